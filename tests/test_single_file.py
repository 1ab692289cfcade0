"""SD 1.x single-file checkpoints: an original-layout file made from a tiny pipeline loads to the same image."""
import json

import pytest
import torch
from safetensors.torch import save_file

from latentdiff import LatentDiffusionPipeline
from latentdiff.checkpoints import CheckpointError, load_safetensors
from latentdiff.layout import save_single_file


def image(pipe):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe("a red circle", num_inference_steps=4, guidance_scale=4.0, latents=latents, output_type="pt",
                progress=False).images


@pytest.fixture(scope="module")
def single_file(tiny_folders, tmp_path_factory):
    folder = tiny_folders[1]
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_single_file(LatentDiffusionPipeline.from_pretrained(folder).components, path)
    return folder, path


def test_same_image_as_the_folder(single_file):
    folder, path = single_file
    keys = load_safetensors(path).keys()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    from_file = LatentDiffusionPipeline.from_single_file(path, config=folder)
    from_folder = LatentDiffusionPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder"):  # the very same weights
        ours, theirs = getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # the same image up to rounding: a batch-1 matrix-vector product (the time embedding) rounds differently
    # depending on where the weights lie in memory (seen: 1e-7 there, 2e-6 in the image)
    torch.testing.assert_close(image(from_file), image(from_folder), atol=1e-5, rtol=0)


def test_full_checkpoint_with_ema(single_file, tmp_path):
    """A training checkpoint: U-Net weights plus an EMA copy under model_ema.* (dotless names)."""
    folder, path = single_file
    sd = load_safetensors(path)
    unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v * 0 for k, v in unet.items()}
    full = tmp_path / "full.safetensors"
    save_file({**sd, **ema, "model_ema.num_updates": torch.tensor(3)}, str(full))
    plain = LatentDiffusionPipeline.from_single_file(full, config=folder)
    torch.testing.assert_close(image(plain), image(LatentDiffusionPipeline.from_single_file(path, config=folder)))
    zeroed = LatentDiffusionPipeline.from_single_file(full, config=folder, prefer_ema=True)
    assert all(torch.count_nonzero(p) == 0 for p in zeroed.unet.parameters())


def test_other_architectures_are_refused(single_file, tmp_path):
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(2),
               "model.diffusion_model.label_emb.0.0.weight": torch.ones(2, 2)}, str(sdxl))
    with pytest.raises(ValueError, match="(?i)sdxl"):
        LatentDiffusionPipeline.from_single_file(sdxl, config=single_file[0])


def test_bad_files(single_file, tmp_path):
    folder, path = single_file
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 a zip pickle")
    with pytest.raises(CheckpointError, match="refusing to open a pickle file"):
        LatentDiffusionPipeline.from_single_file(ckpt, config=folder)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated"):
        LatentDiffusionPipeline.from_single_file(cut, config=folder)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        LatentDiffusionPipeline.from_single_file(tmp_path / "missing.safetensors", config=folder)
    # weights of another size than the architecture folder says
    config = json.loads((folder / "unet" / "config.json").read_text())
    other = tmp_path / "other"
    import shutil

    shutil.copytree(folder, other)
    config["cross_attention_dim"] = 48
    (other / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises((CheckpointError, ValueError), match="attn2.to_k.weight"):
        LatentDiffusionPipeline.from_single_file(path, config=other)


def test_sd15_architecture_folder_is_committed():
    from latentdiff.layout import SD15_CONFIG
    from latentdiff.models.unet import UNetConfig
    from latentdiff.models.vae import VAEConfig

    unet = UNetConfig.from_dict(json.loads((SD15_CONFIG / "unet" / "config.json").read_text()))
    assert unet == UNetConfig.sd15()
    assert VAEConfig.from_dict(json.loads((SD15_CONFIG / "vae" / "config.json").read_text())) == VAEConfig.sd15()
    assert (SD15_CONFIG / "tokenizer" / "vocab.json").exists()
