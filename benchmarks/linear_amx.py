"""Our float32 linear layers on AMX tiles (latentdiff/models/amx_layers.py's AmxLinear and AmxGEGLU, which
optimize_for_inference() uses on float32 models where the CPU has AMX) against oneDNN's (PackedLinear, PackedGEGLU,
what it uses elsewhere) on the linear layers of SD 1.5's U-Net, batch 2. Prints, per layer: the largest error of
both against a float64 reference, the median times (calls interleaved) and the ratio.

    python benchmarks/linear_amx.py [--threads 2] [--repeats 7] [--kernels fma]

`--kernels fma`: the GEGLUs alone, against our AVX2 kernel (fma.py, amx_layers.FmaGEGLU), which
optimize_for_inference() uses on CPUs with AVX2 and FMA but no AVX-512.

Why: oneDNN's float32 products run at the AVX-512 FMA peak at best (about 220-310 GFLOP/s on these layers on a
2-core AMX host); AMX tiles multiply bfloat16 several times faster, and three bfloat16 parts per number with six
products of parts per product keep float32's precision.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from common import amx_unavailable, start_kernel_benchmark, time_interleaved
from latentdiff.models import amx, fma
from latentdiff.models.attention import GEGLU
from latentdiff.models.amx_layers import AmxGEGLU, AmxLinear, FmaGEGLU
from latentdiff.models.packed import PackedGEGLU, PackedLinear

# (name, tokens (batch 2), in, out): per resolution of SD 1.5's 512x512 U-Net, the attention projections, the
# feed-forward's output and its GEGLU (in -> 2 x 4 in), the cross-attention's keys (77 text tokens), the time embedding
LAYERS = [("64x64 q/k/v/out", 8192, 320, 320), ("64x64 ff out", 8192, 1280, 320), ("64x64 geglu", 8192, 320, 0),
          ("32x32 q/k/v/out", 2048, 640, 640), ("32x32 ff out", 2048, 2560, 640), ("32x32 geglu", 2048, 640, 0),
          ("16x16 q/k/v/out", 512, 1280, 1280), ("16x16 ff out", 512, 5120, 1280), ("16x16 geglu", 512, 1280, 0),
          ("text keys 64x64", 154, 768, 320), ("time embedding", 2, 320, 1280)]
# (points, tiles, in, out): Winograd's products in SD 1.5's U-Net, batch 2 (F(4x4): 36 points, F(2x2): 16; the tiles
# of one slice of tile rows, winograd.CHUNK_BYTES), from 64x64 (320 channels) to 8x8 (1280)
POINTS = [(36, 256, 320, 320), (36, 128, 640, 640), (16, 128, 1280, 1280), (16, 128, 2560, 1280),
          (16, 32, 1280, 1280), (16, 256, 1920, 640)]


@torch.no_grad()
def main() -> None:
    args = start_kernel_benchmark(__doc__, 7, lambda: None, lambda parser: parser.add_argument(
        "--kernels", choices=("amx", "fma"), default="amx"))
    on_fma = args.kernels == "fma"
    why = fma.unavailable() if on_fma else amx_unavailable()
    if why:
        print(f"skipped: {why}")
        return
    geglu, label = (FmaGEGLU, "FMA") if on_fma else (AmxGEGLU, "AMX")
    print(f"layer               tokens  in    out   GFLOP  err oneDNN  err {label}   oneDNN ms  {label} ms  "
          f"{label} vs oneDNN")
    for name, tokens, k, n in LAYERS:
        if on_fma and n:  # (the AVX2 kernel makes GEGLUs alone)
            continue
        x = torch.randn(tokens, k)
        if n:  # a plain linear layer
            layer = torch.nn.Linear(k, n).eval()
            exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
            flops = 2 * tokens * k * n
        else:  # GEGLU: k -> 2 x 4k, then value * gelu(gate)
            layer = GEGLU(k, 4 * k).eval()
            reference = GEGLU(k, 4 * k).double()
            reference.load_state_dict(layer.state_dict())
            exact = reference(x.double())
            flops, n = 2 * tokens * k * 8 * k, 4 * k
        onednn, ours = (PackedLinear(layer), AmxLinear(layer)) if isinstance(layer, torch.nn.Linear) else \
            (PackedGEGLU(layer), geglu(layer))
        errors = [(f(x).double() - exact).abs().max().item() for f in (onednn, ours)]
        timings = time_interleaved({"onednn": lambda: onednn(x), "amx": lambda: ours(x)}, args.repeats,
                                   progress=False, memory=False)
        t_onednn, t_amx = (timings[key].median * 1e3 for key in ("onednn", "amx"))
        print(f"{name:19} {tokens:6}  {k:4}  {n:4}  {flops / 1e9:5.2f}  {errors[0]:.2e}    {errors[1]:.2e}  "
              f"{t_onednn:9.3f}  {t_amx:6.3f}  {t_onednn / t_amx:.2f}x")
    if on_fma:
        return
    print("\nWinograd's products (one per transform point), torch.bmm against amx.points")
    print("points x (tiles, in) x out        err bmm   err AMX   bmm ms  AMX ms  AMX vs bmm")
    for points, tiles, k, n in POINTS:
        x, w = torch.randn(points, tiles, k), torch.randn(points, k, n) / k ** 0.5
        packed = amx.pack_points(w.transpose(1, 2))
        exact = torch.bmm(x.double(), w.double())
        errors = [(y.double() - exact).abs().max().item() for y in (torch.bmm(x, w), amx.points(x, packed, n))]
        timings = time_interleaved({"bmm": lambda: torch.bmm(x, w), "amx": lambda: amx.points(x, packed, n)},
                                   args.repeats, progress=False, memory=False)
        t_bmm, t_amx = (timings[key].median * 1e3 for key in ("bmm", "amx"))
        print(f"{str((points, tiles, k, n)):31}  {errors[0]:.2e}  {errors[1]:.2e}  {t_bmm:6.2f}  {t_amx:6.2f}  "
              f"{t_bmm / t_amx:.2f}x")


if __name__ == "__main__":
    sys.exit(main())

# Measured 2026-12-04 (session 21) on the 2-core Intel Xeon with AMX, 2 threads, torch 2.14.1, this script
# (--repeats 7): oneDNN vs AMX ms (errors against float64 oneDNN / AMX): 64x64 q/k/v/out 5.70 vs 4.35 (2.2e-6 /
# 1.2e-6), ff out 21.2 vs 18.3, GEGLU 74.6 vs 44.2 (1.69x); 32x32 q/k/v/out 5.59 vs 4.14, ff out 21.8 vs 16.9, GEGLU
# 47.1 vs 26.1 (1.81x); 16x16 q/k/v/out 5.49 vs 3.87, ff out 22.1 vs 16.4, GEGLU 45.7 vs 33.3; the text keys 0.33 vs
# 0.33; the time embedding's two rows 0.107 vs 0.128 (few_rows: vector products summed in double precision, since
# PyTorch's products for so few rows are more exact than its large ones). AMX errors below oneDNN's on every layer.
# What mattered: the products of a pass over at most 384 of the depth summed in tiles, then added to the output in
# fp32 (one pass over all the depth: errors up to 3x oneDNN's at depth 5120, from rounding the running sums six
# times per product); blocks of 128 rows per thread whose parts (split once per pass, 320 KiB) stay in L2 while
# panels of packed weights (<= 768 KiB) go by: x split once for all rows into one buffer ran 8192-row layers at half
# speed (the parts came from memory); the GEGLU's gate applied as the output is written (erf by Abramowitz & Stegun
# 7.1.26), its 640-deep 32x32 layer in one pass (two passes kept running sums in memory: 1.01x).
# 2026-12-05 (session 22, same host; in-process A/B of two builds of amx.cpp on the same inputs): the GEGLU epilogue's
# exp(-z^2) went subnormal for gates beyond |x| ~ 13 (a microcode assist per operation): with N(0, 1) weights (gates ~
# N(0, 320)) 8192 x 320 -> 2560 took 82 vs 35 ms once the kernels flush subnormals to zero while they run (MXCSR's FTZ
# and DAZ, restored after; same bits); the layers' usual init gives small gates and never showed it. Dropped: flushing a
# block's tile sums a share per depth step of the next block (to overlap the vector epilogue with the tile products):
# 0.99-1.05x. Fewer blocks of 32 rows than threads (32 rows on 2 threads): the threads share out the columns too, 32 x
# 640 -> 640 149 -> 61 us.
# Winograd's products on the same kernel (amx.points: P weights, the threads taking whole points first, so each
# point's filters are read from memory by one thread; before, torch.bmm; 2026-12-05, session 22, --repeats 5): 36 x
# 256 x 320 -> 320 4.46 vs 2.92 ms, 36 x 128 x 640 -> 640 10.3 vs 8.4, 16 x 128 x 1280 -> 1280 25.0 vs 14.8, 16 x 128
# x 2560 -> 1280 57.6 vs 32.6, 16 x 32 x 1280 -> 1280 7.1 vs 5.6, 16 x 256 x 1920 -> 640 29.6 vs 19.8; errors against
# float64 about half of bmm's. Whole models (an in-process A/B of two optimized copies, 4 interleaved calls each,
# float32, 2 threads): SD 1.5's U-Net forward (batch 2, 64x64) 3.415 -> 2.910 s (1.17x), the VAE decode (512 px)
# 5.797 -> 5.416 s (1.07x). The price: the transformed filters held as parts, 1.5x their float32 bytes (the U-Net's
# weights after optimize_for_inference 5.73 -> 7.50 GiB; the VAE's 1.16 -> 1.71 GiB).
# Then Winograd's input and output transforms as one AVX-512 pass each (then in amx.cpp; since session 23 portable
# C++ in winograd.cpp for every CPU, as fast here, measured by benchmarks/winograd.py; PyTorch's
# elementwise ops took one pass per term and were 40-60% of a 64x64 conv's time once the products ran on AMX): per
# conv (fp32, batch 2) 320 -> 320 at 64x64 14.2 -> 8.8 ms, 640 -> 640 at 32x32 10.4 -> 7.9, 960 -> 320 at 64x64 55 ->
# 33, 1920 -> 640 at 32x32 49.5 -> 42; in-process A/B of whole models: U-Net forward 3.086 -> 2.818 s, VAE decode
# 8.49 -> 6.96 s (a noisy hour: runs 5.0-8.4 vs 7.3-11.0). Smaller slices of tile rows (winograd.MIN_TILES 32-128
# instead of 256): within noise.
# Dropped (same session): the residual added by the output transform as it writes (instead of an add_ after): VAE
# decode 4.288 vs 4.165 s, U-Net 2.503 vs 2.515 (in-process A/B, 7 and 4 calls; the tile-wise reads of the residual
# cost what the separate streaming pass did); the products' loops swapped (columns outer) and/or depth passes of 192:
# 0.86-0.98x.
