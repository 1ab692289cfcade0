"""Latent consistency models (Luo et al. 2023; consistency models, Song et al. 2023): a network distilled to map
any point of a trajectory straight to its clean end, so that 1-8 steps make an image. Each step takes the model's
x0 estimate through the consistency parametrization f(x, t) = c_skip(t) x + c_out(t) x0_hat (sec. 3 of Song et
al.: c_skip = 1 and c_out = 0 at t = 0), then noises the result afresh to the next timestep of the grid; the last
step returns it as it is. Used with LCM-distilled U-Nets and with LCM-LoRA on an ordinary Stable Diffusion.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..guidance import Denoiser
from ..schedules import randn
from .base import Scheduler, SchedulerOutput
from .config import LCMConfig

SIGMA_DATA = 0.5  # the data's standard deviation assumed by the parametrization (Song et al. 2023, appendix C)


def lcm_timesteps(num_inference_steps: int, original_steps: int, num_train_timesteps: int,
                  strength: float = 1.0, every_step: bool = False) -> np.ndarray:
    """The distillation grid k-1, 2k-1, ..., (k = T // original_steps, the skipping step of Luo et al. sec. 4.2)
    over the first `strength` of it, and num_inference_steps of its entries at evenly spaced (floored) positions
    from the noisiest down, as diffusers' LCMScheduler picks them. `every_step`: from all training steps instead
    (what diffusers' TCDScheduler does when set_timesteps is given original_inference_steps)."""
    if original_steps > num_train_timesteps:
        raise ValueError(f"original_inference_steps={original_steps} cannot exceed num_train_timesteps="
                         f"{num_train_timesteps} (the distillation grid is a subset of the training steps)")
    if num_inference_steps > original_steps:
        raise ValueError(f"num_inference_steps={num_inference_steps} is more than original_inference_steps="
                         f"{original_steps}: the steps are taken from that grid; use at most {original_steps} steps "
                         "(or a larger original_inference_steps)")
    if every_step:
        origin = np.arange(0, int(num_train_timesteps * strength))
    else:
        k = num_train_timesteps // original_steps
        origin = np.arange(1, int(original_steps * strength) + 1) * k - 1
    if len(origin) < num_inference_steps:
        raise ValueError(f"strength={strength} leaves {len(origin)} of the {original_steps} distillation timesteps, "
                         f"fewer than num_inference_steps={num_inference_steps}: raise strength or use fewer steps")
    positions = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[::-1][positions].astype(np.int64)


def boundary_scalings(t, timestep_scaling: float = 10.0):
    """(c_skip, c_out) at timestep t, a number or a tensor of them (float64; scaled by timestep_scaling first, which
    makes c_skip ~ 0 away from t = 0): c_skip = s^2 / (t^2 + s^2), c_out = t / sqrt(t^2 + s^2), s = SIGMA_DATA."""
    t = (t.double() if isinstance(t, torch.Tensor) else float(t)) * timestep_scaling
    return SIGMA_DATA**2 / (t**2 + SIGMA_DATA**2), t / (t**2 + SIGMA_DATA**2) ** 0.5


def lcm_step(x: torch.Tensor, x0: torch.Tensor, t, abar_next=None, noise: torch.Tensor | None = None,
             timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(next sample, denoised): denoised = c_skip(t) x + c_out(t) x0, then, unless this is the last step (noise
    None), sqrt(abar_next) denoised + sqrt(1 - abar_next) noise."""
    c_skip, c_out = boundary_scalings(t, timestep_scaling)
    denoised = c_out * x0 + c_skip * x
    if noise is None:
        return denoised, denoised
    return abar_next**0.5 * denoised + (1 - abar_next) ** 0.5 * noise, denoised


def sample_lcm(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
               generator=None, timestep_scaling: float = 10.0) -> torch.Tensor:
    """Multistep consistency sampling (Luo et al. 2023, Algorithm 3) from x at timesteps[0]."""
    for i, t in enumerate(timesteps):
        abar = alphas_cumprod[int(t)]
        x0, _ = denoiser(x, t, abar**0.5, (1 - abar) ** 0.5)
        last = i == len(timesteps) - 1
        noise = None if last else randn(x.shape, generator, x.device, x.dtype)
        abar_next = None if last else alphas_cumprod[int(timesteps[i + 1])]
        x, _ = lcm_step(x, x0, t, abar_next, noise, timestep_scaling)
    return x


class LCMScheduler(Scheduler):
    """diffusers' LCMScheduler protocol over `lcm_step`: `step(...).prev_sample` is the next loop input, and
    `.denoised` (also the tuple's second entry, as diffusers returns it) the consistency estimate. set_timesteps
    also takes `original_inference_steps` (the distillation grid's size; the config's by default) and `strength`
    (diffusers' LCM img2img: the grid over the first `strength` of the distillation grid). No thresholding."""
    config_class = LCMConfig
    custom_grids = frozenset({"timesteps"})
    grid_from_every_step = False  # (TCD's: see lcm_timesteps)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      original_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                      strength: float = 1.0, sigmas: None = None) -> None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength} must lie in (0, 1]")
        if strength < 1.0 and timesteps is not None:
            raise ValueError("strength < 1 with timesteps=: pass the timesteps to start from instead")
        original = original_inference_steps or self.config.original_inference_steps
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise ValueError(f"original_inference_steps={original!r} must be a positive integer")
        self._original, self._strength = original, float(strength)
        self._every_step = self.grid_from_every_step and original_inference_steps is not None
        super().set_timesteps(num_inference_steps, device, timesteps=timesteps, sigmas=sigmas)

    def _make_grid(self, num_inference_steps: int, device, timesteps: np.ndarray | None = None) -> torch.Tensor:
        c = self.config
        if timesteps is None:
            steps = lcm_timesteps(num_inference_steps, self._original, c.num_train_timesteps, self._strength,
                                  self._every_step)
        else:
            steps = timesteps.astype(np.int64)
            if not np.array_equal(steps, timesteps):
                raise ValueError(f"LCMScheduler's timesteps must be whole training steps; got {timesteps.tolist()}")
            k = c.num_train_timesteps // self._original
            off_grid = [int(t) for t in steps if (t + 1) % k]
            if off_grid:
                warnings.warn(f"timesteps {off_grid} are not on the distillation grid of {self._original} steps "
                              f"(k * i - 1, k = {k}) that an LCM was trained on", stacklevel=4)
        return torch.from_numpy(steps).to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        i = self.index_for_timestep(timestep)
        t = int(self._grid[i])
        abar = self.alphas_cumprod[t]
        x = sample.float()
        x0, _ = self._clipped_estimates(model_output, x, abar)
        noise = abar_next = None
        if i != self.num_inference_steps - 1:  # (no fresh noise after the last step)
            abar_next = self.alphas_cumprod[int(self._grid[i + 1])]
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype).float()
        prev, denoised = lcm_step(x, x0, t, abar_next, noise, self.config.timestep_scaling)
        self._finish_step(i)
        out = LCMSchedulerOutput(prev.to(sample.dtype), denoised.to(sample.dtype))
        return out if return_dict else out.to_tuple()


class LCMSchedulerOutput(SchedulerOutput):
    """SchedulerOutput whose estimate is diffusers' `denoised` (the consistency function's output)."""

    @property
    def denoised(self) -> torch.Tensor:
        return self.pred_original_sample
