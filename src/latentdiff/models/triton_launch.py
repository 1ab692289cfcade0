"""Launching our Triton kernels (models/group_norm.py, models/fused.py) with little host time: a small batch on a fast
GPU is bound by the host's launches, and Triton's own launch binds and checks every argument anew on each call to
find the compiled kernel in its cache."""
from __future__ import annotations

import torch

DIRECT = True  # False: every launch through Triton's own launch path
_RUNNERS: dict = {}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels read and write


def launch(kernel, grid: tuple, tensors: tuple, scalars: tuple, num_warps: int) -> None:
    """kernel[grid](*tensors, *scalars), through the compiled kernel that Triton's first launch returned for
    arguments like these where there is one (DIRECT). On an H200's host (benchmarks/gpu_group_norm.py --host-time,
    2026-12-04): 28.5 against 35.2 us per one-program GroupNorm, 46.2 against 74.3 us per GroupNorm in slices (two
    launches). Triton specialises a compiled kernel on each integer's value being 1 or a multiple of 16 and on each
    tensor's dtype and 16-byte alignment: the scalars, the tensors' dtypes and alignments (checked per call), the
    grid, the warps and the device make the key."""
    key = (kernel, grid, num_warps, tensors[0].device, scalars,
           *((t.dtype, t.data_ptr() % 16 == 0) for t in tensors))
    runner = _RUNNERS.get(key) if DIRECT else None
    if runner is not None:
        runner(*tensors, *scalars)
        return
    compiled = kernel[grid](*tensors, *scalars, num_warps=num_warps)
    if DIRECT:
        try:  # (the interpreter returns no compiled kernel; Triton versions may differ here)
            runner = compiled[grid]
        except Exception:  # noqa: BLE001
            return
        if len(_RUNNERS) >= 4096:
            _RUNNERS.clear()
        _RUNNERS[key] = runner


def on_device(fn, x: torch.Tensor, *args):
    """fn(x, *args) with x's GPU current: Triton launches on the current device (a pipeline on cuda:1 with cuda:0
    current would otherwise launch on the wrong GPU)."""
    if x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):
            return fn(x, *args)
    return fn(x, *args)


def without_autograd(*tensors: torch.Tensor | None) -> bool:
    """No gradient can flow through these tensors (the kernels have no backward)."""
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (>= 1): Triton's block sizes."""
    return 1 << max(0, n - 1).bit_length()
