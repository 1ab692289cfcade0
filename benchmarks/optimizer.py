"""Time the optimizer step of our training loop (latentdiff.train.loop.make_optimizer: torch's fused AdamW where the
parameters allow) against the AdamW that diffusers' training scripts build (`torch.optim.AdamW(params, lr, betas,
weight_decay, eps)`: on the CPU torch then updates one parameter tensor at a time, on a GPU it runs its foreach
kernels), in one process, over the same parameters and gradients of a U-Net: the training config's defaults (lr
1e-4, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8).

    python benchmarks/optimizer.py [--model tiny|sd15] [--steps 5] [--repeats 5] [--threads N] [--device cpu]

--model tiny: pipelines/tiny-shapes' U-Net (5.5M parameters); sd15: SD 1.5's (860M; on the CPU about 14 GiB: the
parameters, their gradients and one optimizer's two moments, as each variant's optimizer is made anew every round
and freed after it). Each round makes each variant's optimizer, takes one untimed step (it allocates the moments),
then times --steps steps; prints the median milliseconds per step over --repeats rounds, the ratio to the scripts'
AdamW (above 1: ours is faster), and the largest difference between the two updates after three steps from the
same weights and gradients (float rounding: the fused kernel orders its arithmetic differently).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common import machine, print_table, setup

TINY = Path(__file__).resolve().parents[1] / "pipelines" / "tiny-shapes" / "unet"
CONFIG = SimpleNamespace(learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2,
                         adam_epsilon=1e-8, lr_warmup_steps=0, max_train_steps=100, lr_scheduler="constant",
                         lr_num_cycles=1, lr_power=1.0)


def scripts_adamw(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer diffusers' train_text_to_image.py makes (without --use_8bit_adam)."""
    return torch.optim.AdamW(params, lr=CONFIG.learning_rate, betas=(CONFIG.adam_beta1, CONFIG.adam_beta2),
                             weight_decay=CONFIG.adam_weight_decay, eps=CONFIG.adam_epsilon)


def ours_adamw(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from latentdiff.train.loop import make_optimizer

    return make_optimizer([{"params": params}], CONFIG)[0]


VARIANTS = {"diffusers scripts' AdamW": scripts_adamw, "ours (make_optimizer)": ours_adamw}


def unet_parameters(model: str, device: str) -> list[torch.Tensor]:
    """The U-Net's parameters (random values) with random gradients, as leaf tensors on `device`."""
    from latentdiff.checkpoints import read_json
    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig

    config = UNetConfig.sd15() if model == "sd15" else UNetConfig.from_dict(read_json(TINY / "config.json"))
    with torch.device("meta"):
        shapes = [p.shape for p in UNet2DConditionModel(config).parameters()]
    params = []
    for shape in shapes:
        p = torch.randn(shape, device=device).mul_(0.02).requires_grad_()
        p.grad = torch.randn(shape, device=device)
        params.append(p)
    return params


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def update_difference(params: list[torch.Tensor]) -> float:
    """Largest |difference| between the variants' weights after three steps from the same weights and gradients
    (over the first 64 tensors: enough to see the rounding, cheap at SD 1.5's size)."""
    results = []
    for make in VARIANTS.values():
        copies = [p.detach().clone().requires_grad_() for p in params[:64]]
        optimizer = make(copies)
        for step in range(3):
            for c, p in zip(copies, params):
                c.grad = p.grad * (step + 1)
            optimizer.step()
        results.append(copies)
    return max((a - b).abs().max().item() for a, b in zip(*results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and variant")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each variant once per round)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if min(args.steps, args.repeats) < 1:
        parser.error("--steps and --repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is usable here")
    setup(args.threads)
    print(machine())
    params = unet_parameters(args.model, args.device)
    print(f"U-Net {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors, "
          f"on {args.device}; {args.steps} steps per round, {args.repeats} rounds", flush=True)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, make in VARIANTS.items():
            optimizer = make(params)
            optimizer.step()  # (allocates the moments)
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            sync(args.device)
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
            del optimizer
    reference = statistics.median(times["diffusers scripts' AdamW"])
    print_table([{"variant": name, "ms per step": f"{statistics.median(t):.1f}", "best": f"{min(t):.1f}",
                  "vs scripts' AdamW": f"{reference / statistics.median(t):.2f}x"} for name, t in times.items()],
                ["variant", "ms per step", "best", "vs scripts' AdamW"])
    print(f"largest difference of the updated weights after 3 steps: {update_difference(params):.1e}")


if __name__ == "__main__":
    main()
