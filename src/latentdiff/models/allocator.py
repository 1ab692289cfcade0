"""glibc's malloc, from Python, for CPU inference: hand freed memory back to the OS (`malloc_trim`: the tiled VAE
after every tile) or keep large freed buffers for reuse (`keep_freed_buffers`: packed inference). Linux with glibc
only; elsewhere both do nothing."""
from __future__ import annotations

import ctypes
import sys
from functools import cache
from typing import Callable

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Buffers up to this size come from (and go back to) malloc's heap once keep_freed_buffers() has run: above every
# activation of SD 1.5's U-Net (42 MB in fp32 at batch 2) and of its VAE decoder at 512 px (268 MB in fp32)
HEAP_BUFFERS_UP_TO = 1 << 30


def _libc(name: str) -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)  # glibc; musl and others lack malloc_trim
    except (OSError, AttributeError):
        return None


@cache
def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim (hands freed heap memory back to the OS), or None where there is none."""
    return _libc("malloc_trim")


@cache
def keep_freed_buffers() -> bool:
    """Make malloc reuse freed buffers of up to HEAP_BUFFERS_UP_TO bytes rather than unmapping them; returns whether
    it applied. By default glibc serves allocations above its mmap threshold (which adapts, up to 32 MiB) with
    fresh pages, which the kernel zero-fills on first touch (a page fault per 4 KiB), and unmaps them on free: SD
    1.5's float32 U-Net forward at batch 2 paid 181-186k page faults per call, 0.4-0.5 s of system time; with the
    buffers kept, none, and 5.66-5.81 s per forward against 5.95-6.87 s (AMX host, 2 threads, 2026-12-04), the
    peak RSS unchanged (9.49 vs 9.48 GiB). For the rest of the process (glibc cannot return to its adaptive
    threshold); freed memory then stays with the process for reuse until malloc_trim. It speeds up any PyTorch
    code in the process, diffusers' too (in one process with it set: diffusers 7.83 -> 7.14 s, ours-opt 5.90 ->
    5.80 s), so it is no part of optimize_for_inference() nor of the benchmarks' ratios: call it where the process
    is yours (`latentdiff generate --optimize` does)."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BUFFERS_UP_TO)) and bool(mallopt(_M_TRIM_THRESHOLD, HEAP_BUFFERS_UP_TO))
