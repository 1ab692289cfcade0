"""Our float32 kernels for CPUs with AVX2 and FMA but no AVX-512 (fma.cpp), used by optimize_for_inference() there:
GEGLUs (amx_layers.FmaGEGLU: the feed-forward's projection and its gate, value * gelu(gate), in one pass) and
attention (`attention`). Both are products of 6 x 16 output tiles held in registers. On such a CPU (a 2-core AMD
EPYC, 2 threads) oneDNN's float32 products with GELU and multiply epilogues (packed.PackedGEGLU) ran SD 1.5's 64x64
and 32x32 GEGLUs at ~70-100 GFLOP/s, below its plain products (110-140); this kernel 1.2-1.6x faster there
(`benchmarks/linear_amx.py --kernels fma`). PyTorch's float32 flash attention ran SD 1.5's 64x64 self-attention
(16 heads x 4096 queries of dim 40) in ~540-670 ms; `attention` 1.2-1.6x faster (transposed: 32 queries along
the vectors' lanes, an online softmax over 132 keys at a time; `benchmarks/attention_amx.py --kernel fma`). Their
plain products (linear layers, Winograd's) measured no faster than oneDNN's and torch.bmm there, so those stay.
The GEGLU has amx.py's product API (pack_linear, linear), so AmxGEGLU's code runs it. Built with g++ on first use
(native.py); `available()` is False on CPUs with AVX-512 (oneDNN's and PyTorch's kernels there are twice as wide: not
measured against), without g++, or with LATENTDIFF_NO_FMA=1 (or LATENTDIFF_NO_KERNELS=1) in the environment, and
then oneDNN and PyTorch run."""
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
    lib = native.load(SOURCE, FLAGS, "AVX2 kernels (GEGLU, attention)")
    if lib is None:
        return None
    lib.fma_geglu.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
                              + [ctypes.c_int])
    lib.fma_geglu.restype = None
    lib.fma_attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    lib.fma_attention.restype = ctypes.c_int
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


# From this many queries (a block of the kernel; /tmp timing on the AVX2 AMD EPYC host, 2 threads: 32 queries of head
# dim 160 1.17x PyTorch's self-attention and 1.20x its cross-attention, 64 queries 1.29-1.30x, SD 1.5's 16x16 level
# (256 queries) 1.09x / 1.37x; 16 queries 0.80-1.00x). The VAE's 512-dim head ran 0.83x (its keys and values, 8 MiB
# each, stream from memory once per 32 queries): left to PyTorch by MAX_HEAD_DIM, which sizes the kernel's per-block
# buffers (on the stack).
MIN_QUERIES = 32
MAX_HEAD_DIM = 160
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # (half precision computed in float32)


def suits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention`'s kernel takes these [B, heads, tokens, d] queries, keys and values: float32, bfloat16 or
    float16 (all one) on the CPU, unit stride along d (at most MAX_HEAD_DIM), at least MIN_QUERIES queries, no
    autograd, not traced by torch.compile, and the kernel runs here."""
    return (q.is_cpu and q.dtype == k.dtype == v.dtype and q.dtype in DTYPES and q.dim() == 4 and k.dim() == 4
            and k.shape == v.shape and k.shape[2] > 0 and q.shape[2] >= MIN_QUERIES and q.shape[3] <= MAX_HEAD_DIM
            and (k.shape[0], k.shape[1], k.shape[3]) == (q.shape[0], q.shape[1], q.shape[3])
            and all(t.stride(-1) == 1 for t in (q, k, v))
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
            and not torch.compiler.is_compiling() and available())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (no mask), as F.scaled_dot_product_attention(q, k, v): by our kernel where it
    suits (`suits`: its result is then a [B, heads, N, d] view of a [B, N, heads, d] tensor, so merging the heads
    afterwards copies nothing), else by PyTorch. Half-precision inputs are widened to float32 and the result rounded
    to their dtype once: on these CPUs, which have no half-precision arithmetic, PyTorch's bfloat16 flash attention
    took up to 1.7x as long (SD 1.5's 64x64 self-attention; alike at 64 queries) and its float16 one 2-3.4x (SD
    1.5's attention shapes, 2 threads, AVX2 AMD EPYC; `benchmarks/attention_amx.py --kernel fma --dtypes
    bf16,fp16`), with errors as large or larger."""
    return kernel(q, k, v) if suits(q, k, v) else F.scaled_dot_product_attention(q, k, v)


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The compiled kernel on [B, heads, N, d] queries and [B, heads, Nk, d] keys and values with unit stride along d
    (where `available()`): the result is a [B, heads, N, d] view of a [B, N, heads, d] tensor. bfloat16 or float16
    inputs are widened to float32 for it and the result rounded to their dtype (.to keeps that layout)."""
    if q.dtype != torch.float32:
        return kernel(q.float(), k.float(), v.float()).to(q.dtype)
    b, heads, n, d = q.shape
    out = torch.empty(b, n, heads, d).transpose(1, 2)
    strides = torch.tensor([s for t in (q, k, v, out) for s in t.stride()[:3]], dtype=torch.int64)
    with native.labelled("latentdiff::fma_attention"):
        failed = library().fma_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                         strides.data_ptr(), b, heads, n, k.shape[2], d, d ** -0.5,
                                         torch.get_num_threads())
    if failed == 2:
        raise ValueError(f"the AVX2 attention kernel takes head dims up to {MAX_HEAD_DIM}; got {d}: call "
                         "`attention`, which leaves such heads to PyTorch")
    if failed:
        raise MemoryError(f"the AVX2 attention kernel could not allocate its copies of the keys and values "
                          f"({b * heads} heads x {k.shape[2]} tokens): free memory, or run with fewer heads at once")
    return out

