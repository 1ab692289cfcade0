"""Time our text-to-image pipeline against diffusers' StableDiffusionPipeline, both loaded from the same folder (by
default the embedded pipelines/tiny-shapes), end to end: same prompt, seed, scheduler (the folder's), steps and
guidance; calls interleaved (A B A B ...). Then show where the time goes, and optionally time the whole command.

    python benchmarks/pipeline.py [--model FOLDER] [--steps 25] [--guidance 5] [--batch 1] [--repeats 5]
                                  [--threads N] [--prompt TEXT] [--variants diffusers,ours,ours-opt,ours-compile]
                                  [--prompt-cache] [--profile ours] [--cli] [--cli-runs 3] [--controlnet FOLDER]
                                  [--compile-cache FOLDER]

Variants: diffusers (the reference, as shipped, progress bars off), ours (as loaded), ours-opt (after
`pipe.optimize_for_inference()`: U-Net, VAE and text encoder channels-last, packed weights, Winograd convs).
ours-compile: `pipe.compile()`, the U-Net under torch.compile (inductor: frozen weights, C++ wrapper, max-autotune);
ours-compile-opt: `pipe.compile()`, then `pipe.optimize_for_inference()` (which then packs the VAE and the text
encoder only). diffusers-compile: diffusers' U-Net under torch.compile with the same options. Their warm-up call
compiles (reported as "first call s"). ours-qkv: ours after `pipe.fuse_qkv_projections()`.
ours-compile-cache: as ours-compile-opt, with `pipe.compile(cache_dir=--compile-cache)`: the U-Net compiled ahead of
time (AOTInductor) into a package kept in that folder (default: a new temporary one), which a later run loads
instead of compiling (compare the runs' "first call s").
Every variant's images are compared with diffusers' first: a variant that differs by more than --tolerance (in
[0, 1] pixel units) is reported and the script exits with status 1.

--controlnet FOLDER: the ControlNet pipelines (diffusers' StableDiffusionControlNetPipeline, ours
LatentDiffusionControlNetPipeline) with that ControlNet and a shapes silhouette as the control image.

Our pipeline caches prompt embeddings (the empty negative prompt above all); the cache is cleared before every call,
so that both pipelines pay for encoding the prompt as a one-image job does (--prompt-cache keeps it).

Tables: (1) seconds per image (median and best), speed relative to diffusers, achieved GFLOP/s (FlopCounterMode's
count of one diffusers call; attention is not counted on the CPU), max |pixel difference| from diffusers, the
process's peak RSS (every pipeline loaded) and its rise during a call. (2) Where the time goes, averaged over the
timed calls: the prompt encoding (tokenizer and caching, then the CLIP text model), the U-Net (total and per call),
the scheduler (set_timesteps, scale_model_input, step), the VAE decode, the post-processing (to PIL) and the rest
(latents, guidance arithmetic, the loop). Sections are timed by wrapping the pipelines' own methods, nothing edited;
a section's time excludes the sections nested in it. (3) With --cli: `latentdiff generate` as a fresh process
(imports, loading, one image, the PNG) against the same job written with diffusers, each --cli-runs times
interleaved, with OMP_NUM_THREADS=--threads: median and best wall seconds and the peak RSS of each process; then
the same job split into phases (import torch, import the library, load, generate, save), one process each.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from common import count_flops, gib, machine, print_table, setup, time_interleaved

VARIANTS = ("diffusers", "ours", "ours-opt", "ours-compile", "ours-compile-opt", "ours-compile-cache",
            "diffusers-compile", "ours-qkv")
PROMPT = "a small red circle in the center on a white background"


# ---- loading ----------------------------------------------------------------------------------------------------
def load(variant: str, folder: Path, controlnet: Path | None = None, compile_cache: Path | None = None):
    """The variant's pipeline of `folder`; with `controlnet` (a ControlNet folder), its ControlNet pipeline."""
    if variant in ("ours-compile", "ours-compile-opt", "ours-compile-cache"):
        pipe = load("ours", folder, controlnet)
        if variant == "ours-compile-cache":
            compile_cache = compile_cache or tempfile.mkdtemp(prefix="latentdiff-compiled-")
        pipe.compile(cache_dir=compile_cache if variant == "ours-compile-cache" else None)
        if variant != "ours-compile":
            pipe.optimize_for_inference()  # (after compile(): the VAE, the text encoder and the ControlNets)
        return pipe
    if variant == "diffusers-compile":  # compiled with ours' inductor settings (generate() applies them)
        pipe = load("diffusers", folder, controlnet)
        pipe.unet = torch.compile(pipe.unet)
        return pipe
    if variant == "diffusers":
        import diffusers

        if controlnet is None:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                     requires_safety_checker=False)
        else:
            pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
                folder, controlnet=diffusers.ControlNetModel.from_pretrained(controlnet), safety_checker=None,
                requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    from latentdiff import ControlNetModel, LatentDiffusionControlNetPipeline, LatentDiffusionPipeline

    if controlnet is None:
        pipe = LatentDiffusionPipeline.from_pretrained(folder)
    else:
        pipe = LatentDiffusionControlNetPipeline.from_pretrained(
            folder, controlnet=ControlNetModel.from_pretrained(controlnet))
    if variant == "ours-qkv":
        pipe.fuse_qkv_projections()
    if variant == "ours-opt":
        pipe.optimize_for_inference()
    return pipe


def generate(variant: str, pipe, args, output_type: str = "pil", keep_cache: bool = False):
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.batch)]
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.batch,
                  generator=generators, output_type=output_type)
    if args.controlnet:
        kwargs["image"] = args.control_image
    if variant == "diffusers-compile":
        from latentdiff.pipeline import inductor_settings

        with inductor_settings(pipe.device):  # as pipe.compile() has it
            return pipe(args.prompt, **kwargs).images
    if variant == "diffusers":
        return pipe(args.prompt, **kwargs).images
    if not keep_cache:
        pipe._embedding_cache.clear()  # pay for the prompt encoding, as diffusers does on every call
    return pipe(args.prompt, progress=False, **kwargs).images


# ---- where the time goes ----------------------------------------------------------------------------------------
class Sections:
    """Wall time of named sections of each pipeline call, made by wrapping methods of the pipeline and its parts.
    Nested sections are subtracted from the enclosing one, so that the sections and `other` add up to the call."""

    def __init__(self):
        self.calls: list[dict[str, list]] = []  # per pipeline call: section -> [seconds, count]
        self._stack: list[list[float]] = []  # time spent in nested sections, per open section

    def new_call(self) -> None:
        self.calls.append(defaultdict(lambda: [0.0, 0]))

    def wrap(self, obj, attr: str, section: str) -> None:
        method = getattr(obj, attr)

        @functools.wraps(method)  # keeps the signature: both pipelines inspect scheduler.step's parameters
        def timed(*args, **kwargs):
            self._stack.append([0.0])
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = self._stack.pop()[0]
                if self._stack:
                    self._stack[-1][0] += elapsed
                if self.calls:
                    entry = self.calls[-1][section]
                    entry[0] += elapsed - nested
                    entry[1] += 1

        setattr(obj, attr, timed)  # an instance attribute: nn.Module.__call__ looks `forward` up on the instance

    def mean(self, skip: int = 0) -> dict[str, tuple[float, float]]:
        """section -> (mean seconds per pipeline call, mean count per pipeline call), over the calls after `skip`."""
        calls = self.calls[skip:] or self.calls
        names = {name for call in calls for name in call}
        return {name: (sum(c[name][0] for c in calls if name in c) / len(calls),
                        sum(c[name][1] for c in calls if name in c) / len(calls)) for name in names}


def compiled_model(call):
    from latentdiff.pipeline import CompiledCall

    return call.compiled if isinstance(call, CompiledCall) else call


def instrument(variant: str, pipe) -> Sections:
    sections = Sections()
    # diffusers' encode_prompt; ours embeds through embed_prompts (its own encode_prompt is diffusers' API over it)
    sections.wrap(pipe, "encode_prompt" if variant.startswith("diffusers") else "embed_prompts",
                  "prompt: tokenizer, batching")
    sections.wrap(pipe.text_encoder, "forward", "prompt: CLIP text model")
    # the compiled U-Net ours runs (made by the warm-up call): wrapping the plain module's forward would recompile
    # (its CompiledCall's compiled module: the wrapper is made anew for each loop)
    # (with --compile-cache, the CachedCompiledModel itself)
    unet = compiled_model(pipe._unet_call()) if variant.startswith("ours-compile") else pipe.unet
    sections.wrap(unet, "forward", "U-Net")
    for method in ("set_timesteps", "scale_model_input", "step"):
        sections.wrap(pipe.scheduler, method, "scheduler")
    if hasattr(pipe, "controlnet"):  # (compiled: the compiled ControlNet, as for the U-Net)
        compiled = variant.startswith("ours-compile")
        net = compiled_model(pipe._net_calls(pipe._nets)[0]) if compiled else pipe.controlnet
        sections.wrap(net, "forward", "ControlNet")
    sections.wrap(pipe.vae, "decode", "VAE decode")
    if variant.startswith("diffusers"):
        sections.wrap(pipe.image_processor, "postprocess", "post-processing (to PIL)")
    else:
        sections.wrap(pipe, "decode", "post-processing (to PIL)")  # latentdiff's decode: vae.decode + to_images
    return sections


ORDER = ["prompt: tokenizer, batching", "prompt: CLIP text model", "ControlNet", "U-Net", "scheduler", "VAE decode",
         "post-processing (to PIL)"]


def breakdown_table(sections: dict[str, Sections], timings, unet_flops: float, batch: int) -> list[dict]:
    columns = {}
    for variant, s in sections.items():
        means = s.mean()
        total = statistics.mean(timings[variant].wall)
        other = total - sum(seconds for seconds, _ in means.values())
        columns[variant] = {**{name: means.get(name, (0.0, 0)) for name in ORDER}, "other": (other, 0),
                            "total": (total, 0)}
    rows = []
    for name in [*ORDER, "other", "total"]:
        row = {"section (ms per image)": name if name != "other" else "other (latents, guidance, loop)"}
        for variant, col in columns.items():
            seconds, count = col[name]
            share = seconds / col["total"][0]
            calls = f", {count:.0f} calls" if count and name not in ("total",) else ""
            row[variant] = f"{1e3 * seconds / batch:8.1f} ({share:4.0%}{calls})"
        rows.append(row)
    per_call = {"section (ms per image)": "U-Net per call (ms, GFLOP/s)"}
    for variant, col in columns.items():
        seconds, count = col["U-Net"]
        if count:
            per_call[variant] = f"{1e3 * seconds / count:8.2f} ({unet_flops * count / seconds / 1e9:.0f} GFLOP/s)"
    rows.append(per_call)
    return rows


def profile(variant: str, fn, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\nprofile of one {variant} call (torch.profiler, self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50))


def unet_call_flops(pipe, batch: int, guided: bool) -> float:
    """FLOPs of one U-Net call as the pipeline makes it (the guided call covers both halves of the batch)."""
    cfg = pipe.unet.config
    side = cfg.sample_size
    n = batch * (2 if guided else 1)
    x = torch.zeros(n, cfg.in_channels, side, side)
    ctx = torch.zeros(n, pipe.tokenizer.model_max_length, cfg.cross_attention_dim)
    return count_flops(lambda: pipe.unet(x, torch.full((n,), 500), encoder_hidden_states=ctx))


# ---- the whole command ------------------------------------------------------------------------------------------
DIFFUSERS_JOB = """
import sys, torch
from diffusers import StableDiffusionPipeline
folder, prompt, out, steps, guidance = sys.argv[1:6]
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
image = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance),
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(out)
"""

# the same job in phases, for either library: where a fresh process spends its time
PHASES_JOB = """
import json, sys, time
marks = [("start", time.perf_counter())]
import torch
marks.append(("import torch", time.perf_counter()))
library, folder, prompt, out, steps, guidance = sys.argv[1:7]
if library == "ours":
    from latentdiff import LatentDiffusionPipeline
    marks.append(("import the library", time.perf_counter()))
    pipe, kwargs = LatentDiffusionPipeline.from_pretrained(folder), {"progress": False}
else:
    from diffusers import StableDiffusionPipeline
    marks.append(("import the library", time.perf_counter()))
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {}
marks.append(("load the pipeline", time.perf_counter()))
image = pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance),
             generator=torch.Generator().manual_seed(0), **kwargs).images[0]
marks.append(("generate one image", time.perf_counter()))
image.save(out)
marks.append(("save the PNG", time.perf_counter()))
print(json.dumps({name: t - prev for (name, t), (_, prev) in zip(marks[1:], marks)}))
"""


def run_process(command: list[str], env: dict, stdout=subprocess.DEVNULL) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process (its own, from wait4's resource usage)."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(command[:3])} ... exited with {proc.returncode}:\n{tail}")
    return wall, usage.ru_maxrss * 1024


def time_commands(args) -> None:
    from PIL import Image

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    console = Path(sys.executable).with_name("latentdiff")
    ours = [str(console)] if console.exists() else [sys.executable, "-m", "latentdiff.cli"]
    ours += ["generate", args.prompt, "--steps", str(args.steps), "--guidance", str(args.guidance)]
    if args.model_given:
        ours += ["--model", str(args.model)]
    results = {"latentdiff generate": [], "diffusers script": []}
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        for r in range(args.cli_runs):
            for name in results:
                if name == "diffusers script":
                    command = [sys.executable, "-c", DIFFUSERS_JOB, str(args.model), args.prompt,
                               f"{tmp}/diffusers-{r}.png", str(args.steps), str(args.guidance)]
                else:
                    command = [*ours, "--out", f"{tmp}/ours-{r}"]  # a fresh folder: existing images are skipped
                wall, peak = run_process(command, env)
                results[name].append((wall, peak))
                print(f"  run {r + 1}/{args.cli_runs} {name}: {wall:.2f} s, peak RSS {gib(peak)}", file=sys.stderr,
                      flush=True)
        ours_png = next(Path(tmp, "ours-0").glob("*.png"))
        pixels = [np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
                  for png in (ours_png, Path(tmp, "diffusers-0.png"))]
        phases = {}
        for library in ("ours", "diffusers"):
            with tempfile.TemporaryFile() as stdout:
                run_process([sys.executable, "-c", PHASES_JOB, library, str(args.model), args.prompt,
                             f"{tmp}/phases-{library}.png", str(args.steps), str(args.guidance)], env, stdout)
                stdout.seek(0)
                phases[library] = json.loads(stdout.read().decode().strip().splitlines()[-1])
    ref = statistics.median(w for w, _ in results["diffusers script"])
    rows = [{"command": name, "median s": f"{statistics.median(w for w, _ in runs):.2f}",
             "best s": f"{min(w for w, _ in runs):.2f}", "runs": " ".join(f"{w:.2f}" for w, _ in runs),
             "vs diffusers": f"{ref / statistics.median(w for w, _ in runs):.2f}x",
             "peak RSS": gib(max(p for _, p in runs))} for name, runs in results.items()]
    diff = np.abs(pixels[0] - pixels[1]).max()
    print(f"\nthe whole command, one image ({args.steps} steps, guidance {args.guidance}), a fresh process each run "
          f"(imports, loading, generation, PNG), OMP_NUM_THREADS={args.threads or 'unset'}; "
          f"max |difference| of the two PNGs: {diff} / 255")
    print(f"  ours: {shlex.join(ours)} --out DIR")
    print("  diffusers: python -c <imports; from_pretrained; set_progress_bar_config(disable=True); one call; save>")
    print_table(rows, list(rows[0]))
    print("\nthe same job in phases (one run each; `latentdiff generate` also hashes the weights for the PNG's "
          "settings)")
    rows = [{"phase (s)": name, **{library: f"{p[name]:.2f}" for library, p in phases.items()}}
            for name in phases["ours"]]
    rows.append({"phase (s)": "total", **{library: f"{sum(p.values()):.2f}" for library, p in phases.items()}})
    print_table(rows, list(rows[0]))


# ---- main -------------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded tiny-shapes)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=1, help="images per call (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's)")
    parser.add_argument("--variants", default="diffusers,ours,ours-opt,ours-compile",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |pixel difference| from diffusers")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="ours-compile-cache's folder (default: a new temporary one)")
    parser.add_argument("--prompt-cache", action="store_true", help="keep our prompt-embedding cache between calls")
    parser.add_argument("--profile", default="", help="comma-separated variants to profile (one call each)")
    parser.add_argument("--cli", action="store_true", help="also time the whole `latentdiff generate` command")
    parser.add_argument("--cli-runs", type=int, default=3)
    parser.add_argument("--controlnet", default=None,
                        help="a ControlNet folder: time the ControlNet pipelines (e.g. "
                             "pipelines/tiny-shapes-controlnet; the control image is a shapes silhouette)")
    args = parser.parse_args()

    from latentdiff.layout import EMBEDDED

    args.model_given = args.model is not None
    args.model = Path(args.model) if args.model else EMBEDDED
    if not (args.model / "model_index.json").exists():
        parser.error(f"{args.model} is not a pipeline folder (no model_index.json)")
    variants = ["diffusers", *(v for v in args.variants.split(",") if v and v != "diffusers")]
    unknown = set(variants + [v for v in args.profile.split(",") if v]) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.batch < 1 or args.repeats < 1 or args.steps < 1:
        parser.error("--batch, --repeats and --steps must be at least 1")
    setup(args.threads)
    print(machine())

    if args.controlnet:
        if args.cli:
            parser.error("--cli times text to image only: leave out --controlnet")
        from latentdiff.train.data import ShapesSource

        side = json.loads((args.model / "unet" / "config.json").read_text())["sample_size"] * 8
        args.control_image = ShapesSource(side, {"num_samples": 1, "seed": 1234}).load_conditioning(0)
    pipes = {v: load(v, args.model, args.controlnet, args.compile_cache) for v in variants}
    guided = args.guidance > 1.0
    with torch.no_grad():  # one call each: the parity check, and the warm-up
        reference = generate("diffusers", pipes["diffusers"], args, "np")
        errors, first_call = {}, {}
        for v, pipe in pipes.items():
            start = time.perf_counter()
            errors[v] = float(np.abs(generate(v, pipe, args, "np") - reference).max())
            first_call[v] = time.perf_counter() - start
        flops = count_flops(lambda: generate("diffusers", pipes["diffusers"], args))
        unet_flops = unet_call_flops(pipes["diffusers"], args.batch, guided)
    for v in (v for v in args.profile.split(",") if v):
        profile(v, lambda: generate(v, pipes[v], args, keep_cache=args.prompt_cache))

    sections = {v: instrument(v, pipe) for v, pipe in pipes.items()}

    def call(v):
        def run():
            sections[v].new_call()
            generate(v, pipes[v], args, keep_cache=args.prompt_cache)
        return run

    timings = time_interleaved({v: call(v) for v in variants}, args.repeats, warmup=0)

    ref = timings["diffusers"]
    rows = []
    for v, t in timings.items():
        rows.append({
            "variant": v, "s/image": f"{t.median / args.batch:.3f}", "best s/image": f"{t.best / args.batch:.3f}",
            "cpu s/image": f"{t.median_cpu / args.batch:.3f}", "runs (s/call)": " ".join(f"{w:.2f}" for w in t.wall),
            "vs diffusers": f"{ref.median / t.median:.2f}x ({ref.best / t.best:.2f}x)",
            "paired": f"{t.paired_ratio(ref):.2f}x",
            "GFLOP/s": f"{flops / t.median / 1e9:.1f}", "max|pixel diff|": f"{errors[v]:.1e}",
            "peak RSS": gib(t.peak_rss), "+ during call": gib(t.rise),
            "first call s": f"{first_call[v]:.1f}",
        })
    side = pipes["diffusers"].unet.config.sample_size * pipes["diffusers"].vae_scale_factor
    print(f"\n{args.model.name}: {args.batch} x {side}x{side} px per call, {args.steps} steps of "
          f"{type(pipes['diffusers'].scheduler).__name__}, guidance {args.guidance}; {flops / 1e9:.1f} GFLOP per "
          f"call (FlopCounterMode, attention not counted); prompt cache {'kept' if args.prompt_cache else 'cleared'}; "
          "first call: the untimed warm-up call, which for -compile variants includes compiling")
    print("columns: median over the runs (in brackets: from the best run); paired: the median over the rounds of "
          "diffusers' call time / this variant's in the same round; peak RSS: the whole process (every pipeline "
          "loaded), and how much it rose during one call")
    print_table(rows, list(rows[0]))

    print(f"\nwhere the time goes: mean ms per image over the {args.repeats} timed calls (share of the call, "
          "number of calls per pipeline call)")
    table = breakdown_table(sections, timings, unet_flops, args.batch)
    print_table(table, list(table[0]))

    if args.cli:
        time_commands(args)
    bad = {v: e for v, e in errors.items() if e > args.tolerance}
    if bad:
        print(f"\nPARITY FAILED: {bad} differ from diffusers by more than --tolerance {args.tolerance}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
