"""GroupNorm (Wu & He 2018) for the ResNet blocks, with the SiLU after it and the timestep bias before it fused in:
`group_norm(norm, x, silu=True, shift=temb)` is `silu(norm(x + temb[:, :, None, None]))`.

On a CUDA device, without autograd, where they pay (`_kernels_pay`), it runs as two Triton kernels that read the
activation in whatever layout it has (NCHW or channels-last): one computes partial statistics of slices of each
group, the other combines them (Chan et al. 1979's pairwise update, so no E[x^2] - E[x]^2 cancellation) and writes
the normalised, affine, activated output. PyTorch's own CUDA GroupNorm makes channels-last activations contiguous
first (a copy in and a copy out around each norm) and needs separate passes for the bias add and the SiLU.
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
    """Where the kernels beat torch's, as measured on an H200 in fp16 (benchmarks/gpu_group_norm.py, norm + SiLU
    (+ bias add), host time included): on channels-last inputs, which torch copies to NCHW and back (1.2-2.4x at
    SD 1.5's U-Net shapes of batch 8, 0.86-1.2x at its 8x8 ones); on NCHW ones only where torch's reduction, one
    block per group, leaves most of the GPU idle: fewer groups than multiprocessors, 64K+ elements in each (the SD
    VAE decoder's 128-512 channels at 128-512 px: 3-6x; at 64 px, 0.82x). At the U-Net's 256 groups of batch 8,
    torch's NCHW kernels were 1.05-1.3x faster."""
    n, c, h, w = x.shape
    if not x.is_contiguous():  # channels-last
        return True
    return n * groups < _multiprocessors(x.device) and c // groups * h * w >= 1 << 16


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLIT = 64  # slices per group at most (the apply kernel reads all of a group's partial statistics)


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    """How the kernels divide the work (benchmarks/gpu_group_norm.py --sweep times the alternatives): `block`
    elements per load, at least `programs_per_sm` programs per multiprocessor (a group is split into slices to get
    there), `num_warps` warps per program. The defaults are the first ones measured, not tuned yet."""

    block: int = 2048
    programs_per_sm: int = 4
    num_warps: int = 4


SETTINGS = LaunchSettings()


def _triton_group_norm(x: torch.Tensor, norm: nn.GroupNorm, silu: bool, shift: torch.Tensor | None):
    stats_kernel, apply_kernel = _kernels()
    n, c, h, w = x.shape
    groups = norm.num_groups
    cg, pixels = c // groups, h * w
    # channels-last: channel stride 1, pixel stride C; NCHW: channel stride H*W, pixel stride 1
    s_c, s_p = (1, c) if not x.is_contiguous() else (pixels, 1)
    out = torch.empty_like(x)  # same layout as x
    block_c = _next_power_of_2(cg)
    block_p = max(1, SETTINGS.block // block_c)
    # enough programs to fill the GPU, no slice smaller than one block of pixels
    want = -(-SETTINGS.programs_per_sm * _multiprocessors(x.device) // (n * groups))
    split = max(1, min(_MAX_SPLIT, want, -(-pixels // block_p)))
    per_slice = -(-pixels // split)
    stats = torch.empty(3, n * groups, split, device=x.device, dtype=torch.float32)  # mean, M2, count
    shift_or_x = x if shift is None else shift.contiguous()  # (a pointer the kernels ignore without a shift)
    args = dict(C=c, P=pixels, CG=cg, GROUPS=groups, s_n=x.stride(0), s_c=s_c, s_p=s_p, PER_SLICE=per_slice,
                SPLIT=split, BLOCK_C=block_c, BLOCK_P=block_p, HAS_SHIFT=shift is not None)
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
    """The two Triton kernels (compiled on first use); None where Triton is not installed."""
    try:
        from . import group_norm_triton
    except ImportError:
        return None
    return group_norm_triton.stats_kernel, group_norm_triton.apply_kernel
