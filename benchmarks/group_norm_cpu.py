"""Our compiled CPU GroupNorm (latentdiff/models/group_norm.py's group_norm() on float32 CPU tensors without
autograd: group_norm.cpp) against torch's GroupNorm + SiLU (and the bias add before it), per activation shape of SD
1.5's U-Net (batch 2) and VAE decoder (batch 1), NCHW and channels-last: median milliseconds (calls interleaved) and
each one's largest error against float64.

    python benchmarks/group_norm_cpu.py [--threads 2] [--repeats 9]
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from common import start_kernel_benchmark
from latentdiff.models import group_norm as gn
from latentdiff.models import native

# (batch, channels, height, width): U-Net 64x64 and 32x32 levels, the VAE decoder from 64x64 to 512x512
SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (1, 512, 64, 64), (1, 512, 128, 128),
          (1, 512, 256, 256), (1, 256, 256, 256), (1, 256, 512, 512), (1, 128, 512, 512)]


@torch.no_grad()
def main() -> None:
    args = start_kernel_benchmark(__doc__, 9, lambda: None if gn._cpu_kernel() else native.unavailable()
                                  or "the CPU kernel did not build here (see the warning)")
    if args is None:
        return
    print("shape                 layout  torch ms  ours ms  ours vs torch  err torch  err ours")
    for shape in SHAPES:
        for channels_last in (False, True):
            x = 2 * torch.randn(shape) + 1
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            norm = torch.nn.GroupNorm(32, shape[1], eps=1e-6)
            norm.weight.normal_(1, 0.2)
            norm.bias.normal_(0, 0.2)
            shift = torch.randn(shape[0], shape[1])
            calls = {"torch": lambda: F.silu(norm(x + shift[:, :, None, None])),
                     "ours": lambda: gn.group_norm(norm, x, silu=True, shift=shift)}
            exact = F.silu(F.group_norm(x.double() + shift.double()[:, :, None, None], 32, norm.weight.double(),
                                        norm.bias.double(), norm.eps))
            errors = {name: (fn().double() - exact).abs().max().item() for name, fn in calls.items()}
            del exact
            times = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, fn in calls.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            t = {name: sorted(v)[len(v) // 2] * 1e3 for name, v in times.items()}
            print(f"{str(shape):20s}  {'NHWC' if channels_last else 'NCHW':6s}  {t['torch']:8.2f}  {t['ours']:7.2f}"
                  f"  {t['torch'] / t['ours']:12.2f}x  {errors['torch']:9.1e}  {errors['ours']:8.1e}", flush=True)


if __name__ == "__main__":
    main()
