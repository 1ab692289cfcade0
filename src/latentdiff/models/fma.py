"""Our GEGLU kernel for CPUs with AVX2 and FMA but no AVX-512 (fma.cpp), used by optimize_for_inference() there
(amx_layers.FmaGEGLU): the feed-forward's projection and its gate, value * gelu(gate), in one pass. On such a CPU
(a 2-core AMD EPYC, 2 threads) oneDNN's float32 products with GELU and multiply epilogues (packed.PackedGEGLU) ran
SD 1.5's 64x64 and 32x32 GEGLUs at ~70-100 GFLOP/s, below its plain products (110-140); this kernel, 6 x 16 output
tiles in registers and the gate applied as they are written, 1.2-1.9x faster there (`benchmarks/linear_amx.py
--kernels fma`), SD 1.5's U-Net forward 1.05x. Its plain products (linear layers, Winograd's) measured no faster than
oneDNN's and torch.bmm there, so it makes GEGLUs alone. The same API as amx.py's products (pack_linear, linear), so
AmxGEGLU's code runs it. Built with g++ on first use (native.py); `available()` is False on CPUs with AVX-512
(oneDNN's kernels there are twice as wide: not measured against), without g++, or with LATENTDIFF_NO_FMA=1 (or
LATENTDIFF_NO_KERNELS=1) in the environment, and then oneDNN runs."""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from . import native

SOURCE = Path(__file__).with_name("fma.cpp")
FLAGS = native.PORTABLE_FLAGS
GEGLU_GROUP = 8  # a packed GEGLU's rows: 8 values, their 8 gates, 8 values, ... (each 16-column tile holds both)


def unavailable() -> str | None:
    """Why the kernels do not run here, or None where they can (then `library()` builds them)."""
    if os.environ.get("LATENTDIFF_NO_FMA", "0") not in ("", "0"):
        return "LATENTDIFF_NO_FMA is set"
    why = native.unavailable()
    if why:
        return why
    flags = native.cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return "this CPU lacks AVX2 or FMA"
    if "avx512f" in flags:
        return "this CPU has AVX-512, where oneDNN's products are twice as wide"
    return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built once and cached on disk), or None where they do not run (a failed build warns)."""
    if unavailable():
        return None
    lib = native.load(SOURCE, FLAGS, "AVX2 GEGLU kernel")
    if lib is None:
        return None
    lib.fma_geglu.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
                              + [ctypes.c_int])
    lib.fma_geglu.restype = None
    return lib


def available() -> bool:
    return library() is not None


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """A float32 [N, K] weight (N a multiple of 16) as `linear` takes it: panels of 16 rows, each depth's 16 numbers
    side by side, [N / 16, K, 16]."""
    n, k = weight.shape
    if n % 16:
        raise ValueError(f"the AVX2 GEGLU kernel takes whole 16-column tiles; got a weight of {n} rows")
    return weight.detach().float().reshape(n // 16, 16, k).transpose(1, 2).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, geglu: bool = False) -> torch.Tensor:
    """value * gelu(gate) (the exact GELU), [value | gate] = x W^T + bias over the last dimension of a float32 CPU
    `x`, out_features / 2 wide, for W packed by `pack_linear` with its rows (and the bias) ordered GEGLU_GROUP values,
    their GEGLU_GROUP gates, ... (amx.linear's signature: `geglu` must be True, `residual` None, a bias given). Under
    torch.compile: one opaque op, latentdiff::fma_geglu."""
    if not geglu or residual is not None or bias is None:
        raise ValueError("the AVX2 kernel makes GEGLUs alone (geglu=True, a bias, no residual); plain linear layers "
                         "are oneDNN's (PackedLinear), as fast on these CPUs")
    if x.dtype != torch.float32 or not x.is_cpu:
        raise TypeError(f"the AVX2 GEGLU kernel takes float32 CPU inputs; got {x.dtype} on {x.device}")
    if torch.compiler.is_compiling():  # one opaque op for torch.compile (ctypes calls cannot be traced)
        return torch.ops.latentdiff.fma_geglu(x, packed, out_features, bias)
    return _geglu(x, packed, out_features, bias)


@torch.library.custom_op("latentdiff::fma_geglu", mutates_args=())
def _geglu_op(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor) -> torch.Tensor:
    return _geglu(x, packed, out_features, bias)


@_geglu_op.register_fake
def _(x, packed, out_features, bias):
    return x.new_empty(*x.shape[:-1], out_features // 2)


def _geglu(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor) -> torch.Tensor:
    """`linear` once its arguments are checked."""
    k = x.shape[-1]
    if x.numel() == 0:  # no rows, or no depth: the bias alone, gated, as PyTorch gives it
        value, gate = bias.expand(*x.shape[:-1], out_features).unflatten(-1, (-1, 2, GEGLU_GROUP)).unbind(-2)
        return (value * F.gelu(gate)).flatten(-2).contiguous()
    rows = x.reshape(-1, k)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty(*x.shape[:-1], out_features // 2)
    bias = bias.contiguous()
    with native.labelled("latentdiff::fma_geglu"):
        library().fma_geglu(rows.data_ptr(), rows.stride(0), packed.data_ptr(), bias.data_ptr(), out.data_ptr(),
                            out.shape[-1], rows.shape[0], out_features, k, torch.get_num_threads())
    return out
