"""An exponential moving average of a model's weights, the weights a diffusion model is usually sampled with.

Averaging the iterates (Polyak & Juditsky 1992) smooths out the noise of the last optimizer steps; DDPM and Stable
Diffusion sample with the EMA weights. With a fixed decay of 0.9999 the average would remember the random
initialisation for ~10^4 steps, so the decay warms up: after n updates it is min(decay, (1 + n) / (10 + n)).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """`ema.update(model)` after each optimizer step; `ema.copy_to(model)` to sample or export with the average.
    The average is kept in fp32 whatever the model's dtype, on the model's device."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        # the trained parameters (all of them in full training; the adapters when LoRA freezes the rest)
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights."""
        weight = 1.0 - self.current_decay()
        names = list(self.shadow)
        params = dict(model.named_parameters())
        shadow = [self.shadow[n] for n in names]
        current = [params[n].detach().float() for n in names]
        torch._foreach_lerp_(shadow, current, weight)
        self.num_updates += 1

    def state_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s state dict with the averaged parameters in place of its own (buffers kept)."""
        state = dict(model.state_dict())
        for name, value in self.shadow.items():
            state[name] = value.to(state[name].dtype)
        return state

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        params = dict(model.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value)
        return model

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """`model` holds the averages inside, its own parameters again after."""
        params = dict(model.named_parameters())
        own = {name: params[name].detach().clone() for name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in own.items():
                    params[name].copy_(value)

    # the training checkpoints save and restore these (train/state_io.py)
    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = set(self.shadow) - set(state["shadow"]), set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, unexpected "
                             f"{sorted(unexpected)[:5]} (was the checkpoint made with another architecture?)")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.num_updates = int(state["num_updates"])

    def to(self, device) -> "EMA":
        self.shadow = {name: value.to(device) for name, value in self.shadow.items()}
        return self
