"""SD 1.x/2.x single-file conversion: our original layout is the real one (diffusers' own converter reads it back),
our conversion is a bijection on keys in both directions, EMA selection, architecture detection, strict errors."""
import functools
import logging

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from latentdiff.convert import (
    check_supported,
    checkpoint_table,
    detect_architecture,
    diffusers_to_original,
    infer_unet_config,
    infer_vae_config,
    openclip_table,
    original_to_diffusers,
)

logging.getLogger("diffusers").setLevel(logging.ERROR)  # diffusers warns about EMA choices; the tests check them

CROSS, DOWN, CROSS_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
TINY = {  # layers_per_block -> (U-Net config, VAE config): SD's block mix at 4 and 3 levels
    1: (dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, down_block_types=(CROSS, CROSS, CROSS, DOWN),
             up_block_types=(UP, CROSS_UP, CROSS_UP, CROSS_UP), cross_attention_dim=32, norm_num_groups=8,
             attention_head_dim=4, sample_size=8),
        dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)),
    2: (dict(block_out_channels=(16, 32, 64), layers_per_block=2, down_block_types=(CROSS, CROSS, DOWN),
             up_block_types=(UP, CROSS_UP, CROSS_UP), cross_attention_dim=32, norm_num_groups=16,
             attention_head_dim=4, sample_size=8),
        dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=16, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)),
}
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 down_block_types=(CROSS, CROSS, CROSS, DOWN), up_block_types=(UP, CROSS_UP, CROSS_UP, CROSS_UP),
                 attention_head_dim=8, sample_size=64)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def build(unet_kwargs, vae_kwargs, text_kwargs, device="cpu"):
    """Diffusers/transformers models' configs and state dicts; on the CPU every tensor is distinct random data,
    so a swapped key cannot hide behind two identically initialised tensors."""
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**unet_kwargs), AutoencoderKL(**vae_kwargs)
        text = CLIPTextModel(CLIPTextConfig(**text_kwargs))
    g = torch.Generator().manual_seed(0)
    sds = []
    for model in (unet, vae, text):
        sd = model.state_dict()
        if device == "cpu":
            sd = {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}
        sds.append(sd)
    return dict(unet.config), dict(vae.config), *sds


CASES = {"layers1": (*TINY[1], TINY_TEXT), "layers2": (*TINY[2], TINY_TEXT),
         "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT, "meta")}  # SD 1.5 itself: key names and shapes only


@functools.cache
def case(name):
    return build(*CASES[name])


@pytest.fixture(params=list(CASES))
def models(request):
    return case(request.param)


@pytest.fixture(params=["layers1", "layers2"])
def tiny(request):
    return case(request.param)


def assert_same(actual: dict, expected: dict, what: str):
    assert set(actual) == set(expected), f"{what}: {sorted(set(actual) ^ set(expected))[:10]}"
    for k, v in expected.items():
        assert actual[k].shape == v.shape, f"{what} {k}: {tuple(actual[k].shape)} vs {tuple(v.shape)}"
        if v.device.type != "meta":
            assert torch.equal(actual[k], v), f"{what} {k}: values differ"


def listed(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def prefixed(text_sd):
    return {"text_model." + k: v for k, v in text_sd.items()}


def test_diffusers_converter_reads_our_original_layout(models):
    """Diffusers' own LDM converter maps our original-layout checkpoint back to the diffusers state dicts."""
    unet_cfg, vae_cfg, unet_sd, vae_sd, text_sd = models
    original = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg)
    assert_same(convert_ldm_unet_checkpoint(original, unet_cfg), unet_sd, "unet")
    assert_same(convert_ldm_vae_checkpoint(original, vae_cfg), vae_sd, "vae")
    assert_same(convert_ldm_clip_checkpoint(original), prefixed(text_sd), "text encoder")


def test_round_trip_is_a_bijection(models):
    unet_cfg, vae_cfg, unet_sd, vae_sd, text_sd = models
    original = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg)
    assert len(original) == len(unet_sd) + len(vae_sd) + len(text_sd)  # nothing merged or dropped
    layers = 1 + max(int(k.split(".")[2]) for k in text_sd if k.startswith("encoder.layers."))
    table = list(checkpoint_table(unet_cfg, vae_cfg, layers))  # one row per tensor, no name used twice
    assert len({row[1] for row in table}) == len({(row[0], row[2]) for row in table}) == len(table) == len(original)
    back = original_to_diffusers(original, unet_cfg, vae_cfg)
    assert_same(back["unet"], unet_sd, "unet")
    assert_same(back["vae"], vae_sd, "vae")
    assert_same(back["text_encoder"], prefixed(text_sd), "text encoder")


def test_original_layout_details(tiny):
    unet_cfg, vae_cfg, unet_sd, vae_sd, text_sd = tiny
    original = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg)
    q = original["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q.shape == (*vae_sd["encoder.mid_block.attentions.0.to_q.weight"].shape, 1, 1)  # 1x1 conv in LDM
    assert torch.equal(original["first_stage_model.decoder.up.0.block.0.conv1.weight"],  # decoder levels reversed
                       vae_sd[f"decoder.up_blocks.{len(vae_cfg['block_out_channels']) - 1}.resnets.0.conv1.weight"])
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in original
    assert detect_architecture(original) == "sd1"


def test_sd15_landmark_keys():
    """Keys of the released SD 1.5 file that diffusers' converter is lenient about (it accepts an upsampler at
    output_blocks.N.1 or .2) or that identify the layout (diffusers' "v1" marker is output_blocks.11's skip)."""
    unet_cfg, vae_cfg, unet_sd, vae_sd, text_sd = case("sd15")
    original = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg)
    unet, vae = "model.diffusion_model.", "first_stage_model."
    expected = {
        unet + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        unet + "input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        unet + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),  # no attention at this level: upsampler is .1
        unet + "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        unet + "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        unet + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        unet + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        unet + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        vae + "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        vae + "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        vae + "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        vae + "encoder.down.3.block.1.conv2.weight": (512, 512, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    }
    assert {k: tuple(original[k].shape) for k in expected} == expected
    for absent in ("output_blocks.5.1.conv.weight", "output_blocks.2.2.conv.weight", "input_blocks.12.0.op.weight"):
        assert unet + absent not in original
    for absent in ("decoder.up.0.upsample.conv.weight", "encoder.down.3.downsample.conv.weight"):
        assert vae + absent not in original


def test_conversion_never_copies(tiny):
    """Renames share the tensors, the VAE attention reshape is a view: a 4 GB checkpoint is not held twice."""
    unet_cfg, vae_cfg, unet_sd, vae_sd, text_sd = tiny
    original = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg)
    back = original_to_diffusers(original, unet_cfg, vae_cfg)
    for part, sd in (("unet", unet_sd), ("vae", vae_sd), ("text_encoder", prefixed(text_sd))):
        for k, v in sd.items():
            assert back[part][k].untyped_storage().data_ptr() == v.untyped_storage().data_ptr(), k


def test_saves_as_safetensors_and_configs_are_inferred(tiny):
    unet_cfg, vae_cfg, unet_sd, vae_sd, text_sd = tiny
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types"):
        for inferred, given in ((infer_unet_config(unet_sd), unet_cfg), (infer_vae_config(vae_sd), vae_cfg)):
            assert listed(inferred[key]) == listed(given[key]), key
    # configs left out are read back from the state dicts; text keys may carry transformers 4's prefix or not
    original = diffusers_to_original(unet_sd, vae_sd, prefixed(text_sd))
    loaded = safetensors.torch.load(safetensors.torch.save(original))
    assert_same(loaded, original, "saved checkpoint")


def with_ema(original: dict, offset: float) -> dict:
    """A full training checkpoint: LDM's EMA copy of the U-Net (dotless names), its counters and DDPM buffers."""
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + offset
           for k, v in original.items() if k.startswith("model.diffusion_model.")}
    extras = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10),
              "alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    return {**original, **ema, **extras}


def test_ema_selection(tiny):
    unet_cfg, vae_cfg, unet_sd, vae_sd, text_sd = tiny
    original = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg)
    full = with_ema(original, offset=1.0)
    assert sum(k.startswith("model_ema") for k in full) > 100  # diffusers' threshold for "has EMA"
    assert detect_architecture(full) == "sd1"  # scalar counters and 1-D buffers do not confuse detection
    assert_same(original_to_diffusers(full, unet_cfg, vae_cfg)["unet"], unet_sd, "non-EMA unet")
    ema = original_to_diffusers(full, unet_cfg, vae_cfg, prefer_ema=True)
    assert_same(ema["unet"], {k: v + 1.0 for k, v in unet_sd.items()}, "EMA unet")
    assert_same(ema["unet"], convert_ldm_unet_checkpoint(full, unet_cfg, extract_ema=True), "EMA vs diffusers")
    assert_same(ema["vae"], vae_sd, "vae")  # EMA covers only the U-Net
    # an EMA-only file has no model_ema.* copy: its model.diffusion_model.* weights are used
    assert_same(original_to_diffusers(original, unet_cfg, vae_cfg, prefer_ema=True)["unet"], unet_sd, "EMA-only")
    broken = dict(full)
    del broken["model_ema.diffusion_modelout0weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): model_ema\.diffusion_modelout0weight"):
        original_to_diffusers(broken, unet_cfg, vae_cfg, prefer_ema=True)


def test_extra_or_missing_keys_are_listed(tiny):
    unet_cfg, vae_cfg, unet_sd, vae_sd, text_sd = tiny
    original = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): model\.diffusion_model\.extra\.weight"):
        original_to_diffusers({**original, "model.diffusion_model.extra.weight": torch.zeros(1)}, unet_cfg, vae_cfg)
    partial = {k: v for k, v in original.items() if k != "first_stage_model.decoder.up.0.block.0.norm1.bias"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): first_stage_model\.decoder\.up\.0\.block\.0\.norm1"):
        original_to_diffusers(partial, unet_cfg, vae_cfg)
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\): unet: conv_in\.bias.*unexpected keys \(1\): vae: x"):
        unet_less = {k: v for k, v in unet_sd.items() if k != "conv_in.bias"}
        diffusers_to_original(unet_less, {**vae_sd, "x": torch.zeros(1)}, text_sd, unet_cfg, vae_cfg)
    no_layer0 = {k: v for k, v in original.items() if ".encoder.layers.0." not in k}  # a gap in the CLIP layers
    with pytest.raises(ValueError, match=r"missing keys \(16\): cond_stage_model\.transformer\.text_model\.encoder"
                                         r"\.layers\.0\."):
        original_to_diffusers(no_layer0, unet_cfg, vae_cfg)
    # a config that does not describe the weights is caught the same way, not loaded as something else
    other = dict(unet_cfg, layers_per_block=unet_cfg["layers_per_block"] + 1)
    with pytest.raises(ValueError, match="missing keys"):
        original_to_diffusers(original, other, vae_cfg)


@pytest.mark.parametrize("key, value, match", [
    ("class_embed_type", "timestep", "class_embed_type='timestep'"),
    ("transformer_layers_per_block", [1, 2, 2, 2], "transformer_layers_per_block"),
    ("down_block_types", ("DownBlock2D",), "down_block_types"),
])
def test_unsupported_unet_config_is_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        list(checkpoint_table(dict(SD15_UNET, **{key: value}), SD15_VAE, 12))


def test_detect_architecture_and_refusal():
    sd1 = ["model.diffusion_model.input_blocks.0.0.weight",
           "cond_stage_model.transformer.text_model.final_layer_norm.weight", "first_stage_model.quant_conv.weight"]
    attn2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_architecture(sd1) == "sd1"
    assert detect_architecture({**dict.fromkeys(sd1, (1,)), attn2: (320, 768)}) == "sd1"
    assert detect_architecture({**dict.fromkeys(sd1, (1,)), attn2: torch.empty(320, 1024)}) == "sd2"
    assert detect_architecture(sd1[:1] + ["cond_stage_model.model.token_embedding.weight"]) == "sd2"
    assert detect_architecture(sd1[:1] + ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                                          "conditioner.embedders.1.model.positional_embedding"]) == "sdxl"
    assert detect_architecture(sd1 + ["model.diffusion_model.label_emb.0.0.weight"]) == "sdxl"
    assert detect_architecture({**dict.fromkeys(sd1, (1,)), sd1[0]: (320, 9, 3, 3)}) == "sd1-inpainting"
    assert detect_architecture(["encoder.conv_in.weight"]) == "unknown"
    for component in (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"],  # a diffusers U-Net's file
                      ["encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.conv_out.weight"],  # a VAE's
                      ["text_model.embeddings.token_embedding.weight"], ["embeddings.token_embedding.weight"]):
        assert detect_architecture(component) == "component", component
    with pytest.raises(ValueError, match=r"u\.safetensors: this is a single model's weights file .* not a "
                                         r"single-file checkpoint of a whole pipeline: load the pipeline folder"):
        check_supported(["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "u.safetensors")
    assert check_supported(sd1, "a.safetensors") == "sd1"
    assert check_supported({**dict.fromkeys(sd1, (1,)), sd1[0]: (320, 9, 3, 3)}, "i.safetensors") == "sd1-inpainting"
    sd2 = sd1[:1] + ["cond_stage_model.model.ln_final.weight", sd1[2]]
    assert check_supported(sd2, "b.safetensors") == "sd2"
    assert check_supported({**dict.fromkeys(sd2, (1,)), sd1[0]: (320, 9, 3, 3)}, "c.safetensors") == "sd2-inpainting"
    for keys, name in ((sd2 + ["depth_model.model.pretrained.act_postprocess1.0.weight"],
                        "a Stable Diffusion 2.x depth-to-image"),
                       (["conditioner.embedders.0.transformer.text_model.x"], "a Stable Diffusion XL"),
                       (["foo"], "an unrecognised")):
        with pytest.raises(ValueError, match=rf"m\.safetensors: this is {name} checkpoint.*only Stable Diffusion "
                                             r"1\.x and 2\.x.*save_pretrained.*from_pretrained"):
            check_supported(keys, "m.safetensors")


# ---------------------------------------------------------------- SD 2.x: the OpenCLIP text encoder

OPENCLIP_TEXT = dict(TINY_TEXT, hidden_act="gelu", num_hidden_layers=3)


def openclip_text():
    """transformers' CLIPTextModel with GELU (as OpenCLIP's), and random weights under diffusers' full names."""
    text = CLIPTextModel(CLIPTextConfig(**OPENCLIP_TEXT))
    g = torch.Generator().manual_seed(1)
    return text, {k if k.startswith("text_model.") else "text_model." + k: torch.randn(v.shape, generator=g)
                  for k, v in text.state_dict().items() if not k.endswith("position_ids")}


def test_openclip_layout_is_the_one_diffusers_reads():
    """SD 2.x's text encoder under OpenCLIP's names: diffusers' converter reads our layout back to the very tensors,
    ours reads it (the fused query/key/value projection split by views, not copies), and the way back joins it."""
    unet_cfg, vae_cfg, unet_sd, vae_sd, _ = case("layers1")
    text, text_sd = openclip_text()
    original = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, openclip=True)
    fused = "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"
    assert original[fused].shape == (96, 32) and not any(k.startswith("cond_stage_model.transformer") for k in original)
    assert detect_architecture(original) == "sd2"
    theirs = convert_open_clip_checkpoint(text, original)
    assert_same(theirs, text_sd, "diffusers' reading")
    parts = original_to_diffusers(original, unet_cfg, vae_cfg, text_layers=3)
    assert_same(parts["text_encoder"], text_sd, "ours")
    assert_same(parts["unet"], unet_sd, "unet")
    q = parts["text_encoder"]["text_model.encoder.layers.2.self_attn.q_proj.weight"]
    assert q.untyped_storage().data_ptr() == original[fused].untyped_storage().data_ptr()  # a view
    table = list(openclip_table(3))
    assert len({o for o, _, _ in table}) == len(table) - 3 * 4  # 3 projections from each fused weight and bias


def test_openclip_unused_block_and_head_are_skipped():
    """SD 2.x files hold OpenCLIP's 24 blocks and its contrastive head; SD 2.x runs 23 blocks (the penultimate
    block's output): given that depth, the last block is skipped, as diffusers skips it. Any other difference in
    depth is an error naming the keys."""
    unet_cfg, vae_cfg, unet_sd, vae_sd, _ = case("layers1")
    _, text_sd = openclip_text()
    deeper = {k.replace("layers.2.", "layers.3."): v + 1 for k, v in text_sd.items() if "layers.2." in k}
    original = diffusers_to_original(unet_sd, vae_sd, {**text_sd, **deeper}, unet_cfg, vae_cfg, openclip=True)
    original.update({"cond_stage_model.model.text_projection": torch.randn(32, 32),
                     "cond_stage_model.model.logit_scale": torch.tensor(4.6)})
    assert_same(original_to_diffusers(original, unet_cfg, vae_cfg, text_layers=3)["text_encoder"], text_sd, "23 of 24")
    assert len(original_to_diffusers(original, unet_cfg, vae_cfg)["text_encoder"]) == 2 + 16 * 4 + 2  # all read
    with pytest.raises(ValueError, match=r"unexpected keys \(24\): cond_stage_model\.model\.transformer\."
                                         r"resblocks\.2\."):
        original_to_diffusers(original, unet_cfg, vae_cfg, text_layers=2)
    del original["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): cond_stage_model\.model\.transformer\.resblocks"
                                         r"\.1\.attn\.in_proj_bias"):
        original_to_diffusers(original, unet_cfg, vae_cfg, text_layers=3)
    original["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias"] = torch.randn(95)
    with pytest.raises(ValueError, match=r"in_proj_bias: expected a fused query/key/value tensor of 3C rows"):
        original_to_diffusers(original, unet_cfg, vae_cfg, text_layers=3)
