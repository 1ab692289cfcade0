"""Our AMX attention kernel (latentdiff/models/amx.py, used by optimize_for_inference() on bf16 and fp32
models where the CPU has AMX), or on CPUs with AVX512-BF16 but no AMX its AVX-512 build (bf16 only), against
PyTorch's scaled_dot_product_attention (its CPU flash kernel) on the attention shapes of SD 1.5's U-Net, batch 2, and
the VAE's, in bfloat16 and float32. Prints, per shape: the largest error of both against a float64 reference, their
largest difference, the median times (calls interleaved), the ratio, and whether optimize_for_inference() would use
the kernel there (amx.suits).

    python benchmarks/attention_amx.py [--threads 2] [--repeats 5] [--dtypes bf16,fp32] [--scale 1]
                                       [--kernel amx|avx512|fma]

--kernel fma: our float32 AVX2 kernel (fma.attention, for CPUs with AVX2 but no AVX-512) instead; bfloat16 and
float16 inputs widened to float32 for it (fma.kernel).

--scale multiplies the queries and keys: 8 spreads each row's scores over hundreds (a sharply peaked softmax, whose
exponentials mostly fall below float32's normal range).

Why: SDPA's 64x64 self-attention (2 x 8 heads x 4096 tokens x 40 dims) takes ~41% of our bf16 U-Net forward on a
2-core AMX host, and its time is little more at head dim 40 than at 8 (~102 vs ~87 ms): its softmax and overheads,
not its matrix products, bound it.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from common import amx_unavailable, start_kernel_benchmark, time_interleaved
from latentdiff.models import amx, fma

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (batch, heads, queries, keys, head dim): SD 1.5 U-Net's self- and cross-attention at 64x64, 32x32, 16x16, 8x8
# latents, SD 2.x's 64-dim heads at 64x64, the VAE's single 512-dim head at 64x64
SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
          (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160), (2, 8, 64, 77, 160),
          (2, 5, 4096, 4096, 64), (1, 1, 4096, 4096, 512)]


def main() -> None:
    def more_options(parser):
        parser.add_argument("--dtypes", default=None,
                            help="default: bf16,fp32 (AMX), bf16 (AVX-512), fp32,bf16,fp16 (fma)")
        parser.add_argument("--scale", type=float, default=1.0, help="queries and keys times this")
        parser.add_argument("--kernel", choices=["amx", "avx512", "fma"], default=None,
                            help="default: amx where it runs, else avx512")

    # (which kernel, and so whether it runs, is known once the options are read)
    args = start_kernel_benchmark(__doc__, 5, lambda: None, more_options)
    if args is None:
        return
    args.kernel = args.kernel or ("amx" if amx.available() else "avx512")
    if args.kernel == "amx":
        lib, why, bounds = amx.library(), amx_unavailable(), (amx.MIN_QUERIES, amx.MAX_HEAD_DIM)
    elif args.kernel == "fma":
        lib, why, bounds = None, fma.unavailable(), None
    else:
        lib, bounds = amx.avx512_library(), (amx.AVX512_MIN_QUERIES, amx.AVX512_MAX_HEAD_DIM)
        why = None if lib else amx.unavailable(amx.AVX512_CPU_FLAGS) or "its build failed (see the warning)"
    if why:
        print(f"skipped: {why}")
        return
    args.dtypes = args.dtypes or {"amx": "bf16,fp32", "avx512": "bf16", "fma": "fp32,bf16,fp16"}[args.kernel]
    run = fma.kernel if args.kernel == "fma" else lambda q, k, v: amx.kernel(lib, q, k, v)
    used = fma.suits if args.kernel == "fma" else lambda q, k, v: amx.suits(q, k, v, *bounds)
    print(f"kernel: {args.kernel}")
    print("dtype shape (B, H, N, Nk, d)      err sdpa  err amx   sdpa-amx  sdpa ms  amx ms  amx vs sdpa  used")
    for dtype, (b, h, n, nk, d) in ((dtype, shape) for dtype in args.dtypes.split(",") for shape in SHAPES):
        if args.kernel == "fma" and d > fma.MAX_HEAD_DIM:
            print(f"{dtype:5} {str((b, h, n, nk, d)):27} the kernel takes head dims up to {fma.MAX_HEAD_DIM}: "
                  "PyTorch's alone")
            continue
        def tokens(count):  # [B, H, count, d] views of [B, count, H * d], as the U-Net's attention makes them
            x = torch.randn(b, count, h * d).to(DTYPES[dtype])
            return x.unflatten(-1, (h, d)).transpose(1, 2)
        q, k, v = tokens(n) * args.scale, tokens(nk) * args.scale, tokens(nk)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        ours, sdpa = run(q, k, v), F.scaled_dot_product_attention(q, k, v)
        timings = time_interleaved({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                                    "amx": lambda: run(q, k, v)}, args.repeats, progress=False, memory=False)
        t_sdpa, t_amx = (timings[name].median * 1e3 for name in ("sdpa", "amx"))
        print(f"{dtype:5} {str((b, h, n, nk, d)):27} {(sdpa.double() - exact).abs().max():.2e}  "
              f"{(ours.double() - exact).abs().max():.2e}  {(sdpa.double() - ours.double()).abs().max():.2e}  "
              f"{t_sdpa:7.2f}  {t_amx:6.2f}  {t_sdpa / t_amx:.2f}x        {used(q, k, v)}")


if __name__ == "__main__":
    sys.exit(main())

# Measured 2026-12-04 (session 20) on the 2-core Intel Xeon with AMX, 2 threads, torch 2.14.1, this script
# (--repeats 7): SD 1.5's 64x64 self-attention SDPA 100.8 ms, AMX 58.1 (1.74x), its cross-attention 7.5 vs 3.2;
# 32x32 self 8.6 vs 6.3, cross 2.1 vs 1.1; 16x16 (256 queries) 0.85 vs 0.93 and 0.68 vs 0.51 (left to SDPA:
# amx.MIN_QUERIES); SD 2.x's 64-dim heads 66.8 vs 44.8; the VAE's 512-dim head 22.1 vs 30.8 (left to
# SDPA: MAX_HEAD_DIM). Errors against float64 the same as SDPA's. (With the peak-RSS measurement between calls,
# which hands freed memory back to the OS, both kernels' small calls took 2-4x longer.)
# Where the time goes in the 64x64 self-attention, per thread at 2 threads (rdtsc around the phases): q k^T 19 ms,
# softmax 23, p v 15, packing 3.5. A microbenchmark of the tiles on this host: a tile product ~14 cycles (alone or in
# a dependent chain), a 1 KiB tile store ~50, so q k^T is bound by storing the fp32 scores. What mattered: buffers
# on 64-byte boundaries (83 -> 67 ms: with malloc's 16-byte alignment every tile row straddled two cache lines),
# no max pass for chunks within 2^8 of the running maximum (67 -> 63), PyTorch's OpenMP runtime instead of our own
# threads (those slowed the PyTorch ops around the kernel: its workers spin after each parallel region). Chunks of
# 512-4096 keys: within noise of 1024. Keys and values packed with vector code into a buffer kept between calls:
# 61-63 -> 59-61 ms. Tried and dropped: scores for head dims up to 64 with the queries kept in tiles and only the
# keys' real depth loaded (40 as 32 + 8, its own tile configuration): 58 -> 56 ms, not worth a second q k^T path;
# a degree-3 exp2 (within noise); the next chunk's scores made between this chunk's rows of numerators, so that
# tile and vector units could overlap (within noise: 59-61 vs 60-61 ms).
# Float32 (2026-12-04, session 21, same host, this script --repeats 7): every number split into three bfloat16
# parts (x = x0 + x1 + x2, exact), each product as six tile products of parts (x0 y0, x0 y1, x0 y2, x1 y0, x1 y1,
# x2 y0; the three left out are below 2^-23 of x y). 64x64 self-attention SDPA 251.9 ms, AMX 158.4 (1.59x), errors
# against float64 2.2e-7 vs SDPA's 2.8e-7; its cross-attention 11.3 vs 7.3; 32x32 self 24.6 vs 23.2, cross 3.8 vs
# 2.9; SD 2.x's 64-dim heads 198 vs 142; 16x16 and the VAE's head left to SDPA as in bf16 (0.88-1.0x, 0.77x).
# bf16 in the same run: 101.4 vs 56.5 ms. Where the fp32 time goes (rdtsc, per thread, Mcycles per call at 2.6 GHz):
# first 192 q k^T, 141 softmax, 195 p v, 14 packing (208 ms): the tile products ran at ~46 cycles each against ~14
# alone, because a head's packed keys and values (2 MB + 1.2 MB with three parts) no longer fit the 2 MB L2 and
# every block of 32 queries streamed them from L3 (a microbenchmark: tile loads from a 1 MB buffer ~17-23 cycles
# per product, from 3 MB or more ~40-70). What mattered: blocks of queries taking each 1024-key chunk in turn, 8 at
# a time (GROUP; in bf16 within noise), and the products of parts ordered so that each numerators' part is loaded
# once per 32 keys and reused (p v 195 -> 122 Mcycles); numerators split by truncation (exact in three parts) and
# packed two vectors per conversion (softmax 141 -> 117); a degree-6 exp2 fit instead of a degree-7 Taylor
# polynomial (136 -> 128). Then 131 + 128 + 124 + 15 Mcycles (~160 ms). Groups of 4-16 and chunks of 256-1024 were
# all within 5%.
# Peaked scores (2026-12-05, session 22, same host, --threads 2 --repeats 3 --scale 8: each row's scores spread over
# hundreds): before the kernels flushed subnormals to zero (MXCSR's FTZ and DAZ while they run, restored after), the
# exponentials of scores far below the row's maximum fell below float32's normal range, each costing a microcode
# assist: 64x64 self-attention bf16 1030 ms against SDPA's 118 (0.11x), fp32 1164 vs 270 (0.23x), SD 2.x heads 604 vs
# 71; after: 55.6 vs 104.9 ms (1.89x) and 157 vs 270 (1.71x), errors unchanged (bf16 1.5e-2 both; fp32 9.6e-5 vs
# SDPA's 1.6e-4). Unscaled (an in-process A/B of both builds, 9 calls each): bf16 61.8 vs 61.0 ms, fp32 153.2 vs 150.1,
# the same bits.
