"""Time our U-Net against diffusers' UNet2DConditionModel in one process: same random weights, same inputs, runs
interleaved (A B A B ...). Default: Stable Diffusion 1.5, one guided step (batch 2), 4x64x64 latents, fp32 and bf16.

    python benchmarks/unet.py [--quick] [--size 64] [--dtypes fp32,bf16] [--repeats 3] [--threads N]
                              [--variants diffusers,ours,ours-opt] [--profile ours-opt]

Variants: diffusers (the reference, as shipped), diffusers-cl (the reference in channels-last), ours (eager, as
constructed), ours-opt (after `optimize_for_inference()`: channels-last, oneDNN-packed weights, Winograd 3x3 convs,
on AMX CPUs the AMX attention kernel and, in fp32, AMX linear layers; in bf16 on AVX512-BF16 CPUs without AMX the
kernel's AVX-512 build), ours-opt-sdpa (the same with PyTorch's attention kernel), ours-packed (the same without
Winograd, `optimize_for_inference(winograd=False)`), ours-compile (torch.compile of ours in channels-last with
inductor's freezing, compile time reported; slow to compile). Prints per variant: median and best seconds per
forward, process CPU seconds, GFLOP/s (FLOPs counted by FlopCounterMode on fake tensors, shapes only; it has no
formula for the CPU attention kernel: attention is reported apart), share of the 3x3-conv roofline measured in the
same run (benchmarks/roofline.py: the best of its measurements before the runs and before each round) and, paired,
the median over rounds of the share against the roofline of the same round (on a host whose speed moves within
seconds a short sample, so noisy too), speed relative to diffusers, the bytes of the variant's weights and the
process's peak RSS. On a CPU without oneDNN kernels for bf16 (AVX2-only) diffusers and ours (eager) run in bf16 in
channels-last (in NCHW one forward takes about half an hour there; channels-last about 1.5 minutes), and the bf16
roofline is that of PyTorch's fallback convolution: `--dtypes bf16 --variants diffusers,ours-opt --repeats 2
--warmup 0` takes about 8 minutes there. On a machine shared with other jobs, OpenMP threads that lose their core
stall every parallel region: compare with --threads 1 (and the CPU-seconds column) there.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from common import (SLOW_HALF_NOTE, half_is_slow, parse_model_benchmark_args, print_table, reference_flops,
                    slow_half_in_channels_last, time_with_roofline, timing_rows, twins, weight_bytes)
from roofline import DTYPES, conv_roofline

VARIANTS = ("diffusers", "diffusers-cl", "ours", "ours-opt", "ours-opt-sdpa", "ours-packed", "ours-compile")


def build(dtype: torch.dtype, variants: list[str]) -> dict[str, torch.nn.Module]:
    """diffusers' SD 1.5 U-Net with random weights, and ours holding the very same tensors (no copy); the optimized
    and compiled variants make their own (packed or channels-last) copies."""
    import diffusers

    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig

    ref, ours = twins(diffusers.UNet2DConditionModel, UNet2DConditionModel, UNetConfig.sd15(), dtype,
                      "diffusers U-Net")
    models = {"diffusers": ref}
    for name in variants:
        if name == "diffusers-cl":
            models[name] = type(ref).from_config(ref.config).to(dtype).eval().requires_grad_(False)
            models[name].load_state_dict(ref.state_dict())
            models[name].to(memory_format=torch.channels_last)
        elif name == "ours":
            models[name] = ours()
        elif name == "ours-opt":
            models[name] = ours().optimize_for_inference()
        elif name == "ours-opt-sdpa":
            models[name] = ours().optimize_for_inference()
            for layer in models[name].modules():
                layer.__dict__.pop("attend", None)  # back to the class's F.scaled_dot_product_attention
        elif name == "ours-packed":
            models[name] = ours().optimize_for_inference(winograd=False)
        elif name == "ours-compile":
            models[name] = ours().to(memory_format=torch.channels_last)
    slow_half_in_channels_last(models, dtype)
    return models


def count_flops(batch: int, size: int) -> tuple[int, int]:
    """FLOPs of diffusers' forward at this batch and latent size, all and attention's (on fake tensors)."""
    import diffusers

    from latentdiff.models.unet import UNetConfig

    return reference_flops(diffusers.UNet2DConditionModel, UNetConfig.sd15(), lambda m: m(
        torch.randn(batch, 4, size, size), torch.full((batch,), 500), torch.randn(batch, 77, 768)).sample)


def compile_model(model: torch.nn.Module, args: tuple) -> tuple[object, float]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constant-fold and pre-pack weights, as packed.py does by hand
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*args)
    return compiled, time.perf_counter() - start


def profile(fn, title: str, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    print(f"\nprofile of {title}")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                             max_name_column_width=40, max_shapes_column_width=60))


def run_dtype(name: str, dtype: torch.dtype, args) -> list[dict]:
    variants = [v for v in args.variants if v != "diffusers"]
    models = build(dtype, variants)
    weights = {v: weight_bytes(m) for v, m in models.items()}
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(dtype)
    ctx = torch.randn(args.batch, 77, 768, generator=g).to(dtype)
    t = torch.full((args.batch,), 500)
    inputs = (sample, t, ctx)

    calls, compile_s = {}, None
    for v, model in models.items():
        if v.startswith("diffusers"):
            calls[v] = (lambda m: lambda: m(*inputs).sample)(model)
        elif v == "ours-compile":
            compiled, compile_s = compile_model(model, inputs)
            calls[v] = (lambda m: lambda: m(*inputs))(compiled)
        else:
            calls[v] = (lambda m: lambda: m(*inputs))(model)
    calls = {v: calls[v] for v in ["diffusers", *variants]}

    flops, attention = count_flops(args.batch, args.size)
    with torch.no_grad():
        reference = calls["diffusers"]().float()
        errors = {"diffusers": 0.0, **{v: (calls[v]().float() - reference).abs().max().item() for v in variants}}
    if args.profile:
        for v in args.profile:
            profile(calls[v], f"{v} ({name})")

    timings, roof, roofs = time_with_roofline(calls, args.repeats, args.warmup, lambda: conv_roofline(dtype, repeats=3))
    rows = timing_rows(name, timings, flops, roof, weights, errors, roofs)
    if half_is_slow(dtype):
        print(SLOW_HALF_NOTE.format(name=name))
    print(f"\n{name}: {flops / 1e9:.0f} GFLOP per forward as FlopCounterMode counts them (batch {args.batch}, "
          f"4x{args.size}x{args.size}; + {attention / 1e9:.0f} GFLOP of attention it does not count on the CPU); "
          f"3x3-conv roofline {roof:.0f} GFLOP/s (per round: {' '.join(f'{r:.0f}' for r in roofs)})"
          + (f"; ours-compile compiled in {compile_s:.0f} s" if compile_s else ""), flush=True)
    print("columns: median over the runs (in brackets: from the best run); paired: the median over the rounds of "
          "diffusers' time / the variant's in the same round; weights: the variant's own (ours shares "
          "diffusers' tensors here); peak RSS: of the whole process (every model alive) during the variant's runs, "
          "and how much it rose above the resident memory before them")
    print_table(rows, list(rows[0]))
    del models, calls, timings
    gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32x32 latents, 2 repeats (about a minute)")
    parser.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512 px images)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one classifier-free guided step")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--variants", default="diffusers,ours,ours-opt",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's)")
    parser.add_argument("--profile", default="", help="comma-separated variants to profile (one forward each)")
    args = parse_model_benchmark_args(parser, VARIANTS, DTYPES)
    for name in args.dtypes:
        run_dtype(name, DTYPES[name], args)


if __name__ == "__main__":
    main()
