"""Inpainting against diffusers' StableDiffusionInpaintPipeline: an inpainting U-Net (9 input channels: latents,
mask, masked-image latents) and a plain one (4: the known region put back after every step), strengths, schedulers
(a stochastic one draws from the generator after the encodings, so the draws' order is checked too), PIL and
tensor inputs; and the errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline, LatentDiffusionPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inpainting_folder(tmp_path_factory, tiny_folders):
    from tiny import diffusers_pipeline

    folder = tmp_path_factory.mktemp("inpaint") / "pipe"
    diffusers_pipeline(tiny_folders[0] / "tokenizer", pipeline_cls="StableDiffusionInpaintPipeline",
                       in_channels=9).save_pretrained(folder, safe_serialization=True)
    return folder


IMAGE = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
MASK = torch.zeros(1, 1, 16, 16)
MASK[..., 4:12, 6:16] = 1.0


def against_diffusers(folder, scheduler="DDIMScheduler", image=IMAGE, mask=MASK, **kwargs):
    import diffusers

    from latentdiff import schedulers

    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionInpaintPipeline.from_pretrained(folder)
    ref.scheduler = getattr(diffusers, scheduler).from_config(dict(ref.scheduler.config))
    ours.scheduler = getattr(schedulers, scheduler).from_config(dict(ours.scheduler.config))
    kwargs = dict(guidance_scale=5.0, output_type="np", num_inference_steps=4, **kwargs)
    expected = ref("a red circle", image=image, mask_image=mask, generator=torch.Generator().manual_seed(0),
                   **kwargs).images
    got = ours("a red circle", image, mask, generator=torch.Generator().manual_seed(0), progress=False,
               **kwargs).images
    return got, expected


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_unet_matches_diffusers(inpainting_folder, strength):
    got, expected = against_diffusers(inpainting_folder, strength=strength)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)


def test_saved_inpainting_folder_loads_as_diffusers_inpainting(inpainting_folder, tmp_path):
    import diffusers

    LatentDiffusionInpaintPipeline.from_pretrained(inpainting_folder).save_pretrained(tmp_path / "saved")
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.unet.config.in_channels == 9


@pytest.mark.parametrize("strength,scheduler", [(1.0, "DDIMScheduler"), (0.6, "DDIMScheduler"),
                                                (1.0, "EulerAncestralDiscreteScheduler")])
def test_plain_unet_matches_diffusers(tiny_folders, strength, scheduler):
    got, expected = against_diffusers(tiny_folders[1], scheduler, strength=strength)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)


def test_pil_inputs_and_what_is_kept(tiny_folders):
    pixels = ((IMAGE[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    image, mask = Image.fromarray(pixels), Image.fromarray((MASK[0, 0].numpy() * 255).astype(np.uint8))
    got, expected = against_diffusers(tiny_folders[1], image=image, mask=mask)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    # with the plain U-Net the final latents are the image's (its posterior sample, the seed's first draw) where
    # the mask keeps it, and new where it repaints
    pipe = LatentDiffusionInpaintPipeline.from_pretrained(tiny_folders[1])
    latents = pipe("x", image, mask, num_inference_steps=3, output_type="latent", progress=False,
                   generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        z0 = pipe._encode_sample(pipe.preprocess(image), [torch.Generator().manual_seed(0)])
    kept = 1 - torch.nn.functional.interpolate(MASK, size=(8, 8))
    assert (latents - z0).abs().mul(kept).max() < 1e-6 and (latents - z0).abs().mul(1 - kept).max() > 1e-2


def test_errors(tiny_folders, inpainting_folder):
    pipe = LatentDiffusionInpaintPipeline.from_pretrained(tiny_folders[1])
    with pytest.raises(ValueError, match="needs mask_image"):
        pipe("x", IMAGE)
    with pytest.raises(ValueError, match="mask is 8x8 but the image 16x16"):
        pipe("x", IMAGE, torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        pipe("x", IMAGE, MASK * 255)
    with pytest.raises(ValueError, match="strength 1 only"):
        pipe("x", IMAGE, MASK, strength=0.5, latents=torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="got 3 masks for 2 prompts"):
        pipe(["x", "y"], IMAGE, MASK.repeat(3, 1, 1, 1))
    # one mask per prompt, two images each: each image repaints its prompt's region (the same as alone)
    masks = torch.stack([MASK[0], 1 - MASK[0]])
    both = pipe(["x", "y"], IMAGE, masks, num_images_per_prompt=2, num_inference_steps=2, output_type="latent",
                progress=False, generator=torch.Generator().manual_seed(0)).images
    alone = pipe("y", IMAGE, masks[1:], num_images_per_prompt=2, num_inference_steps=2, output_type="latent",
                 progress=False, generator=[torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)]).images
    torch.testing.assert_close(both[2:], alone, rtol=0, atol=1e-5)
    text_to_image = LatentDiffusionPipeline.from_pretrained(inpainting_folder)
    with pytest.raises(ValueError, match="inpainting U-Net.*LatentDiffusionInpaintPipeline"):
        text_to_image("x", num_inference_steps=1)
    with pytest.raises(ValueError, match="inpainting U-Net.*LatentDiffusionInpaintPipeline"):
        LatentDiffusionImg2ImgPipeline.from_pipe(text_to_image)("x", IMAGE)


def test_inpainting_single_file(inpainting_folder, tiny_folders, tmp_path):
    """An SD 1.x inpainting checkpoint in the original single-file layout (9-channel conv_in) loads, into the
    inpainting pipeline, with the folder's weights, though the architecture folder is a plain U-Net's (as
    pipelines/sd-v1-5, the default, is)."""
    from latentdiff.layout import save_single_file

    folder = LatentDiffusionInpaintPipeline.from_pretrained(inpainting_folder)
    save_single_file(folder.components, tmp_path / "inpaint.safetensors")
    single = LatentDiffusionInpaintPipeline.from_single_file(tmp_path / "inpaint.safetensors",
                                                             config=tiny_folders[1])
    assert single.unet.config.in_channels == 9
    for a, b in zip(folder.unet.state_dict().values(), single.unet.state_dict().values()):
        assert torch.equal(a, b)
