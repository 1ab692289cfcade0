"""Our kernels on Intel AMX tiles for the CPU (amx.cpp), used by optimize_for_inference() where they beat PyTorch's:
attention in bfloat16 and float32 (`attention`), float32 linear layers (`pack_linear`, `linear`; amx_layers.AmxLinear
and AmxGEGLU), Winograd's per-point products (`pack_points`, `points`; packed.WinogradConv2d) and float32 direct
convolutions (`pack_conv`, `conv`, `conv2d`, `upsample_conv2d`; amx_layers.AmxConv2d and AmxUpsampleConv). SD 1.5's
U-Net at 512x512 spent ~40% of a bf16 forward in the 64x64 level's self-attention (2 x 8 heads, 4096 tokens, head dim
40), where PyTorch's CPU flash kernel is bound by its softmax, not its matrix products (~87 ms at head dim 8, ~102 at
40; 2 threads); this kernel takes ~58 ms. In float32 the kernels split each number into three bfloat16 parts and take
six tile products of parts per product, as exact as PyTorch's float32 kernels (errors against float64 the same or
smaller): attention ~160 ms there against PyTorch's ~250, linear layers 1.2-1.8x oneDNN's float32 products,
convolutions 1.2-2.0x its direct ones. The source is compiled with the system's g++ on first use (about 2 s;
native.py) and loaded with ctypes; its OpenMP threads are PyTorch's own. Where the CPU lacks AMX or the compiler is
missing, `available()` is False (with the reason from `unavailable()`) and everything stays with PyTorch, except
bfloat16 attention on CPUs with AVX512-BF16 (AMD Zen 4, Intel Cooper Lake): the same source built without its tile
code (`avx512_library()`) takes the products with vdpbf16ps, where PyTorch's CPU flash kernel runs no faster in
bfloat16 than in float32 (SD 1.5's 64x64 self-attention, 2 threads, AMD EPYC: 318-392 ms per call there)."""
from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import native

SOURCE = Path(__file__).with_name("amx.cpp")
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++17", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mfma"]
CPU_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512vl")
AVX512_FLAGS = [flag for flag in FLAGS if not flag.startswith("-mamx")] + ["-DLATENTDIFF_AVX512_ATTENTION"]
AVX512_CPU_FLAGS = ("avx512_bf16", "avx512bw", "avx512vl")
# Below this many queries PyTorch's kernel is about as fast (benchmarks/attention_amx.py, 2 threads, SD 1.5's
# self- and cross-attention: 16x16 latents' 256 queries 0.9x and 1.3x, 0.1 ms apart; 32x32's 1024, 1.4x and 1.9x;
# 64x64's 4096, 1.7x and 2.4x).
MIN_QUERIES = 1024
# The AVX-512 kernel wins from fewer in bfloat16 (benchmarks/attention_amx.py's shapes, AMD EPYC, 2 threads: 1.8-1.9x
# at SD 1.5's 8x8 level, 64 queries of head dim 160; 2.0-2.5x from 256 up; 1.2x at 64 queries of dim 24).
AVX512_MIN_QUERIES = 64
# Above this head dim it loses (the VAE's single 512-dim head at 64x64: 31 vs 22 ms); SD 2.x's 64 wins 1.5x. The
# AVX-512 build wins there too (bf16, AMD EPYC, 2 threads: 183 vs 87 ms).
MAX_HEAD_DIM = 160
AVX512_MAX_HEAD_DIM = 512


def unavailable(cpu_flags: tuple[str, ...] = CPU_FLAGS) -> str | None:
    """Why the kernel cannot run on this machine, or None when it can (then `library()` builds it); with
    cpu_flags=AVX512_CPU_FLAGS, the same for the AVX-512 attention kernel (`avx512_library()`).
    LATENTDIFF_NO_AMX=1 (read at the first use) leaves what these kernels do to PyTorch and oneDNN, as on a CPU
    without AMX or AVX512-BF16; the portable kernels (native.py) stay."""
    why = native.unavailable()
    if why:
        return why
    if os.environ.get("LATENTDIFF_NO_AMX", "0") not in ("", "0"):
        return "LATENTDIFF_NO_AMX is set"
    missing = [flag for flag in cpu_flags if flag not in native.cpu_flags()]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built once per source version and cached on disk), or None where they cannot run; a
    failed build on a CPU that has AMX warns with the compiler's message and leaves attention and linear layers to
    PyTorch."""
    if unavailable():
        return None
    lib = native.load(SOURCE, FLAGS, "AMX kernels (attention, linear layers, Winograd products)",
                      "a g++ that supports -mamx-tile (11 or newer)")
    if lib is None:
        return None
    if lib.amx_request() != 0:  # Linux grants the AMX tile state on request only (arch_prctl)
        warnings.warn("Linux refused this process the AMX tile state; attention and linear layers stay with "
                      "PyTorch's kernels", RuntimeWarning, stacklevel=2)
        return None
    for function in (lib.amx_attention, lib.amx_attention_fp32):
        _attention_signature(function)
    lib.amx_packed_linear_size.argtypes = [ctypes.c_int64] * 2
    lib.amx_packed_linear_size.restype = ctypes.c_int64
    lib.amx_pack_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.amx_pack_linear.restype = None
    lib.amx_linear.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3
                               + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 4
                               + [ctypes.c_int, ctypes.c_int, ctypes.c_void_p])
    lib.amx_linear.restype = ctypes.c_int
    lib.amx_linear_passes.argtypes = [ctypes.c_int64, ctypes.c_int]
    lib.amx_linear_passes.restype = ctypes.c_int64
    lib.amx_linear_points.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64]
                                      + [ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_int])
    lib.amx_linear_points.restype = ctypes.c_int
    lib.amx_conv.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    lib.amx_conv.restype = ctypes.c_int
    return lib


@functools.cache
def avx512_library() -> ctypes.CDLL | None:
    """The bfloat16 attention kernel built for AVX512-BF16 (amx.cpp with LATENTDIFF_AVX512_ATTENTION: its
    `amx_attention` alone), or None where it cannot run here. `attention` takes it where the AMX kernels do not run
    (they are faster)."""
    if unavailable(AVX512_CPU_FLAGS):
        return None
    lib = native.load(SOURCE, AVX512_FLAGS, "AVX-512 BF16 attention kernel", "a g++ that supports -mavx512bf16 (10 "
                      "or newer)")
    if lib is not None:
        _attention_signature(lib.amx_attention)
    return lib


def _attention_signature(function) -> None:
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
    function.restype = ctypes.c_int


class ConvShape(ctypes.Structure):
    """amx.cpp's ConvShape: a convolution's geometry, in pixels and elements."""
    _fields_ = [(name, ctypes.c_int64) for name in
                "B H W C xb xh xw kh kw stride top left Ho Wo N yb yh yw rb rh rw".split()]


def available() -> bool:
    return library() is not None


def suits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, min_queries: int = MIN_QUERIES,
          max_head_dim: int = MAX_HEAD_DIM) -> bool:
    """Whether the kernel takes these [B, heads, tokens, d] queries, keys and values: all bfloat16 or all float32
    on the CPU, unit stride along an even d of at most max_head_dim, at least min_queries queries (where it pays), no
    autograd, not being traced by torch.compile."""
    return (q.is_cpu and q.dtype == k.dtype == v.dtype in (torch.bfloat16, torch.float32)
            and q.dim() == 4 and q.shape[-1] % 2 == 0 and q.shape[-1] <= max_head_dim and q.shape[2] >= min_queries
            and k.shape == v.shape and k.dim() == 4 and k.shape[2] > 0
            and (k.shape[0], k.shape[1], k.shape[3]) == (q.shape[0], q.shape[1], q.shape[3])
            and all(t.stride(-1) == 1 for t in (q, k, v))
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
            and not torch.compiler.is_compiling())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (no mask), as F.scaled_dot_product_attention(q, k, v): by the AMX kernel where
    it suits (`suits`) and runs here, in bfloat16 by the AVX-512 one where that runs instead, else by PyTorch."""
    lib = library() if suits(q, k, v) else None
    if (lib is None and q.dtype == torch.bfloat16 and suits(q, k, v, AVX512_MIN_QUERIES, AVX512_MAX_HEAD_DIM)
            and not available()):  # (not on AMX CPUs: their PyTorch kernel is faster and this one unmeasured there)
        lib = avx512_library()
    return F.scaled_dot_product_attention(q, k, v) if lib is None else kernel(lib, q, k, v)


def runs_attention(dtype: torch.dtype) -> bool:
    """Whether `attention` runs one of these kernels for this dtype here (else it is PyTorch's)."""
    return available() or (dtype == torch.bfloat16 and avx512_library() is not None)


def kernel(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The compiled kernel (`lib`, from library()) on [B, heads, N, d] queries and [B, heads, Nk, d] keys and
    values, all bfloat16 or all float32, with unit stride along an even d. The result is a [B, heads, N, d] view
    of a [B, N, heads, d] tensor, so merging the heads afterwards copies nothing."""
    b, heads, n, d = q.shape
    out = torch.empty(b, n, heads, d, dtype=q.dtype).transpose(1, 2)
    strides = torch.tensor([s for t in (q, k, v, out) for s in t.stride()[:3]], dtype=torch.int64)
    with native.labelled("latentdiff::amx_attention"):
        function = lib.amx_attention if q.dtype == torch.bfloat16 else lib.amx_attention_fp32
        failed = function(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, heads, n, k.shape[2], d,
                          strides.data_ptr(), d ** -0.5, torch.get_num_threads())
    if failed:
        raise MemoryError(f"the AMX attention kernel could not allocate its buffers (keys and values of {b * heads} "
                          f"heads x {k.shape[2]} tokens, re-laid out): free memory, or run with fewer heads at once")
    return out


def pack_points(weights: torch.Tensor) -> torch.Tensor:
    """P float32 [N, K] weights ([P, N, K]) packed for `points`: [P, pack_linear's size] (int16), each point's
    written in place (no second copy of them all while packing)."""
    p, n, k = weights.shape
    lib = library()
    packed = torch.empty(p, lib.amx_packed_linear_size(n, k), dtype=torch.int16)
    for weight, out in zip(weights, packed):
        weight = weight.detach().float().contiguous()
        lib.amx_pack_linear(weight.data_ptr(), n, k, out.data_ptr(), torch.get_num_threads())
    return packed


def unpack_points(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The float32 weights [P, out_features, in_features] that `pack_points` packed (exactly: the parts sum to them)."""
    n32, k32 = _padded(out_features), _padded(in_features)
    # [P][N32 / 16][3 parts][K32 / 2][16 columns][2 depths] bfloat16 bits (see amx_pack_linear)
    bits = packed.view(-1, n32 // 16, 3, k32 // 2, 16, 2).to(torch.int32) & 0xFFFF
    parts = (bits << 16).view(torch.float32).double().sum(2).float()  # (exact in float64, exactly float32)
    return parts.permute(0, 1, 3, 2, 4).reshape(-1, n32, k32)[:, :out_features, :in_features].contiguous()


def _padded(n: int) -> int:
    return -(-n // 32) * 32


def points(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """torch.bmm(x, W.transpose(1, 2)) for float32 x [P, M, K] and the P weights W [P, out_features, K] packed by
    `pack_points`, with linear's precision: one matrix product per point (Winograd's transform points), the points
    shared out among the threads first, so that each point's weights are read from memory once. Where
    `available()`."""
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 3 or packed.shape[0] != x.shape[0]:
        raise TypeError(f"amx.points takes float32 CPU inputs [P, M, K] for P packed weights; got {x.dtype} "
                        f"{tuple(x.shape)} on {x.device} for {packed.shape[0]} weights")
    p, m, k = x.shape
    x = x.contiguous()
    out = x.new_empty(p, m, out_features)
    with native.labelled("latentdiff::amx_points"):
        failed = library().amx_linear_points(x.data_ptr(), m * k, packed.data_ptr(), packed.shape[1], out.data_ptr(),
                                             m * out_features, out_features, p, m, out_features, k,
                                             torch.get_num_threads())
    if failed:
        raise MemoryError(f"the AMX linear kernel could not allocate its buffers ({m} x {k} inputs split into "
                          "parts): free memory")
    return out


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """A float32 [N, K] weight as `linear` takes it: three bfloat16 parts per number (exactly their sum), laid out
    as AMX tiles (int16 storage, 1.5x the float32 bytes). Where `available()`."""
    return pack_points(weight[None])[0]


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, geglu: bool = False) -> torch.Tensor:
    """x W^T + bias (+ residual) over the last dimension of a float32 CPU `x`, for W packed by `pack_linear`: as exact
    as PyTorch's float32 linear (errors against float64 the same or smaller), 1.2-1.8x faster on SD 1.5's layers
    (benchmarks/linear_amx.py). `residual`: float32, x's shape but `out_features` wide. `geglu`: W's rows ordered 16
    values, their 16 gates, 16 values, ... (out_features a multiple of 32, a bias, no residual); the result is
    value * gelu(gate), out_features / 2 wide. Under torch.compile: one opaque op, latentdiff::amx_linear."""
    width = _width(out_features, geglu)
    if x.dtype != torch.float32 or not x.is_cpu:
        raise TypeError(f"the AMX linear kernel takes float32 CPU inputs; got {x.dtype} on {x.device}")
    if geglu and residual is not None:
        raise ValueError("the AMX linear kernel adds no residual to a GEGLU's output: add it afterwards")
    if residual is not None and (residual.dtype != torch.float32 or not residual.is_cpu
                                 or residual.shape != (*x.shape[:-1], width)):
        raise ValueError(f"the residual must be a float32 CPU tensor of shape {(*x.shape[:-1], width)}; got "
                         f"{residual.dtype} {tuple(residual.shape)} on {residual.device}")
    if torch.compiler.is_compiling():  # one opaque op for torch.compile (ctypes calls cannot be traced)
        return torch.ops.latentdiff.amx_linear(x, packed, out_features, bias, residual, geglu)
    return _linear(library(), x, packed, out_features, bias, residual, geglu)


@torch.library.custom_op("latentdiff::amx_linear", mutates_args=(), schema=(
    "(Tensor x, Tensor packed, int out_features, Tensor? bias, Tensor? residual, bool geglu) -> Tensor"))
def _linear_op(x, packed, out_features, bias, residual, geglu):
    return _linear(library(), x, packed, out_features, bias, residual, geglu)


@_linear_op.register_fake
def _(x, packed, out_features, bias, residual, geglu):
    return x.new_empty(*x.shape[:-1], _width(out_features, geglu))


def _width(out_features: int, geglu: bool) -> int:
    """The width of `linear`'s result: a GEGLU's half of the projection, else all of it."""
    return out_features // 2 if geglu else out_features


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t [..., width] as [rows, width] with unit stride along the rows (a view where it can be)."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _linear(lib, x, packed, out_features, bias, residual, geglu):
    """`linear` once its arguments are checked."""
    k = x.shape[-1]
    width = _width(out_features, geglu)
    if x.numel() == 0:  # no rows, or no depth: nothing for the tiles to do
        out = x.new_zeros(*x.shape[:-1], out_features)
        if bias is not None:
            out += bias
        if geglu:
            value, gate = out.view(*out.shape[:-1], out_features // 32, 2, 16).unbind(-2)
            out = (value * F.gelu(gate)).flatten(-2)
        return out if residual is None else out + residual
    rows = _rows(x, k)
    m = rows.shape[0]
    out = torch.empty(*x.shape[:-1], width)
    sums = torch.empty(m, out_features) if geglu and lib.amx_linear_passes(k, 1) > 1 else None
    res = None if residual is None else _rows(residual, width)
    with native.labelled("latentdiff::amx_linear"):
        failed = lib.amx_linear(rows.data_ptr(), rows.stride(0), packed.data_ptr(),
                                None if bias is None else bias.data_ptr(), None if res is None else res.data_ptr(),
                                0 if res is None else res.stride(0), out.data_ptr(), out.shape[-1], m, out_features, k,
                                torch.get_num_threads(), geglu, None if sums is None else sums.data_ptr())
    if failed:
        raise MemoryError(f"the AMX linear kernel could not allocate its buffers ({m} x {k} inputs split into "
                          "parts): free memory")
    return out


def pack_conv(weight: torch.Tensor) -> torch.Tensor:
    """A float32 conv weight [N, C, kh, kw] as `conv` takes it: pack_linear's layout of [N, kh * kw * C16], each tap's
    channels padded with zeros to C16, a multiple of 16. Where `available()`."""
    n, c, kh, kw = weight.shape
    return pack_linear(F.pad(weight.detach().float().permute(0, 2, 3, 1), (0, -c % 16)).reshape(n, -1))


def unpack_conv(packed: torch.Tensor, out_channels: int, in_channels: int,
                kernel_size: tuple[int, int]) -> torch.Tensor:
    """The float32 weight [N, C, kh, kw] that `pack_conv` packed (exactly: the parts sum to it)."""
    kh, kw = kernel_size
    c16 = -(-in_channels // 16) * 16
    rows = unpack_points(packed[None], out_channels, kh * kw * c16)[0]
    return rows.view(out_channels, kh, kw, c16)[..., :in_channels].permute(0, 3, 1, 2).contiguous()


def conv(x: torch.Tensor, packed: torch.Tensor, kernel_size: tuple[int, int], out: torch.Tensor, stride: int = 1,
         origin: tuple[int, int] = (0, 0), bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """Writes into `out` [B, Ho, Wo, N] the float32 convolution of `x` [B, H, W, C] with a kh x kw filter packed by
    `pack_conv` (+ bias, + residual [B, Ho, Wo, N]): out[b, i, j] takes the patch of x whose top-left tap is the
    pixel (i * stride + origin[0], j * stride + origin[1]), pixels outside x zero (origin (-p, -p): padding p).
    Any strides, but channels unit-stride in x, out and residual (a channels-last NCHW tensor permuted to NHWC is
    such a view, and so is every phase of one). Each output pixel is a row of amx_linear's products, its patch the
    depth: errors against float64 as PyTorch's float32 conv or smaller. Returns `out`. Where `available()`; not
    under torch.compile (see conv2d)."""
    for name, t in (("x", x), ("out", out), ("residual", residual)):
        if t is not None and (t.dtype != torch.float32 or not t.is_cpu or t.dim() != 4
                              or (t.stride(-1) != 1 and t.shape[-1] > 1)):
            raise TypeError(f"amx.conv takes float32 CPU [B, H, W, C] tensors with unit-stride channels; {name} is "
                            f"{t.dtype} {tuple(t.shape)} (strides {t.stride()}) on {t.device}")
    if out.shape[0] != x.shape[0] or (residual is not None and residual.shape != out.shape):
        raise ValueError(f"amx.conv: x {tuple(x.shape)}, out {tuple(out.shape)} and residual "
                         f"{None if residual is None else tuple(residual.shape)} disagree")
    return _conv(x, packed, tuple(kernel_size), out, stride, tuple(origin), bias, residual)


def _conv(x, packed, kernel_size, out, stride, origin, bias, residual):
    """`conv` once its arguments are checked (a small conv's call is mostly host time: this is the lean part)."""
    shape = _conv_shape(x.shape, x.stride(), kernel_size, stride, origin, out.shape, out.stride(),
                        None if residual is None else residual.stride())
    with native.labelled("latentdiff::amx_conv"):
        failed = library().amx_conv(x.data_ptr(), shape, packed.data_ptr(), None if bias is None else bias.data_ptr(),
                                    None if residual is None else residual.data_ptr(), out.data_ptr(),
                                    torch.get_num_threads())
    if failed:
        raise MemoryError(f"the AMX convolution could not allocate its buffers ({out.shape[:3].numel()} patches of "
                          f"{kernel_size[0]}x{kernel_size[1]}x{x.shape[-1]}, split into parts): free memory")
    return out


@functools.lru_cache(maxsize=1024)
def _conv_shape(x_shape, x_strides, kernel_size, stride, origin, out_shape, out_strides, residual_strides):
    """The ConvShape of these sizes and strides, made once per combination (a denoising run repeats a few)."""
    b, h, w, c = x_shape
    _, ho, wo, n = out_shape
    return ctypes.byref(ConvShape(b, h, w, c, *x_strides[:3], *kernel_size, stride, *origin, ho, wo, n,
                                  *out_strides[:3], *(residual_strides or out_strides)[:3]))


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv2d(x: torch.Tensor, packed: torch.Tensor, out_channels: int, kernel_size: tuple[int, int], stride: int = 1,
           padding: tuple[int, int] = (0, 0), bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, W, bias, stride, padding) (+ residual) for float32 CPU x [B, C, H, W] (channels-last read
    without a copy) and W packed by `pack_conv`; the result is channels-last. Under torch.compile one opaque op,
    latentdiff::amx_conv2d."""
    if torch.compiler.is_compiling():
        return torch.ops.latentdiff.amx_conv2d(x, packed, out_channels, list(kernel_size), stride, list(padding),
                                               bias, residual)
    return _conv2d(x, packed, out_channels, kernel_size, stride, padding, bias, residual)


def _conv2d(x, packed, out_channels, kernel_size, stride, padding, bias, residual):
    _require_float32(x, residual)
    b, _, h, w = x.shape
    ho, wo = _out_size(h, kernel_size[0], stride, padding[0]), _out_size(w, kernel_size[1], stride, padding[1])
    out = torch.empty(b, out_channels, ho, wo, memory_format=torch.channels_last)
    if residual is not None and residual.shape != out.shape:
        raise ValueError(f"the AMX convolution adds a residual of its output's shape {tuple(out.shape)}; got "
                         f"{tuple(residual.shape)}: add it afterwards")
    _conv(_pixels(x), packed, tuple(kernel_size), out.permute(0, 2, 3, 1), stride, (-padding[0], -padding[1]), bias,
          None if residual is None else _pixels(residual))
    return out


def _require_float32(x: torch.Tensor, residual: torch.Tensor | None) -> None:
    for t in (x, residual):
        if t is not None and (t.dtype != torch.float32 or not t.is_cpu or t.dim() != 4):
            raise TypeError(f"the AMX convolutions take float32 CPU [B, C, H, W] tensors; got {t.dtype} "
                            f"{tuple(t.shape)} on {t.device}: cast and move before optimize_for_inference()")


def _pixels(t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] as a [B, H, W, C] view with unit-stride channels (a copy where t is not channels-last)."""
    pixels = t.permute(0, 2, 3, 1)
    return pixels if pixels.stride(-1) == 1 else pixels.contiguous()


@torch.library.custom_op("latentdiff::amx_conv2d", mutates_args=(), schema=(
    "(Tensor x, Tensor packed, int out_channels, int[] kernel_size, int stride, int[] padding, Tensor? bias, "
    "Tensor? residual) -> Tensor"))
def _conv2d_op(x, packed, out_channels, kernel_size, stride, padding, bias, residual):
    return _conv2d(x, packed, out_channels, kernel_size, stride, padding, bias, residual)


@_conv2d_op.register_fake
def _(x, packed, out_channels, kernel_size, stride, padding, bias, residual):
    b, _, h, w = x.shape
    ho, wo = (_out_size(n, k, stride, p) for n, k, p in zip((h, w), kernel_size, padding))
    return torch.empty(b, out_channels, ho, wo, device=x.device, memory_format=torch.channels_last)


def upsample_conv2d(x: torch.Tensor, phases: torch.Tensor, out_channels: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 3x3, padding-1 conv of the nearest-neighbour 2x upsampling of float32 CPU x [B, C, H, W], without making
    the upsampled map: output pixel (2i + a, 2j + b) is phase (a, b)'s 2x2 conv of x whose top-left tap is at
    (i + a - 1, j + b - 1); `phases` [4, ...]: the four phase filters (a, b) in row-major order, each packed by
    `pack_conv` (see packed.upsampling_phases). Each phase writes its pixels of the [B, out_channels, 2H, 2W]
    channels-last result in place. Under torch.compile one opaque op, latentdiff::amx_upsample_conv2d."""
    if torch.compiler.is_compiling():
        return torch.ops.latentdiff.amx_upsample_conv2d(x, phases, out_channels, bias)
    return _upsample_conv2d(x, phases, out_channels, bias)


def _upsample_conv2d(x, phases, out_channels, bias):
    _require_float32(x, None)
    b, _, h, w = x.shape
    out = torch.empty(b, h, 2, w, 2, out_channels)  # [B, H, a, W, b, N]: channels-last [B, N, 2H, 2W]
    pixels = _pixels(x)
    for i, packed in enumerate(phases):
        a, c = divmod(i, 2)
        _conv(pixels, packed, (2, 2), out[:, :, a, :, c], 1, (a - 1, c - 1), bias, None)
    return out.view(b, 2 * h, 2 * w, out_channels).permute(0, 3, 1, 2)


@torch.library.custom_op("latentdiff::amx_upsample_conv2d", mutates_args=(), schema=(
    "(Tensor x, Tensor phases, int out_channels, Tensor? bias) -> Tensor"))
def _upsample_conv2d_op(x, phases, out_channels, bias):
    return _upsample_conv2d(x, phases, out_channels, bias)


@_upsample_conv2d_op.register_fake
def _(x, phases, out_channels, bias):
    b, _, h, w = x.shape
    return torch.empty(b, out_channels, 2 * h, 2 * w, device=x.device, memory_format=torch.channels_last)
