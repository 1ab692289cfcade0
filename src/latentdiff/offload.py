"""Model CPU offload, as diffusers' `pipe.enable_model_cpu_offload()`: the pipeline's models are kept in CPU memory,
and a model moves to the accelerator when it runs, sending the models of the stage before back. A call then holds
on the accelerator one stage's weights at a time, for the price of moving each stage there once per call (SD 1.5's
U-Net: 3.4 GB in fp32, 1.7 GB in fp16):

    stage 1: the text encoder (and an IP-Adapter's image encoder)   stage 3: the VAE
    stage 2: the U-Net and what runs with it in every step (ControlNets, T2I-Adapters)

A model's entry points (forward, and a VAE's encode and decode) are wrapped on the instance: the wrapper loads the
model's stage, then moves the call's tensors to the accelerator. The pipeline's `device` is then the accelerator's,
so that latents and noise are made there.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

ENTRY_POINTS = ("forward", "encode", "decode")


def to_device(value, device: torch.device):
    """`value` with every tensor in it (in tuples, lists and dicts too) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        moved = [to_device(v, device) for v in value]
        return type(value)(moved) if not hasattr(value, "_fields") else type(value)(*moved)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class ModelOffload:
    """Stages of models (lists), kept on the CPU; calling a model loads its stage on `device` and unloads the one
    loaded before."""

    def __init__(self, stages: list[list[nn.Module]], device: torch.device):
        self.device, self.stages = device, [stage for stage in stages if stage]
        self.loaded: int | None = None  # the stage on the device
        self.wrapped: list[tuple[nn.Module, str]] = []
        self.stage_of: dict[int, int] = {}
        for index, stage in enumerate(self.stages):
            for model in stage:
                self.stage_of[id(model)] = index
                model.to("cpu")
                for name in ENTRY_POINTS:
                    if callable(getattr(type(model), name, None)):
                        self._wrap(model, name)

    def _wrap(self, model: nn.Module, name: str) -> None:
        method = getattr(model, name)

        @functools.wraps(method)
        def run(*args, **kwargs):
            self.load(model)
            return method(*to_device(args, self.device), **to_device(kwargs, self.device))

        object.__setattr__(model, name, run)  # (an instance attribute: nn.Module.__call__ finds it as forward)
        self.wrapped.append((model, name))

    def load(self, model: nn.Module) -> None:
        index = self.stage_of[id(model)]
        if index != self.loaded:
            self.unload()
            for member in self.stages[index]:
                member.to(self.device)
            self.loaded = index

    def unload(self) -> None:
        """Every model back in CPU memory (what a call ends with)."""
        if self.loaded is not None:
            for member in self.stages[self.loaded]:
                member.to("cpu")
            self.loaded = None

    def remove(self) -> None:
        """The models' own entry points back; the models stay where they are (in CPU memory)."""
        self.unload()
        for model, name in self.wrapped:
            model.__dict__.pop(name, None)
        self.wrapped.clear()
