"""Time our VAE decoder against diffusers' AutoencoderKL in one process: same random weights, same latents, runs
interleaved. Default: the Stable Diffusion 1.x VAE decoding one 4x64x64 latent to a 512x512 image, fp32 and bf16.

    python benchmarks/vae.py [--quick] [--size 64] [--batch 1] [--dtypes fp32,bf16] [--repeats 3] [--threads N]
                             [--variants diffusers,ours,ours-opt]

Variants: diffusers (the reference), ours (eager), ours-opt (`pack_for_inference(vae)`: channels-last, packed
weights, Winograd 3x3 convs), ours-packed (the same without Winograd). Columns, and the bf16 runs on a CPU without
oneDNN kernels for it (eager models in channels-last), as in benchmarks/unet.py.
`--model tiny` times TAESD instead (AutoencoderTiny, ours against diffusers', its default SD 1.x config).
"""
from __future__ import annotations

import argparse
import gc

import torch

from common import (SLOW_HALF_NOTE, half_is_slow, parse_model_benchmark_args, print_table, reference_flops,
                    slow_half_in_channels_last, time_with_roofline, timing_rows, twins, weight_bytes)
from roofline import DTYPES, conv_roofline

VARIANTS = ("diffusers", "ours", "ours-opt", "ours-packed")
TINY_DROP = ("block_out_channels",)  # diffusers' AutoencoderTiny takes neither it nor our other written-only keys


def build(dtype: torch.dtype, variants: list[str], model: str = "kl") -> dict[str, torch.nn.Module]:
    import diffusers

    from latentdiff.models.packed import pack_for_inference
    from latentdiff.models.vae import AutoencoderKL, VAEConfig
    from latentdiff.models.vae_tiny import AutoencoderTiny, TinyVAEConfig

    if model == "tiny":
        ref, ours = twins(diffusers.AutoencoderTiny, AutoencoderTiny, TinyVAEConfig(), dtype, "diffusers TAESD",
                          drop=TINY_DROP)
    else:
        ref, ours = twins(diffusers.AutoencoderKL, AutoencoderKL, VAEConfig.sd15(), dtype, "diffusers VAE")
    models = {"diffusers": ref}
    for name in variants:
        if name == "ours":
            models[name] = ours()
        elif name in ("ours-opt", "ours-packed"):
            models[name] = pack_for_inference(ours(), winograd=name == "ours-opt")
    slow_half_in_channels_last(models, dtype)
    return models


def count_flops(model: str, batch: int, size: int) -> int:
    """FLOPs of diffusers' decode of `batch` latents of this size (on fake tensors; attention not counted)."""
    import diffusers

    from latentdiff.models.vae import VAEConfig
    from latentdiff.models.vae_tiny import TinyVAEConfig

    cls, config, drop = ((diffusers.AutoencoderTiny, TinyVAEConfig(), TINY_DROP) if model == "tiny" else
                         (diffusers.AutoencoderKL, VAEConfig.sd15(), ()))
    return reference_flops(cls, config, lambda m: m.decode(torch.randn(batch, 4, size, size)).sample, drop)[0]


def run_dtype(name: str, dtype: torch.dtype, args) -> None:
    variants = [v for v in args.variants if v != "diffusers"]
    models = build(dtype, variants, args.model)
    weights = {v: weight_bytes(m) for v, m in models.items()}
    latents = torch.randn(args.batch, 4, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(dtype)
    calls = {v: (lambda m: lambda: m.decode(latents).sample)(m) if v == "diffusers"
             else (lambda m: lambda: m.decode(latents))(m) for v, m in models.items()}
    calls = {v: calls[v] for v in ["diffusers", *variants]}
    flops = count_flops(args.model, args.batch, args.size)
    with torch.no_grad():
        reference = calls["diffusers"]().float()
        errors = {"diffusers": 0.0, **{v: (calls[v]().float() - reference).abs().max().item() for v in variants}}
    timings, roof, roofs = time_with_roofline(calls, args.repeats, args.warmup, lambda: conv_roofline(dtype, repeats=3))
    rows = timing_rows(name, timings, flops, roof, weights, errors, roofs)
    if half_is_slow(dtype):
        print(SLOW_HALF_NOTE.format(name=name))
    print(f"\n{name}: decode {args.batch}x4x{args.size}x{args.size} -> {args.size * 8}px, {flops / 1e9:.0f} GFLOP "
          f"(FlopCounterMode, attention not counted); 3x3-conv roofline {roof:.0f} GFLOP/s "
          f"(per round: {' '.join(f'{r:.0f}' for r in roofs)})", flush=True)
    print_table(rows, list(rows[0]))
    del models, calls, timings
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32x32 latents (256 px), 2 repeats")
    parser.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512 px images)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--model", choices=("kl", "tiny"), default="kl", help="the SD VAE, or TAESD")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--variants", default="diffusers,ours,ours-opt",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's)")
    args = parse_model_benchmark_args(parser, VARIANTS, DTYPES)
    for name in args.dtypes:
        run_dtype(name, DTYPES[name], args)


if __name__ == "__main__":
    main()
