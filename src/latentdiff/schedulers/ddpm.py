"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on any descending subset of the training steps."""
from __future__ import annotations

import torch

from ..guidance import Denoiser
from ..schedules import randn
from .base import Scheduler, SchedulerOutput
from .config import DDPMConfig
from .grids import spaced_timesteps


def ddpm_step(x: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor, abar_prev: torch.Tensor,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """A draw from the posterior q(x_prev | x_t, x0) (Ho et al. 2020, eqs. 6-7) between two retained steps:
    mean = sqrt(abar_prev) beta / (1 - abar) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar) x_t with
    alpha = abar / abar_prev, beta = 1 - alpha, and the "fixed_small" variance (1 - abar_prev) / (1 - abar) beta."""
    alpha = abar / abar_prev
    beta = 1 - alpha
    mean = (abar_prev**0.5 * beta / (1 - abar)) * x0 + (alpha**0.5 * (1 - abar_prev) / (1 - abar)) * x
    if noise is None:
        return mean
    variance = torch.clamp((1 - abar_prev) / (1 - abar) * beta, min=1e-20)
    return mean + variance**0.5 * noise


def previous_alphas(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """abar at the step each DDPM step lands on: the next timestep of the grid, and 1 (clean data) after the last."""
    return torch.cat([alphas_cumprod[timesteps[1:].cpu()], torch.ones(1)])


def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                generator=None, clip_sample_range: float | None = None) -> torch.Tensor:
    """Run DDPM from x at timesteps[0] down to clean data. Noise is drawn at every step with t > 0 (as diffusers
    does, which keeps the generator's stream aligned with it)."""
    abar_prev = previous_alphas(timesteps, alphas_cumprod)
    for i, t in enumerate(timesteps):
        abar = alphas_cumprod[int(t)]
        x0, _ = denoiser(x, t, abar**0.5, (1 - abar) ** 0.5)
        if clip_sample_range is not None:
            x0 = x0.clamp(-clip_sample_range, clip_sample_range)
        noise = randn(x.shape, generator, x.device, x.dtype) if int(t) > 0 else None
        x = ddpm_step(x, x0, abar, abar_prev[i], noise)
    return x


class DDPMScheduler(Scheduler):
    """diffusers' DDPMScheduler protocol over `ddpm_step`; variance_type "fixed_small" only, no thresholding.
    Before set_timesteps it steps through all training steps, as diffusers' does."""
    config_class = DDPMConfig

    def __init__(self, **config):
        super().__init__(**config)
        self._abar_prev = previous_alphas(self.timesteps, self.alphas_cumprod)  # the full chain T-1, ..., 0
        self._grid = self.timesteps.double().numpy()

    def _make_grid(self, num_inference_steps: int, device) -> torch.Tensor:
        c = self.config
        steps = torch.from_numpy(spaced_timesteps(num_inference_steps, c.num_train_timesteps, c.timestep_spacing,
                                                  c.steps_offset).astype("int64"))
        self._abar_prev = previous_alphas(steps, self.alphas_cumprod)
        return steps.to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        i = self.index_for_timestep(timestep)
        t = int(self._grid[i])
        abar, abar_prev = self.alphas_cumprod[t], self._abar_prev[i]
        x = sample.float()
        x0, _ = self._clipped_estimates(model_output, x, abar)
        noise = None
        if t > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype).float()
        prev = ddpm_step(x, x0, abar, abar_prev, noise).to(sample.dtype)
        self._finish_step(i)
        out = SchedulerOutput(prev, x0.to(sample.dtype))
        return out if return_dict else out.to_tuple()
