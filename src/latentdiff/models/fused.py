"""Fused elementwise steps of the transformer blocks, for GPU inference: the residual add with the LayerNorm after
it (`add_layer_norm`: one pass instead of two, both results written) and GEGLU's gate (`geglu`: value * gelu(gate)
in one pass over the projection's output instead of two). Each saves a kernel launch, which a small batch on a fast
GPU pays for in host time (SD 1.5: 48 fewer per denoising step), and a round trip of an intermediate through
memory.

Opt-in (`ENABLED = True`) until measured on a GPU (benchmarks/gpu.py's `-fused` variants). Where they apply (a
CUDA device, no autograd, outside torch.compile, contiguous inputs) they run as Triton kernels (fused_triton.py);
elsewhere the plain operations run.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .triton_launch import DTYPES, launch, next_power_of_2, on_device, without_autograd

ENABLED = False
_MAX_D = 8192  # LayerNorm widths one program row covers (SD 1.x/2.x: 320-1280)
_NUM_WARPS = 4


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y))."""
    if _applies(x, y, norm.weight) and norm.bias is not None and x.shape == y.shape \
            and norm.normalized_shape == (x.shape[-1],) and x.shape[-1] <= _MAX_D:
        return on_device(_add_layer_norm, x, y, norm)
    s = x + y
    return s, norm(s)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """value * gelu(gate) (exact GELU) for h = [value | gate] along the last dimension."""
    if _applies(h) and h.shape[-1] % 2 == 0:
        return on_device(_geglu, h)
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


def adds_residual(*layers: nn.Module) -> bool:
    """Whether each layer computes `layer(x, residual)` = residual + layer(x) itself, adding as it writes its output
    (the CPU's packed layers, packed._Packed): the blocks then hand it their residual instead of adding after it."""
    return all(getattr(layer, "adds_residual", False) for layer in layers)


def _applies(*tensors: torch.Tensor) -> bool:
    x = tensors[0]
    return (ENABLED and not torch.compiler.is_compiling()
            and x.is_cuda and x.dtype in DTYPES and all(t.dtype == x.dtype for t in tensors[:2])
            and without_autograd(*tensors) and all(t.is_contiguous() for t in tensors)
            and _kernels() is not None)


def _add_layer_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm):
    d = x.shape[-1]
    rows = x.numel() // d
    rows_per = 4
    s, out = torch.empty_like(x), torch.empty_like(x)
    launch(_kernels()[0], (-(-rows // rows_per), 1, 1), (x, y, norm.weight, norm.bias, s, out),
           (norm.eps, rows, d, rows_per, next_power_of_2(d)), _NUM_WARPS)
    return s, out


def _geglu(h: torch.Tensor) -> torch.Tensor:
    dh = h.shape[-1] // 2
    rows = h.numel() // h.shape[-1]
    block = min(1024, next_power_of_2(dh))
    out = h.new_empty(*h.shape[:-1], dh)
    launch(_kernels()[1], (rows, -(-dh // block), 1), (h, out), (dh, block), _NUM_WARPS)
    return out


@functools.cache
def _kernels():
    """add_layer_norm_kernel, geglu_kernel (compiled on first use); None where Triton is not installed."""
    try:
        from . import fused_triton
    except ImportError:
        return None
    return fused_triton.add_layer_norm_kernel, fused_triton.geglu_kernel
