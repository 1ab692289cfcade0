"""The compiled U-Net's float32 linear layers packed for oneDNN (inductor_passes.OneDNNLinears, which pipe.compile()
runs) against inductor's own packing for MKL (the pass turned off), each compiled in a fresh child process as
pipe.compile() compiles (pipeline.inductor_settings; the FX graph cache off, so that each variant compiles): the
process's RSS after loading, its growth while compiling, its peak, and the compiled forward's median seconds.

    python benchmarks/compile_linears.py [--model tiny|sd15] [--side 16] [--batch 2] [--threads 2] [--repeats 10]

tiny: pipelines/tiny-shapes' U-Net; sd15: SD 1.5's U-Net with random weights (compiling it takes minutes).
Timings come from two processes, one after the other, so they carry the host's drift between them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import machine, peak_rss, rss, setup

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def child(args) -> None:
    import torch._inductor.config as inductor_config

    from latentdiff import inductor_passes
    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig
    from latentdiff.pipeline import inductor_settings

    setup(args.threads)
    if args.model == "tiny":
        unet = UNet2DConditionModel.from_pretrained(ROOT / "pipelines" / "tiny-shapes" / "unet")
    else:
        unet = UNet2DConditionModel(UNetConfig.sd15())
    unet = unet.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    config = unet.config
    x = torch.randn(args.batch, config.in_channels, args.side, args.side)
    t = torch.tensor(500.0)
    context = torch.randn(args.batch, 77, config.cross_attention_dim)
    if args.child == "mkl":
        inductor_passes.OneDNNLinears.__call__ = lambda self, graph: None
    loaded = rss() / MIB
    compiled = torch.compile(unet)
    start = time.perf_counter()
    with torch.no_grad(), inductor_settings("cpu"), inductor_config.patch(fx_graph_cache=False):
        compiled(x, t, context)
        compile_s = time.perf_counter() - start
        after = rss() / MIB
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            compiled(x, t, context)
            times.append(time.perf_counter() - start)
    print(json.dumps({"variant": args.child, "loaded": loaded, "growth": after - loaded, "peak": peak_rss() / MIB,
                      "compile_s": compile_s, "median": statistics.median(times), "best": min(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--side", type=int, default=16, help="latent side (16: tiny-shapes' 128 px images)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", choices=("mkl", "onednn"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    rows = {}
    for variant in ("mkl", "onednn"):
        command = [sys.executable, __file__, "--child", variant] + sys.argv[1:]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    setup(args.threads)
    print(f"{args.model} U-Net, batch {args.batch}, {args.side}x{args.side} latents; {machine()}")
    print(f"{'linears':8s} {'loaded MiB':>10s} {'+compile MiB':>12s} {'peak MiB':>9s} {'compile s':>9s} "
          f"{'median s':>9s} {'best s':>8s}")
    for variant, r in rows.items():
        print(f"{variant:8s} {r['loaded']:10.0f} {r['growth']:12.0f} {r['peak']:9.0f} {r['compile_s']:9.1f} "
              f"{r['median']:9.4f} {r['best']:8.4f}")
    mkl, onednn = rows["mkl"], rows["onednn"]
    print(f"oneDNN saves {mkl['growth'] - onednn['growth']:.0f} MiB of the compile's growth, "
          f"{mkl['peak'] - onednn['peak']:.0f} MiB of peak RSS; median time mkl / oneDNN "
          f"{mkl['median'] / onednn['median']:.3f}")


if __name__ == "__main__":
    main()
