"""SD 2's depth-to-image: LatentDiffusionDepth2ImgPipeline against diffusers' StableDiffusionDepth2ImgPipeline with
the same tiny random weights and depth maps; folders both ways; errors."""
import logging

import numpy as np
import pytest
import torch

from latentdiff import LatentDiffusionDepth2ImgPipeline

logging.getLogger("diffusers").setLevel(logging.ERROR)
pytestmark = pytest.mark.usefixtures("one_thread")
KWARGS = dict(num_inference_steps=6, guidance_scale=6.0, strength=0.7, output_type="np")


def photo(batch: int = 1, seed: int = 5) -> torch.Tensor:
    """An image in [0, 1] (diffusers' tensor range; ours takes 2x - 1)."""
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def depth(batch: int = 1, seed: int = 6) -> torch.Tensor:
    return torch.rand(batch, 24, 24, generator=torch.Generator().manual_seed(seed)) * 10 + 1


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    """diffusers' depth-to-image pipeline (a 5-channel tiny U-Net, no depth estimator), saved: (pipeline, folder)."""
    import diffusers
    from tiny import diffusers_pipeline

    from latentdiff.models.text import CLIPTokenizer

    root = tmp_path_factory.mktemp("depth")
    CLIPTokenizer().save_pretrained(root / "tok")
    base = diffusers_pipeline(root / "tok", in_channels=5)
    pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=base.scheduler, depth_estimator=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "diffusers", safe_serialization=True)
    return pipe, root / "diffusers"


def test_same_images_as_diffusers_and_folders_both_ways(depth_model, tmp_path):
    """One prompt; two prompts with an image, a depth map and a generator each: diffusers' images. The folder we
    save loads in diffusers (given depth_estimator=None, as for its own folder without one) to the same image."""
    import diffusers

    ref, folder = depth_model
    ours = LatentDiffusionDepth2ImgPipeline.from_pretrained(folder)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    expected = ref("a red circle", image=photo(), depth_map=depth(), generator=gens(1), **KWARGS).images
    got = ours("a red circle", image=photo() * 2 - 1, depth_map=depth(), generator=gens(1), progress=False,
               **KWARGS).images
    assert got.shape == (1, 16, 16, 3) and expected.std() > 0.05
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    prompts = ["a red circle", "a blue star"]
    expected2 = ref(prompts, image=photo(2), depth_map=depth(2), generator=gens(1, 2), **KWARGS).images
    got2 = ours(prompts, image=photo(2) * 2 - 1, depth_map=depth(2), generator=gens(1, 2), progress=False,
                **KWARGS).images
    np.testing.assert_allclose(got2, expected2, atol=2e-5, rtol=0)
    flat_depth = ours("a red circle", image=photo() * 2 - 1, depth_map=depth(seed=9), generator=gens(1),
                      progress=False, **KWARGS).images
    assert np.abs(flat_depth - got).max() > 1e-3  # the depth map matters
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(tmp_path / "ours", depth_estimator=None,
                                                                      feature_extractor=None)
    back.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(back("a red circle", image=photo(), depth_map=depth(), generator=gens(1),
                                    **KWARGS).images, expected, atol=1e-6, rtol=0)


def test_images_per_prompt_and_errors(depth_model, tiny_folders):
    _, folder = depth_model
    pipe = LatentDiffusionDepth2ImgPipeline.from_pretrained(folder)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    two = pipe("x", image=photo() * 2 - 1, depth_map=depth()[0], num_images_per_prompt=2, generator=gens(1, 2),
               progress=False, **KWARGS).images
    alone = pipe("x", image=photo() * 2 - 1, depth_map=depth(), generator=gens(2), progress=False, **KWARGS).images
    np.testing.assert_allclose(two[1:], alone, atol=1e-5, rtol=0)
    image = photo() * 2 - 1
    for bad, match in ((None, "depth_map is required"), (torch.ones(1, 24, 24), "flat"),
                       (torch.ones(1, 2, 24, 24), r"\[B, H, W\]"), (torch.full((24, 24), float("nan")), "NaN")):
        with pytest.raises(ValueError, match=match):
            pipe("x", image=image, depth_map=bad, **KWARGS)
    plain = LatentDiffusionDepth2ImgPipeline.from_pretrained(tiny_folders[1])
    with pytest.raises(ValueError, match="not a depth-to-image model"):
        plain("x", image=image, depth_map=depth(), **KWARGS)


def test_command_line(depth_model, tiny_folders, tmp_path, capsys):
    """`latentdiff generate --model DEPTH --image photo.png --depth-map depth.npy`: the Python API's image, which
    --from-png reproduces; a 16-bit PNG depth map reads as its values; --depth-map is refused for another model."""
    from PIL import Image
    from test_cli import run

    from latentdiff.cli import read_depth_map
    from latentdiff.schedulers import scheduler_from_name

    folder = depth_model[1]
    Image.fromarray((photo()[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / "photo.png")
    values = depth()[0]
    np.save(tmp_path / "depth.npy", values.numpy())
    code, out, err = run(["generate", "a red circle", "--model", folder, "--image", tmp_path / "photo.png",
                          "--depth-map", tmp_path / "depth.npy", "--strength", 0.7, "--steps", 6, "--guidance", 6,
                          "--seed", 4, "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    made = np.asarray(Image.open(out.strip()))
    pipe = LatentDiffusionDepth2ImgPipeline.from_pretrained(folder)
    pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
    expected = pipe("a red circle", image=Image.open(tmp_path / "photo.png"), depth_map=values, strength=0.7,
                    num_inference_steps=6, guidance_scale=6, generator=torch.Generator().manual_seed(4),
                    progress=False).images[0]
    assert np.array_equal(made, np.asarray(expected))
    code, out, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "again"], capsys)
    assert code == 0 and np.array_equal(np.asarray(Image.open(out.strip())), made)
    wide = (values / values.max() * 65535).round().numpy().astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "depth16.png")
    assert torch.equal(read_depth_map(str(tmp_path / "depth16.png")), torch.from_numpy(wide.astype(np.float32)))
    code, _, err = run(["generate", "x", "--model", folder, "--image", tmp_path / "photo.png", "--out",
                        tmp_path / "p"], capsys)
    assert code == 2 and "a depth-to-image model needs --depth-map" in err
    code, _, err = run(["generate", "x", "--model", tiny_folders[1], "--image", tmp_path / "photo.png",
                        "--depth-map", tmp_path / "depth.npy", "--out", tmp_path / "q"], capsys)
    assert code == 2 and "--depth-map is for a depth-to-image model" in err
