"""Where the host's time goes in a denoising step that the host, not the GPU, bounds: SD 1.5 at batch 1 with
guidance (one U-Net call on 2 samples per step) on a fast GPU is such a step.

    python benchmarks/gpu_host.py [--variants diffusers,ours,ours-cl,...] [--steps 5,25] [--rounds 3]
                                  [--profile ours,ours-cl] [--top 25] [--device cuda] [--tiny]

Per variant (gpu.py's variants and pipelines: the same weights, fp16, 512x512): milliseconds per denoising step,
taken as the difference between calls of the two --steps counts divided by the steps between them (the text
encoder, the VAE decode and the call's fixed costs cancel), the calls interleaved over the variants in --rounds
rounds (median), and the GPU kernel launches per step (torch.profiler, the same difference between calls of 2 and
4 steps: profiling a long call costs more than the call). --profile then runs
one call of the larger step count per listed variant under cProfile and prints the functions that took the most
host time of their own: Python in the models and in Triton's launcher, and each torch operator's C++ entry (its
dispatch and launch). On the CPU (--device cpu --tiny) it is a smoke test of the script.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

import gpu
from common import print_table, setup


def call(pipes, variant: str, latents: torch.Tensor, args, steps: int):
    lib = variant.split("-")[0]
    return gpu.generate(pipes[lib], lib, args.prompt, latents, argparse.Namespace(size=args.size, steps=steps))


def launches(pipes, variant: str, latents: torch.Tensor, args, steps: int) -> int:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if latents.is_cuda else [])
    with profile(activities=activities) as prof:
        call(pipes, variant, latents, args, steps)
        gpu.sync(latents.device)
    kind = "CUDA" if latents.is_cuda else "CPU"
    return sum(1 for e in prof.events() if e.device_type.name == kind)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="diffusers,ours,ours-plain,ours-jit,ours-cl,ours-qkv")
    parser.add_argument("--steps", default="5,25", help="the two step counts whose difference is timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", default="ours,ours-cl", help="variants to run under cProfile ('' for none)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse on the moon")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random models, 64x64 (a smoke test)")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(gpu.VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(gpu.VARIANTS)}")
    few, many = sorted(int(s) for s in args.steps.split(","))
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    args.size = 64 if args.tiny else 512
    setup(None)
    print(gpu.describe(device), flush=True)
    pipes = gpu.build_pipelines(args.tiny, device, dtype, vae_upcast=False)
    latents = gpu.make_latents(pipes, 1, args, device, dtype)

    per_step = {v: [] for v in variants}
    for round_ in range(args.rounds + 1):  # round 0 warms every variant up at both step counts
        for variant in variants:
            with gpu.variant_unet(pipes[variant.split("-")[0]], variant):
                seconds = [gpu.timed(lambda: call(pipes, variant, latents, args, n), device)[0]  # noqa: B023
                           for n in (few, many)]
            if round_:
                per_step[variant].append((seconds[1] - seconds[0]) / (many - few))
    rows = []
    for variant in variants:
        with gpu.variant_unet(pipes[variant.split("-")[0]], variant):
            counts = [launches(pipes, variant, latents, args, n) for n in (2, 4)]
        ms = statistics.median(per_step[variant]) * 1e3
        rows.append({"variant": variant, "ms per step": f"{ms:.2f}",
                     "rounds": " ".join(f"{s * 1e3:.1f}" for s in per_step[variant]),
                     "vs diffusers": f"{statistics.median(per_step['diffusers']) * 1e3 / ms:.2f}x"
                     if "diffusers" in per_step else "-",
                     "launches per step": f"{(counts[1] - counts[0]) / 2:.0f}"})
        print("  " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    print(f"\nbatch 1, guidance {gpu.GUIDANCE}: one U-Net call on 2 samples per step; ms per step from calls of "
          f"{few} and {many} steps")
    print_table(rows, list(rows[0]))

    for variant in [v for v in args.profile.split(",") if v]:
        with gpu.variant_unet(pipes[variant.split("-")[0]], variant):
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.runcall(call, pipes, variant, latents, args, many)
            gpu.sync(device)
            wall = time.perf_counter() - start
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
        body = text.getvalue()
        print(f"\ncProfile {variant}, {many} steps (wall {wall:.2f} s under the profiler):\n"
              + body[body.find("   ncalls"):], flush=True)


if __name__ == "__main__":
    main()
