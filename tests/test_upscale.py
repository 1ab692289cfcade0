"""The SD 2.x x4 upscaler: a U-Net with class embeddings (the noise level) and cross-attention-only stages, and
LatentDiffusionUpscalePipeline, against diffusers' UNet2DConditionModel and StableDiffusionUpscalePipeline with the
same tiny random weights; folders both ways; errors."""
import logging

import numpy as np
import pytest
import torch
from tiny import TINY_TEXT, perturb, randomized

from latentdiff import LatentDiffusionPipeline, LatentDiffusionUpscalePipeline
from latentdiff.models.unet import UNet2DConditionModel, UNetConfig

logging.getLogger("diffusers").setLevel(logging.ERROR)
pytestmark = pytest.mark.usefixtures("one_thread")

UPSCALER_UNET = dict(  # stabilityai/stable-diffusion-x4-upscaler's structure at tiny widths
    block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=8, in_channels=7, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=8, num_class_embeds=100, only_cross_attention=[True, True, False],
    use_linear_projection=True,
)
KWARGS = dict(num_inference_steps=4, guidance_scale=6.0, noise_level=30, output_type="np")


def low_res(batch: int = 1, seed: int = 5) -> torch.Tensor:
    """A small image in [-1, 1], as our pipelines take tensors."""
    return torch.rand(batch, 3, 12, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def for_diffusers(image: torch.Tensor) -> torch.Tensor:
    """The same image in [0, 1], as diffusers' image processor takes tensors (it maps them to [-1, 1])."""
    return (image + 1) / 2


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    """diffusers' StableDiffusionUpscalePipeline with tiny random parts (a 3-level VAE: 4x), saved: (pipeline,
    folder)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from latentdiff.models.text import CLIPTokenizer as Tokenizer

    root = tmp_path_factory.mktemp("upscaler")
    Tokenizer(pad_token="!").save_pretrained(root / "tok")
    torch.manual_seed(0)
    unet = randomized(diffusers.UNet2DConditionModel(**UPSCALER_UNET), 1, 0.05)
    vae = perturb(diffusers.AutoencoderKL(
        block_out_channels=(16, 32, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1,
        scaling_factor=0.08333), 2).eval()
    text = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, "hidden_act": "gelu"})).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                                        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1)
    low = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(root / "tok"), unet=unet,
        low_res_scheduler=low, scheduler=scheduler, max_noise_level=100)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "diffusers", safe_serialization=True)
    return pipe, root / "diffusers"


@torch.no_grad()
def test_unet_class_labels_and_cross_attention_only_stages(upscaler):
    """Our U-Net of the upscaler's config: diffusers' output with the same weights, class labels one per sample or
    one for all, k contexts per sample; the labels are required, checked and refused where there is no embedding."""
    ref = upscaler[0].unet
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    block = ours.down_blocks[1].attentions[0].transformer_blocks[0]
    assert block.only_cross and block.attn1.to_k.in_features == 32 and ours.class_embedding.num_embeddings == 100
    assert not ours.mid_block.attentions[0].transformer_blocks[0].only_cross  # (as diffusers' mid block)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 7, 12, 20, generator=g), torch.randn(2, 5, 32, generator=g)
    t, labels = torch.tensor([500, 20]), torch.tensor([20, 3])
    expected = ref(x, t, ctx, class_labels=labels).sample
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(ours(x, t, ctx, class_labels=labels), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(x, t, ctx, labels), expected, atol=1e-5, rtol=0)  # (positional, as diffusers)
    same = ref(x, t, ctx, class_labels=torch.tensor([7, 7])).sample
    torch.testing.assert_close(ours(x, t, ctx, class_labels=torch.tensor([7])), same, atol=1e-5, rtol=0)
    contexts = torch.cat([ctx, ctx * 0.5])
    shared = ref(torch.cat([x, x]), torch.cat([t, t]), contexts, class_labels=torch.cat([labels, labels])).sample
    torch.testing.assert_close(ours(x, t, contexts, class_labels=labels), shared, atol=1e-5, rtol=0)
    labels_once = torch.tensor([7])
    ours(x, t, ctx, class_labels=labels_once)  # its range read once (a pipeline's steps pass the same tensor) ...
    from test_pipeline import HostReads

    with HostReads() as mode:
        ours(x, t, ctx, class_labels=labels_once)
    assert mode.count == 0
    labels_once[0] = 100  # ... and again once it changed
    with pytest.raises(ValueError, match=r"in \[0, 100\)"):
        ours(x, t, ctx, class_labels=labels_once)
    for bad, match in ((None, "embeds class labels .*pass class_labels"), (torch.tensor([1.0, 2.0]), "integers"),
                       (torch.tensor([0, 100]), r"in \[0, 100\)"), (torch.tensor([1, 2, 3]), "3 entries")):
        with pytest.raises(ValueError, match=match):
            ours(x, t, ctx, class_labels=bad)
    plain = UNet2DConditionModel(UNetConfig(block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=8,
                                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                            attention_head_dim=2, in_channels=4))
    with pytest.raises(ValueError, match="no class embedding"):
        plain(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 3, 32), class_labels=torch.tensor([1]))
    for key, value, match in (("num_class_embeds", 0, "num_class_embeds"),
                              ("only_cross_attention", (True,), "only_cross_attention")):
        with pytest.raises(ValueError, match=match):
            UNetConfig.from_dict({**dict(ref.config), key: value})


def test_same_image_as_diffusers_and_folders_both_ways(upscaler, tmp_path):
    """From diffusers' folder: diffusers' images (one prompt; two prompts, an image each, a generator each); the
    folder we save loads in diffusers to the same images; optimize_for_inference keeps them."""
    import diffusers

    ref, folder = upscaler
    ours = LatentDiffusionUpscalePipeline.from_pretrained(folder)
    assert ours.max_noise_level == 100 and type(ours.low_res_scheduler).__name__ == "DDPMScheduler"
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    expected = ref("a red circle", image=for_diffusers(low_res()), generator=gens(1), **KWARGS).images
    got = ours("a red circle", image=low_res(), generator=gens(1), progress=False, **KWARGS).images
    assert got.shape == (1, 48, 64, 3) and expected.std() > 0.05
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    prompts = ["a red circle", "a blue star"]
    expected2 = ref(prompts, image=for_diffusers(low_res(2)), generator=gens(1, 2), negative_prompt=["", "blurry"],
                    **KWARGS).images
    got2 = ours(prompts, image=low_res(2), generator=gens(1, 2), negative_prompt=["", "blurry"], progress=False,
                **KWARGS).images
    np.testing.assert_allclose(got2, expected2, atol=2e-5, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "ours")
    back.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(back("a red circle", image=for_diffusers(low_res()), generator=gens(1), **KWARGS).images,
                               expected, atol=1e-6, rtol=0)
    again = LatentDiffusionUpscalePipeline.from_pretrained(tmp_path / "ours", max_noise_level=50)
    assert again.max_noise_level == 50
    ours.optimize_for_inference()
    fast = ours("a red circle", image=low_res(), generator=gens(1), progress=False, **KWARGS).images
    np.testing.assert_allclose(fast, expected, atol=1e-4, rtol=0)


@pytest.mark.slow  # (a torch.compile graph of ~40 s on a 2-core CPU; make test-slow)
def test_compiled_upscaler_same_images(upscaler):
    """pipe.compile() with the noise level as the U-Net's class labels: the eager images, for two noise levels (a
    new class label value reuses the graph)."""
    from torch._dynamo.utils import counters

    _, folder = upscaler
    pipe = LatentDiffusionUpscalePipeline.from_pretrained(folder)

    def images(level):
        return pipe("a red circle", image=low_res(), generator=torch.Generator().manual_seed(1), progress=False,
                    **{**KWARGS, "noise_level": level}).images

    eager = [images(level) for level in (20, 60)]
    pipe.compile(max_autotune=False)
    np.testing.assert_allclose(images(20), eager[0], atol=1e-4, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    np.testing.assert_allclose(images(60), eager[1], atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs
    assert np.abs(eager[0] - eager[1]).max() > 1e-3  # (10x the tolerance)


def test_images_per_prompt_and_errors(upscaler, tiny_folders):
    """Several images per prompt: each from its own generator (augmentation noise, then latents), as if alone;
    bad noise levels, image sizes and components are named."""
    _, folder = upscaler
    pipe = LatentDiffusionUpscalePipeline.from_pretrained(folder)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    two = pipe("a red circle", image=low_res(), num_images_per_prompt=2, generator=gens(1, 2), progress=False,
               **KWARGS).images
    alone = pipe("a red circle", image=low_res(), generator=gens(2), progress=False, **KWARGS).images
    np.testing.assert_allclose(two[1:], alone, atol=1e-5, rtol=0)
    assert np.abs(two[0] - two[1]).max() > 1e-2
    for level in (101, -1, 2.5):
        with pytest.raises(ValueError, match=r"noise_level=.* must be an integer in \[0, 100\]"):
            pipe("x", image=low_res(), **{**KWARGS, "noise_level": level})
    with pytest.raises(ValueError, match="sides must be multiples of 4.*resize it to 12x8"):
        pipe("x", image=low_res()[..., :10, :13], **KWARGS)
    with pytest.raises(ValueError, match="needs an image"):
        pipe("x", **KWARGS)
    with pytest.raises(ValueError, match="has no low_res_scheduler"):  # (a text-to-image folder)
        LatentDiffusionUpscalePipeline.from_pretrained(tiny_folders[1])
    with pytest.warns(UserWarning, match="scaling_factor is 0.18215.*0.08333"):
        vae = type(pipe.vae)(pipe.vae.config.replace(scaling_factor=0.18215))
        LatentDiffusionUpscalePipeline(pipe.tokenizer, pipe.text_encoder, pipe.unet, vae, pipe.scheduler,
                                       pipe.low_res_scheduler)
    base = LatentDiffusionPipeline.from_pipe(pipe)
    assert "low_res_scheduler" not in base.components
    assert LatentDiffusionUpscalePipeline.from_pipe(pipe).max_noise_level == 100


def test_command_line(upscaler, tiny_folders, tmp_path, capsys):
    """`latentdiff generate --model UPSCALER --image small.png --noise-level N`: the Python API's image at 4x, which
    --from-png reproduces; --noise-level is refused without --image and with another model."""
    from PIL import Image
    from test_cli import run

    from latentdiff.schedulers import scheduler_from_name

    folder = upscaler[1]
    small = Image.fromarray(((low_res()[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    small.save(tmp_path / "small.png")
    code, out, err = run(["generate", "a red circle", "--model", folder, "--image", tmp_path / "small.png",
                          "--noise-level", 30, "--steps", 3, "--guidance", 6, "--seed", 4, "--out", tmp_path / "o"],
                         capsys)
    assert code == 0, err
    made = np.asarray(Image.open(out.strip()))
    pipe = LatentDiffusionUpscalePipeline.from_pretrained(folder)
    pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
    expected = pipe("a red circle", image=small, noise_level=30, num_inference_steps=3, guidance_scale=6,
                    generator=torch.Generator().manual_seed(4), progress=False).images[0]
    assert made.shape == (48, 64, 3) and np.array_equal(made, np.asarray(expected))
    code, out, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "again"], capsys)
    assert code == 0 and np.array_equal(np.asarray(Image.open(out.strip())), made)
    code, _, err = run(["generate", "x", "--model", folder, "--noise-level", 30], capsys)
    assert code == 2 and "give --image PATH" in err
    code, _, err = run(["generate", "x", "--model", tiny_folders[1], "--image", tmp_path / "small.png",
                        "--noise-level", 30, "--out", tmp_path / "p"], capsys)
    assert code == 2 and "--noise-level is for an x4 upscaler model" in err


def test_single_file_needs_the_low_res_scheduler(tiny_folders, tmp_path):
    """A single file holds no noise-augmentation scheduler: the error names it and how to pass one."""
    from latentdiff.layout import save_single_file

    save_single_file(LatentDiffusionPipeline.from_pretrained(tiny_folders[1]).components, tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match=r"holds no low_res_scheduler: pass it, e\.g\. low_res_scheduler="
                                         r"DDPMScheduler\.from_pretrained\(folder, subfolder='low_res_scheduler'\)"):
        LatentDiffusionUpscalePipeline.from_single_file(tmp_path / "sd.safetensors", config=tiny_folders[1])
