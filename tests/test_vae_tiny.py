"""TAESD (models/vae_tiny.py, AutoencoderTiny) against diffusers' AutoencoderTiny with the same random weights: encode,
decode, its folder both ways, and pipelines that use it as their VAE (text to image, img2img) against diffusers'."""
import json

import numpy as np
import pytest
import torch

from latentdiff import AutoencoderTiny, LatentDiffusionImg2ImgPipeline, LatentDiffusionPipeline
from tiny import randomized

# two stages (2x, as the tiny test pipelines' VAE), TAESD's block counts per stage otherwise
SMALL = dict(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 2),
             num_decoder_blocks=(2, 1))


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float32 rounding, relative to the values' scale (random weights make them large)."""
    return bool((got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item()))


def reference(seed: int = 0, **config):
    import diffusers

    torch.manual_seed(seed)
    return randomized(diffusers.AutoencoderTiny(**{**SMALL, **config}), seed, scale=0.06)


@pytest.mark.parametrize("config", [{}, {"act_fn": "silu", "latent_channels": 3},
                                    {"encoder_block_out_channels": (8, 8, 8), "decoder_block_out_channels": (8, 8, 8),
                                     "num_encoder_blocks": (1, 1, 1), "num_decoder_blocks": (1, 1, 1)}],
                         ids=["taesd-like", "silu-3-channels", "three-stages"])
def test_encode_and_decode_match_diffusers(tmp_path, config):
    ref = reference(**config)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = AutoencoderTiny.from_pretrained(tmp_path)
    assert ours.vae_scale_factor == 2 ** (len(ours.config.decoder_block_out_channels) - 1)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = torch.randn(2, ref.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        expected_latents, expected_images = ref.encode(images).latents, ref.decode(latents).sample
        got = ours.encode(images)
        assert close(got.latents, expected_latents) and got.mean is got.latent_dist.sample()
        assert close(ours.decode(latents), expected_images)
        assert close(ours.encode(images, return_dict=True).latents, expected_latents)
        assert close(ours.decode(latents, return_dict=False)[0], expected_images)
        ours.enable_slicing()
        assert close(ours.decode(latents), expected_images)
        assert (ours.unscale_latents(ours.scale_latents(latents[:, :, :1])) - latents[:, :, :1]).abs()[
            latents[:, :, :1].abs() < 3].max() < 1e-5


def test_folder_round_trip_and_errors(tmp_path):
    import diffusers

    ours = AutoencoderTiny.from_pretrained(_saved(reference(), tmp_path / "theirs"))
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny" and config["block_out_channels"] == [16, 16]
    assert config["force_upcast"] is False
    theirs = diffusers.AutoencoderTiny.from_pretrained(tmp_path / "ours")
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    with pytest.raises(ValueError, match="one width for every stage"):
        AutoencoderTiny.from_config({**SMALL, "decoder_block_out_channels": [16, 32]})
    with pytest.raises(ValueError, match="act_fn 'tanh'"):
        AutoencoderTiny.from_config({**SMALL, "act_fn": "tanh"})
    with pytest.raises(NotImplementedError, match="enable_slicing"):
        ours.enable_tiling()
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, H, W\]"):
        ours.decode(torch.zeros(1, 3, 8, 8))


def _saved(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_pipelines_with_taesd_match_diffusers(tmp_path, tiny_folders):
    """diffusers' StableDiffusion(Img2Img)Pipeline with an AutoencoderTiny as its VAE and ours with the same one give
    the same images; the pipeline folder saved with it names AutoencoderTiny and loads back in both."""
    import diffusers

    diffusers_folder, folder = tiny_folders
    taesd = _saved(reference(seed=3), tmp_path / "taesd")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_folder, safety_checker=None,
                                                               vae=diffusers.AutoencoderTiny.from_pretrained(taesd))
    theirs.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folder)
    ours.vae = AutoencoderTiny.from_pretrained(taesd)
    kwargs = dict(num_inference_steps=4, guidance_scale=6.0, output_type="np")
    expected = theirs("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours("a red circle", generator=torch.Generator().manual_seed(0), progress=False, **kwargs).images
    assert np.abs(got - expected).max() < 1e-4 and 0.05 < ((got > 0.01) & (got < 0.99)).mean()  # (not all clipped)

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    theirs_i2i = diffusers.StableDiffusionImg2ImgPipeline(**theirs.components)
    theirs_i2i.set_progress_bar_config(disable=True)
    expected = theirs_i2i("a blue star", image=image, strength=0.6, generator=torch.Generator().manual_seed(1),
                          **kwargs).images
    got = LatentDiffusionImg2ImgPipeline.from_pipe(ours)("a blue star", image=image, strength=0.6, progress=False,
                                                         generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.abs(got - expected).max() < 1e-4

    ours.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderTiny"]
    assert isinstance(LatentDiffusionPipeline.from_pretrained(tmp_path / "pipe").vae, AutoencoderTiny)
    reloaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", safety_checker=None)
    assert type(reloaded.vae).__name__ == "AutoencoderTiny"
    from latentdiff.layout import save_single_file

    with pytest.raises(ValueError, match="single-file checkpoint holds the SD VAE"):
        save_single_file(ours.components, tmp_path / "one.safetensors")
