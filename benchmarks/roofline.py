"""What this machine can do: fp32 and bf16 GFLOP/s of large matrix products and of 3x3 convolutions (NCHW,
channels-last, and with a oneDNN-packed weight), the ceilings the model benchmarks compare against.

    python benchmarks/roofline.py [--quick] [--threads N]

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (2 per multiply-add) on the plain op.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import count_flops, machine, print_table, setup
from latentdiff.models.packed import half_supported

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _gflops(fn, flops: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9


@torch.no_grad()
def matmul(dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return _gflops(lambda: a @ b, count_flops(lambda: a @ b), repeats)


@torch.no_grad()
def packed_linear(dtype: torch.dtype, rows: int, n: int, repeats: int = 5) -> float:
    """oneDNN linear with a pre-packed weight (what latentdiff.models.packed runs)."""
    x, w = torch.randn(rows, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    run = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
    return _gflops(run, count_flops(lambda: F.linear(x, w)), repeats)


@torch.no_grad()
def conv3x3(dtype: torch.dtype, channels: int, size: int, batch: int = 2, layout: str = "channels_last",
            repeats: int = 5) -> float:
    """A `channels`->`channels` 3x3 conv, padding 1, on [batch, channels, size, size]; layout: nchw,
    channels_last or packed (channels-last activations, weight packed once for oneDNN)."""
    x = torch.randn(batch, channels, size, size, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, dtype=dtype) * channels ** -0.5
    flops = count_flops(lambda: F.conv2d(x, w, padding=1))
    if layout != "nchw":
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    if layout == "packed":
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, None)
        run = lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, None, [1, 1], [1, 1], [1, 1], 1,  # noqa
                                                               "none", [], "")
    else:
        run = lambda: F.conv2d(x, w, padding=1)  # noqa: E731
    return _gflops(run, flops, repeats)


def conv_roofline(dtype: torch.dtype, channels: int = 320, size: int = 64, repeats: int = 5) -> float:
    """The ceiling the U-Net benchmark reports against: the best of a channels-last 3x3 conv at SD 1.5's first
    level (320 channels, 64x64 latents, batch 2), plain or packed (where oneDNN can pack this dtype: not bfloat16
    on an AVX2-only CPU, whose plain bfloat16 conv is PyTorch's slow fallback)."""
    layouts = ("channels_last", "packed") if onednn_packs(dtype) else ("channels_last",)
    return max(conv3x3(dtype, channels, size, layout=layout, repeats=repeats) for layout in layouts)


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack weights of this dtype here (bfloat16 not on AVX2-only CPUs)."""
    return dtype == torch.float32 or half_supported(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup(args.threads)
    print(machine())
    n, rows, channels, size = (1024, 2048, 160, 32) if args.quick else (4096, 8192, 320, 64)
    table = []
    for name, dtype in DTYPES.items():
        packs = onednn_packs(dtype)
        results = {f"matmul {n}^3": matmul(dtype, n, args.repeats)}
        if packs:
            results[f"linear {rows}x{n}x{n}, packed"] = packed_linear(dtype, rows, n, args.repeats)
        for layout in ("nchw", "channels_last", "packed") if packs else ("nchw", "channels_last"):
            results[f"conv3x3 {channels}ch {size}x{size} b2, {layout}"] = conv3x3(dtype, channels, size,
                                                                                  layout=layout,
                                                                                  repeats=args.repeats)
        best = max(v for k, v in results.items() if k.startswith("conv"))
        for k, v in results.items():
            table.append({"dtype": name, "benchmark": k, "GFLOP/s": f"{v:.0f}",
                          "of best conv": f"{v / best:.0%}"})
    print_table(table, ["dtype", "benchmark", "GFLOP/s", "of best conv"])


if __name__ == "__main__":
    main()
