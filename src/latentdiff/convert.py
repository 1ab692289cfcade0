"""Stable Diffusion 1.x and 2.x single-file checkpoints (the CompVis/LDM layout) <-> diffusers' state-dict keys.

One table, generated from the diffusers configs, lists every tensor as (original key, diffusers key, reshape).
The same table converts in both directions, so a key cannot be renamed one way and forgotten the other, and
strictness (nothing missing, nothing left over) is a comparison of key sets against it.

The original layout (Rombach et al. 2022, github.com/CompVis/stable-diffusion) numbers U-Net blocks in one flat
sequence (`input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`), names the VAE decoder's levels in the reverse
order of diffusers' (`decoder.up.0` is the last level to run), stores the VAE attention projections as 1x1
convolutions and keeps the CLIP text model under `cond_stage_model.transformer.` (SD 1.x: transformers' names) or
the OpenCLIP text tower under `cond_stage_model.model.` (SD 2.x: OpenCLIP's names, query/key/value in one fused
`in_proj` tensor). Renames are free: tensors are never copied, and the reshapes (1x1 conv <-> linear, a third of
the fused projection) are views; only writing OpenCLIP's fused projection back concatenates.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPENCLIP = "cond_stage_model.model."  # SD 2.x's text encoder (FrozenOpenCLIPEmbedder)
EMA = "model_ema."
CONTROL = "control_model."  # ControlNet 1.0's files hold a whole SD model and, under this prefix, the ControlNet
SAME, CONV1X1 = "same", "conv1x1_to_linear"  # reshape kinds: none, or [C, C, 1, 1] (original) <-> [C, C] (diffusers)
IN_PROJ = "in_proj."  # + "0", "1", "2": query, key or value, a third of OpenCLIP's fused [3C, C] (or [3C]) tensor

Entry = tuple[str, str, str]  # (original key, diffusers key, reshape kind), keys relative to their component

# Buffers and bookkeeping the LDM training code saves next to the weights; nothing here is a model weight.
IGNORED_KEYS = frozenset(
    ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
     "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
     "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
     "logvar", "lvlb_weights", "model_ema.decay", "model_ema.num_updates",
     TEXT + "text_model.embeddings.position_ids",
     # OpenCLIP's contrastive head, which SD 2.x never runs (diffusers' CLIPTextModel has no place for it either)
     OPENCLIP + "text_projection", OPENCLIP + "logit_scale", OPENCLIP + "attn_mask"]
)


# ---------------------------------------------------------------------------------------------------------- table
def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _renamed(original: str, diffusers: str, names: Mapping[str, str] | Iterable[str], kind: str = SAME,
             params: tuple[str, ...] = ("weight", "bias")) -> Iterator[Entry]:
    """Entries for sub-modules `names` (original name -> diffusers name) under two prefixes."""
    pairs = names.items() if isinstance(names, Mapping) else ((n, n) for n in names)
    for old, new in pairs:
        for p in params:
            yield _join(original, old, p), _join(diffusers, new, p), kind if p == "weight" else SAME


_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_VAE_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _unet_resnet(original: str, diffusers: str, shortcut: bool) -> Iterator[Entry]:
    yield from _renamed(original, diffusers, _UNET_RESNET)
    if shortcut:  # a 1x1 conv on the skip path, only where the channel count changes
        yield from _renamed(original, diffusers, {"skip_connection": "conv_shortcut"})


def _transformer(original: str, diffusers: str, depth: int) -> Iterator[Entry]:
    """A spatial transformer: LDM and diffusers use the same names inside it, only the prefix moves."""
    yield from _renamed(original, diffusers, ["norm", "proj_in", "proj_out"])
    for b in range(depth):
        block = f"transformer_blocks.{b}"
        layers = ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2", "attn1.to_out.0", "attn2.to_out.0")
        yield from _renamed(original, diffusers, [f"{block}.{n}" for n in layers])
        qkv = [f"{block}.attn{a}.to_{p}" for a in (1, 2) for p in "qkv"]
        yield from _renamed(original, diffusers, qkv, params=("weight",))  # SD's q/k/v projections have no bias


def _vae_resnet(original: str, diffusers: str, shortcut: bool) -> Iterator[Entry]:
    yield from _renamed(original, diffusers, _VAE_RESNET)
    if shortcut:
        yield from _renamed(original, diffusers, {"nin_shortcut": "conv_shortcut"})


def _vae_mid(part: str) -> Iterator[Entry]:
    yield from _vae_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
    yield from _renamed(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", {"norm": "group_norm"})
    yield from _renamed(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION, kind=CONV1X1)
    yield from _vae_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)


def unet_table(config: Mapping) -> Iterator[Entry]:
    """Every U-Net tensor. LDM numbers blocks in one sequence: input block 0 is conv_in, then per level
    `layers_per_block` (resnet, attention) pairs and a downsampler (not on the last level); output blocks run
    the levels in reverse with one extra layer each, the upsampler sitting after the layer's attention if any."""
    config = _unet_config(config)
    channels, layers, depth = list(config["block_out_channels"]), config["layers_per_block"], config["depth"]
    down_attention = [t == "CrossAttnDownBlock2D" for t in config["down_block_types"]]
    up_attention = [t == "CrossAttnUpBlock2D" for t in config["up_block_types"]]
    levels = len(channels)
    yield from _renamed("", "", {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                                 "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"})
    skips, width, n = [channels[0]], channels[0], 1  # skip-connection widths, as the down path pushes them
    for i, out in enumerate(channels):
        for j in range(layers):
            yield from _unet_resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", width != out)
            if down_attention[i]:
                yield from _transformer(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", depth)
            skips.append(out)
            width, n = out, n + 1
        if i < levels - 1:
            yield from _renamed(f"input_blocks.{n}.0.op", f"down_blocks.{i}.downsamplers.0.conv", [""])
            skips.append(out)
            n += 1
    yield from _unet_resnet("middle_block.0", "mid_block.resnets.0", False)
    yield from _transformer("middle_block.1", "mid_block.attentions.0", depth)
    yield from _unet_resnet("middle_block.2", "mid_block.resnets.1", False)
    n = 0
    for i, out in enumerate(reversed(channels)):
        for j in range(layers + 1):
            yield from _unet_resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", width + skips.pop() != out)
            if up_attention[i]:
                yield from _transformer(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", depth)
            width = out
            if j == layers and i < levels - 1:
                up = 2 if up_attention[i] else 1
                yield from _renamed(f"output_blocks.{n}.{up}.conv", f"up_blocks.{i}.upsamplers.0.conv", [""])
            n += 1


def vae_table(config: Mapping) -> Iterator[Entry]:
    """Every VAE tensor. The decoder's levels are numbered from the output end in LDM (`up.0` runs last) and from
    the input end in diffusers (`up_blocks.0` runs first)."""
    config = _vae_config(config)
    channels, layers = list(config["block_out_channels"]), config["layers_per_block"]
    levels = len(channels)
    top = [f"{part}.{conv}" for part in ("encoder", "decoder") for conv in ("conv_in", "conv_out")]
    yield from _renamed("", "", top + ["quant_conv", "post_quant_conv"])
    yield from _renamed("", "", {f"{part}.norm_out": f"{part}.conv_norm_out" for part in ("encoder", "decoder")})
    width = channels[0]
    for i, out in enumerate(channels):
        for j in range(layers):
            yield from _vae_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", width != out)
            width = out
        if i < levels - 1:
            yield from _renamed(f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0", ["conv"])
    yield from _vae_mid("encoder")
    yield from _vae_mid("decoder")
    for i, out in enumerate(reversed(channels)):
        level = levels - 1 - i
        for j in range(layers + 1):
            yield from _vae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", width != out)
            width = out
        if i < levels - 1:
            yield from _renamed(f"decoder.up.{level}.upsample", f"decoder.up_blocks.{i}.upsamplers.0", ["conv"])


def text_table(num_layers: int) -> Iterator[Entry]:
    """Every CLIP text-model tensor; SD 1.x checkpoints store transformers' own names, so only prefixes change."""
    names = ["embeddings.token_embedding", "embeddings.position_embedding"]
    yield from _renamed("text_model", "text_model", names, params=("weight",))
    for i in range(num_layers):
        sub = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"]
        yield from _renamed(f"text_model.encoder.layers.{i}", f"text_model.encoder.layers.{i}", sub)
    yield from _renamed("text_model", "text_model", ["final_layer_norm"])


_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openclip_table(num_layers: int) -> Iterator[Entry]:
    """Every CLIP text-model tensor under OpenCLIP's names (SD 2.x, keys after `cond_stage_model.model.`): the
    position embedding is a bare parameter, each residual block `transformer.resblocks.N` holds its query, key and
    value projections as one `attn.in_proj_weight` [3C, C] (and bias), in that order."""
    yield "token_embedding.weight", "text_model.embeddings.token_embedding.weight", SAME
    yield "positional_embedding", "text_model.embeddings.position_embedding.weight", SAME
    for i in range(num_layers):
        block, layer = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        yield from _renamed(block, layer, _OPENCLIP_BLOCK)
        for p in ("weight", "bias"):
            for j, name in enumerate("qkv"):
                yield f"{block}.attn.in_proj_{p}", f"{layer}.self_attn.{name}_proj.{p}", IN_PROJ + str(j)
    yield from _renamed("ln_final", "text_model.final_layer_norm", [""])


def controlnet_table(config: Mapping) -> Iterator[Entry]:
    """Every ControlNet tensor (github.com/lllyasviel/ControlNet's layout, keys after `control_model.`): the down
    path and middle block named as in the U-Net (unet_table), the control image's convs as `input_hint_block.N`
    (every other module of that sequence is a SiLU), one 1x1 zero conv per skip connection as `zero_convs.N.0`, and
    the middle block's as `middle_block_out.0`."""
    config = _as_dict(config)
    kinds = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    unet = {**config, "up_block_types": [kinds.get(t, t) for t in reversed(config["down_block_types"])]}
    own = ("time_embedding.", "conv_in.", "down_blocks.", "mid_block.")
    yield from (entry for entry in unet_table(unet) if entry[1].startswith(own))
    steps = len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1
    convs = ["conv_in", *(f"blocks.{i}" for i in range(2 * steps)), "conv_out"]
    yield from _renamed("input_hint_block", "controlnet_cond_embedding",
                        {str(2 * i): name for i, name in enumerate(convs)})
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    skips = 1 + levels * layers + levels - 1
    yield from _renamed("", "", {f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in range(skips)})
    yield from _renamed("", "", {"middle_block_out.0": "controlnet_mid_block"})


def controlnet_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A ControlNet single file (keys with or without `control_model.`) as a diffusers-keyed state dict. Strict,
    as original_to_diffusers; in a file that also holds a Stable Diffusion model, only control_model.* is read."""
    prefix = CONTROL if any(k.startswith(CONTROL) for k in state_dict) else ""
    out, missing, used = {}, [], set()
    for original, diffusers, kind in controlnet_table(config):
        key = prefix + original
        used.add(key)
        if key not in state_dict:
            missing.append(key)
            continue
        out[diffusers] = _to_diffusers(state_dict[key], kind, original)
    unexpected = [k for k in state_dict if k.startswith(prefix) and k not in used and k not in IGNORED_KEYS]
    _mismatch("ControlNet checkpoint", missing, unexpected,
              "check that it is a ControlNet for Stable Diffusion 1.x/2.x and that the config describes it")
    return out


def diffusers_to_controlnet(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """The reverse: a diffusers-keyed ControlNet state dict in the single-file layout (no prefix)."""
    table = list(controlnet_table(config))
    missing = [d for _, d, _ in table if d not in state_dict]
    unexpected = sorted(set(state_dict) - {d for _, d, _ in table})
    _mismatch("ControlNet state dict", missing, unexpected, "check that the config belongs to these weights")
    return {original: _to_original(state_dict[d], kind, d) for original, d, kind in table}


def checkpoint_table(unet_config: Mapping, vae_config: Mapping, text_layers: int,
                     openclip: bool = False) -> Iterator[tuple[str, ...]]:
    """(component, full original key, diffusers key within the component, reshape kind) for a whole checkpoint;
    `openclip`: the text encoder in SD 2.x's OpenCLIP layout rather than SD 1.x's transformers layout."""
    text = ("text_encoder", OPENCLIP, openclip_table(text_layers)) if openclip else \
        ("text_encoder", TEXT, text_table(text_layers))
    for component, prefix, table in (("unet", UNET, unet_table(unet_config)), ("vae", VAE, vae_table(vae_config)),
                                     text):
        for original, diffusers, kind in table:
            yield component, prefix + original, diffusers, kind


# -------------------------------------------------------------------------------------------------------- configs
_UNET_FIXED = {  # diffusers options that add or rename tensors; SD 1.x/2.x use these values
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "class_embed_type": (None,), "addition_embed_type": (None,),
    "num_class_embeds": (None,), "encoder_hid_dim": (None,), "time_cond_proj_dim": (None,),
    "dual_cross_attention": (False,), "reverse_transformer_layers_per_block": (None,), "attention_type": ("default",),
}

_VAE_FIXED = {"mid_block_add_attention": (True,), "use_quant_conv": (True,), "use_post_quant_conv": (True,)}


def _as_dict(config) -> dict:
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


def _check_fixed(config: dict, fixed: dict, what: str) -> None:
    for key, accepted in fixed.items():
        value = config.get(key, accepted[0])
        value = tuple(value) if isinstance(value, list) else value
        if value not in accepted:
            raise ValueError(f"{what} config {key}={value!r} has no SD 1.x single-file layout (supported: "
                             f"{' or '.join(map(repr, accepted))}); use a diffusers folder for this architecture")


def _unet_config(config) -> dict:
    config = _as_dict(config)
    _check_fixed(config, _UNET_FIXED, "U-Net")
    for key, allowed in (("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D")),
                         ("up_block_types", ("CrossAttnUpBlock2D", "UpBlock2D"))):
        bad = [t for t in config[key] if t not in allowed]
        if bad or len(config[key]) != len(config["block_out_channels"]):
            raise ValueError(f"U-Net config {key}={list(config[key])}: need one of {allowed} per entry of "
                             f"block_out_channels ({len(config['block_out_channels'])} levels)")
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)) and len(set(depth)) == 1:  # the same depth written once per level
        depth = depth[0]
    if not isinstance(depth, int) or not isinstance(config["layers_per_block"], int):
        raise ValueError("U-Net config layers_per_block and transformer_layers_per_block must be single integers "
                         "in the SD 1.x layout (per-level lists are an SDXL feature)")
    return {**config, "depth": depth}


def _vae_config(config) -> dict:
    config = _as_dict(config)
    _check_fixed(config, _VAE_FIXED, "VAE")
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != allowed for t in config[key]) or len(config[key]) != len(config["block_out_channels"]):
            raise ValueError(f"VAE config {key}={list(config[key])}: need {allowed!r} once per entry of "
                             "block_out_channels")
    return config


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct integers that follow `prefix` in `keys` (e.g. the layer numbers of a module list)."""
    return sorted({int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)})


def _count(keys: Iterable[str], prefix: str) -> int:
    """Length of the module list under `prefix`; a gap in the numbering then shows up as missing keys."""
    return max(_indices(keys, prefix), default=-1) + 1


def infer_unet_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The key-relevant part of a diffusers U-Net config, read back from its state dict."""
    levels = _indices(state_dict, "down_blocks.")

    def kinds(part: str, attention: str, plain: str) -> list[str]:
        return [attention if _indices(state_dict, f"{part}.{i}.attentions.") else plain for i in levels]

    return {
        "block_out_channels": [state_dict[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels],
        "layers_per_block": _count(state_dict, "down_blocks.0.resnets."),
        "transformer_layers_per_block": _count(state_dict, "mid_block.attentions.0.transformer_blocks."),
        "down_block_types": kinds("down_blocks", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": kinds("up_blocks", "CrossAttnUpBlock2D", "UpBlock2D"),
    }


def infer_vae_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The key-relevant part of a diffusers AutoencoderKL config, read back from its state dict."""
    levels = _indices(state_dict, "encoder.down_blocks.")
    return {
        "block_out_channels": [state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels],
        "layers_per_block": _count(state_dict, "encoder.down_blocks.0.resnets."),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
    }


# ----------------------------------------------------------------------------------------------------- conversion
def _to_diffusers(tensor: torch.Tensor, kind: str, key: str) -> torch.Tensor:
    if kind.startswith(IN_PROJ):  # a third of OpenCLIP's fused query/key/value tensor: a view
        if tensor.shape[0] % 3:
            raise ValueError(f"{key}: expected a fused query/key/value tensor of 3C rows, got shape "
                             f"{tuple(tensor.shape)}")
        return tensor.chunk(3)[int(kind[len(IN_PROJ):])]
    if kind == SAME or tensor.ndim == 2:  # some re-saved SD 1.x files already store the VAE attention as linear
        return tensor
    if tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1):
        return tensor[:, :, 0, 0]  # a view: no copy
    raise ValueError(f"{key}: expected a 1x1 convolution weight [C, C, 1, 1], got shape {tuple(tensor.shape)}")


def _to_original(tensor: torch.Tensor, kind: str, key: str) -> torch.Tensor:
    if kind == SAME or kind.startswith(IN_PROJ):  # (the fused projection is joined by the caller)
        return tensor
    if tensor.ndim == 2:
        return tensor[:, :, None, None]
    raise ValueError(f"{key}: expected a linear weight [C, C], got shape {tuple(tensor.shape)}")


def _ema_key(key: str) -> str:
    """LDM's EMA stores `model.diffusion_model.a.b` as `model_ema.diffusion_modelab` (buffer names cannot hold dots)."""
    return EMA + key[len("model."):].replace(".", "")


def _listed(title: str, items: list[str], limit: int = 20) -> str:
    if not items:
        return ""
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


def _mismatch(what: str, missing: list[str], unexpected: list[str], fix: str) -> None:
    if missing or unexpected:
        raise ValueError(f"{what}: keys differ from the Stable Diffusion layout ({fix}):"
                         + _listed("missing keys", sorted(set(missing)))  # (a fused tensor is missed 3 times)
                         + _listed("unexpected keys", sorted(unexpected)))


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping, vae_config: Mapping,
                          prefer_ema: bool = False,
                          text_layers: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Split an SD 1.x or 2.x single-file state dict into diffusers-keyed {"unet", "vae", "text_encoder"} state
    dicts (the text encoder with transformers' `text_model.` prefix).

    With `prefer_ema`, U-Net weights come from the `model_ema.*` copy when the file has one (full training
    checkpoints); "EMA-only" files have none, their `model.diffusion_model.*` weights being the EMA already.
    `text_layers`: the text encoder's depth in its config (default: as many layers as the file holds). SD 2.x files
    hold OpenCLIP's whole text tower, one block more than SD 2.x runs (it conditions on the penultimate block's
    output, with the final layer norm, as a diffusers CLIPTextModel one block shorter does): that last block is
    left unread.
    Strict: a missing tensor or an unknown key raises ValueError listing them.
    """
    openclip = any(k.startswith(OPENCLIP) for k in state_dict)
    layers = OPENCLIP + "transformer.resblocks." if openclip else TEXT + "text_model.encoder.layers."
    stored = _count(state_dict, layers)
    text_layers = stored if text_layers is None else text_layers
    unread = f"{OPENCLIP}transformer.resblocks.{stored - 1}." if openclip and stored == text_layers + 1 else None
    use_ema = prefer_ema and any(k.startswith(EMA + "diffusion_model") for k in state_dict)
    out: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    used, missing = set(), []
    table = checkpoint_table(unet_config, vae_config, text_layers, openclip=openclip)
    for component, original, diffusers, kind in table:
        source = _ema_key(original) if use_ema and component == "unet" else original
        if source not in state_dict:
            missing.append(source)
            continue
        used.add(source)
        out[component][diffusers] = _to_diffusers(state_dict[source], kind, source)
    skipped = UNET if use_ema else EMA  # the U-Net copy not chosen; a ControlNet beside the model (ControlNet 1.0)
    unexpected = [k for k in state_dict if k not in used and k not in IGNORED_KEYS and not k.startswith(skipped)
                  and not k.startswith(CONTROL) and not (unread and k.startswith(unread))]
    _mismatch("checkpoint", missing, unexpected, "check that it is a Stable Diffusion 1.x or 2.x checkpoint and "
              "that the configs describe its architecture")
    return out


def diffusers_to_original(unet_sd: Mapping[str, torch.Tensor], vae_sd: Mapping[str, torch.Tensor],
                          text_sd: Mapping[str, torch.Tensor], unet_config: Mapping | None = None,
                          vae_config: Mapping | None = None, openclip: bool = False) -> dict[str, torch.Tensor]:
    """Join diffusers-keyed U-Net, VAE and CLIP text-model state dicts into one single-file state dict: SD 1.x's
    layout, or with `openclip` SD 2.x's (the text encoder under OpenCLIP's names, as many blocks as it has).

    The configs are read back from the state dicts when not given. Text-model keys may carry transformers'
    `text_model.` prefix (transformers 4) or not (transformers 5); its position_ids buffer is dropped.
    """
    text_sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text_sd.items()}
    text_sd.pop("text_model.embeddings.position_ids", None)
    parts = {"unet": unet_sd, "vae": vae_sd, "text_encoder": text_sd}
    table = checkpoint_table(unet_config or infer_unet_config(unet_sd), vae_config or infer_vae_config(vae_sd),
                             _count(text_sd, "text_model.encoder.layers."), openclip=openclip)
    out, used, missing, fused = {}, {name: set() for name in parts}, [], {}
    for component, original, diffusers, kind in table:
        if diffusers not in parts[component]:
            missing.append(f"{component}: {diffusers}")
            continue
        used[component].add(diffusers)
        tensor = _to_original(parts[component][diffusers], kind, diffusers)
        if kind.startswith(IN_PROJ):
            fused.setdefault(original, []).append(tensor)
        else:
            out[original] = tensor
    unexpected = [f"{name}: {k}" for name, sd in parts.items() for k in sd if k not in used[name]]
    _mismatch("diffusers state dicts", missing, unexpected, "check that the configs belong to these weights")
    out.update({original: torch.cat(parts) for original, parts in fused.items()})  # query, key, value in order
    return out


# --------------------------------------------------------------------------------------------------- architecture
_ARCHITECTURES = {  # name -> (description, evidence, diffusers pipeline class that converts it)
    "sd1": ("Stable Diffusion 1.x", "", "StableDiffusionPipeline"),
    "sd1-inpainting": ("Stable Diffusion 1.x inpainting", "a U-Net with 9 input channels",
                       "StableDiffusionInpaintPipeline"),
    "sd2": ("Stable Diffusion 2.x", "an OpenCLIP text encoder under cond_stage_model.model.* or 1024-wide "
            "U-Net cross-attention", "StableDiffusionPipeline"),
    "sd2-inpainting": ("Stable Diffusion 2.x inpainting", "a U-Net with 9 input channels",
                       "StableDiffusionInpaintPipeline"),
    "sd2-depth": ("Stable Diffusion 2.x depth-to-image", "a MiDaS depth model under depth_model.* and a U-Net with "
                  "5 input channels", "StableDiffusionDepth2ImgPipeline"),
    "sdxl": ("Stable Diffusion XL", "keys under conditioner.embedders.* or model.diffusion_model.label_emb.*",
             "StableDiffusionXLPipeline"),
    "controlnet": ("ControlNet", "input_hint_block.* and zero_convs.* without a Stable Diffusion model", ""),
    "component": ("single model's", "keys as in a pipeline folder's component: a diffusers U-Net or VAE "
                  "(conv_in.*, down_blocks.*, decoder.up_blocks.*) or a transformers CLIP text model (text_model.*)",
                  ""),
    "unknown": ("unrecognised", "no model.diffusion_model.* U-Net with a cond_stage_model.transformer.* (CLIP) or "
                "cond_stage_model.model.* (OpenCLIP) text encoder", "matching diffusers pipeline"),
}


SUPPORTED = ("sd1", "sd1-inpainting", "sd2", "sd2-inpainting")


def detect_architecture(keys: Mapping[str, torch.Tensor] | Iterable[str]) -> str:
    """A key of _ARCHITECTURES ("sd1", "sd1-inpainting", "sd2", "sd2-inpainting", "sdxl", ...), from key names (and
    shapes when given a mapping of tensors or shapes: SD 2.x's 1024-wide cross-attention tells it from SD 1.x's 768
    where the text encoder does not, and the U-Net's input channels tell inpainting models)."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in keys.items()} if isinstance(keys, Mapping) else {}
    names = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in names)

    if (has("input_hint_block.") or has(CONTROL + "input_hint_block.")) and not has(UNET):
        return "controlnet"
    if has("conditioner.embedders.") or has(UNET + "label_emb.0."):
        return "sdxl"
    if has("depth_model."):
        return "sd2-depth"
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    inpainting = "-inpainting" if conv_in is not None and conv_in[1:2] == (9,) else ""
    if has(OPENCLIP) or any(k.startswith(UNET) and k.endswith("attn2.to_k.weight")
                            and shapes.get(k, ())[-1:] == (1024,) for k in names):
        return "sd2" + inpainting
    if has(UNET) and has(TEXT + "text_model."):
        return "sd1" + inpainting
    if (has("conv_in.") and has("down_blocks.")) or has("encoder.down_blocks.") or has("decoder.up_blocks.") \
            or has("text_model.embeddings.") or has("embeddings.token_embedding."):
        return "component"
    return "unknown"


def check_supported(keys: Mapping[str, torch.Tensor] | Iterable[str], path) -> str:
    """Return "sd1", "sd1-inpainting", "sd2" or "sd2-inpainting", or raise ValueError naming the architecture found
    and the way to load it instead."""
    arch = detect_architecture(keys)
    if arch in SUPPORTED:
        return arch
    name, evidence, pipeline = _ARCHITECTURES[arch]
    if arch == "controlnet":
        raise ValueError(f"{path}: this is a ControlNet single file ({evidence}): load it with "
                         "latentdiff.ControlNetModel.from_single_file(path) and pass it to "
                         "LatentDiffusionControlNetPipeline.from_pretrained(base_pipeline_folder, controlnet=...)")
    if arch == "component":
        raise ValueError(f"{path}: this is a {name} weights file ({evidence}), not a single-file checkpoint of a "
                         "whole pipeline: load the pipeline folder that holds it with "
                         "LatentDiffusionPipeline.from_pretrained(folder), or the model with its class's "
                         "from_pretrained(its folder)")
    raise ValueError(
        f"{path}: this is {'an' if name[0] in 'aeiou' else 'a'} {name} checkpoint ({evidence}); from_single_file "
        "supports only Stable Diffusion 1.x and 2.x single files (text to image and inpainting). Convert it to a "
        f"diffusers folder with diffusers ({pipeline}.from_single_file(path).save_pretrained(folder)) and load "
        "that folder with LatentDiffusionPipeline.from_pretrained(folder), if latentdiff supports its architecture"
    )
