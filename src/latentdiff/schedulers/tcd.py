"""Trajectory consistency distillation (Zheng et al. 2024): like an LCM, the distilled model estimates x0 in few
steps, but each step first moves deterministically (as DDIM) to an intermediate timestep s = floor((1 - gamma)
t_next) and only then noises afresh to t_next; gamma (diffusers' `eta`) sets how much of the way is stochastic:
0 is deterministic, 1 noises from the x0 estimate itself (an LCM step without its boundary scalings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..guidance import Denoiser
from ..schedules import predict_x0_eps, randn
from .base import SchedulerOutput
from .config import TCDConfig
from .lcm import LCMScheduler


def tcd_step(x0: torch.Tensor, eps: torch.Tensor, abar_s, abar_next=None, noise: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(next sample, the sample at s): x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, then, unless this is the last
    step or gamma is 0 (noise None), sqrt(abar_next / abar_s) x_s + sqrt(1 - abar_next / abar_s) noise."""
    x_s = abar_s**0.5 * x0 + (1 - abar_s) ** 0.5 * eps
    if noise is None:
        return x_s, x_s
    ratio = abar_next / abar_s
    return ratio**0.5 * x_s + (1 - ratio) ** 0.5 * noise, x_s


def intermediate_timestep(t_next: int, gamma: float) -> int:
    """s = floor((1 - gamma) t_next), in float32 as diffusers computes it."""
    return int(math.floor(float(torch.tensor(1 - gamma, dtype=torch.float32) * t_next)))


def sample_tcd(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
               gamma: float = 0.3, generator=None) -> torch.Tensor:
    """Strategic stochastic sampling (Zheng et al. 2024, Algorithm 4) from x at timesteps[0]."""
    for i, t in enumerate(timesteps):
        abar = alphas_cumprod[int(t)]
        x0, eps = denoiser(x, t, abar**0.5, (1 - abar) ** 0.5)
        last = i == len(timesteps) - 1
        t_next = 0 if last else int(timesteps[i + 1])
        noisy = gamma > 0 and not last
        noise = randn(x.shape, generator, x.device, x.dtype) if noisy else None
        x, _ = tcd_step(x0, eps, alphas_cumprod[intermediate_timestep(t_next, gamma)], alphas_cumprod[t_next], noise)
    return x


@dataclass
class TCDSchedulerOutput(SchedulerOutput):
    """SchedulerOutput with diffusers' `pred_noised_sample` (the sample at s), also the tuple's second entry."""
    pred_noised_sample: torch.Tensor | None = None

    def to_tuple(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.prev_sample, self.pred_noised_sample


class TCDScheduler(LCMScheduler):
    """diffusers' TCDScheduler protocol over `tcd_step`: LCMScheduler's grids (given original_inference_steps,
    from every training step, as diffusers' does), `step(..., eta=gamma)` with diffusers' default 0.3 (a pipeline
    passes its own `eta`, 0 unless set: deterministic)."""
    config_class = TCDConfig
    grid_from_every_step = True

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.3, generator=None,
             return_dict: bool = True):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta} (TCD's gamma) must lie in [0, 1]: 0 is deterministic, 1 fully stochastic")
        i = self.index_for_timestep(timestep)
        t = int(self._grid[i])
        last = i == self.num_inference_steps - 1
        t_next = int(self._grid[i + 1]) if i + 1 < len(self._grid) else 0
        abar = self.alphas_cumprod[t]
        x = sample.float()
        x0, eps = predict_x0_eps(model_output.float(), x, abar**0.5, (1 - abar) ** 0.5, self.config.prediction_type)
        noise = None
        if eta > 0 and not last:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype).float()
        abar_s = self.alphas_cumprod[intermediate_timestep(t_next, eta)]
        prev, x_s = tcd_step(x0, eps, abar_s, self.alphas_cumprod[t_next], noise)
        self._finish_step(i)
        out = TCDSchedulerOutput(prev.to(sample.dtype), x0.to(sample.dtype), x_s.to(sample.dtype))
        return out if return_dict else out.to_tuple()
