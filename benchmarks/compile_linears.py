"""The compiled U-Net's float32 linear layers packed for oneDNN (inductor_passes.OneDNNLinears, which pipe.compile()
runs) against inductor's own packing for MKL (the pass turned off), each compiled in a fresh child process as
pipe.compile() compiles (pipeline.inductor_settings; the FX graph cache off, so that each variant compiles): the
process's RSS after loading, its growth while compiling, its peak, and the compiled forward's median seconds.

    python benchmarks/compile_linears.py [--model tiny|sd15] [--side 16] [--batch 2] [--threads 2] [--repeats 10]
        [--speed]

tiny: pipelines/tiny-shapes' U-Net; sd15: SD 1.5's U-Net with random weights (compiling it takes minutes).
Those timings come from two processes, one after the other, so they carry the host's drift between them; `--speed`
also compiles both variants in one more child process and times them there, calls interleaved over `--repeats`
rounds, with the paired ratio (the median over rounds of MKL's call / oneDNN's): the figure to trust for speed.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from common import machine, peak_rss, rss, setup, time_interleaved
from latentdiff import inductor_passes
from latentdiff.pipeline import inductor_settings

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def load_unet(args):
    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig

    if args.model == "tiny":
        unet = UNet2DConditionModel.from_pretrained(ROOT / "pipelines" / "tiny-shapes" / "unet")
    else:
        torch.manual_seed(0)  # (the same random weights in every process)
        unet = UNet2DConditionModel(UNetConfig.sd15())
    return unet.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def skip_pass(self, graph) -> None:
    """OneDNNLinears.__call__ while the MKL variant compiles: inductor's own MKL packing is left as it is."""


def child(args) -> None:
    setup(args.threads)
    unet = load_unet(args)
    config = unet.config
    x = torch.randn(args.batch, config.in_channels, args.side, args.side)
    t = torch.tensor(500.0)
    context = torch.randn(args.batch, 77, config.cross_attention_dim)
    if args.child == "both":
        return speed(args, unet, (x, t, context))
    if args.child == "mkl":
        inductor_passes.OneDNNLinears.__call__ = skip_pass
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


def speed(args, unet, inputs) -> None:
    """Both variants compiled in this process (the oneDNN pass off while the MKL one compiles), then timed in
    interleaved rounds."""
    run_pass, ran = inductor_passes.OneDNNLinears.__call__, []

    def counted(self, graph):
        ran.append(graph)
        return run_pass(self, graph)

    compiled = {}
    with torch.no_grad(), inductor_settings("cpu"), inductor_config.patch(fx_graph_cache=False):
        for variant in ("mkl", "onednn"):
            inductor_passes.OneDNNLinears.__call__ = skip_pass if variant == "mkl" else counted
            compiled[variant] = torch.compile(copy.deepcopy(unet) if variant == "mkl" else unet)
            compiled[variant](*inputs)  # (compiles, under the pass as it is now)
        inductor_passes.OneDNNLinears.__call__ = run_pass
        if not ran:
            raise RuntimeError("the oneDNN variant compiled no graph of its own (dynamo reused the MKL one's)")
        timings = time_interleaved({variant: functools.partial(fn, *inputs) for variant, fn in compiled.items()},
                                   args.repeats, warmup=0, progress=False, memory=False)
    mkl, onednn = timings["mkl"], timings["onednn"]
    print(json.dumps({"mkl": mkl.median, "onednn": onednn.median, "paired": onednn.paired_ratio(mkl)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--side", type=int, default=16, help="latent side (16: tiny-shapes' 128 px images)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--speed", action="store_true", help="also time both in one process (interleaved)")
    parser.add_argument("--child", choices=("mkl", "onednn", "both"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    rows = {}
    for variant in ("mkl", "onednn") + (("both",) if args.speed else ()):
        command = [sys.executable, __file__, "--child", variant] + sys.argv[1:]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    both = rows.pop("both", None)
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
          f"{mkl['median'] / onednn['median']:.3f} (two processes)")
    if both is not None:
        print(f"in one process, interleaved: median s mkl {both['mkl']:.4f}, oneDNN {both['onednn']:.4f}; paired "
              f"mkl / oneDNN {both['paired']:.3f}")


if __name__ == "__main__":
    main()
