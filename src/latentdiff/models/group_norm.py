"""GroupNorm (Wu & He 2018) for the ResNet blocks, with the SiLU after it and the timestep bias before it fused in:
`group_norm(norm, x, silu=True, shift=temb)` is `silu(norm(x + temb[:, :, None, None]))`.

On a CUDA device, without autograd, where they pay (`_kernels_pay`), it runs as Triton kernels that read the
activation in whatever layout it has (NCHW or channels-last), where PyTorch's CUDA GroupNorm copies channels-last
activations to NCHW and back and needs separate passes for the bias add and the SiLU. Where there are enough
groups to fill the GPU and each is small enough (`_one_program`), one program per group computes its mean, then
the squared deviations from it, then writes the output: one launch. Otherwise each group is split into slices over
two launches: one computes each slice's statistics, the other combines them (Chan et al. 1979's pairwise update,
so no E[x^2] - E[x]^2 cancellation) and writes the normalised, affine, activated output.
Elsewhere (the CPU, training, torch.compile, which fuses these itself) the plain modules run. `ENABLED = False`
turns the kernels off.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

ENABLED = True


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False,
               shift: torch.Tensor | None = None) -> torch.Tensor:
    """`norm(x + shift[:, :, None, None])`, then SiLU if `silu`; shift is [N, C] (or None)."""
    if _fused_applies(norm, x, shift):
        return _triton_group_norm(x, norm, silu, shift)
    if shift is not None:
        x = x + shift[:, :, None, None]
    x = norm(x)
    return F.silu(x) if silu else x


def _fused_applies(norm: nn.GroupNorm, x: torch.Tensor, shift: torch.Tensor | None) -> bool:
    return (ENABLED and not torch.compiler.is_compiling()  # (first: a compiled graph traces none of the rest)
            and x.is_cuda and x.dim() == 4 and norm.affine and x.dtype in _DTYPES
            and "forward" not in norm.__dict__  # a norm whose forward was replaced (tiled VAE passes) runs it
            and not (torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad
                                                   or (shift is not None and shift.requires_grad)))
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and _kernels_pay(x, norm.num_groups) and _kernels() is not None)


def _kernels_pay(x: torch.Tensor, groups: int) -> bool:
    """Where the kernels beat torch's, as measured on an H200 in fp16 (benchmarks/gpu_group_norm.py --gpu-time, norm
    + SiLU (+ bias add)): on channels-last inputs, which torch copies to NCHW and back (2.3-3.9x at SD 1.5's U-Net
    shapes of batch 8); on NCHW ones with many groups (the U-Net at batch 4 with guidance: one program per group,
    2.2-3.3x) or large ones, where torch's reduction, one block per group, leaves most of the GPU idle (the SD VAE
    decoder's 128-512 channels at 128-512 px: 10-14x). Not on NCHW ones with few small groups (the U-Net at batch
    1 with guidance): there the denoising step is bound by the host's launches, and a Triton launch costs the
    host more than torch's (two-launch kernels on every norm at batch 1: 0.84x end to end)."""
    n, c, h, w = x.shape
    if not x.is_contiguous():  # channels-last
        return True
    return _many_groups(x, groups) or c // groups * h * w >= 1 << 16


def _many_groups(x: torch.Tensor, groups: int) -> bool:
    """At least as many (sample, group) pairs as half the GPU's multiprocessors."""
    return 2 * x.shape[0] * groups >= _multiprocessors(x.device)


def _one_program(x: torch.Tensor, groups: int) -> bool:
    """Whether each group gets one program (one launch; else slices over two): enough groups for half the
    multiprocessors and each at most LaunchSettings.one_program elements; on channels-last inputs at most 32x32
    pixels too. On an H200, batch 8 (fp16, GPU time): NCHW 35 vs 93 us (320x64x64), 135 vs 229 (960x64x64), 5-17
    vs 7-50 at 16x16 and 8x8; channels-last 27 vs 37 (640x32x32), 21 vs 64 (2560x16x16), but 74 vs 64 (320x64x64)
    and 191 vs 122 (960x64x64): one program reading a group's few channels of every pixel is slower there. With
    fewer groups (SD VAE decoder at batch 1, 32 groups), slices: 11 vs 18 us (512x64x64)."""
    _, c, h, w = x.shape
    return (_many_groups(x, groups) and c // groups * h * w <= SETTINGS.one_program
            and (x.is_contiguous() or h * w <= 1024))


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
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


def _triton_group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool, shift: torch.Tensor | None):
    norm_kernel, stats_kernel, apply_kernel = _kernels()
    n, c, h, w = x.shape
    groups = norm.num_groups
    cg, pixels = c // groups, h * w
    # channels-last: channel stride 1, pixel stride C; NCHW: channel stride H*W, pixel stride 1
    s_c, s_p = (1, c) if not x.is_contiguous() else (pixels, 1)
    out = torch.empty_like(x)  # same layout as x
    block_c = _next_power_of_2(cg)
    block_p = max(1, SETTINGS.block // block_c)
    shift_or_x = x if shift is None else shift.contiguous()  # (a pointer the kernels ignore without a shift)
    layout = dict(C=c, P=pixels, CG=cg, GROUPS=groups, s_n=x.stride(0), s_c=s_c, s_p=s_p, BLOCK_C=block_c,
                  BLOCK_P=block_p, HAS_SHIFT=shift is not None)
    if _one_program(x, groups):
        norm_kernel[(n * groups,)](x, shift_or_x, norm.weight, norm.bias, out, norm.eps, SILU=silu,
                                   num_warps=SETTINGS.num_warps, **layout)
        return out
    # enough programs to fill the GPU, no slice smaller than one block of pixels
    want = -(-SETTINGS.programs_per_sm * _multiprocessors(x.device) // (n * groups))
    split = max(1, min(_MAX_SPLIT, want, -(-pixels // block_p)))
    per_slice = -(-pixels // split)
    stats = torch.empty(3, n * groups, split, device=x.device, dtype=torch.float32)  # mean, M2, count
    args = dict(layout, PER_SLICE=per_slice, SPLIT=split)
    grid = (n * groups, split)
    stats_kernel[grid](x, shift_or_x, stats, num_warps=SETTINGS.num_warps, **args)
    apply_kernel[grid](x, shift_or_x, stats, norm.weight, norm.bias, out, norm.eps,
                       SILU=silu, BLOCK_S=_next_power_of_2(split), num_warps=SETTINGS.num_warps, **args)
    return out


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


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
