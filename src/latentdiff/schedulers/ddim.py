"""DDIM (Song et al. 2021): the non-Markovian sampler that eta interpolates from deterministic (0) to DDPM-like (1)."""
from __future__ import annotations

import torch

from ..guidance import Denoiser
from ..schedules import randn
from .base import Scheduler, SchedulerOutput
from .config import DDIMConfig, DDIMInverseConfig
from .grids import spaced_timesteps


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor, abar_prev: torch.Tensor, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Song et al. 2021, eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z, with
    s = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev) (eq. 16)."""
    if eta > 0 and noise is None:
        raise ValueError(f"ddim_step with eta={eta} > 0 needs `noise` (a standard normal tensor like x0)")
    abar, abar_prev = torch.as_tensor(abar), torch.as_tensor(abar_prev)
    # (not computed at eta 0: from abar = 1, an inverted step's start, it would be 0 * inf)
    std = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)) ** 0.5 if eta > 0 else 0.0
    x = abar_prev**0.5 * x0 + (1 - abar_prev - std**2).clamp(min=0) ** 0.5 * eps
    return x + std * noise if eta > 0 else x


def previous_alphas(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, stride: int,
                    final_alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """abar at t - stride for each step, final_alpha_cumprod below 0. Like the DDIM paper's code and diffusers, the
    step goes to t - T // n, which for "linspace" spacing can differ by a step or two from the next grid entry."""
    prev = timesteps.cpu() - stride
    return torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final_alpha_cumprod)


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                eta: float = 0.0, generator=None, final_alpha_cumprod: float = 1.0, stride: int | None = None,
                clip_sample_range: float | None = None) -> torch.Tensor:
    """Run DDIM from x at timesteps[0]; stride defaults to T // len(timesteps)."""
    stride = stride or len(alphas_cumprod) // len(timesteps)
    abar_prev = previous_alphas(timesteps, alphas_cumprod, stride, torch.tensor(float(final_alpha_cumprod)))
    for i, t in enumerate(timesteps):
        abar = alphas_cumprod[int(t)]
        x0, eps = denoiser(x, t, abar**0.5, (1 - abar) ** 0.5)
        if clip_sample_range is not None:
            x0 = x0.clamp(-clip_sample_range, clip_sample_range)
        noise = randn(x.shape, generator, x.device, x.dtype) if eta > 0 else None
        x = ddim_step(x0, eps, abar, abar_prev[i], eta, noise)
    return x


class DDIMScheduler(Scheduler):
    """diffusers' DDIMScheduler protocol over `ddim_step` (no thresholding). `step` takes eta per call."""
    config_class = DDIMConfig

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _make_grid(self, num_inference_steps: int, device) -> torch.Tensor:
        c = self.config
        steps = torch.from_numpy(spaced_timesteps(num_inference_steps, c.num_train_timesteps, c.timestep_spacing,
                                                  c.steps_offset).astype("int64"))
        stride = c.num_train_timesteps // num_inference_steps
        self._abar_prev = previous_alphas(steps, self.alphas_cumprod, stride, self.final_alpha_cumprod)
        return steps.to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        """One DDIM step; with eta > 0 the noise comes from `variance_noise` or is drawn with `generator`."""
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise to DDIMScheduler.step, not both")
        i = self.index_for_timestep(timestep)
        abar, abar_prev = self.alphas_cumprod[int(self._grid[i])], self._abar_prev[i]
        x0, eps = self._clipped_estimates(model_output, sample.float(), abar)
        noise = None
        if eta > 0:
            noise = variance_noise if variance_noise is not None else randn(
                model_output.shape, generator, model_output.device, model_output.dtype)
            noise = noise.float()
        prev = ddim_step(x0, eps, abar, abar_prev, eta, noise).to(sample.dtype)
        self._finish_step(i)
        out = SchedulerOutput(prev, x0.to(sample.dtype))
        return out if return_dict else out.to_tuple()


class DDIMInverseScheduler(Scheduler):
    """diffusers' DDIMInverseScheduler: deterministic DDIM run backwards, from an image's latents towards noise
    (inversion: the noise that DDIM would turn back into that image, for editing real images). The grid ascends
    ("leading" or "trailing" spacing), and the step called with timestep t moves the sample from the noise level of
    t - T // n (below 0: the clean image's, abar = 1 with set_alpha_to_one) up to t's, with the model's output at
    t for the sample at the lower level, as diffusers' does."""
    config_class = DDIMInverseConfig

    def __init__(self, **config):
        super().__init__(**config)
        self.initial_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _make_grid(self, num_inference_steps: int, device) -> torch.Tensor:
        c = self.config
        if c.timestep_spacing not in ("leading", "trailing"):
            raise ValueError(f"DDIMInverseScheduler: timestep_spacing={c.timestep_spacing!r}; it spaces its grid "
                             "'leading' or 'trailing' (as diffusers' does): set one of them")
        steps = spaced_timesteps(num_inference_steps, c.num_train_timesteps, c.timestep_spacing, c.steps_offset)
        steps = torch.from_numpy(steps[::-1].astype("int64"))
        # the level each step starts from: t - T // n's (diffusers' min(t - T // n, T - 1), the cap never binding)
        self._abar_from = previous_alphas(steps, self.alphas_cumprod, c.num_train_timesteps // num_inference_steps,
                                          self.initial_alpha_cumprod)
        return steps.to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One inverted DDIM step: from the level below `timestep` up to it."""
        i = self.index_for_timestep(timestep)
        abar, abar_to = self._abar_from[i], self.alphas_cumprod[int(self._grid[i])]
        x0, eps = self._clipped_estimates(model_output, sample.float(), abar)
        nxt = ddim_step(x0, eps, abar, abar_to).to(sample.dtype)
        self._finish_step(i)
        out = SchedulerOutput(nxt, x0.to(sample.dtype))
        return out if return_dict else out.to_tuple()
