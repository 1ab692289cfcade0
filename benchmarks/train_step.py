"""Time one U-Net training step of ours against diffusers' UNet2DConditionModel in one process: same config, same
seeded random weights, same inputs, the same loss, runs interleaved (A B A B ...). Default: the embedded
tiny-shapes pipeline's U-Net (pipelines/tiny-shapes/unet: 5.5M parameters, 4x16x16 latents, 77x64 context), batch 32.

    python benchmarks/train_step.py [--config FOLDER] [--batch 32] [--steps 5] [--repeats 3] [--threads N]
                                    [--variants diffusers,ours,ours-cl]

A step is what the training loop does per batch: latentdiff.train.loss.diffusion_loss (eps target, min-SNR-5
weighting) on fixed random z0, context, timesteps and noise, backward, clip_grad_norm_(1.0), AdamW as the training
loop makes it (train.loop.make_optimizer: torch's fused AdamW, the config's defaults; before 2026-12-07 torch's
default AdamW), zero_grad. diffusers' model goes through the identical loss behind a small adapter that returns its
`.sample`. Variants: diffusers (the reference, as shipped), ours (as constructed), ours-cl (ours with weights and
latents in channels-last). Before timing, every variant takes one step from the same weights and is compared with
diffusers: the loss, the gradients and the updated weights must agree to float32 rounding (the comparison is printed;
the timings of a variant that disagrees are meaningless). That step is also the warm-up. Each timed call runs
--steps steps; prints per variant steps/s and samples/s (median over --repeats calls, in brackets the best), process
CPU seconds per step, speed relative to diffusers and the process's peak RSS. On a machine shared with other jobs
compare with --threads 1.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from common import gaussian_init_, gib, machine, print_table, setup, time_interleaved

VARIANTS = ("diffusers", "ours", "ours-cl")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "tiny-shapes" / "unet"


class DiffusersAdapter(nn.Module):
    """diffusers' U-Net returns an output object; the loss wants `unet(z_t, t, context) -> prediction`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timesteps, context).sample


def build(folder: Path, variants: list[str]) -> tuple[dict[str, nn.Module], object]:
    """diffusers' U-Net from the folder's config.json with seeded random weights, and ours with copies of the same
    tensors (copies: every variant trains its own weights)."""
    import diffusers

    from latentdiff.checkpoints import load_into, read_json
    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig

    config = UNetConfig.from_dict(read_json(folder / "config.json"))
    kwargs = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    ref = gaussian_init_(diffusers.UNet2DConditionModel(**kwargs))
    weights = {k: v.detach().clone() for k, v in ref.state_dict().items()}

    def ours() -> nn.Module:
        with torch.device("meta"):
            model = UNet2DConditionModel(config)
        return load_into(model, {k: v.clone() for k, v in weights.items()}, "diffusers U-Net")

    models = {"diffusers": DiffusersAdapter(ref)}
    for name in variants:
        if name == "ours":
            models[name] = ours()
        elif name == "ours-cl":
            models[name] = ours().to(memory_format=torch.channels_last)
    return {name: model.train() for name, model in models.items()}, config


def make_inputs(config, batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    from latentdiff.schedules import alphas_cumprod, make_betas

    g = torch.Generator().manual_seed(seed)
    size = config.sample_size
    return {
        "z0": torch.randn(batch, config.in_channels, size, size, generator=g),
        "context": torch.randn(batch, 77, config.cross_attention_dim, generator=g),
        "timesteps": torch.randint(0, 1000, (batch,), generator=g),
        "noise": torch.randn(batch, config.in_channels, size, size, generator=g),
        # Stable Diffusion's schedule (scaled_linear, 0.00085 to 0.012); the schedule does not change the cost
        "alphas_cumprod": alphas_cumprod(make_betas("scaled_linear", 1000, 0.00085, 0.012)),
    }


class Trainer:
    """One model, its AdamW and the fixed batch; `step()` is one optimizer step, `run(n)` n of them."""

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor], channels_last: bool = False):
        self.model = model
        from latentdiff.train.config import TextToImageConfig
        from latentdiff.train.loop import make_optimizer

        self.params = [p for p in model.parameters() if p.requires_grad]
        # the training loop's AdamW (torch's fused one on the CPU) with the training config's defaults: lr 1e-4,
        # betas (0.9, 0.999), weight decay 1e-2, eps 1e-8
        self.optimizer = make_optimizer([{"params": self.params}], TextToImageConfig())[0]
        self.inputs = dict(inputs)
        if channels_last:
            for key in ("z0", "noise"):
                self.inputs[key] = self.inputs[key].contiguous(memory_format=torch.channels_last)

    def step(self, keep_grads: bool = False) -> tuple[float, list[torch.Tensor] | None]:
        from latentdiff.train.loss import diffusion_loss

        x = self.inputs
        with torch.enable_grad():  # time_interleaved runs its candidates under no_grad
            loss = diffusion_loss(self.model, x["z0"], x["context"], x["timesteps"], x["noise"], x["alphas_cumprod"],
                                  "epsilon", snr_gamma=5.0)
            loss.backward()
        grads = [p.grad.detach().clone() for p in self.params] if keep_grads else None
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grads

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


def check_parity(trainers: dict[str, Trainer]) -> dict[str, dict[str, float]]:
    """One step of every variant from the same weights; differences from diffusers' loss, gradients and updated
    weights (parameters matched by name: ours and diffusers' modules share their checkpoint keys)."""
    named = {}
    for name, trainer in trainers.items():
        before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        loss, grads = trainer.step(keep_grads=True)
        prefix = len("unet.") if name == "diffusers" else 0  # the adapter puts diffusers' keys under "unet."
        state = {k[prefix:]: v for k, v in trainer.model.state_dict().items()}
        before = {k[prefix:]: v for k, v in before.items()}
        param_names = [k[prefix:] for k, p in trainer.model.named_parameters() if p.requires_grad]
        named[name] = {"loss": loss, "grads": dict(zip(param_names, grads)), "state": state, "before": before}
    ref = named["diffusers"]
    moved = max((ref["state"][k] - ref["before"][k]).abs().max().item() for k in ref["grads"])
    grad_scale = max(g.abs().max().item() for g in ref["grads"].values())
    results = {}
    for name, got in named.items():
        if set(got["grads"]) != set(ref["grads"]):
            raise RuntimeError(f"{name}: its parameter names differ from diffusers'; cannot compare the step")
        results[name] = {
            "loss": got["loss"],
            "loss diff": abs(got["loss"] - ref["loss"]),
            "grad diff": max((g - ref["grads"][k]).abs().max().item() for k, g in got["grads"].items()),
            "grad scale": grad_scale,
            "weight diff": max((got["state"][k] - ref["state"][k]).abs().max().item() for k in ref["grads"]),
            # AdamW's first step is lr * g / (|g| + eps): where |g| is near eps = 1e-8 it amplifies a float32
            # rounding difference of g by up to lr / eps = 1e4, so compare the weights apart from those entries too
            "weight diff, |g| > 1e-6": max(
                ((got["state"][k] - ref["state"][k]).abs() * (ref["grads"][k].abs() > 1e-6)).max().item()
                for k in ref["grads"]),
            "weight moved": moved,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a U-Net folder holding config.json")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: PyTorch's)")
    parser.add_argument("--variants", default="diffusers,ours,ours-cl",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if not (args.config / "config.json").is_file():
        parser.error(f"--config {args.config}: no config.json there; give a U-Net folder (like "
                     "pipelines/tiny-shapes/unet)")
    if min(args.batch, args.steps, args.repeats) < 1:
        parser.error("--batch, --steps and --repeats must be at least 1")
    setup(args.threads)
    print(machine())

    models, config = build(args.config, [v for v in variants if v != "diffusers"])
    inputs = make_inputs(config, args.batch)
    trainers = {name: Trainer(model, inputs, channels_last=name.endswith("-cl")) for name, model in models.items()}
    n_params = sum(p.numel() for p in trainers["diffusers"].params)
    size = config.sample_size
    print(f"U-Net {args.config}: {n_params / 1e6:.2f}M parameters; batch {args.batch} of "
          f"{config.in_channels}x{size}x{size} latents, context 77x{config.cross_attention_dim}; "
          f"{args.steps} steps per call, {args.repeats} calls per variant", flush=True)

    parity = check_parity(trainers)
    print("parity after one step from the same weights (vs diffusers): max |difference| of the loss, of the "
          "gradients (largest gradient entry in brackets) and of the updated weights (largest weight change in "
          "brackets; AdamW's first step amplifies rounding where |gradient| is near its eps = 1e-8, so also apart "
          "from those)")
    print_table([{"variant": name, "loss": f"{r['loss']:.6f}", "loss diff": f"{r['loss diff']:.1e}",
                  "grad diff": f"{r['grad diff']:.1e} ({r['grad scale']:.1e})",
                  "weight diff": f"{r['weight diff']:.1e} ({r['weight moved']:.1e})",
                  "weight diff, |g| > 1e-6": f"{r['weight diff, |g| > 1e-6']:.1e}"}
                 for name, r in parity.items()],
                ["variant", "loss", "loss diff", "grad diff", "weight diff", "weight diff, |g| > 1e-6"])
    for name, r in parity.items():
        if r["loss diff"] > 1e-5 * abs(parity["diffusers"]["loss"]) or r["grad diff"] > 1e-4 * r["grad scale"]:
            print(f"WARNING: {name} does not compute diffusers' training step (loss or gradients differ beyond "
                  "float32 rounding); its timing below is not comparable", flush=True)

    calls = {name: (lambda t: lambda: t.run(args.steps))(trainer) for name, trainer in trainers.items()}
    timings = time_interleaved(calls, args.repeats, warmup=0)  # the parity step was the warm-up

    ref = timings["diffusers"]
    rows = []
    for name, timing in timings.items():
        rate, best = args.steps / timing.median, args.steps / timing.best
        rows.append({
            "variant": name, "steps/s": f"{rate:.2f} ({best:.2f})",
            "samples/s": f"{rate * args.batch:.0f} ({best * args.batch:.0f})",
            "s/step": f"{timing.median / args.steps:.3f}", "cpu s/step": f"{timing.median_cpu / args.steps:.3f}",
            "runs s/step": " ".join(f"{w / args.steps:.3f}" for w in timing.wall),
            "vs diffusers": f"{ref.median / timing.median:.2f}x ({ref.best / timing.best:.2f}x)",
            "peak RSS": gib(timing.peak_rss), "+ during call": gib(timing.rise),
        })
    print("\ncolumns: median over the calls (in brackets: from the best call); peak RSS of the whole process (every "
          "model alive) during the variant's calls, and how much it rose above the resident memory before them")
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
