"""Time each scheduler's sampling loop, ours against diffusers' class of the same name, in one process: the same
config (Stable Diffusion's schedule), a fixed model output, `set_timesteps` then scale_model_input and step for
every timestep, as a pipeline drives them; calls interleaved (A B A B ...). What is timed is host time: on small
latents the loop is a few hundred operations on tiny and 0-dim tensors, so this is what a scheduler adds to each
step of a small model (tiny-shapes: 25 steps beside a ~0.3 s image on a 2-core CPU) or of a GPU pipeline bound by
the host. The loop is run on the same scheduler object call after call, as a pipeline reuses its scheduler.

    python benchmarks/schedulers.py [--steps 25] [--repeats 15] [--shape 1,4,16,16] [--threads N]
                                    [--schedulers DDIMScheduler,EulerDiscreteScheduler,...]

Prints per scheduler the median milliseconds of one whole loop for each library and their ratio (diffusers / ours:
above 1, ours is faster), and the largest difference of the final samples (the same fixed output in both, so the
trajectories must agree to float32 rounding; the DPM-SDE and ancestral samplers draw noise from a seeded generator
the same way in both).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import statistics
import warnings

import torch

from common import machine, print_table, setup, time_interleaved

SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
              "HeunDiscreteScheduler", "DEISMultistepScheduler", "DPMSolverSinglestepScheduler", "LCMScheduler")
CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def loop(scheduler, x: torch.Tensor, output: torch.Tensor, steps: int) -> torch.Tensor:
    """A pipeline's use of the scheduler for one image: set_timesteps, then scale_model_input and step for every
    timestep, the model replaced by a fixed output."""
    scheduler.set_timesteps(steps)
    kwargs = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(
        scheduler.step).parameters else {}
    sample = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        scheduler.scale_model_input(sample, t)
        sample = scheduler.step(output, t, sample, **kwargs).prev_sample
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=15, help="timed loops per library and scheduler")
    parser.add_argument("--shape", default="1,4,16,16", help="the latents' shape (tiny-shapes' by default)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS))
    args = parser.parse_args()
    names = [n for n in args.schedulers.split(",") if n]
    unknown = set(names) - set(SCHEDULERS)
    if unknown:
        parser.error(f"unknown schedulers {sorted(unknown)}; choose from {', '.join(SCHEDULERS)}")
    setup(args.threads)
    print(machine())
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # (diffusers' deprecation notes; torchsde's, under its DPM-SDE)
    import diffusers

    from latentdiff import schedulers

    g = torch.Generator().manual_seed(0)
    shape = tuple(int(n) for n in args.shape.split(","))
    x, output = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    rows = []
    for name in names:
        pair = {"diffusers": getattr(diffusers, name)(**CONFIG), "ours": getattr(schedulers, name)(**CONFIG)}
        finals = {who: loop(s, x, output, args.steps) for who, s in pair.items()}
        timings = time_interleaved({who: (lambda s: lambda: loop(s, x, output, args.steps))(s)
                                    for who, s in pair.items()}, args.repeats, progress=False, memory=False)
        ref, ours = (1e3 * statistics.median(timings[who].wall) for who in ("diffusers", "ours"))
        rows.append({"scheduler": name, "diffusers ms": f"{ref:.2f}", "ours ms": f"{ours:.2f}",
                     "diffusers / ours": f"{ref / ours:.2f}x",
                     "max |difference|": f"{(finals['ours'] - finals['diffusers']).abs().max().item():.1e}"})
        print(f"  {name}: diffusers {ref:.2f} ms, ours {ours:.2f} ms", flush=True)
    print(f"\none loop of {args.steps} steps on {'x'.join(map(str, shape))} latents, median of {args.repeats} "
          "interleaved loops")
    print_table(rows, ["scheduler", "diffusers ms", "ours ms", "diffusers / ours", "max |difference|"])


if __name__ == "__main__":
    main()
