"""Our AMX attention kernel (latentdiff/models/amx_attention.py, used by optimize_for_inference() on bf16 models
where the CPU has AMX) against PyTorch's scaled_dot_product_attention (its CPU flash kernel) on the attention shapes
of SD 1.5's U-Net in bfloat16, batch 2, and the VAE's. Prints, per shape: the largest error of both against a
float64 reference, their largest difference, the median times (calls interleaved), the ratio, and whether
optimize_for_inference() would use the kernel there (amx_attention.suits).

    python benchmarks/attention_amx.py [--threads 2] [--repeats 5]

Why: SDPA's 64x64 self-attention (2 x 8 heads x 4096 tokens x 40 dims) takes ~41% of our bf16 U-Net forward on a
2-core AMX host, and its time is little more at head dim 40 than at 8 (~102 vs ~87 ms): its softmax and overheads,
not its matrix products, bound it.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import machine, setup, time_interleaved
from latentdiff.models import amx_attention

# (batch, heads, queries, keys, head dim): SD 1.5 U-Net's self- and cross-attention at 64x64, 32x32, 16x16
# latents, SD 2.x's 64-dim heads at 64x64, the VAE's single 512-dim head at 64x64
SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
          (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 5, 4096, 4096, 64), (1, 1, 4096, 4096, 512)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup(args.threads)
    print(machine())
    if not amx_attention.available():
        print(f"skipped: {amx_attention.unavailable() or 'the kernel did not build (see the warning)'}")
        return
    lib = amx_attention.library()
    print("shape (B, H, N, Nk, d)      err sdpa  err amx   sdpa-amx  sdpa ms  amx ms  amx vs sdpa  used")
    for b, h, n, nk, d in SHAPES:
        def tokens(count):  # [B, H, count, d] views of [B, count, H * d], as the U-Net's attention makes them
            return torch.randn(b, count, h * d).bfloat16().unflatten(-1, (h, d)).transpose(1, 2)
        q, k, v = tokens(n), tokens(nk), tokens(nk)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        ours, sdpa = amx_attention.kernel(lib, q, k, v), F.scaled_dot_product_attention(q, k, v)
        timings = time_interleaved({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                                    "amx": lambda: amx_attention.kernel(lib, q, k, v)}, args.repeats, progress=False)
        t_sdpa, t_amx = (timings[name].median * 1e3 for name in ("sdpa", "amx"))
        print(f"{str((b, h, n, nk, d)):27} {(sdpa.double() - exact).abs().max():.2e}  "
              f"{(ours.double() - exact).abs().max():.2e}  {(sdpa.double() - ours.double()).abs().max():.2e}  "
              f"{t_sdpa:7.2f}  {t_amx:6.2f}  {t_sdpa / t_amx:.2f}x        {amx_attention.suits(q, k, v)}")


if __name__ == "__main__":
    sys.exit(main())

# Measured 2026-12-04 (session 20) on the 2-core Intel Xeon with AMX, 2 threads, torch 2.14.1, this script:
# SD 1.5's 64x64 self-attention SDPA 127.8 ms, AMX 90.6 (1.41x; timed alone, not interleaved: 102-104 vs 82-83),
# its cross-attention 17.4 vs 8.7; 32x32 self 13.7 vs 12.2, cross 4.7 vs 3.2; 16x16 (256 queries) 3.1 vs 3.5 and
# 2.2 vs 2.0 (left to SDPA: amx_attention.MIN_QUERIES); SD 2.x's 64-dim heads 77.7 vs 58.5; the VAE's 512-dim head
# 29.4 vs 41.6 (left to SDPA: MAX_HEAD_DIM). Errors against float64 equal to SDPA's but for the last digit.
# Where one thread's time goes in the 64x64 self-attention (rdtsc around the phases): q k^T 50-63 ms, softmax
# 64-85 ms, p v 29-38 ms, packing 6 ms. A microbenchmark of the tiles on this host: a tile product ~14 cycles
# (alone or in a dependent chain), a 1 KiB tile store ~50: q k^T, with head dims up to 64 two products per 16x16
# score tile, is bound by storing the scores. Ways on: a depth-8 tail tile instead of padding 40 to 64 (fewer key
# bytes to load), a cheaper exp2 and one pass less in the softmax, packing keys and values once per call with
# vector code. A first version with its own std::threads slowed the PyTorch ops around it (their OpenMP workers
# spin after each parallel region and lost their core): the kernel now runs on PyTorch's OpenMP runtime.
