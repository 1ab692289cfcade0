"""IP-Adapter against diffusers: a random adapter for the tiny pipeline (its layers numbered in diffusers' order of
attention processors) with a tiny CLIP image encoder; the same images from an image prompt or from its embeddings,
the U-Net's added_cond_kwargs, scales, unloading; and the errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import LatentDiffusionPipeline
from tiny import generate

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def pair(tiny_folders, ip_folder, scale=0.7):
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folders[0], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(ip_folder), subfolder="", weight_name="ip.safetensors")
    ref.set_ip_adapter_scale(scale)
    ours = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
    ours.load_ip_adapter(ip_folder, weight_name="ip.safetensors")
    ours.set_ip_adapter_scale(scale)
    return ours, ref


def test_image_prompt_matches_diffusers(tiny_folders, ip_folder):
    ours, ref = pair(tiny_folders, ip_folder)
    got, expected = generate(ours, ip_adapter_image=IMAGE), generate(ref, ip_adapter_image=IMAGE)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    # from the embeddings, as diffusers takes them ([uncond; cond] x 1 image x width); several images per prompt
    positive, negative = ours.encode_image(IMAGE)
    embeds = [torch.cat([negative, positive])[:, None]]
    np.testing.assert_allclose(generate(ours, ip_adapter_image_embeds=embeds), got, atol=1e-6)
    two = dict(ip_adapter_image=IMAGE, num_images_per_prompt=2)
    np.testing.assert_allclose(generate(ours, images=2, **two), generate(ref, images=2, **two), atol=2e-4, rtol=0)
    plain = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
    assert np.abs(got - generate(plain)).max() > 1e-3  # the image prompt changed the image


def test_unet_takes_image_embeds_as_diffusers(tiny_folders, ip_folder):
    ours, ref = pair(tiny_folders, ip_folder, scale=1.0)
    g = torch.Generator().manual_seed(0)
    x, ctx, embeds = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.randn(2, 1, 24)
    with torch.no_grad():
        got = ours.unet(x, 500, ctx, added_cond_kwargs={"image_embeds": [embeds]})
        expected = ref.unet(x, 500, ctx, added_cond_kwargs={"image_embeds": [embeds]}).sample
        shared = ours.unet(x[:1], 500, ctx, added_cond_kwargs={"image_embeds": [embeds]})  # 2 contexts, 1 sample
        repeated = ref.unet(x[:1].repeat(2, 1, 1, 1), 500, ctx, added_cond_kwargs={"image_embeds": [embeds]}).sample
    assert (got - expected).abs().max() < 1e-5 and (shared - repeated).abs().max() < 1e-5
    with pytest.raises(ValueError, match="an IP-Adapter is loaded: pass its image embeddings"):
        ours.unet(x, 500, ctx)


def test_scale_and_unload(tiny_folders, ip_folder):
    """Scale 0 draws the plain image; a new scale applies at once (no stale cached keys); unloading restores the
    plain pipeline and its U-Net's state dict was never touched."""
    ours, _ = pair(tiny_folders, ip_folder)
    plain_pipe = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
    plain = generate(plain_pipe)
    assert set(ours.unet.state_dict()) == set(plain_pipe.unet.state_dict())
    first = generate(ours, ip_adapter_image=IMAGE)
    ours.set_ip_adapter_scale(0.0)
    np.testing.assert_allclose(generate(ours, ip_adapter_image=IMAGE), plain, atol=1e-6)
    ours.set_ip_adapter_scale(0.7)
    np.testing.assert_allclose(generate(ours, ip_adapter_image=IMAGE), first, atol=1e-6)
    ours.unload_ip_adapter()
    np.testing.assert_allclose(generate(ours), plain, atol=1e-6)


def test_errors(tiny_folders, ip_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    ours = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
    with pytest.raises(ValueError, match="no IP-Adapter is loaded: load_ip_adapter"):
        generate(ours, ip_adapter_image=IMAGE)
    ours.load_ip_adapter(ip_folder, weight_name="ip.safetensors")
    with pytest.raises(ValueError, match="an IP-Adapter is loaded: pass ip_adapter_image="):
        generate(ours)
    state = load_file(ip_folder / "ip.safetensors")
    face = {k: v for k, v in state.items() if not k.startswith("image_proj.")}
    face["image_proj.proj.3.weight"] = torch.zeros(4, 4)
    save_file(face, tmp_path / "face.safetensors")
    with pytest.raises(ValueError, match="IP-Adapter Full Face is not supported"):
        ours.load_ip_adapter(tmp_path / "face.safetensors", image_encoder_folder=None)
    wide = {**state, "image_proj.proj.weight": torch.zeros(4 * 48, 24), "image_proj.proj.bias": torch.zeros(4 * 48)}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="tokens of width 48 but the U-Net's cross-attention reads 32"):
        ours.load_ip_adapter(tmp_path / "wide.safetensors", image_encoder_folder=None)
    short = {k: v for k, v in state.items() if not k.startswith("ip_adapter.5.")}
    save_file(short, tmp_path / "short.safetensors")
    with pytest.raises(ValueError, match=r"no ip_adapter\.5\.to_k_ip\.weight"):
        ours.load_ip_adapter(tmp_path / "short.safetensors", image_encoder_folder=None)
    fresh = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
    fresh.load_ip_adapter(ip_folder, weight_name="ip.safetensors", image_encoder_folder=None)
    with pytest.raises(ValueError, match="no IP-Adapter image encoder is loaded"):
        generate(fresh, ip_adapter_image=IMAGE)


def test_with_img2img_controlnet_and_optimized_layers(tiny_folders, ip_folder, tmp_path):
    """The image prompt in img2img and beside a ControlNet, as diffusers' pipelines of those tasks take it; the
    U-Net optimized for inference (packed layers, AMX attention where the CPU has it) gives the same images."""
    import diffusers

    from latentdiff import ControlNetModel, LatentDiffusionControlNetPipeline, LatentDiffusionImg2ImgPipeline

    ours, ref = pair(tiny_folders, ip_folder)
    start = Image.fromarray(np.random.default_rng(5).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    img2img = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(ref)
    kwargs = dict(image=start, strength=0.7, ip_adapter_image=IMAGE)
    np.testing.assert_allclose(generate(LatentDiffusionImg2ImgPipeline.from_pipe(ours), **kwargs),
                               generate(img2img, **kwargs), atol=2e-4, rtol=0)

    plain_unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_folders[0] / "unet")
    net = diffusers.ControlNetModel.from_unet(plain_unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    net.save_pretrained(tmp_path / "cn")
    controlled_ref = diffusers.StableDiffusionControlNetPipeline.from_pipe(ref, controlnet=net)
    controlled = LatentDiffusionControlNetPipeline.from_pipe(
        ours, controlnet=ControlNetModel.from_pretrained(tmp_path / "cn"))
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    kwargs = dict(image=control, ip_adapter_image=IMAGE)
    np.testing.assert_allclose(generate(controlled, **kwargs), generate(controlled_ref, **kwargs), atol=2e-4,
                               rtol=0)
    if torch.backends.mkldnn.is_available():
        expected = generate(ours, ip_adapter_image=IMAGE)
        ours.optimize_for_inference()
        np.testing.assert_allclose(generate(ours, ip_adapter_image=IMAGE), expected, atol=1e-4)


def test_image_encoder_given_to_from_pretrained(tiny_folders, ip_folder):
    """As diffusers: an image encoder passed to from_pretrained serves an adapter loaded without one, and from_pipe
    carries it over."""
    from transformers import CLIPVisionModelWithProjection

    from latentdiff import LatentDiffusionImg2ImgPipeline

    encoder = CLIPVisionModelWithProjection.from_pretrained(ip_folder / "image_encoder")
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_folders[0], image_encoder=encoder)
    pipe.load_ip_adapter(ip_folder, weight_name="ip.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    assert pipe.image_encoder is encoder
    assert LatentDiffusionImg2ImgPipeline.from_pipe(pipe).image_encoder is encoder
    ours, _ = pair(tiny_folders, ip_folder)
    np.testing.assert_allclose(generate(pipe, ip_adapter_image=IMAGE), generate(ours, ip_adapter_image=IMAGE),
                               atol=1e-6)


def test_per_layer_scales_as_diffusers(tiny_folders, ip_folder):
    """set_ip_adapter_scale's per-stage form (InstantStyle): the tiny U-Net has attention in down block 0 (2
    transformers), up block 1 (3) and the middle (1); what the dict leaves out is 0, as in diffusers."""
    ours, ref = pair(tiny_folders, ip_folder)
    scale = {"down": {"block_0": [0.0, 1.0]}, "up": {"block_1": [0.5, 0.0, 1.0]}}
    ours.set_ip_adapter_scale(scale)
    ref.set_ip_adapter_scale(scale)
    got = generate(ours, ip_adapter_image=IMAGE)
    np.testing.assert_allclose(got, generate(ref, ip_adapter_image=IMAGE), atol=2e-4, rtol=0)
    ours.set_ip_adapter_scale(0.7)
    assert np.abs(generate(ours, ip_adapter_image=IMAGE) - got).max() > 1e-3
    with pytest.raises(ValueError, match=r"down \['block_1'\] name no stage with attention"):
        ours.set_ip_adapter_scale({"down": {"block_1": 1.0}})
    with pytest.raises(ValueError, match="up block_1 has 3 transformers; got 2 scales"):
        ours.set_ip_adapter_scale({"up": {"block_1": [1.0, 1.0]}})


def plus_adapter(ip_folder, folder, name: str = "plus.safetensors", seed: int = 7) -> int:
    """An IP-Adapter Plus (a resampler of depth 4 over the image encoder's penultimate hidden states, 4 queries of
    width 128 in two 64-wide heads) in the published layout (layers.i.0.to_kv, layers.i.1.{0,1,3}, which diffusers
    converts on load), with ip_folder's attention layers, written to folder/name beside a copy of its image encoder.
    Returns its number of queries."""
    import shutil

    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    hidden, queries, width, encoder_width = 128, 4, 32, 32
    proj = {"latents": rand(1, queries, hidden), "proj_in.weight": rand(hidden, encoder_width),
            "proj_in.bias": rand(hidden), "proj_out.weight": rand(width, hidden), "proj_out.bias": rand(width),
            "norm_out.weight": 1 + rand(width), "norm_out.bias": rand(width)}
    for i in range(4):
        block = {"0.norm1.weight": 1 + rand(hidden), "0.norm1.bias": rand(hidden),
                 "0.norm2.weight": 1 + rand(hidden), "0.norm2.bias": rand(hidden),
                 "0.to_q.weight": rand(hidden, hidden), "0.to_kv.weight": rand(2 * hidden, hidden),
                 "0.to_out.weight": rand(hidden, hidden), "1.0.weight": 1 + rand(hidden), "1.0.bias": rand(hidden),
                 "1.1.weight": rand(4 * hidden, hidden), "1.3.weight": rand(hidden, 4 * hidden)}
        proj.update({f"layers.{i}.{k}": v for k, v in block.items()})
    attention = {k: v for k, v in load_file(ip_folder / "ip.safetensors").items() if k.startswith("ip_adapter.")}
    save_file({**{f"image_proj.{k}": v for k, v in proj.items()}, **attention}, folder / name)
    if not (folder / "image_encoder").exists():
        shutil.copytree(ip_folder / "image_encoder", folder / "image_encoder")
    return queries


def test_plus_matches_diffusers(tiny_folders, ip_folder, tmp_path):
    """IP-Adapter Plus: the same images."""
    import diffusers

    queries = plus_adapter(ip_folder, tmp_path)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folders[0], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(tmp_path), subfolder="", weight_name="plus.safetensors")
    ref.set_ip_adapter_scale(0.8)
    ours = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
    ours.load_ip_adapter(tmp_path, weight_name="plus.safetensors")
    ours.set_ip_adapter_scale(0.8)
    assert ours.unet._ip.adapters[0].plus and ours.unet._ip.adapters[0].tokens == queries
    got = generate(ours, ip_adapter_image=IMAGE)
    np.testing.assert_allclose(got, generate(ref, ip_adapter_image=IMAGE), atol=2e-4, rtol=0)
    ours.set_ip_adapter_scale(0.0)
    assert np.abs(generate(ours, ip_adapter_image=IMAGE) - got).max() > 1e-3


def test_several_adapters_and_images_match_diffusers(tiny_folders, ip_folder, tmp_path):
    """Two adapters loaded at once (the original and a Plus), an image each, a scale each (one per-stage); one
    adapter given two images (attended to as one sequence); the embeddings path; the errors."""
    import shutil

    import diffusers

    shutil.copy(ip_folder / "ip.safetensors", tmp_path / "ip.safetensors")
    plus_adapter(ip_folder, tmp_path)
    names = ["ip.safetensors", "plus.safetensors"]
    other = Image.fromarray(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folders[0], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(str(tmp_path), subfolder="", weight_name=names)
    ours = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
    ours.load_ip_adapter(tmp_path, weight_name=names)
    scales = [0.6, {"up": {"block_1": [0.5, 1.0, 0.0]}}]
    ref.set_ip_adapter_scale(scales)
    ours.set_ip_adapter_scale(scales)
    both = dict(ip_adapter_image=[IMAGE, other])
    got = generate(ours, **both)
    np.testing.assert_allclose(got, generate(ref, **both), atol=2e-4, rtol=0)
    ours.set_ip_adapter_scale([0.6, 0.0])
    alone = generate(ours, **both)
    assert np.abs(alone - got).max() > 1e-3
    # the second adapter at scale 0 is skipped: as the first adapter alone
    first = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
    first.load_ip_adapter(tmp_path, weight_name="ip.safetensors")
    first.set_ip_adapter_scale(0.6)
    np.testing.assert_allclose(generate(first, ip_adapter_image=IMAGE), alone, atol=1e-6, rtol=0)
    # one adapter, two images seen together
    ref.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors")
    ref.set_ip_adapter_scale(0.7)
    first.set_ip_adapter_scale(0.7)
    pair_of = dict(ip_adapter_image=[[IMAGE, other]])
    np.testing.assert_allclose(generate(first, **pair_of), generate(ref, **pair_of), atol=2e-4, rtol=0)
    # from embeddings, one tensor per adapter
    embeds = []
    for state, image in zip(ours.unet._ip.adapters, (IMAGE, other)):
        positive, negative = ours.encode_image(image, output_hidden_states=state.plus)
        embeds.append(torch.cat([negative, positive])[:, None])
    ours.set_ip_adapter_scale(scales)
    np.testing.assert_allclose(generate(ours, ip_adapter_image_embeds=embeds), got, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="ip_adapter_image: 1 entries for 2 loaded IP-Adapters"):
        ours("a red circle", ip_adapter_image=IMAGE, num_inference_steps=2)
    with pytest.raises(ValueError, match="3 scales for 2 loaded IP-Adapters"):
        ours.set_ip_adapter_scale([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="2 subfolder for 3 adapters"):
        ours.load_ip_adapter(tmp_path, subfolder=["", ""], weight_name=names + names[:1])


def test_with_a_call_time_lora_scale(tiny_folders, ip_folder):
    """A LoRA scale given at call time (cross_attention_kwargs) with an IP-Adapter: the image tokens are appended
    once, as with the same scale set by set_adapters."""
    ours, _ = pair(tiny_folders, ip_folder)
    g = torch.Generator().manual_seed(9)
    state = {}
    for path, layer in ours.unet.named_modules():
        if path.endswith(("attn2.to_q", "attn1.to_v")):
            state[f"unet.{path}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g)
            state[f"unet.{path}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g)
    ours.load_lora_weights(state, adapter_name="style")
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    added = {"image_embeds": [torch.randn(2, 1, 24, generator=g)]}
    with torch.no_grad():
        at_call = ours.unet(x, 500, ctx, added_cond_kwargs=added, cross_attention_kwargs={"scale": 0.5})
        ours.set_adapters("style", 0.5)
        expected = ours.unet(x, 500, ctx, added_cond_kwargs=added)
    assert (at_call - expected).abs().max() < 1e-5


def test_masks_match_diffusers(tiny_folders, ip_folder, tmp_path):
    """IP-Adapter masks (cross_attention_kwargs={"ip_adapter_masks": ...}, as diffusers' IPAdapterMaskProcessor
    makes them): one adapter given two images, each confined to its half of the image; and two adapters, one of
    them masked."""
    import shutil

    from diffusers.image_processor import IPAdapterMaskProcessor

    other = Image.fromarray(np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    left, right = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    left[:, :8], right[:, 8:] = 255, 255
    masks = IPAdapterMaskProcessor().preprocess([Image.fromarray(left), Image.fromarray(right)], height=16, width=16)
    two_images = [masks.reshape(1, 2, 16, 16)]
    ours, ref = pair(tiny_folders, ip_folder)
    kwargs = dict(ip_adapter_image=[[IMAGE, other]], cross_attention_kwargs={"ip_adapter_masks": two_images})
    got = generate(ours, **kwargs)
    np.testing.assert_allclose(got, generate(ref, **kwargs), atol=2e-4, rtol=0)
    assert np.abs(got - generate(ours, ip_adapter_image=[[IMAGE, other]])).max() > 1e-3  # (the masks count)
    # two adapters, the second one masked
    shutil.copy(ip_folder / "ip.safetensors", tmp_path / "ip.safetensors")
    plus_adapter(ip_folder, tmp_path)
    names = ["ip.safetensors", "plus.safetensors"]
    ref.load_ip_adapter(str(tmp_path), subfolder="", weight_name=names)
    ours.load_ip_adapter(tmp_path, weight_name=names)
    for pipe in (ours, ref):
        pipe.set_ip_adapter_scale([0.6, 0.8])
    one_mask = masks[:1].reshape(1, 1, 16, 16)
    kwargs = dict(ip_adapter_image=[IMAGE, other], cross_attention_kwargs={"ip_adapter_masks": [None, one_mask]})
    np.testing.assert_allclose(generate(ours, **kwargs), generate(ref, **kwargs), atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="ip_adapter_masks: 1 entries for 2 loaded IP-Adapters"):
        generate(ours, ip_adapter_image=[IMAGE, other], cross_attention_kwargs={"ip_adapter_masks": [one_mask]})
    with pytest.raises(ValueError, match="2 masks for an adapter given 1 images"):
        generate(ours, ip_adapter_image=[IMAGE, other],
                 cross_attention_kwargs={"ip_adapter_masks": [None, masks.reshape(1, 2, 16, 16)]})


@pytest.mark.slow  # (an AOTInductor compile of ~2 minutes on a 2-core CPU; make test-slow)
def test_compile_cache_runs_the_ip_adapter(tiny_folders, ip_folder, tmp_path):
    """compile(cache_dir=): the U-Net's calls with image tokens run from a package, with the eager images; a
    pipeline loaded anew, that has made no call yet (as in a new process), loads that package."""
    def loaded():
        pipe = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
        pipe.load_ip_adapter(ip_folder, weight_name="ip.safetensors")
        pipe.set_ip_adapter_scale(0.7)
        return pipe

    pipe = loaded()
    eager = generate(pipe, ip_adapter_image=IMAGE)
    for compiled, loads in [(1, 0), (0, 1)]:
        pipe.compile(max_autotune=False, cache_dir=tmp_path)
        np.testing.assert_allclose(generate(pipe, ip_adapter_image=IMAGE), eager, atol=1e-4, rtol=0)
        model = pipe._compiled[1]
        assert (len(model.compiled_packages), len(model.loaded_packages)) == (compiled, loads)
        pipe = loaded()
