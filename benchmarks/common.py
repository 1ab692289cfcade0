"""Shared by the benchmark scripts: interleaved timing (A B A B ... so that load from other processes hits every
candidate alike), FLOP counting, peak-RSS measurement, random weights, and the printed table."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# run from a checkout without installing: make `latentdiff` importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from latentdiff.models.allocator import malloc_trim  # noqa: E402


def parse_model_benchmark_args(parser, variants: tuple[str, ...], dtypes: dict):
    """The argument handling unet.py and vae.py share: --quick (32x32 latents, 2 repeats), --variants (and --profile,
    where the script has it) split and checked against `variants`, diffusers run first as the reference, --dtypes
    checked against `dtypes`; then the thread count fixed and the machine printed. Returns the parsed arguments, with
    `dtypes` as a list of names."""
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = 32, 2
    args.variants = [v for v in args.variants.split(",") if v]
    args.profile = [v for v in getattr(args, "profile", "").split(",") if v]
    unknown = set(args.variants + args.profile) - set(variants)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(variants)}")
    if "diffusers" not in args.variants:
        args.variants.insert(0, "diffusers")
    args.dtypes = args.dtypes.split(",")
    if set(args.dtypes) - set(dtypes):
        parser.error(f"unknown dtype(s) {sorted(set(args.dtypes) - set(dtypes))}; choose from {', '.join(dtypes)}")
    setup(args.threads)
    print(machine())
    return args


def parse_shapes_benchmark_args(doc: str, argv: list[str] | None, add_arguments: Callable) -> argparse.Namespace:
    """The arguments of a benchmark on the embedded shapes pipeline: --model (pipelines/tiny-shapes by default),
    --threads, and those `add_arguments(parser)` adds; the threads set (setup)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "pipelines" / "tiny-shapes"))
    parser.add_argument("--threads", type=int, default=None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup(args.threads)
    return args


def setup(threads: int | None) -> None:
    """Fix the thread count (default: PyTorch's, i.e. all cores) and keep the hub offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)


def start_kernel_benchmark(doc: str, repeats: int, unavailable: Callable[[], str | None],
                           more_options: Callable[[argparse.ArgumentParser], None] | None = None
                           ) -> argparse.Namespace | None:
    """The start of a benchmark of one of our kernels: --threads and --repeats (and what `more_options` adds to the
    parser) parsed, the threads set, the machine printed; None, after printing why, where `unavailable()` says why
    the kernel cannot run here."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=repeats)
    if more_options is not None:
        more_options(parser)
    args = parser.parse_args()
    setup(args.threads)
    print(machine())
    why = unavailable()
    if why:
        print(f"skipped: {why}")
        return None
    return args


def amx_unavailable() -> str | None:
    """Why our AMX kernels cannot run here (for start_kernel_benchmark), or None."""
    from latentdiff.models import amx

    return None if amx.available() else amx.unavailable() or "the kernels did not build (see the warning)"


_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object], attention_only: bool = False) -> int:
    """FLOPs of one call as torch.utils.flop_counter.FlopCounterMode counts them: 2 per multiply-add of convolutions
    and matrix products; elementwise work is free. Count on plain PyTorch ops (packed oneDNN ops are not counted).
    FlopCounterMode has no formula for PyTorch's CPU flash-attention kernel, so on the CPU attention is left out;
    `attention_only=True` counts just that kernel (q k^T and p v: 4 B H N_q N_k D)."""
    mapping = {_CPU_ATTENTION: _attention_flops} if attention_only else {}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    if attention_only:
        return counter.get_flop_counts()["Global"].get(_CPU_ATTENTION, 0)
    return counter.get_total_flops()


def reference_flops(reference_cls, config, call: Callable[[torch.nn.Module], object], drop: tuple[str, ...] = ()
                    ) -> tuple[int, int]:
    """FLOPs of `call(model)` for the reference model built from our config's keys less `drop` (as twins builds it),
    all of them and attention's alone (see count_flops), counted on fake tensors: shapes only, no arithmetic, so a
    few seconds even where the real call takes minutes (diffusers in bfloat16 on a CPU without oneDNN bfloat16
    kernels). FLOPs do not depend on the dtype: counted in float32. `call` makes its inputs (fake too)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kwargs = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in drop}
    with FakeTensorMode():
        model = reference_cls(**kwargs).eval().requires_grad_(False)
        return count_flops(lambda: call(model)), count_flops(lambda: call(model), attention_only=True)


SLOW_HALF_NOTE = ("\n{name}: this CPU has no oneDNN kernels for {name}, so diffusers and ours (eager) run in "
                  "channels-last, where PyTorch's fallback convolutions are least slow (NCHW: ~20x slower still), "
                  "and the roofline is that of those fallbacks; ours-opt computes the {name} layers by packed "
                  "float32 copies (packed.Float32Compute)")


def half_is_slow(dtype: torch.dtype) -> bool:
    """Whether `dtype` is bfloat16 or float16 and oneDNN has no kernels for it on this CPU (AVX2-only CPUs): there
    PyTorch's own convolutions and matrix products in it are slow fallbacks, NCHW 3x3 convolutions slowest of all
    (~0.6 GFLOP/s for bfloat16, ~14 in channels-last, against 110-130 in float32 on a 2-core AVX2 host)."""
    from latentdiff.models.packed import half_supported

    return dtype in (torch.bfloat16, torch.float16) and not half_supported(dtype)


def slow_half_in_channels_last(models: dict, dtype: torch.dtype) -> None:
    """Where `dtype` is slow here (half_is_slow), the eager models ("diffusers", "ours", where present) to
    channels-last, the layout where PyTorch's fallback convolutions are least slow."""
    if half_is_slow(dtype):
        for name in ("diffusers", "ours"):
            if name in models:
                models[name].to(memory_format=torch.channels_last)


def reset_peak_rss() -> None:
    """Hand freed heap memory back to the OS (glibc), then reset the kernel's resident-set high-water mark of this
    process (Linux; elsewhere the peak is since start), so that the next peak counts only memory in use."""
    gc.collect()
    if (trim := malloc_trim()) is not None:
        trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (since the last reset_peak_rss, on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclasses.dataclass
class Timing:
    wall: list[float] = dataclasses.field(default_factory=list)  # seconds per call
    cpu: list[float] = dataclasses.field(default_factory=list)  # process CPU seconds per call (all threads)
    peak_rss: int = 0  # bytes: highest resident memory seen during this candidate's calls
    rise: int = 0  # bytes: the most the resident memory rose during one call (activations and workspace)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def best(self) -> float:
        """Interference from other processes only ever adds time: on a shared machine the fastest run is the
        steadiest estimate of what the code costs, the median what a user sees."""
        return min(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)

    def paired_ratio(self, ref: Timing) -> float:
        """The median over rounds of ref's call time / this one's in the same round (time_interleaved: the two calls
        of a round ran back to back, under much the same load, so a slow minute of a shared machine slows both)."""
        return statistics.median(a / b for a, b in zip(ref.wall, self.wall))


def median_times(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each call, the calls interleaved over `repeats` rounds (after one untimed call each): the
    kernel benchmarks' light timer (time_interleaved also tracks memory and prints progress)."""
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


@torch.no_grad()
def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     progress: bool = True, memory: bool = True,
                     each_round: Callable[[], object] | None = None) -> dict[str, Timing]:
    """Call every candidate `warmup` times, then `repeats` rounds of one call each, in turn (A B C A B C ...).
    `memory`: measure each call's peak RSS too (reset_peak_rss before it hands freed memory back to the OS, so the
    call's buffers page-fault afresh: a cost that dominates calls of a few milliseconds). `each_round`: called
    (untimed) before each round's calls: a measurement to pair with them, such as the roofline."""
    timings = {name: Timing() for name in candidates}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
    for r in range(repeats):
        if each_round is not None:
            each_round()
        for name, fn in candidates.items():
            if memory:
                reset_peak_rss()
            before = rss()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            t = timings[name]
            t.wall.append(wall)
            t.cpu.append(cpu)
            t.peak_rss = max(t.peak_rss, peak_rss())
            t.rise = max(t.rise, t.peak_rss - before)
            if progress:
                print(f"  round {r + 1}/{repeats} {name}: {wall:.3f} s (cpu {cpu:.3f} s)", file=sys.stderr, flush=True)
    return timings


@torch.no_grad()
def gaussian_init_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights that keep activations at unit scale (so no layer is trivially zero): W ~ N(0, 1/fan_in),
    biases ~ N(0, 0.02^2), norm scales ~ N(1, 0.02^2). Fast enough for a 860M-parameter model."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
        else:
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02, generator=g)
    return model


def time_with_roofline(calls: dict[str, Callable[[], object]], repeats: int, warmup: int,
                       roofline: Callable[[], float]) -> tuple[dict[str, Timing], float, list[float]]:
    """time_interleaved with `roofline()` (GFLOP/s) measured before the runs and before each round: the timings, the
    best roofline seen (the shares' denominator: the fastest minute's) and each round's (for timing_rows' paired
    share)."""
    first, roofs = roofline(), []
    timings = time_interleaved(calls, repeats, warmup, each_round=lambda: roofs.append(roofline()))
    return timings, max(first, *roofs), roofs


def timing_rows(dtype_name: str, timings: dict, flops: int, roof: float, weights: dict, errors: dict,
                roofs: list[float] = ()) -> list[dict]:
    """One table row per variant of a model benchmark (unet.py, vae.py): median and best seconds, CPU seconds,
    GFLOP/s and share of the roofline `roof`, and where `roofs` has the roofline measured in each round
    (time_interleaved's each_round), the median over rounds of the share against its own round's roofline (a busy
    minute slows the conv and the forwards alike); speed against the "diffusers" variant (also paired:
    Timing.paired_ratio), weights, memory and max |diff|."""
    ref = timings["diffusers"]
    rows = []
    for v, timing in timings.items():
        gflops, best = flops / timing.median / 1e9, flops / timing.best / 1e9
        shares = [flops / wall / 1e9 / r for wall, r in zip(timing.wall, roofs)]
        paired_share = {"paired of roofline": f"{statistics.median(shares):.0%}"} if shares else {}
        rows.append({
            "dtype": dtype_name, "variant": v, "median s": f"{timing.median:.3f}", "best s": f"{timing.best:.3f}",
            "cpu s": f"{timing.median_cpu:.2f}", "runs": " ".join(f"{w:.2f}" for w in timing.wall),
            "GFLOP/s": f"{gflops:.0f} ({best:.0f})", "of roofline": f"{gflops / roof:.0%} ({best / roof:.0%})",
            **paired_share,
            "vs diffusers": f"{ref.median / timing.median:.2f}x ({ref.best / timing.best:.2f}x)",
            "paired": f"{timing.paired_ratio(ref):.2f}x",
            "weights": gib(weights[v]), "peak RSS": gib(timing.peak_rss), "+ during forward": gib(timing.rise),
            "max|diff|": f"{errors[v]:.1e}",
        })
    return rows


def twins(reference_cls, ours_cls, config, dtype: torch.dtype, what: str, drop: tuple[str, ...] = ()):
    """The reference model (a diffusers class, built from our config's keys less `drop`) with gaussian_init_ weights
    in `dtype`, and a function that makes one of ours holding the very same tensors (no copy)."""
    from latentdiff.checkpoints import load_into

    kwargs = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in drop}
    with torch.device("meta"):
        ref = reference_cls(**kwargs).to(dtype)
    ref = gaussian_init_(ref.to_empty(device="cpu")).eval().requires_grad_(False)

    def ours() -> torch.nn.Module:
        with torch.device("meta"):
            model = ours_cls(config)
        return load_into(model, ref.state_dict(), what).eval().requires_grad_(False)

    return ref, ours


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters, buffers and packed weights (oneDNN tensors held as plain attributes)."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = [*module._parameters.values(), *module._buffers.values(), getattr(module, "weight", None)]
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"load average {load:.1f}")
