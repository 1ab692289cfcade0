"""Time our LatentDiffusionPipeline against diffusers' StableDiffusionPipeline end to end on a GPU, in one run:
the SD 1.5 architecture with random weights (U-Net 859M, VAE, CLIP ViT-L/14 text encoder), 512x512, 50 steps of
DPM-Solver++(2M), guidance 7.5, fp16, decoded to images.

    python benchmarks/gpu.py [--batches 1,4] [--variants diffusers,ours,diffusers-compile,ours-compile]
                             [--repeats 2] [--steps 50] [--size 512] [--time-limit SECONDS] [--device cuda]
                             [--tiny] [--no-vae-upcast] [--profile STEPS] [--warmup SECONDS] [--interleave]

Both pipelines hold the very same weight tensors (ours are drawn once; diffusers' modules are built on the meta
device and given them; its text model is transformers' CLIPTextModel over our text model's tensors), tokenizers
read from the same folder and DPM-Solver++ schedulers built from one explicit config. Variants: diffusers and
ours (eager, SDPA attention), and the same with the U-Net alone wrapped in torch.compile (default mode,
fullgraph=False, dynamic=False so that each batch size gets its own static graph rather than a dynamic one),
compile time reported as the first call minus a timed one;
`-cl` variants run the U-Net and the VAE with channels_last weights and activations (`ours-clvae` the VAE alone),
`-graph` ones replay our U-Net from CUDA graphs (pipe.enable_cuda_graphs(); its first call captures; NCHW unless
`-cl`), and `ours-plain` runs ours with torch's GroupNorm and separate SiLU / bias-add passes instead of the fused
Triton kernels (models/group_norm.py), `ours-jit` launches those kernels through Triton's own launch path
(triton_launch.DIRECT = False: per-call argument binding) rather than through their compiled forms, `-sync` makes
the host wait for the GPU before each scheduler step (what ours did until 2026-12-04: it read each timestep's value
from the GPU), `-qkv` calls the pipeline's fuse_qkv_projections() (both libraries have it), `-flash` keeps SDPA off
its cuDNN backend (flash attention first: PyTorch 2.11 picks cuDNN's on an H200, whose calls took 90 us of host time
each in a profile of 2026-12-04), `-fused` turns on models/fused.py's kernels (residual add + LayerNorm, GEGLU);
`ours-fused-qkv-flash` takes those three host-time savings at once; `-offload` keeps the models in CPU memory and
moves each stage to the GPU while it runs (pipe.enable_model_cpu_offload(), both libraries; peak GPU memory against
the time of moving the weights at every call); `ours-pipecompile` is
pipe.compile(max_autotune=False) (frozen weights; its first call compiles); these are not in the default set. A
variant that fails prints its error and the run goes on. --warmup runs diffusers' batch-1 call for that many seconds
first, so that the GPU's clocks have settled before any timing.
Per batch and variant: seconds per image (a call's time / batch; median over --repeats calls; with --interleave the
calls are taken in rounds, one per variant each, so that a noisy host's slow spells hit every variant), peak GPU
memory of the timed calls (torch.cuda.max_memory_allocated) and how far it rose above the memory in use before them,
speed relative to diffusers eager (also best call against best call: a noisy host only ever adds time; and with
--interleave the median of each round's ratio, its two calls having run under the same load) and to diffusers
compiled of the same batch, and the max |difference| of the warm-up call's images from diffusers eager's
(same latents). Rows are printed as they are measured; --time-limit stops starting new ones (with --interleave: new
batches) once that many seconds have passed. --memory-phases then splits each eager variant's peak GPU memory
into denoising and decoding. --profile STEPS then profiles one call of STEPS steps per variant at the largest batch (or
at --profile-batches; torch.profiler): wall and GPU-busy time, kernel launches, and the operators that took the most
GPU time.

As shipped, ours decodes fp16 latents with the VAE in fp32 (the VAE config's force_upcast: the SD VAE overflows in
fp16), while diffusers' StableDiffusionPipeline decodes in fp16; --no-vae-upcast makes ours decode in fp16 too.
Ours also caches prompt embeddings, so repeated calls skip the text encoder; diffusers encodes on every call.
On the CPU (--device cpu: fp32; default variants the eager two) --tiny runs tiny random configs (tests/tiny.py's
sizes, 64x64, 2 steps), a smoke test of the script: `python benchmarks/gpu.py --device cpu --tiny`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch

from common import gib, machine, print_table, setup

VARIANTS = ("diffusers", "ours", "diffusers-compile", "ours-compile", "diffusers-cl", "ours-cl", "ours-graph",
            "ours-plain", "ours-cl-graph", "ours-cl-compile", "diffusers-cl-compile", "ours-pipecompile", "ours-jit",
            "ours-sync", "ours-compile-sync", "ours-qkv", "diffusers-qkv", "ours-flash", "diffusers-flash",
            "ours-clvae", "ours-fused", "ours-cl-fused", "ours-fused-qkv-flash", "ours-offload", "diffusers-offload")
GUIDANCE = 7.5
# DPM-Solver++(2M) over SD 1.5's noise schedule, given to both libraries' classes as the same explicit keywords
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
    lower_order_final=True, final_sigmas_type="zero", use_karras_sigmas=False, timestep_spacing="leading",
    steps_offset=1,
)
# the tiny U-Net of tests/tiny.py (its cross-attention width matches latentdiff's text_config_tiny)
TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=8, down_block_types=("CrossAttnDownBlock2D",
    "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=(2, 4), norm_num_groups=8,
)  # fmt: skip


@torch.no_grad()
def random_weights_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """common.gaussian_init_'s distribution (W ~ N(0, 1/fan_in), biases N(0, 0.02^2), norm scales N(1, 0.02^2)),
    drawn with a generator on the parameters' device: a GPU fills 1B parameters in milliseconds, where
    gaussian_init_'s CPU generator takes seconds and the GPU machine's time is scarce."""
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
        else:
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def build_pipelines(tiny: bool, device: torch.device, dtype: torch.dtype, vae_upcast: bool, seed: int = 0):
    """(ours, diffusers') pipelines over one set of random weights."""
    from latentdiff import LatentDiffusionPipeline
    from latentdiff.layout import SD15_CONFIG
    from latentdiff.models.text import CLIPTokenizer, build_text_encoder, text_config_sd15, text_config_tiny
    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig
    from latentdiff.models.vae import AutoencoderKL, VAEConfig
    from latentdiff.pipeline import to_diffusers
    from latentdiff.schedulers import DPMSolverMultistepScheduler

    unet_config = UNetConfig(**TINY_UNET) if tiny else UNetConfig.sd15()
    vae_config = (VAEConfig.tiny() if tiny else VAEConfig.sd15()).replace(force_upcast=vae_upcast)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(unet_config), AutoencoderKL(vae_config)
    unet = random_weights_(unet.to_empty(device=device).to(dtype), seed)
    vae = random_weights_(vae.to_empty(device=device).to(dtype), seed + 1)
    with torch.device(device):  # its own random init (transformers' distributions), drawn where the model lives
        text_encoder = build_text_encoder(text_config_tiny() if tiny else text_config_sd15(), seed=seed + 2)
    text_encoder = text_encoder.to(dtype).requires_grad_(False)
    # the committed SD 1.5 tokenizer folder (written by our tokenizer); to_diffusers gives transformers' tokenizer
    # the same files
    ours = LatentDiffusionPipeline(CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer"), text_encoder, unet, vae,
                                   DPMSolverMultistepScheduler(**SCHEDULER))
    return {"ours": ours, "diffusers": to_diffusers(ours)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(pipe, lib: str, prompt: str, latents: torch.Tensor, args, output_type: str = "pt") -> torch.Tensor:
    """One full pipeline call for len(latents) images; images [B, 3, H, W] in [0, 1] on the device (or the final
    latents, output_type "latent")."""
    extra = {"progress": False} if lib == "ours" else {}
    out = pipe([prompt] * latents.shape[0], height=args.size, width=args.size, num_inference_steps=args.steps,
               guidance_scale=GUIDANCE, latents=latents, output_type=output_type, **extra)
    return out.images


@torch.no_grad()
def memory_phases(pipes, variants: list[str], batches: list[int], args, device, dtype) -> None:
    """--memory-phases: the peak GPU memory of each eager variant (not compiled, not from CUDA graphs) during a 2-step
    call that stops at the latents and during one that decodes them too, and how far each rose above the memory in
    use before: which phase sets the peak."""
    two = argparse.Namespace(**{**vars(args), "steps": 2})
    rows = []
    for batch in batches:
        latents = make_latents(pipes, batch, args, device, dtype)
        for variant in [v for v in variants if "compile" not in v and "graph" not in v]:
            lib = variant.split("-")[0]
            row = {"batch": batch, "variant": variant}
            with variant_unet(pipes[lib], variant):
                for phase, output_type in (("denoising", "latent"), ("with decode", "pt")):
                    run = lambda: generate(pipes[lib], lib, args.prompt, latents, two, output_type)  # noqa: E731, B023
                    run()  # (warm: cuDNN's workspaces, our caches)
                    _, peak, rise = timed_calls(run, device, 1)
                    row[f"{phase}: peak"], row[f"{phase}: rise"] = gib(peak), gib(rise)
            rows.append(row)
            print("  " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print_table(rows, list(rows[0]))


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def make_latents(pipes, batch: int, args, device, dtype) -> torch.Tensor:
    """x_T for `batch` images, drawn on the CPU from a fixed seed, identical for both pipelines."""
    ours = pipes["ours"]
    side = args.size // ours.vae_scale_factor
    g = torch.Generator().manual_seed(1000 + batch)
    return torch.randn(batch, ours.unet.config.in_channels, side, side, generator=g).to(device, dtype)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@contextlib.contextmanager
def variant_unet(pipe, variant: str):
    """The pipeline's U-Net as `variant` runs it: in channels_last (`-cl`, the VAE too; `-clvae`: the VAE alone),
    compiled (`-compile`, `-pipecompile`), replayed from CUDA graphs (`-graph`), without the fused GroupNorm kernels
    (`-plain`) or with them launched by Triton's own launch path (`-jit`), with a sync before each scheduler step
    (`-sync`), with the self-attention projections fused (`-qkv`), with SDPA kept off its cuDNN backend (`-flash`:
    flash attention, else memory-efficient, else math), with the transformer blocks' fused add + LayerNorm and
    GEGLU kernels (`-fused`, models/fused.py: opt-in), with model CPU offload (`-offload`); restored after."""
    from latentdiff.models import fused, group_norm, triton_launch

    options = set(variant.split("-")[1:])
    eager_unet = pipe.unet
    try:
        if "cl" in options:
            eager_unet.to(memory_format=torch.channels_last)
        if "cl" in options or "clvae" in options:
            pipe.vae.to(memory_format=torch.channels_last)
        if "compile" in options:
            pipe.unet = torch.compile(eager_unet, fullgraph=False, dynamic=False)
        if "graph" in options:  # the U-Net in channels-last only in -cl-graph (enable_cuda_graphs' default)
            pipe.enable_cuda_graphs(channels_last="cl" in options)
        if "pipecompile" in options:
            pipe.compile(max_autotune=False)
        group_norm.ENABLED = "plain" not in options
        triton_launch.DIRECT = "jit" not in options
        fused.ENABLED = "fused" in options
        if "qkv" in options:
            pipe.fuse_qkv_projections()
        if "offload" in options:
            device = pipe.device
            pipe.to("cpu")
            pipe.enable_model_cpu_offload(device=device)
        if "sync" in options:
            step = pipe.scheduler.step

            @functools.wraps(step)
            def synced_step(*args, **kwargs):
                torch.cuda.synchronize()
                return step(*args, **kwargs)

            pipe.scheduler.step = synced_step
        with contextlib.ExitStack() as stack:
            if "flash" in options:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                 SDPBackend.MATH]))
            yield
    finally:
        if "offload" in options:
            pipe.remove_all_hooks()
            pipe.to(device)
        if "qkv" in options:
            pipe.unfuse_qkv_projections()
        if "sync" in options:
            del pipe.scheduler.step
        group_norm.ENABLED = triton_launch.DIRECT = True
        fused.ENABLED = False
        if "pipecompile" in options:
            pipe.disable_compile()
        if "graph" in options:
            pipe.disable_cuda_graphs()
        pipe.unet = eager_unet
        if "cl" in options:
            eager_unet.to(memory_format=torch.contiguous_format)
        if "cl" in options or "clvae" in options:
            pipe.vae.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def profile(pipes, variant: str, latents: torch.Tensor, args, device, top: int = 12) -> None:
    """One call of --profile steps under torch.profiler: where the GPU time goes, and how busy the GPU is."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    lib = variant.split("-")[0]
    steps = argparse.Namespace(**{**vars(args), "steps": args.profile})
    with variant_unet(pipes[lib], variant):
        run = lambda: generate(pipes[lib], lib, args.prompt, latents, steps)  # noqa: E731
        timed(run, device)  # warm-up at this step count
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            wall, _ = timed(run, device)
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time_total for e in kernels) / 1e6 if kernels else 0.0
    print(f"\nprofile {variant}, batch {len(latents)}, {args.profile} steps: wall {wall:.3f} s, GPU kernels "
          f"{busy:.3f} s ({busy / wall:.0%} of the wall), {len(kernels)} kernel launches", flush=True)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=top, max_name_column_width=60), flush=True)


def timed_calls(run, device: torch.device, n: int) -> tuple[list[float], int, int]:
    """Seconds of each of n calls, the peak GPU memory during them, and how far it rose above the memory in use
    before them (0 and 0 off a GPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    calls = [timed(run, device)[0] for _ in range(n)]
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    return calls, peak, peak - before


@torch.no_grad()
def measure(pipes, variant: str, batch: int, latents: torch.Tensor, warm: dict, args, device) -> dict:
    """Warm up (unless `warm` holds this variant's first call already), then time args.repeats calls."""
    lib, compiled = variant.split("-")[0], "compile" in variant
    pipe = pipes[lib]
    run = lambda: generate(pipe, lib, args.prompt, latents, args)  # noqa: E731
    with variant_unet(pipe, variant):
        first, images = warm.get((variant, batch)) or timed(run, device)
        calls, peak, rise = timed_calls(run, device, args.repeats)
    call = statistics.median(calls)
    return {
        "batch": batch, "variant": variant, "s/image": call / batch, "calls": calls, "peak": peak,
        "rise": rise, "compile": first - call if compiled else None, "images": images,
    }


@torch.no_grad()
def measure_interleaved(pipes, variants: list[str], batch: int, latents: torch.Tensor, warm: dict, args,
                        device) -> list[dict]:
    """--interleave: a warm-up call per variant, then args.repeats rounds that time one call of every variant in
    turn (A B C A B C ...), so that a noisy host's slow spells spread over all variants instead of landing on the
    one that ran then. Each call enters its variant anew (a CUDA-graph or compiled variant makes one untimed call
    first, to capture or compile again). A variant that fails is reported and left out."""
    results = {v: {"batch": batch, "variant": v, "calls": [], "peak": 0, "rise": 0, "compile": None,
                   "interleaved": True} for v in variants}
    for round_ in range(args.repeats + 1):  # round 0: the warm-up calls, whose images are compared
        for variant in [v for v in variants if v in results]:
            lib = variant.split("-")[0]
            run = lambda: generate(pipes[lib], lib, args.prompt, latents, args)  # noqa: E731, B023
            result = results[variant]
            try:
                with variant_unet(pipes[lib], variant):
                    if round_ == 0:
                        result["images"] = (warm.get((variant, batch)) or timed(run, device))[1]
                        continue
                    if "graph" in variant or "compile" in variant:
                        timed(run, device)
                    (seconds,), peak, rise = timed_calls(run, device, 1)
                    result["calls"].append(seconds)
                    result["peak"], result["rise"] = max(result["peak"], peak), max(result["rise"], rise)
            except Exception as error:  # noqa: BLE001 (one broken variant should not cost the others' figures)
                print(f"  batch {batch}, {variant}: FAILED: {type(error).__name__}: {error}", flush=True)
                del results[variant]
    for result in results.values():
        result["s/image"] = statistics.median(result["calls"]) / batch
    return list(results.values())


def paired_ratio(m: dict, rows: list[dict]) -> str:
    """The median over rounds of diffusers' call time / this variant's in the same round (--interleave: the two
    calls of a round ran seconds apart, under the same load), "-" where the calls were not taken in rounds."""
    ref = next((r for r in rows if r["batch"] == m["batch"] and r["variant"] == "diffusers"), None)
    if ref is None or len(ref["calls"]) != len(m["calls"]) or not m.get("interleaved"):
        return "-"
    return f"{statistics.median(a / b for a, b in zip(ref['calls'], m['calls'])):.2f}x"


def format_row(m: dict, rows: list[dict], device: torch.device) -> dict:
    def ratio(name: str, of=lambda r: r["s/image"]) -> str:
        ref = next((r for r in rows if r["batch"] == m["batch"] and r["variant"] == name), None)
        return f"{of(ref) / of(m):.2f}x" if ref else "-"

    cuda = device.type == "cuda"
    return {
        "batch": m["batch"], "variant": m["variant"], "s/image": f"{m['s/image']:.3f}",
        "calls s": " ".join(f"{c:.2f}" for c in m["calls"]),
        "vs diffusers": ratio("diffusers"),
        "best vs best": ratio("diffusers", lambda r: min(r["calls"])),  # (a noisy host only ever adds time)
        "paired vs diffusers": paired_ratio(m, rows),
        "vs diffusers-compile": ratio("diffusers-compile") if "compile" in m["variant"] else "-",
        "peak GPU mem": gib(m["peak"]) if cuda else "-", "+ during call": gib(m["rise"]) if cuda else "-",
        "compile s": f"{m['compile']:.1f}" if m["compile"] is not None else "-",
        "max|diff|": f"{m['diff']:.1e}" if m["diff"] is not None else "-",
    }


def describe(device: torch.device) -> str:
    import diffusers
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"device: {name}; {machine()}; diffusers {diffusers.__version__}, transformers {transformers.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes (images per call)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all on a GPU, the eager two on "
                             "the CPU, where compiling takes minutes)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per batch and variant")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; --tiny: 2)")
    parser.add_argument("--size", type=int, default=None, help="image height and width (default 512; --tiny: 64)")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse on the moon")
    parser.add_argument("--device", default="cuda", help="cuda (fp16) or cpu (fp32, for a smoke test)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (tests/tiny.py's sizes)")
    parser.add_argument("--no-vae-upcast", action="store_true", help="ours decodes fp16 latents in fp16, as diffusers")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds since the start after which no new measurement starts (0: none)")
    parser.add_argument("--warmup", type=float, default=None, metavar="SECONDS",
                        help="run diffusers' batch-1 call this long before timing (default 10 on a GPU, 0 on the CPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile one call of STEPS steps per variant at the largest batch (0: none)")
    parser.add_argument("--profile-compiled", action="store_true", help="--profile the -compile variants too")
    parser.add_argument("--interleave", action="store_true",
                        help="time the variants in rounds, one call each per round (fairer on a noisy host)")
    parser.add_argument("--memory-phases", action="store_true",
                        help="then each eager variant's peak GPU memory with and without the VAE decode")
    parser.add_argument("--profile-batches", default=None,
                        help="comma-separated batch sizes to profile at (default: the largest of --batches)")
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    default = VARIANTS[:4] if device.type == "cuda" else VARIANTS[:2]
    variants = [v for v in args.variants.split(",") if v] if args.variants else list(default)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        parser.error(f"--batches {args.batches!r}: give comma-separated positive integers, e.g. 1,4")
    if not batches or min(batches) < 1 or args.repeats < 1:
        parser.error("--batches needs positive integers and --repeats at least 1")
    args.steps = args.steps or (2 if args.tiny else 50)
    args.size = args.size or (64 if args.tiny else 512)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but PyTorch sees no GPU; use --device cpu (with --tiny) for a smoke test")
    dtype = torch.float32 if device.type == "cpu" else torch.float16

    setup(None)
    print(describe(device), flush=True)
    pipes = build_pipelines(args.tiny, device, dtype, vae_upcast=not args.no_vae_upcast)
    print(f"{'tiny' if args.tiny else 'SD 1.5'} architecture, random weights, {str(dtype).removeprefix('torch.')}, "
          f"{args.size}x{args.size}, {args.steps} steps DPM-Solver++(2M), guidance {GUIDANCE}; U-Net "
          f"{sum(p.numel() for p in pipes['ours'].unet.parameters()) / 1e6:.0f}M parameters; built in "
          f"{time.perf_counter() - start:.1f} s", flush=True)

    first_latents = make_latents(pipes, 1, args, device, dtype)
    warmup = args.warmup if args.warmup is not None else (10.0 if device.type == "cuda" else 0.0)
    until = time.perf_counter() + warmup
    while time.perf_counter() < until:  # the GPU's clocks rise under load: the first variant timed would lose
        timed(lambda: generate(pipes["diffusers"], "diffusers", args.prompt, first_latents, args), device)
    # parity first: batch 1, same latents, eager; these calls are also the eager variants' warm-ups at batch 1
    warm = {(lib, 1): timed(lambda: generate(pipes[lib], lib, args.prompt, first_latents, args), device)
            for lib in ("diffusers", "ours")}
    print(f"parity (batch 1, eager, same latents): max |ours - diffusers| = "
          f"{max_diff(warm[('ours', 1)][1], warm[('diffusers', 1)][1]):.2e} over images in [0, 1]", flush=True)

    rows: list[dict] = []
    stopped = None
    for batch in batches:
        latents = first_latents if batch == 1 else make_latents(pipes, batch, args, device, dtype)
        measured = None
        if args.interleave:
            if args.time_limit and time.perf_counter() - start > args.time_limit:
                stopped = f"time limit of {args.time_limit:.0f} s reached before batch {batch}"
                break
            measured = {m["variant"]: m for m in measure_interleaved(pipes, variants, batch, latents, warm, args,
                                                                     device)}
        for variant in variants:
            if measured is not None:
                m = measured.get(variant)
                if m is None:  # (it failed)
                    continue
            else:
                if args.time_limit and time.perf_counter() - start > args.time_limit:
                    stopped = f"time limit of {args.time_limit:.0f} s reached before batch {batch} {variant}"
                    break
                try:
                    m = measure(pipes, variant, batch, latents, warm, args, device)
                except Exception as error:  # noqa: BLE001 (one broken variant should not cost the others')
                    print(f"  batch {batch}, {variant}: FAILED: {type(error).__name__}: {error}", flush=True)
                    continue
            images = m.pop("images")
            if variant == "diffusers":
                warm.setdefault(("diffusers", batch), (None, images))
            reference = warm.get(("diffusers", batch))
            m["diff"] = max_diff(images, reference[1]) if reference else None
            rows.append(m)
            line = format_row(m, rows, device)
            print("  " + ", ".join(f"{k} {v}" for k, v in line.items()), flush=True)
        warm = {key: value for key, value in warm.items() if key[1] != batch}  # free this batch's images
        if stopped:
            break
    if stopped:
        print(f"stopped: {stopped}", flush=True)
    if rows:
        print(f"\nseconds per image = call time / batch (median of {args.repeats}); speed-ups compare seconds per "
              "image with the diffusers variant of the same batch; max|diff|: the warm-up call's images against "
              "diffusers eager's, same latents")
        table = [format_row(m, rows, device) for m in rows]
        print_table(table, list(table[0]))
    if args.memory_phases and not stopped:
        memory_phases(pipes, variants, batches, args, device, dtype)
    if args.profile and not stopped:
        for batch in [int(b) for b in args.profile_batches.split(",")] if args.profile_batches else [max(batches)]:
            latents = make_latents(pipes, batch, args, device, dtype)
            for variant in variants:
                if "compile" not in variant or args.profile_compiled:
                    profile(pipes, variant, latents, args, device)
    print(f"total {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
