"""The text side of Stable Diffusion: CLIP's tokenizer and text encoder (Radford et al. 2021).

SD 1.x conditions its U-Net on the last hidden state of CLIP ViT-L/14's text transformer, [B, 77, 768]
(Rombach et al. 2022, sec. 3.3). The encoder is our own CLIPTextModel (clip.py), with transformers' parameter
names and config.json; this module adds presets, strict safetensors loading for both key layouts, and clip-skip.

Key layouts: transformers 4 (and SD checkpoints, and the hub's SD folders) name the weights
"text_model.embeddings...", transformers 5 drops the "text_model." prefix. We read both, and write the prefixed
layout, which every transformers version and diffusers' single-file tools load.

Nothing here imports transformers (importing it costs seconds); functions that take a model also accept
transformers' CLIPTextModel.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoints import CheckpointError, load_folder_weights, load_into, read_json, require_path, save_safetensors
from ..checkpoints import with_variant, write_json
from .clip import CLIPTextConfig, CLIPTextModel
from .tokenizer import CLIPTokenizer

__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTokenizer",
    "text_config_sd15",
    "text_config_tiny",
    "build_text_encoder",
    "read_text_config",
    "load_text_encoder",
    "build_text_encoder_from_folder",
    "load_text_encoder_state_dict",
    "save_text_encoder",
    "text_encoder_state_dict",
    "to_transformers",
    "encode_prompt_ids",
]

PREFIX = "text_model."
WEIGHTS_NAME = "model.safetensors"
POSITION_IDS = "embeddings.position_ids"  # a buffer older files carry; it is always arange(77): dropped


def text_config_sd15() -> CLIPTextConfig:
    """CLIP ViT-L/14's text transformer, as SD 1.x uses it: 123,060,480 parameters."""
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip


def text_config_sd2() -> CLIPTextConfig:
    """OpenCLIP ViT-H/14's text transformer as SD 2.x uses it: GELU, 1024 wide, and 23 of its 24 blocks (SD 2.x
    conditions on the penultimate block's output, after the final layer norm): 340,387,840 parameters."""
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip


def text_config_tiny(**overrides) -> CLIPTextConfig:
    """A small CLIP text transformer for tests and tiny pipelines. It keeps CLIP's vocabulary and 77 positions,
    so the real tokenizer drives it; width and depth are small (override any CLIPTextConfig field)."""
    fields = dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    return CLIPTextConfig(**{**fields, **overrides})


def build_text_encoder(config: CLIPTextConfig, seed: int | None = None) -> CLIPTextModel:
    """A randomly initialised CLIPTextModel (eval mode); `seed` makes the weights reproducible."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # seeding leaves the caller's RNG alone
        if seed is not None:
            torch.manual_seed(seed)
        return CLIPTextModel(config).eval()


def _core(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding embeddings / encoder / final_layer_norm: `model.text_model` in ours and transformers 4,
    the model itself in transformers 5."""
    return getattr(model, "text_model", model)


def text_encoder_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights under "text_model." keys (ours, or transformers' CLIPTextModel of any version)."""
    core = _core(model)
    return {PREFIX + k: v for k, v in core.state_dict().items() if k != POSITION_IDS}


def load_text_encoder_state_dict(
    config: CLIPTextConfig, state_dict: dict[str, torch.Tensor], source: str = "state dict",
    torch_dtype: torch.dtype | None = None,
) -> CLIPTextModel:
    """A CLIPTextModel holding `state_dict`, whose keys may carry the "text_model." prefix or not (all alike).
    Strict: a missing, unexpected or mis-shaped key is a CheckpointError listing them. The model is built on the
    meta device and the tensors assigned, so a large encoder is never initialised randomly or held twice."""
    prefixed = [k for k in state_dict if k.startswith(PREFIX)]
    if prefixed and len(prefixed) != len(state_dict):
        plain = sorted(k for k in state_dict if not k.startswith(PREFIX))
        raise CheckpointError(f"{source}: keys mix the '{PREFIX}' layout with plain keys ({plain[:5]} ...)")
    weights = {k.removeprefix(PREFIX): v for k, v in state_dict.items()}
    weights.pop(POSITION_IDS, None)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    load_into(model.text_model, weights, source, dtype=torch_dtype)
    return model.eval()


def read_text_config(folder: str | os.PathLike) -> CLIPTextConfig:
    """The CLIPTextConfig in `folder`/config.json (a text_encoder folder of a pipeline)."""
    path = require_path(folder, "text encoder folder") / "config.json"
    return CLIPTextConfig.from_dict(read_json(path), str(path))


def load_text_encoder(
    folder: str | os.PathLike, torch_dtype: torch.dtype | None = None, subfolder: str | None = None,
    variant: str | None = None,
) -> CLIPTextModel:
    """Read a text-encoder folder: config.json + model.safetensors (either key layout), its `variant`
    (model.fp16.safetensors) or the shards model.safetensors.index.json lists. torch_dtype=None keeps the dtype
    stored in the file."""
    folder = require_path(Path(folder) / subfolder if subfolder else folder, "text encoder folder")
    config = read_text_config(folder)
    state_dict, source = load_folder_weights(folder, WEIGHTS_NAME, variant)
    return load_text_encoder_state_dict(config, state_dict, source, torch_dtype)


def build_text_encoder_from_folder(
    folder: str | os.PathLike, state_dict: dict[str, torch.Tensor], source: str = "state dict",
    torch_dtype: torch.dtype | None = None,
) -> CLIPTextModel:
    """The architecture from `folder`/config.json, the weights from `state_dict` (e.g. the text encoder part of
    an SD 1.x single-file checkpoint)."""
    return load_text_encoder_state_dict(read_text_config(folder), state_dict, source, torch_dtype)


def save_text_encoder(model: torch.nn.Module, folder: str | os.PathLike, variant: str | None = None) -> None:
    """Write config.json + model.safetensors ("text_model." keys; `variant`: model.VARIANT.safetensors) that
    transformers' CLIPTextModel.from_pretrained loads (and we do). `model` is ours or transformers'."""
    folder = Path(folder)
    config = model.config.to_dict() if isinstance(model.config, CLIPTextConfig) else json.loads(
        model.config.to_json_string(use_diff=True))
    config["architectures"] = ["CLIPTextModel"]
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_json(config, folder / "config.json")
    save_safetensors(text_encoder_state_dict(model), folder / with_variant(WEIGHTS_NAME, variant))


def to_transformers(model: CLIPTextModel) -> torch.nn.Module:
    """transformers' CLIPTextModel of the same config holding our `model`'s very tensors (no copy): for code that
    wants transformers' class (the reference in tests and benchmarks). Needs transformers installed."""
    import transformers

    config = transformers.CLIPTextConfig(**{k: v for k, v in model.config.to_dict().items() if k != "architectures"})
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(config)
    core = _core(ref)
    core.load_state_dict(model.text_model.state_dict(), strict=True, assign=True)
    # its position_ids buffer is in no state dict
    core.embeddings.position_ids = torch.arange(config.max_position_embeddings, device=model.device).expand(1, -1)
    left = [name for name, t in [*ref.named_parameters(), *ref.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers' CLIPTextModel has tensors ours does not provide: {left[:5]}")
    return ref.eval().requires_grad_(model.text_model.final_layer_norm.weight.requires_grad)


def encode_prompt_ids(
    text_encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int | None = None
) -> torch.Tensor:
    """Token ids [B, L] -> context [B, L, D] for the U-Net's cross-attention.

    clip_skip=None: the last hidden state (after the final layer norm), as SD 1.x was trained.
    clip_skip=k: the output of the layer k before the last, put through the final layer norm, as diffusers'
    StableDiffusionPipeline.encode_prompt does (k=0 equals None). Some fine-tuned models expect k=1."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype != torch.long:
        what = f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids)
        raise ValueError(f"ids must be a LongTensor [batch, length] from the tokenizer, got {what}")
    config = text_encoder.config
    if ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"ids have length {ids.shape[1]} but the text encoder has {config.max_position_embeddings} positions; "
            "tokenize with model_max_length <= that"
        )
    ids = ids.to(_core(text_encoder).embeddings.token_embedding.weight.device)
    if clip_skip is None:
        return text_encoder(ids).last_hidden_state
    layers = config.num_hidden_layers
    if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
        raise ValueError(f"clip_skip={clip_skip!r}: expected None or an int in [0, {layers - 1}] (layers to skip)")
    # hidden_states = (embeddings, layer 1, ..., layer N), before the final layer norm.
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return _core(text_encoder).final_layer_norm(hidden)
