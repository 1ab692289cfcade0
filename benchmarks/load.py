"""Time loading a Stable Diffusion 1.x single-file checkpoint (the original key layout, one .safetensors file): ours
(`LatentDiffusionPipeline.from_single_file`, i.e. latentdiff.layout.load_single_file) against diffusers'
`StableDiffusionPipeline.from_single_file`, each load in a fresh process, so that peak RSS is the job's own.

    python benchmarks/load.py [--tiny] [--dtype fp16|fp32] [--torch-dtypes fp32,none] [--repeats 3] [--threads N]
                              [--config FOLDER] [--rebuild]

The checkpoint: the architecture of --config (default pipelines/sd-v1-5: the SD 1.5 U-Net, VAE and CLIP ViT-L text
encoder, 1.07 G parameters) with random weights, written once under out/bench/ in --dtype (fp16: 2.1 GB) and reused.
--tiny uses the embedded pipelines/tiny-shapes architecture instead (19 MB; about 10 s per round of loads, most of
it process start-up).

Both libraries read the architecture from the same folder (diffusers: config=FOLDER, local_files_only=True,
HF_HUB_OFFLINE=1), so nothing is fetched. --torch-dtypes: `fp32` etc. ask both for that dtype (the like-for-like
comparison); `none` loads as each library does by default (diffusers 0.42 gives float32, we keep the file's dtype).
The file is read once before the first job, so every job finds it in the page cache (warm-cache loading; a cold
cache needs root to drop).

Printed per library and torch dtype: the median seconds of the load call itself and the runs, the import seconds
before it (after torch; diffusers' pipeline imports transformers' CLIPTextModel there, ours has its own since
2026-12-03) and their sum; `touch s`: reading every weight once after the load (weights still memory-mapped from
the file, as when the dtype is kept, are only paged in then, so load times alone flatter them); the bytes of the loaded weights;
resident memory after the imports (base), the process's peak (VmHWM, after the touch) and the rise between them, also
as a multiple of the file's size; resident memory right after the load, split into anonymous memory (copies) and
file-backed pages (the mapped checkpoint). Holding the weights once means a rise near max(file, weights), not
file + weights (e.g. fp16 file -> fp32 weights: 2 + 4 GiB at SD 1.5 size, if the whole file stays mapped while the
fp32 copies are made).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import gaussian_init_, gib, machine, print_table, setup, weight_bytes

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "out" / "bench"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LIBRARIES = ("diffusers", "ours")


# ---- the checkpoint ---------------------------------------------------------------------------------------------
def checkpoint_path(config: Path, dtype: str) -> Path:
    return CACHE / f"{config.name}-random-{dtype}.safetensors"


@torch.no_grad()
def build_checkpoint(config: Path, dtype: torch.dtype, path: Path) -> None:
    """Random weights for the U-Net, VAE and text encoder of `config`, written in the SD 1.x original layout (our
    conversion table, convert.py). Built on the meta device and materialised in `dtype`, so an fp16 SD 1.5 build
    never holds fp32 weights."""
    from latentdiff.checkpoints import read_json
    from latentdiff.layout import save_single_file
    from latentdiff.models.text import CLIPTextModel, read_text_config
    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig
    from latentdiff.models.vae import AutoencoderKL, VAEConfig

    with torch.device("meta"):
        components = {
            "unet": UNet2DConditionModel(UNetConfig.from_dict(read_json(config / "unet" / "config.json"))),
            "vae": AutoencoderKL(VAEConfig.from_dict(read_json(config / "vae" / "config.json"))),
            "text_encoder": CLIPTextModel(read_text_config(config / "text_encoder")),
        }
    for seed, (name, model) in enumerate(components.items()):
        components[name] = gaussian_init_(model.to(dtype).to_empty(device="cpu"), seed=seed)
    save_single_file(components, path)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# ---- one load, in a child process -------------------------------------------------------------------------------
def memory() -> dict[str, int]:
    """This process's VmHWM (peak), VmRSS, RssAnon and RssFile from /proc/self/status, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def job(library: str, path: Path, config: Path, torch_dtype: str) -> dict:
    """Import, then load `path` with `library`; what the parent prints. Runs in a fresh process."""
    dtype = DTYPES.get(torch_dtype)
    start = time.perf_counter()
    if library == "ours":
        from latentdiff import LatentDiffusionPipeline

        imported = time.perf_counter()
        base = memory()
        pipe = LatentDiffusionPipeline.from_single_file(path, config=config, torch_dtype=dtype)
    else:
        from diffusers import StableDiffusionPipeline

        imported = time.perf_counter()
        base = memory()
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False,
                                                        **kwargs)
    loaded = time.perf_counter()
    after = memory()
    models = (pipe.unet, pipe.vae, pipe.text_encoder)
    with torch.no_grad():  # read every weight once: memory-mapped ones are only paged in when first used
        for p in (p for m in models for p in m.parameters()):
            p.sum()
    touched = time.perf_counter()
    return {
        "import_s": imported - start, "load_s": loaded - imported, "touch_s": touched - loaded,
        "base_rss": base["VmRSS"], "peak_rss": memory()["VmHWM"], "anon": after["RssAnon"], "file": after["RssFile"],
        "weights": sum(weight_bytes(m) for m in models),
        "dtype": "/".join(sorted({str(p.dtype).removeprefix("torch.") for m in models for p in m.parameters()})),
        # the same numbers in both libraries show that both read the same tensors
        "checksum": sum(float(m.weight.double().sum()) for m in (pipe.unet.conv_in, pipe.vae.decoder.conv_out)),
    }


def measure(library: str, path: Path, config: Path, torch_dtype: str, threads: int | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, __file__, "--job", library, "--file", str(path), "--config", str(config),
               "--torch-dtypes", torch_dtype]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the {library} load exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- main -------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny-shapes architecture (seconds, for testing)")
    parser.add_argument("--config", default=None, help="architecture folder (default: pipelines/sd-v1-5)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "fp32", "bf16"], help="of the checkpoint file")
    parser.add_argument("--torch-dtypes", default="fp32,none",
                        help="comma-separated dtypes to load into: none (each library's default), fp32, fp16, bf16")
    parser.add_argument("--repeats", type=int, default=3, help="loads per library and dtype (interleaved)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the loading processes")
    parser.add_argument("--rebuild", action="store_true", help="write the checkpoint again even if it exists")
    parser.add_argument("--job", choices=LIBRARIES, help=argparse.SUPPRESS)  # internal: one load, in a child
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from latentdiff.layout import EMBEDDED, SD15_CONFIG

    config = Path(args.config) if args.config else EMBEDDED if args.tiny else SD15_CONFIG
    torch_dtypes = [d for d in args.torch_dtypes.split(",") if d]
    unknown = set(torch_dtypes) - {"none", *DTYPES}
    if unknown:
        parser.error(f"unknown --torch-dtypes {sorted(unknown)}; choose from none, {', '.join(DTYPES)}")
    if args.job:
        print(json.dumps(job(args.job, Path(args.file), config, torch_dtypes[0])))
        return
    setup(args.threads)
    print(machine())

    path = checkpoint_path(config, args.dtype)
    if args.rebuild or not path.exists():
        start = time.perf_counter()
        build_checkpoint(config, DTYPES[args.dtype], path)
        print(f"built {path} in {time.perf_counter() - start:.1f} s")
    size = path.stat().st_size
    warm_page_cache(path)
    print(f"checkpoint: {path} ({gib(size)}, {args.dtype}, architecture {config}), in the page cache")

    rows = []
    for torch_dtype in torch_dtypes:
        runs = {library: [] for library in LIBRARIES}
        for r in range(args.repeats):
            for library in LIBRARIES:
                result = measure(library, path, config, torch_dtype, args.threads)
                runs[library].append(result)
                print(f"  {torch_dtype} round {r + 1}/{args.repeats} {library}: load {result['load_s']:.2f} s, "
                      f"peak RSS {gib(result['peak_rss'])}", file=sys.stderr, flush=True)
        checksums = {library: results[0]["checksum"] for library, results in runs.items()}
        if abs(checksums["ours"] - checksums["diffusers"]) > 1e-6 * max(1.0, abs(checksums["diffusers"])):
            print(f"warning: the libraries loaded different weights (checksums {checksums})", file=sys.stderr)
        ref = statistics.median(r["load_s"] for r in runs["diffusers"])
        for library, results in runs.items():
            load = statistics.median(r["load_s"] for r in results)
            peak = max(r["peak_rss"] for r in results)
            base = statistics.median(r["base_rss"] for r in results)
            last = results[-1]
            rows.append({
                "torch_dtype": torch_dtype, "library": library, "loaded as": last["dtype"],
                "load s": f"{load:.2f}", "runs": " ".join(f"{r['load_s']:.2f}" for r in results),
                "vs diffusers": f"{ref / load:.2f}x",
                "import s": f"{statistics.median(r['import_s'] for r in results):.2f}",
                "import+load s": f"{statistics.median(r['import_s'] + r['load_s'] for r in results):.2f}",
                "touch s": f"{statistics.median(r['touch_s'] for r in results):.2f}",
                "weights": gib(last["weights"]), "base RSS": gib(base), "peak RSS": gib(peak),
                "peak - base": gib(peak - base), "(peak-base)/file": f"{(peak - base) / size:.2f}",
                "after load: anon + file": f"{gib(last['anon'])} + {gib(last['file'])}",
            })
    print(f"\nloading {path.name} ({gib(size)}) in a fresh process per load, {args.repeats} loads per row, "
          f"interleaved; base RSS: after the imports, before the load")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
