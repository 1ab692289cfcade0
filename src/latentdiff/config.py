"""Dataclass configs that read and write diffusers' config.json, and the from_pretrained/save_pretrained of models.

A config class lists the diffusers keys it implements as dataclass fields. Keys diffusers knows but we do not
implement are listed with the one value we accept (their diffusers default, or the value SD uses); any other value
is an error naming the key, so an unsupported architecture is never silently loaded as a different one.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .checkpoints import (load_folder_weights, load_into, read_json, require_path, save_safetensors, with_variant,
                          write_json)

DIFFUSERS_VERSION = "0.30.0"  # written into config.json; diffusers only uses it to warn about much newer files


def _normalise(value: Any) -> Any:
    return tuple(_normalise(v) for v in value) if isinstance(value, (list, tuple)) else value


class ConfigMixin:
    """Mixed into frozen dataclasses. Subclasses set `diffusers_class` and `fixed` (unimplemented key -> accepted
    value or tuple of accepted values wrapped in `AnyOf`)."""

    diffusers_class: ClassVar[str] = ""
    fixed: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        declared = data.get("_class_name")
        if cls.diffusers_class and isinstance(declared, str) and declared != cls.diffusers_class:
            raise ValueError(f"{cls.__name__}: this config is for {declared} (its _class_name), not for "
                             f"{cls.diffusers_class}: give the {cls.diffusers_class} folder (e.g. the pipeline's "
                             f"unet/ or vae/), or load it with the class for {declared}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key.startswith("_"):
                continue
            value = _normalise(value)
            if key in names:
                kwargs[key] = value
            elif key in cls.fixed:
                accepted = cls.fixed[key]
                choices = accepted.values if isinstance(accepted, AnyOf) else (_normalise(accepted),)
                if value not in choices:
                    shown = " or ".join(repr(c) for c in choices)
                    raise ValueError(
                        f"{cls.__name__}: config key {key!r} = {value!r} is not supported by latentdiff "
                        f"(supported: {shown}); this architecture is outside the Stable Diffusion 1.x/2.x subset"
                    )
            else:
                raise ValueError(
                    f"{cls.__name__}: unknown config key {key!r} = {value!r}; expected keys: {sorted(names)}"
                )
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        """Checks across fields; raise ValueError naming the key."""

    def to_dict(self) -> dict[str, Any]:
        out = {"_class_name": self.diffusers_class, "_diffusers_version": DIFFUSERS_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class AnyOf:
    values: tuple


def returned(value: Any, return_dict: bool | None, output: Callable[[Any], Any]) -> Any:
    """What a model call returns: the bare value when return_dict is not given (how latentdiff calls its models);
    with return_dict as diffusers' models take it, `output(value)` (True: `.sample`, `.latent_dist`) or the
    1-tuple (value,) (False), so that diffusers' `model(..., return_dict=False)[0]` is the whole batch here too."""
    if return_dict is None:
        return value
    return output(value) if return_dict else (value,)


class ModelMixin(nn.Module):
    """from_pretrained / save_pretrained in the diffusers layout: config.json + diffusion_pytorch_model.safetensors."""

    config_class: ClassVar[type] = None
    weights_name: ClassVar[str] = "diffusion_pytorch_model.safetensors"

    @classmethod
    def from_config(cls, config):
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        return cls(config)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu", variant: str | None = None,
    ):
        """config.json and the weights of `folder` (or its `subfolder`): diffusion_pytorch_model.safetensors, its
        `variant` (diffusion_pytorch_model.fp16.safetensors, say), or the shards its .index.json lists."""
        folder = require_path(Path(folder) / subfolder if subfolder else folder, f"{cls.__name__} folder")
        config = cls.config_class.from_dict(read_json(folder / "config.json"))
        state_dict, source = load_folder_weights(folder, cls.weights_name, variant, device)
        with torch.device("meta"):
            model = cls(config)
        return load_into(model, state_dict, source, dtype=torch_dtype).eval()

    def save_pretrained(self, folder: str | os.PathLike, variant: str | None = None) -> None:
        """config.json and the weights (`variant`: under diffusers' name for it, NAME.VARIANT.safetensors)."""
        folder = Path(folder)
        write_json(self.config.to_dict(), folder / "config.json")
        save_safetensors(self.state_dict(), folder / with_variant(self.weights_name, variant))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
