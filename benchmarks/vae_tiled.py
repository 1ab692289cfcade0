"""Peak working memory of tiled vs untiled VAE decoding (and encoding), ours against diffusers' AutoencoderKL: the
Stable Diffusion 1.x VAE (VAEConfig.sd15(), 83.65M parameters) with random weights, fp32, one image of --size pixels
(default 512: a 1x4x64x64 latent), each measurement in a fresh process so that its peak resident memory is its own.

    python benchmarks/vae_tiled.py [--size 512] [--encode] [--tile 128] [--diffusers-tile 128] [--repeats 1]
                                   [--threads N] [--variants ours,ours-tiled,diffusers,diffusers-tiled,...]

Variants: `ours` (`vae.decode(z, tiled=False)`), `ours-tiled` (`vae.enable_tiling(--tile)`, then
`vae.decode(z, tiled=True)`; exact: whole-image GroupNorm statistics, halos over the receptive field), `diffusers`
(`vae.decode(z)`), `diffusers-tiled` (`vae.enable_tiling()` as shipped: tiles of config.sample_size = 512 px, so an
image of 512 px or less is one tile and nothing is tiled) and `diffusers-small-tiles` (the same with diffusers'
tile_sample_min_size set to --diffusers-tile px: overlapping tiles decoded independently, attention included, and
blended at the seams, so the result differs from the untiled one). --encode measures `encode` the same way (ours:
posterior mean and log-variance; diffusers: its latent_dist's), after the decode rows.

The allocator matters to what a tiled call's peak RSS shows. With glibc's defaults the mmap threshold grows to the
largest block freed so far (up to 32 MiB), so tile-sized temporaries come from the heap and stay resident after they
are freed, fragmented among tiles of different sizes. Ours therefore calls malloc_trim after every tile (see
latentdiff.models.vae._return_freed_memory): with 1 thread, decode 0.28x of untiled with 64 px tiles (the default;
without the trim 0.36x), 0.34-0.38x with 128 px tiles. --mmap-threshold 131072 (MALLOC_MMAP_THRESHOLD_, for every
job, tiled or not) makes glibc return such blocks at once instead: 288 of 987 MiB (0.29x) with 128 px tiles before
the trim existed, 13% slower (more page faults).

Every job builds the models with common.twins (as benchmarks/vae.py does): diffusers' on the meta device, its
weights drawn by common.gaussian_init_(seed=0), and for ours that state dict loaded (the same tensors, never held
twice). Inputs are seeded (latents ~ N(0, 1); images ~ U(-1, 1) for --encode). Then, under torch.no_grad(): gc +
malloc_trim, reset the kernel's high-water mark (/proc/self/clear_refs), read VmRSS (`base`: weights, imports,
input), run the ONE call, read VmHWM (`peak`). `work` = peak - base is the call's working memory: activations,
workspace and output. No warm-up call is made, by design: a warm-up would leave memory resident in the allocator and
the thread pools, which the measured call could then reuse unseen, understating its needs; in a fresh process every
byte the call touches shows in the rise. The cost is that `wall s` is a first call's time, one-off set-up (oneDNN
kernels, thread pools) included; benchmarks/vae.py times warm calls. With --repeats N each variant runs N times
(interleaved, each in a new process): median wall time, largest working memory. `max|diff|`: max |tiled - untiled|
of the same library's outputs (ours is exact up to float rounding: ~1e-5; diffusers' blended seams: far larger); the
footer also checks that ours and diffusers agree untiled (same weights).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine, peak_rss, print_table, reset_peak_rss, rss, setup, twins

VARIANTS = ("ours", "ours-tiled", "diffusers", "diffusers-tiled", "diffusers-small-tiles")
UNTILED = {"ours-tiled": "ours", "diffusers-tiled": "diffusers", "diffusers-small-tiles": "diffusers"}


# ---- one call, in a child process -------------------------------------------------------------------------------
def build(variant: str, tile: int, diffusers_tile: int) -> torch.nn.Module:
    import diffusers

    from latentdiff.models.vae import AutoencoderKL, VAEConfig

    ref, ours = twins(diffusers.AutoencoderKL, AutoencoderKL, VAEConfig.sd15(), torch.float32, "diffusers VAE")
    if variant.startswith("diffusers"):
        if variant != "diffusers":
            ref.enable_tiling()
        if variant == "diffusers-small-tiles":
            ref.tile_sample_min_size, ref.tile_latent_min_size = diffusers_tile, diffusers_tile // 8
        return ref
    vae = ours()
    vae.enable_tiling(tile)  # the tile size; whether to tile is chosen per call below
    return vae


def call(vae: torch.nn.Module, variant: str, encode: bool, x: torch.Tensor) -> torch.Tensor:
    if variant.startswith("ours"):
        tiled = variant == "ours-tiled"
        if encode:
            posterior = vae.encode(x, tiled=tiled)
            return torch.cat([posterior.mean, posterior.logvar], dim=1)
        return vae.decode(x, tiled=tiled)
    if encode:
        posterior = vae.encode(x).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1)
    return vae.decode(x).sample


@torch.no_grad()
def job(variant: str, encode: bool, size: int, tile: int, diffusers_tile: int, out: Path) -> dict:
    vae = build(variant, tile, diffusers_tile)
    g = torch.Generator().manual_seed(1)
    if encode:
        x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    else:
        x = torch.randn(1, 4, size // 8, size // 8, generator=g)
    reset_peak_rss()
    base = rss()
    reset_slack = peak_rss() - base  # ~0 if the high-water mark was reset (else the peak dates from the build)
    wall, cpu = time.perf_counter(), time.process_time()
    y = call(vae, variant, encode, x)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss()
    torch.save(y, out)
    return {"base": base, "peak": peak, "work": peak - base, "reset_slack": reset_slack, "wall": wall, "cpu": cpu,
            "shape": list(y.shape)}


def measure(variant: str, encode: bool, args, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [sys.executable, __file__, "--job", variant, "--size", str(args.size), "--tile", str(args.tile),
               "--diffusers-tile", str(args.diffusers_tile), "--out", str(out)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if encode:
        command.append("--encode")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {variant} job exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- main -------------------------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def direction(encode: bool, args, folder: Path) -> list[dict]:
    name = "encode" if encode else "decode"
    runs, outputs = {v: [] for v in args.variants}, {}
    for r in range(args.repeats):
        for v in args.variants:
            outputs[v] = folder / f"{name}-{v}.pt"
            result = measure(v, encode, args, outputs[v])
            runs[v].append(result)
            print(f"  {name} round {r + 1}/{args.repeats} {v}: {result['wall']:.2f} s, work {mib(result['work'])}",
                  file=sys.stderr, flush=True)
            if result["reset_slack"] > 16 * 2**20:
                print(f"  warning: the peak was not reset before the call ({mib(result['reset_slack'])} above the "
                      f"base): work is overstated", file=sys.stderr)
    y = {v: torch.load(path) for v, path in outputs.items()}
    work = {v: max(r["work"] for r in rs) for v, rs in runs.items()}
    wall = {v: statistics.median(r["wall"] for r in rs) for v, rs in runs.items()}
    tiles = {"ours": "-", "ours-tiled": f"{args.tile} px", "diffusers": "-", "diffusers-small-tiles":
             f"{args.diffusers_tile} px", "diffusers-tiled": f"{args.sample_size} px" +
             (" (no-op: one tile)" if args.size <= args.sample_size else "")}
    rows = []
    for v in args.variants:
        ref = UNTILED.get(v)
        has_ref = ref in runs
        rows.append({
            "variant": v, "tile": tiles[v], "work": mib(work[v]),
            "work vs untiled": f"{work[v] / work[ref]:.2f}x" if has_ref else "",
            "wall s": f"{wall[v]:.2f}", "runs": " ".join(f"{r['wall']:.2f}" for r in runs[v]),
            "wall vs untiled": f"{wall[v] / wall[ref]:.2f}x" if has_ref else "",
            "max|tiled - untiled|": f"{(y[v] - y[ref]).abs().max().item():.1e}" if has_ref else "",
            "base RSS": mib(statistics.median(r["base"] for r in runs[v])),
            "peak RSS": mib(max(r["peak"] for r in runs[v])),
        })
    shape = "x".join(map(str, runs[args.variants[0]][0]["shape"]))
    source = f"1x3x{args.size}x{args.size} images" if encode else f"1x4x{args.size // 8}x{args.size // 8} latents"
    allocator = (f"glibc MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold
                 else "glibc's default (dynamic) mmap threshold")
    print(f"\n{name}: {source} -> {shape}, SD 1.x VAE, fp32; fresh process per call, no warm-up; "
          f"work = peak RSS (VmHWM) - RSS before the call; {allocator}")
    print_table(rows, list(rows[0]))
    if "ours" in y and "diffusers" in y:
        print(f"(same weights: max|ours - diffusers| untiled {(y['ours'] - y['diffusers']).abs().max().item():.1e}; "
              f"untiled output max|y| {y['ours'].abs().max().item():.1f})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image height and width in pixels (a multiple of 8)")
    parser.add_argument("--encode", action="store_true", help="also measure encoding")
    parser.add_argument("--tile", type=int, default=None, help="ours' tile size (default: DEFAULT_TILE_SIZE)")
    parser.add_argument("--diffusers-tile", type=int, default=None,
                        help="diffusers-small-tiles' tile_sample_min_size in px (default: --tile)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1, help="processes per variant (interleaved)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's)")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run every job with MALLOC_MMAP_THRESHOLD_=BYTES (e.g. 131072): glibc then hands each "
                             "freed block of that size or more back to the OS instead of keeping it for reuse")
    parser.add_argument("--job", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one call, in a child
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from latentdiff.models.vae import DEFAULT_TILE_SIZE, VAEConfig

    args.tile = args.tile or DEFAULT_TILE_SIZE
    args.diffusers_tile = args.diffusers_tile or args.tile
    args.sample_size = VAEConfig.sd15().sample_size
    if args.size <= 0 or args.size % 8:
        parser.error(f"--size {args.size} must be a positive multiple of 8 (the VAE downsamples by 8)")
    if args.diffusers_tile % 8:
        parser.error(f"--diffusers-tile {args.diffusers_tile} must be a multiple of 8 (its latent tile is 1/8 of it)")
    setup(args.threads)
    if args.job:
        print(json.dumps(job(args.job, args.encode, args.size, args.tile, args.diffusers_tile, Path(args.out))))
        return
    args.variants = [v for v in args.variants.split(",") if v]
    if not args.variants or set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(args.variants) - set(VARIANTS))}; choose from {VARIANTS}")
    print(machine())
    with tempfile.TemporaryDirectory(prefix="vae_tiled-") as folder:
        direction(False, args, Path(folder))
        if args.encode:
            direction(True, args, Path(folder))


if __name__ == "__main__":
    main()
