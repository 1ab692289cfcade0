"""Perturbed-attention guidance against diffusers' StableDiffusionPAGPipeline (same weights, same latents)."""
import numpy as np
import pytest
import torch

from latentdiff import LatentDiffusionPAGPipeline, LatentDiffusionPipeline
from tiny import generate

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(folder, layers):
    import diffusers

    ref = diffusers.StableDiffusionPAGPipeline.from_pretrained(folder, safety_checker=None,
                                                               pag_applied_layers=layers)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("layers, kwargs", [
    ("mid", {}),
    ("mid", {"guidance_scale": 1.0}),  # PAG alone: [cond, cond]
    (["down_blocks.0", "up_blocks.1.attentions.2"], {"pag_scale": 2.0, "negative_prompt": ["blue", "red"]}),
    ("mid", {"pag_adaptive_scale": 0.004, "guidance_rescale": 0.7}),
    ("mid", {"pag_scale": 0.0}),
])
def test_pag_matches_diffusers(tiny_folders, layers, kwargs):
    folder = tiny_folders[0]
    ours = LatentDiffusionPAGPipeline.from_pretrained(folder, pag_applied_layers=layers)
    assert ours.pag_applied_layers == ([layers] if isinstance(layers, str) else layers)
    expected = generate(reference(folder, layers), ["a red circle", "a blue star"], images=2, **kwargs)
    got = generate(ours, ["a red circle", "a blue star"], images=2, **kwargs)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    plain = generate(LatentDiffusionPipeline.from_pipe(ours), ["a red circle", "a blue star"], images=2,
                     **{k: v for k, v in kwargs.items() if not k.startswith("pag")})
    assert (np.abs(got - plain).max() > 1e-3) == (kwargs.get("pag_scale", 3.0) > 0)


@pytest.mark.slow  # (torch.compile graphs of ~40 s each on a 2-core CPU; make test-slow)
def test_compiled_pag_pipeline_same_images(tiny_folders):
    """pipe.compile() under perturbed-attention guidance (three passes per step, the perturbed layers' attention
    replaced): the eager images, with and without classifier-free guidance."""
    pipe = LatentDiffusionPAGPipeline.from_pretrained(tiny_folders[0], pag_applied_layers=["mid"])
    eager = [generate(pipe, guidance_scale=g) for g in (5.0, 1.0)]
    pipe.compile(max_autotune=False)
    for g, expected in zip((5.0, 1.0), eager):
        np.testing.assert_allclose(generate(pipe, guidance_scale=g), expected, atol=2e-4, rtol=0)
    assert np.abs(eager[0] - eager[1]).max() > 1e-3


@pytest.mark.slow  # (two AOTInductor compiles of ~30-60 s each on a 2-core CPU; make test-slow)
def test_compile_cache_keys_the_perturbed_layers(tiny_folders, tmp_path):
    """compile(cache_dir=) under PAG: without classifier-free guidance its batch [cond, cond] is laid out as a plain
    guided call's [uncond, cond], so only the perturbed layers' setting (Attention.perturbed, set for the call)
    tells their packages apart: each pipeline gets its own package and its eager images."""
    pipe = LatentDiffusionPAGPipeline.from_pretrained(tiny_folders[0], pag_applied_layers=["mid"])
    plain = LatentDiffusionPipeline.from_pipe(pipe)
    eager, eager_plain = generate(pipe, guidance_scale=1.0), generate(plain)
    assert np.abs(eager - eager_plain).max() > 1e-3
    for each in (pipe, plain):
        each.compile(max_autotune=False, cache_dir=tmp_path)
    np.testing.assert_allclose(generate(pipe, guidance_scale=1.0), eager, atol=2e-4, rtol=0)
    np.testing.assert_allclose(generate(plain), eager_plain, atol=2e-4, rtol=0)
    assert len(list(tmp_path.glob("*.pt2"))) == 2


def test_perturbed_rows_attend_to_themselves_only():
    """Attention.perturbed = m: the last m samples get to_out(to_v(x)); the others are untouched."""
    from latentdiff.models.attention import Attention

    attn = Attention(16, 2, 8).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        plain = attn(x)
        attn.perturbed = 1
        got = attn(x)
    torch.testing.assert_close(got[:2], plain[:2])
    torch.testing.assert_close(got[2:], attn.to_out[0](attn.to_v(x[2:])))


def test_optimized_pipeline_and_layer_errors(tiny_folders):
    """optimize_for_inference (packed layers adding the residual) gives the same images; entries that find no
    layer, or are not regular expressions, are refused by name."""
    ours = LatentDiffusionPAGPipeline.from_pretrained(tiny_folders[0], pag_applied_layers=["mid", "up_blocks.1"])
    expected = generate(ours)
    ours.optimize_for_inference()
    np.testing.assert_allclose(generate(ours), expected, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="'down_blocks.7' matches no self-attention"):
        ours.set_pag_applied_layers(["mid", "down_blocks.7"])
    with pytest.raises(ValueError, match="is not a regular expression"):
        ours.set_pag_applied_layers("mid(")
    assert ours.pag_applied_layers == ["mid", "up_blocks.1"]
    with pytest.raises(ValueError, match="pag_scale=-1 must be a number >= 0"):
        ours("a red circle", pag_scale=-1)


@pytest.mark.parametrize("task", ["Img2Img", "Inpaint"])
def test_pag_img2img_and_inpainting_match_diffusers(tiny_folders, task):
    """The PAG image-to-image and inpainting pipelines (the image's noised start; inpainting one image per call, as
    diffusers' inpainting encodes one input image for all the images of a prompt with the first generator)."""
    import diffusers
    from PIL import Image

    import latentdiff

    folder = tiny_folders[0]
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8))
    count = 2 if task == "Img2Img" else 1
    kwargs = {"image": image, "strength": 0.7, "pag_scale": 2.0, "num_images_per_prompt": count}
    if task == "Inpaint":
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4:12] = 255
        kwargs["mask_image"] = Image.fromarray(mask)
    ref = getattr(diffusers, f"StableDiffusionPAG{task}Pipeline").from_pretrained(
        folder, safety_checker=None, pag_applied_layers=["mid", "up_blocks.1"])
    ref.set_progress_bar_config(disable=True)
    ours = getattr(latentdiff, f"LatentDiffusionPAG{task}Pipeline").from_pretrained(
        folder, pag_applied_layers=["mid", "up_blocks.1"])
    expected = generate(ref, images=count, **kwargs)
    np.testing.assert_allclose(generate(ours, images=count, **kwargs), expected, atol=2e-4, rtol=0)
    plain = generate(ours, images=count, **{**kwargs, "pag_scale": 0.0})
    assert np.abs(plain - expected).max() > 1e-3


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_pag_with_an_ip_adapter_matches_diffusers(tiny_folders, ip_folder, guidance):
    """The image embeddings follow the batch's layout: [uncond, cond, cond] with guidance, [cond, cond] without."""
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    ref = reference(tiny_folders[0], "mid")
    ref.load_ip_adapter(str(ip_folder), subfolder="", weight_name="ip.safetensors")
    ours = LatentDiffusionPAGPipeline.from_pretrained(tiny_folders[0])
    ours.load_ip_adapter(ip_folder, weight_name="ip.safetensors")
    for pipe in (ref, ours):
        pipe.set_ip_adapter_scale(0.7)
    kwargs = dict(ip_adapter_image=image, guidance_scale=guidance, pag_scale=2.5)
    np.testing.assert_allclose(generate(ours, **kwargs), generate(ref, **kwargs), atol=2e-4, rtol=0)


def test_pag_with_a_controlnet_matches_diffusers(tiny_folders, tmp_path):
    """A ControlNet sees all three passes; the perturbation is the U-Net's alone (text to image and inpainting).
    Guess mode is refused."""
    import diffusers

    from latentdiff import ControlNetModel, LatentDiffusionControlNetPAGPipeline
    from tiny import randomized

    net = diffusers.ControlNetModel.from_unet(diffusers.UNet2DConditionModel.from_pretrained(tiny_folders[0] / "unet"),
                                              conditioning_embedding_out_channels=(8, 16))
    randomized(net, 3).save_pretrained(tmp_path / "cn", safe_serialization=True)
    ref = diffusers.StableDiffusionControlNetPAGPipeline.from_pretrained(
        tiny_folders[0], safety_checker=None, controlnet=diffusers.ControlNetModel.from_pretrained(tmp_path / "cn"),
        pag_applied_layers=["mid"])
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionControlNetPAGPipeline.from_pretrained(
        tiny_folders[0], controlnet=ControlNetModel.from_pretrained(tmp_path / "cn"), pag_applied_layers=["mid"])
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    kwargs = dict(image=control, pag_scale=2.0, controlnet_conditioning_scale=0.8)
    np.testing.assert_allclose(generate(ours, **kwargs), generate(ref, **kwargs), atol=2e-4, rtol=0)
    # inpainting: diffusers' StableDiffusionControlNetPAGInpaintPipeline
    from PIL import Image

    from latentdiff import LatentDiffusionControlNetPAGInpaintPipeline

    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    image = Image.fromarray((np.random.default_rng(2).random((16, 16, 3)) * 255).astype(np.uint8))
    kwargs = dict(image=image, mask_image=Image.fromarray(mask), control_image=control, pag_scale=2.0,
                  strength=0.8)
    ref_inpaint = diffusers.StableDiffusionControlNetPAGInpaintPipeline.from_pipe(ref)
    inpaint = LatentDiffusionControlNetPAGInpaintPipeline.from_pipe(ours)
    np.testing.assert_allclose(generate(inpaint, **kwargs), generate(ref_inpaint, **kwargs), atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="guess mode .* with perturbed-attention guidance is not supported"):
        ours("a red circle", image=control, guess_mode=True, num_inference_steps=2, progress=False)


def test_from_pipe_keeps_the_perturbed_layers(tiny_folders):
    from latentdiff import LatentDiffusionPAGImg2ImgPipeline

    pag = LatentDiffusionPAGPipeline.from_pretrained(tiny_folders[0], pag_applied_layers=["mid", "up_blocks.1"])
    assert LatentDiffusionPAGImg2ImgPipeline.from_pipe(pag).pag_applied_layers == ["mid", "up_blocks.1"]
    assert LatentDiffusionPAGImg2ImgPipeline.from_pipe(pag, pag_applied_layers="mid").pag_applied_layers == ["mid"]
    assert LatentDiffusionPAGPipeline.from_pipe(LatentDiffusionPipeline.from_pipe(pag)).pag_applied_layers == ["mid"]
