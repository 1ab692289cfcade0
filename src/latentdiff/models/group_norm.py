"""GroupNorm (Wu & He 2018) for the ResNet blocks, with the SiLU after it and the timestep bias before it fused in:
`group_norm(norm, x, silu=True, shift=temb)` is `silu(norm(x + temb[:, :, None, None]))`.

On a CUDA device, without autograd, it runs as Triton kernels that read the activation in whatever layout it has
(NCHW or channels-last), where PyTorch's CUDA GroupNorm copies channels-last activations to NCHW and back and needs
separate passes for the bias add and the SiLU. Where each group is small enough (`_one_program`), one program per
group computes its mean, then the squared deviations from it, then writes the output: one launch. Otherwise each
group is split into slices over two launches: one computes each slice's statistics, the other combines them (Chan
et al. 1979's pairwise update, so no E[x^2] - E[x]^2 cancellation) and writes the normalised, affine, activated
output. The kernels beat torch's on the GPU at every shape measured (H200, fp16, benchmarks/gpu_group_norm.py
--gpu-time: 1.9-5x at SD 1.5's U-Net shapes at batches 2 and 8, 2.2-14x at the VAE decoder's) and on the host,
where a small batch is bound by launches (--host-time: `group_norm()` 23.5 us per call against 40.9 us for torch's
GroupNorm and SiLU, 56.3 us with the bias add; the kernels launch through models/triton_launch.py).
On the CPU, float32 without autograd, a compiled kernel (group_norm.cpp, built by native.py) makes the same sum in
two passes over memory instead of PyTorch's five to seven: one for every channel's sum and sum of squares (in
double), one writing the normalised, affine, activated output, in x's layout. 2-2.5x torch's GroupNorm + SiLU on
the SD VAE decoder's large maps (2 threads), and closer to float64 (torch's channels-last CPU GroupNorm erred by
1.6e-4 on a 128 x 512 x 512 map, this kernel by 1.6e-6). With autograd (float32 training on the CPU) the same
forward saves x and the groups' statistics, and a compiled backward gives every gradient in two passes over x and
dL/dout (_CompiledGroupNorm): torch's ops keep x + shift and the norm's output and run the SiLU's backward, the
norm's and the shift's sum apart. Elsewhere (training on a GPU, torch.compile, which fuses these itself, other
dtypes) the plain modules run. `ENABLED = False` turns the kernels off.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .triton_launch import DTYPES, launch, next_power_of_2, on_device, without_autograd

ENABLED = True
# whether a torch.func transform (vmap, grad, ...) is running (a private function of PyTorch's: where a version lacks
# it, none is taken to run)
_transforming = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", lambda: None)


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False, shift: torch.Tensor | None = None,
               channels_last: bool = False, reuse: bool = False) -> torch.Tensor:
    """`norm(x + shift[:, :, None, None])`, then SiLU if `silu`; shift is [N, C], [1, C] (the same for every
    sample) or None. `channels_last`: the kernels write the output in channels-last memory format whatever x's
    (at no cost to them; the pixels are then [N, H*W, C] tokens without a copy); torch's path keeps x's. `reuse`:
    the caller has no further use for x, so the CPU kernel may write the output over it, without autograd (a
    fresh output of a large map costs more than the kernel: glibc maps buffers of 32 MiB and more anew for each
    call, a page fault per 4 KiB; the SD VAE decoder's 128 x 512 x 512 map took 88 ms with a new output, 27 ms
    over its input, 2 threads, AVX2 AMD EPYC)."""
    if _fused_applies(norm, x, shift):
        return on_device(_triton_group_norm, x, norm, silu, shift, channels_last)
    if _compiled_applies(norm, x, shift):
        if _no_autograd(norm, x, shift):
            return _compiled_group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu, shift, None,
                                        x if reuse else None)
        return _CompiledGroupNorm.apply(x, shift, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
    if shift is not None:
        x = x + shift[:, :, None, None]
    x = norm(x)
    return F.silu(x) if silu else x


def _fused_applies(norm: nn.GroupNorm, x: torch.Tensor, shift: torch.Tensor | None) -> bool:
    """Whether the Triton kernels take this call (a CUDA tensor of one of their dtypes, no autograd)."""
    return (x.is_cuda and x.dtype in DTYPES and _kernels_take(norm, x, shift) and _no_autograd(norm, x, shift)
            and _kernels() is not None)


def _no_autograd(norm: nn.GroupNorm, x: torch.Tensor, shift: torch.Tensor | None) -> bool:
    """No gradient flows through this call (grad mode is read first: the norm's parameters cost a module attribute
    lookup each, ~1 us, a third of a small call's checks)."""
    return not torch.is_grad_enabled() or without_autograd(x, norm.weight, norm.bias, shift)


def _compiled_applies(norm: nn.GroupNorm, x: torch.Tensor, shift: torch.Tensor | None) -> bool:
    """Whether the compiled CPU kernels (group_norm.cpp) take this call: float32 activations and weights (with
    autograd too: _CompiledGroupNorm)."""
    return (x.is_cpu and x.dtype == torch.float32 and (shift is None or shift.is_cpu)
            and _kernels_take(norm, x, shift) and norm.weight.dtype == torch.float32 and _cpu_kernel() is not None)


def _kernels_take(norm: nn.GroupNorm, x: torch.Tensor, shift: torch.Tensor | None) -> bool:
    """What both kinds of kernel need (after the device and dtype checks of each, so that a call runs this once): an
    affine norm of a 4-d NCHW or channels-last x, a shift of x's dtype per sample or for all, the kernels not turned
    off, no graph being traced and no torch.func transform (vmap, grad, ...) running."""
    return (ENABLED and not torch.compiler.is_compiling()  # (first: a compiled graph traces none of the rest)
            and _transforming() is None  # (nor a torch.func transform's wrapped tensors)
            and x.dim() == 4 and norm.affine
            and "forward" not in norm.__dict__  # a norm whose forward was replaced (tiled VAE passes) runs it
            and (shift is None or (shift.dtype == x.dtype and shift.shape in ((1, x.shape[1]), x.shape[:2])))
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)))


@functools.cache
def _cpu_kernel() -> ctypes.CDLL | None:
    """group_norm.cpp built for this CPU (native.py), or None where it cannot be (then PyTorch's modules run)."""
    lib = native.load(Path(__file__).with_suffix(".cpp"), native.PORTABLE_FLAGS, "GroupNorm kernel")
    if lib is not None:
        lib.group_norm.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_int64]
                                   + [ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 2
                                   + [ctypes.c_float, ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int])
        lib.group_norm.restype = ctypes.c_int
        lib.group_norm_backward.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_int]
                                            + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 3
                                            + [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int])
        lib.group_norm_backward.restype = ctypes.c_int
    return lib


def _compiled_group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                         silu: bool, shift: torch.Tensor | None, stats: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU kernel's two passes over x (statistics, then the normalised, affine, activated output), in x's
    layout, into `out` (x itself, or a new tensor where None); `stats` (float64 [N, G, 2]), where given, receives
    each group's mean and 1 / sqrt(var + eps)."""
    n, c, h, w = x.shape
    out = torch.empty_like(x) if out is None else out
    shift = None if shift is None else shift.contiguous()
    with native.labelled("latentdiff::group_norm"):
        failed = _cpu_kernel().group_norm(
            x.data_ptr(), n, c, h * w, not x.is_contiguous(), groups,
            None if shift is None else shift.data_ptr(), 0 if shift is None or shift.shape[0] == 1 else c,
            weight.data_ptr(), bias.data_ptr(), eps, silu, out.data_ptr(),
            None if stats is None else stats.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError(f"the GroupNorm kernel could not allocate its statistics ({n} x {c} channels): free memory")
    return out


class _CompiledGroupNorm(torch.autograd.Function):
    """group_norm() on the CPU kernels with autograd (training in float32): the forward saves x and each group's
    statistics, not the normalised map (torch's GroupNorm and SiLU keep x + shift and the norm's output), and the
    backward (group_norm_backward) makes dL/dx, dL/dshift, dL/dgamma and dL/dbeta in two passes over x and
    dL/dout instead of torch's SiLU backward, GroupNorm backward and bias sum."""

    @staticmethod
    def forward(ctx, x, shift, weight, bias, groups, eps, silu):
        shift = None if shift is None else shift.contiguous()  # (as the kernels read it, forward and backward)
        stats = torch.empty(x.shape[0], groups, 2, dtype=torch.float64)
        out = _compiled_group_norm(x, weight, bias, groups, eps, silu, shift, stats)
        ctx.save_for_backward(x, shift, weight, bias, stats)
        ctx.silu = silu
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, shift, weight, bias, stats = ctx.saved_tensors
        n, c, h, w = x.shape
        channels_last = not x.is_contiguous()
        grad = grad.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        grad_x = torch.empty_like(x)
        grad_weight, grad_bias = torch.empty_like(weight), torch.empty_like(bias)
        grad_shift = None if shift is None or not ctx.needs_input_grad[1] else torch.empty_like(shift)
        with native.labelled("latentdiff::group_norm_backward"):
            failed = _cpu_kernel().group_norm_backward(
                x.data_ptr(), grad.data_ptr(), n, c, h * w, channels_last, stats.shape[1],
                None if shift is None else shift.data_ptr(), 0 if shift is None or shift.shape[0] == 1 else c,
                weight.data_ptr(), bias.data_ptr(), stats.data_ptr(), ctx.silu, grad_x.data_ptr(),
                grad_weight.data_ptr(), grad_bias.data_ptr(), None if grad_shift is None else grad_shift.data_ptr(),
                torch.get_num_threads())
        if failed:
            raise MemoryError(f"the GroupNorm backward could not allocate its sums ({n} x {c} channels): free memory")
        return grad_x, grad_shift, grad_weight, grad_bias, None, None, None


def _one_program(x: torch.Tensor, groups: int) -> bool:
    """Whether each group gets one program (one launch; else slices over two): groups of at most
    LaunchSettings.one_program elements, on channels-last inputs of at most 32x32 pixels too. On an H200, batch 8
    (fp16, GPU time): NCHW 35 vs 93 us (320x64x64), 135 vs 229 (960x64x64), 5-17 vs 7-50 at 16x16 and 8x8;
    channels-last 27 vs 37 (640x32x32), 21 vs 64 (2560x16x16), but 74 vs 64 (320x64x64) and 191 vs 122
    (960x64x64): one program reading a group's few channels of every pixel is slower there. With few groups the GPU
    is not filled (the SD VAE decoder at batch 1, 32 groups of 512x64x64: 18 vs 11 us in slices), but such a call
    costs the host half as much (one launch): where groups are few and small (SD 1.5's U-Net at batch 1 with
    guidance: 2 samples of 32 groups), the denoising step is bound by the host."""
    _, c, h, w = x.shape
    return c // groups * h * w <= SETTINGS.one_program and (x.is_contiguous() or h * w <= 1024)


_MAX_SPLIT = 64  # slices per group at most (the apply kernel reads all of a group's partial statistics)


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    """How the kernels divide the work (benchmarks/gpu_group_norm.py --sweep times the alternatives): `block`
    elements per load, groups of up to `one_program` elements in one program each (one launch), larger ones split
    into slices to give at least `programs_per_sm` programs per multiprocessor (two launches), `num_warps` warps
    per program (see _one_program). programs_per_sm 16 and 8 warps: the split kernels' best on the SD VAE
    decoder's shapes in the sweep on an H200 (1.6-2.5x faster than 4 and 4); one_program covers every group of SD
    1.5's U-Net at 512x512 (at most 30 channels x 64 x 64)."""

    block: int = 2048
    one_program: int = 1 << 17
    programs_per_sm: int = 16
    num_warps: int = 8


SETTINGS = LaunchSettings()


def _triton_group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool, shift: torch.Tensor | None,
                       channels_last: bool = False):
    n, c, h, w = x.shape
    settings = SETTINGS
    if shift is not None:  # rows of C contiguous values; a single row is every sample's (row stride 0)
        shift = shift.contiguous()
    s_t = 0 if shift is None or shift.shape[0] == 1 else c
    nchw = x.is_contiguous()
    out_nchw = nchw and not channels_last
    plan = _plan(n, c, h * w, norm.num_groups, nchw, out_nchw, x.stride(0), s_t, shift is not None, silu,
                 _one_program(x, norm.num_groups), settings, _multiprocessors(x.device))
    out = torch.empty_like(x, memory_format=torch.contiguous_format if out_nchw else torch.channels_last)
    stats = x if plan.stats is None else torch.empty(plan.stats, device=x.device, dtype=torch.float32)
    # (x stands in for the pointers that a kernel ignores: the shift where there is none, the one program's stats)
    tensors = (x, x if shift is None else shift, norm.weight, norm.bias, out, stats)
    for kernel, grid in plan.launches:
        launch(_kernels()[kernel], grid, tensors, (norm.eps, *plan.scalars), settings.num_warps)
    return out


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How one shape is launched: (kernel index in _kernels(), grid) per launch, the integer and constexpr arguments
    after the tensors and eps (group_norm_triton.py's common parameter list), and the shape of the slice statistics
    (None: one program per group)."""
    launches: tuple
    scalars: tuple
    stats: tuple | None


@functools.lru_cache(maxsize=1024)
def _plan(n: int, c: int, pixels: int, groups: int, nchw: bool, out_nchw: bool, s_n: int, s_t: int,
          has_shift: bool, silu: bool, one_program: bool, settings: LaunchSettings, multiprocessors: int) -> _Plan:
    cg = c // groups
    # channels-last: channel stride 1, pixel stride C; NCHW: channel stride H*W, pixel stride 1 (x's, the output's)
    s_c, s_p = (pixels, 1) if nchw else (1, c)
    o_c, o_p = (pixels, 1) if out_nchw else (1, c)
    block_c = next_power_of_2(cg)
    block_p = max(1, settings.block // block_c)
    if one_program:
        split, per_slice = 1, pixels
    else:  # enough programs to fill the GPU, no slice smaller than one block of pixels
        want = -(-settings.programs_per_sm * multiprocessors // (n * groups))
        split = max(1, min(_MAX_SPLIT, want, -(-pixels // block_p)))
        per_slice = -(-pixels // split)
    scalars = (pixels, cg, groups, s_n, s_c, s_p, s_t, o_c, o_p, per_slice, split, block_c, block_p,
               next_power_of_2(split), has_shift, silu)
    if one_program:
        return _Plan(((0, (n * groups, 1, 1)),), scalars, None)
    grid = (n * groups, split, 1)
    return _Plan(((1, grid), (2, grid)), scalars, (3, n * groups, split))  # stats: mean, M2, count


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.cache
def _kernels():
    """The Triton kernels (compiled on first use): one-program, split statistics, split apply; None where Triton is
    not installed."""
    try:
        from . import group_norm_triton
    except ImportError:
        return None
    return group_norm_triton.norm_kernel, group_norm_triton.stats_kernel, group_norm_triton.apply_kernel
