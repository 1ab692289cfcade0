"""LoRA training (Hu et al. 2021): the U-Net's weights stay frozen and each target layer W learns a low-rank
update, W x + scale * B(A(x)) with A [r, in] (random) and B [out, r] (zero at the start, so training starts from
the pretrained model), scale = alpha / r. The adapters are exported as diffusers' LoRA file (latentdiff.lora
writes it), which latentdiff's and diffusers' load_lora_weights read."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA script
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # the text encoder's (train_text_encoder with LoRA)


class LoRATrainingLayer(nn.Module):
    """`base_layer` (frozen) plus its trainable low-rank update; parameter names as peft's (lora_A, lora_B)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, scale: float):
        super().__init__()
        self.base_layer, self.scale = base, scale
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight.device)
        self.lora_B.to(base.weight.device)

    def __getattr__(self, name: str):
        """The base layer's attributes (in_features, out_features, ...: what code sizing its work by a layer reads),
        as peft's LoRA layers give them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def weight(self) -> torch.Tensor:  # the base's (what code keying caches on a layer's weight reads)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scale


def targeted(path: str, targets) -> bool:
    """peft's rule: a target names a layer by its whole path or by the path's last parts."""
    return any(path == t or path.endswith("." + t) for t in targets)


def add_lora_layers(model: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
                    seed: int = 0) -> dict[str, LoRATrainingLayer]:
    """Freeze `model` and wrap its linear and conv layers named by `targets` in LoRATrainingLayers (A drawn from
    `seed`). Returns them by path."""
    if rank < 1:
        raise ValueError(f"lora_rank must be at least 1, got {rank}")
    model.requires_grad_(False)
    paths = [path for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and
             targeted(path, targets)]
    if not paths:
        raise ValueError(f"lora_target_modules {list(targets)} name no linear or conv layer of the "
                         f"{type(model).__name__} (e.g. to_q, to_k, to_v, to_out.0, proj_in, conv1, ff.net.2)")
    scale = (rank if alpha is None else alpha) / rank
    layers = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for path in paths:
            parent, _, name = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            layers[path] = LoRATrainingLayer(getattr(owner, name), rank, scale)
            setattr(owner, name, layers[path])
    return layers


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Within this block `model` runs as without its adapters (their scale 0): the frozen base model."""
    layers = lora_layers(model).values()
    scales = [layer.scale for layer in layers]
    for layer in layers:
        layer.scale = 0.0
    try:
        yield model
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale


def lora_layers(model: nn.Module) -> dict[str, LoRATrainingLayer]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRATrainingLayer)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the adapters' factors (fp32, CPU), keyed `<layer path>.lora_A.weight` / `.lora_B.weight`."""
    return {f"{path}.lora_{part}.weight": getattr(layer, f"lora_{part}").weight.detach().to("cpu", torch.float32,
                                                                                             copy=True)
            for path, layer in lora_layers(model).items() for part in "AB"}
