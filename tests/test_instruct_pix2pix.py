"""InstructPix2Pix against diffusers' StableDiffusionInstructPix2PixPipeline: a tiny random 8-channel U-Net, the
image's latents (posterior mode, unscaled) as extra channels, text and image guidance; folders both ways."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import LatentDiffusionInstructPix2PixPipeline, LatentDiffusionPipeline
from tiny import diffusers_pipeline, generate

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE = Image.fromarray(np.random.default_rng(5).integers(0, 256, (16, 24, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ip2p_folder(tiny_folders, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip2p") / "pipe"
    diffusers_pipeline(tiny_folders[0] / "tokenizer", pipeline_cls="StableDiffusionInstructPix2PixPipeline",
                       in_channels=8).save_pretrained(
        folder, safe_serialization=True)
    return folder


def reference(folder):
    import diffusers

    ref = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("kwargs", [{}, {"image_guidance_scale": 2.5, "guidance_scale": 4.0,
                                         "negative_prompt": "blurry"},
                                    {"guidance_scale": 1.0}, {"num_images_per_prompt": 2, "images": 2}])
def test_matches_diffusers(ip2p_folder, kwargs):
    """Euler-ancestral as the model ships, noise from each image's generator; the output has the image's size."""
    import diffusers

    from latentdiff.schedulers import scheduler_from_name

    ours = LatentDiffusionInstructPix2PixPipeline.from_pretrained(ip2p_folder)
    ours.scheduler = scheduler_from_name("euler_a", ours.scheduler.config)
    ref = reference(ip2p_folder)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(dict(ours.scheduler.config))
    kwargs = {"image": IMAGE, **kwargs}
    got = generate(ours, "make it blue", **kwargs)
    assert got.shape[1:3] == (16, 24)
    np.testing.assert_allclose(got, generate(ref, "make it blue", **kwargs), atol=2e-4, rtol=0)


def test_folders_both_ways_and_errors(ip2p_folder, tiny_folders, tmp_path):
    import diffusers

    ours = LatentDiffusionInstructPix2PixPipeline.from_pretrained(ip2p_folder)
    ours.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionInstructPix2PixPipeline")
    assert isinstance(diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None),
                      diffusers.StableDiffusionInstructPix2PixPipeline)
    with pytest.raises(ValueError, match="an InstructPix2Pix one 8 .*LatentDiffusionInstructPix2PixPipeline"):
        LatentDiffusionPipeline.from_pipe(ours)("make it blue", num_inference_steps=2)
    with pytest.raises(ValueError, match="InstructPix2Pix needs 8"):
        LatentDiffusionInstructPix2PixPipeline.from_pretrained(tiny_folders[0])("a", image=IMAGE)
    with pytest.raises(ValueError, match="needs image="):
        ours("make it blue")


def test_command_line(ip2p_folder, tmp_path, capsys):
    """latentdiff generate with --image on an InstructPix2Pix model edits the image (--image-guidance), as the
    pipeline does; the PNG's settings reproduce it."""
    from latentdiff.cli import PNG_KEY, main
    from latentdiff.schedulers import scheduler_from_name

    IMAGE.save(tmp_path / "in.png")
    args = ["generate", "make it blue", "--model", str(ip2p_folder), "--image", str(tmp_path / "in.png"),
            "--image-guidance", "2.0", "--steps", "3", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    path = capsys.readouterr().out.split()[0]
    made = np.asarray(Image.open(path)).astype(int)
    assert json.loads(Image.open(path).text[PNG_KEY])["image_guidance"] == 2.0
    pipe = LatentDiffusionInstructPix2PixPipeline.from_pretrained(ip2p_folder)
    pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
    expected = pipe("make it blue", image=Image.open(tmp_path / "in.png").convert("RGB"), num_inference_steps=3,
                    guidance_scale=5.0, image_guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                    progress=False).images[0]
    assert made.shape == (16, 24, 3) and np.abs(made - np.asarray(expected).astype(int)).max() <= 1
    assert main(["generate", "--from-png", path, "--out", str(tmp_path / "repro")]) == 0
    again = capsys.readouterr().out.split()[0]
    assert np.abs(np.asarray(Image.open(again)).astype(int) - made).max() <= 1
    assert main(["generate", "a", "--model", str(ip2p_folder), "--image-guidance", "2"]) == 2
    assert "--image-guidance acts on an input image: give --image PATH" in capsys.readouterr().err
