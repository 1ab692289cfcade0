"""SD 1.x and 2.x single-file checkpoints: an original-layout file made from a tiny pipeline loads to the same image
(and, for SD 2.x, to the same weights and image as in diffusers' from_single_file)."""
import json

import numpy as np
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
    assert (from_file.name_or_path, from_folder.name_or_path) == (path, folder)
    assert {**from_file.config, "_name_or_path": folder} == from_folder.config
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


# ---------------------------------------------------------------- SD 2.x


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """A tiny SD 2.x-shaped pipeline saved by diffusers (an OpenCLIP-like text encoder with GELU, linear projections
    in the U-Net's transformers, v-prediction, a tokenizer padding with "!"), and our single file of it."""
    from latentdiff.models.text import CLIPTokenizer
    from tiny import diffusers_pipeline

    root = tmp_path_factory.mktemp("sd2")
    CLIPTokenizer(pad_token="!").save_pretrained(root / "tok")
    pipe = diffusers_pipeline(root / "tok", text={"hidden_act": "gelu", "num_hidden_layers": 3},
                              scheduler={"prediction_type": "v_prediction"}, use_linear_projection=True,
                              upcast_attention=True)
    pipe.save_pretrained(root / "diffusers", safe_serialization=True)
    path = root / "sd2.safetensors"
    save_single_file(LatentDiffusionPipeline.from_pretrained(root / "diffusers").components, path)
    return root / "diffusers", path


def same_weights(a, b, what):
    a, b = a.state_dict(), b.state_dict()
    a, b = ({k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
            for sd in (a, b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), what


def test_sd2_single_file_reads_as_in_diffusers(sd2):
    """Our SD 2.x file holds the text encoder in OpenCLIP's layout; diffusers' from_single_file and ours read it to
    the folder's very weights, and both pipelines make the same image."""
    import diffusers
    from tiny import generate

    folder, path = sd2
    keys = load_safetensors(path).keys()
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    ours = LatentDiffusionPipeline.from_single_file(path, config=folder)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    for name in ("unet", "vae", "text_encoder"):
        same_weights(getattr(ours, name), getattr(reference, name), f"ours {name}")
        same_weights(getattr(theirs, name), getattr(reference, name), f"diffusers' {name}")
    assert ours.scheduler.config.prediction_type == "v_prediction" and ours.tokenizer.pad_token == "!"
    np.testing.assert_allclose(generate(ours), generate(theirs), atol=2e-4, rtol=0)


def test_sd2_defaults_without_config(sd2, tmp_path, monkeypatch):
    """Without config=, SD 2.x files take pipelines/sd-v2-1 (here the tiny architecture stands in for it): a 768 px
    v-prediction model, with a warning that says how to load a 512 px base model; prediction_type="epsilon"
    loads one (512 px by default); SD 2.x inpainting files are epsilon at 512 px."""
    import warnings

    import latentdiff.layout as layout

    folder, path = sd2
    monkeypatch.setattr(layout, "SD21_CONFIG", folder)
    with pytest.warns(UserWarning, match=r"taken as a 768 px v-prediction model .*prediction_type='epsilon'"):
        pipe = LatentDiffusionPipeline.from_single_file(path)
    assert (pipe.scheduler.config.prediction_type, pipe.unet.config.sample_size) == ("v_prediction", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base = LatentDiffusionPipeline.from_single_file(path, prediction_type="epsilon")
        given = LatentDiffusionPipeline.from_single_file(path, config=folder, prediction_type="epsilon")
    assert (base.scheduler.config.prediction_type, base.unet.config.sample_size) == ("epsilon", 64)
    assert (given.scheduler.config.prediction_type, given.unet.config.sample_size) == ("epsilon", 8)
    with pytest.raises(ValueError, match="prediction_type='eps': choose 'epsilon', 'v_prediction' or 'sample'"):
        LatentDiffusionPipeline.from_single_file(path, prediction_type="eps")
    sd = load_safetensors(path)
    conv_in = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(conv_in.shape[0], 9, 3, 3)
    save_file(sd, str(tmp_path / "inpaint.safetensors"))
    from latentdiff import LatentDiffusionInpaintPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inpaint = LatentDiffusionInpaintPipeline.from_single_file(tmp_path / "inpaint.safetensors")
    assert (inpaint.unet.config.in_channels, inpaint.unet.config.sample_size) == (9, 64)
    assert inpaint.scheduler.config.prediction_type == "epsilon"


def test_sd2_architecture_folder_is_committed():
    """pipelines/sd-v2-1: SD 2.1's configs (stabilityai/stable-diffusion-2-1's values), read back as our presets."""
    from latentdiff.layout import SD21_CONFIG
    from latentdiff.models.text import CLIPTokenizer, read_text_config, text_config_sd2
    from latentdiff.models.unet import UNetConfig

    assert UNetConfig.from_dict(json.loads((SD21_CONFIG / "unet" / "config.json").read_text())) == UNetConfig.sd2()
    text = read_text_config(SD21_CONFIG / "text_encoder")
    assert text == text_config_sd2()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size,
            text.hidden_act) == (1024, 23, 16, 4096, "gelu")
    tokenizer = CLIPTokenizer.from_pretrained(SD21_CONFIG / "tokenizer")
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0 and tokenizer.model_max_length == 77
    scheduler = json.loads((SD21_CONFIG / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["beta_schedule"], scheduler["beta_end"]) == (
        "v_prediction", "scaled_linear", 0.012)
