"""DPM-Solver-2 in sigma space ("DPM2"; Lu et al. 2022, Algorithm 1 with r = 1/2, in Karras et al. 2022's VE
form, as k-diffusion's sample_dpm_2): each step takes the slope at its start to the geometric midpoint
sigma_mid = sqrt(sigma sigma_next), evaluates the model there, and moves the whole step with that midpoint slope.
Two model calls a step; the last step, onto sigma = 0 (no midpoint), is an Euler step. The ancestral form ("DPM2
a", k-diffusion's sample_dpm_2_ancestral) steps to sigma_down and adds fresh noise of std sigma_up instead
(euler.ancestral_sigmas), its midpoint between sigma and sigma_down.
"""
from __future__ import annotations

import numpy as np
import torch

from ..guidance import Denoiser
from ..schedules import randn, ve_sigmas
from .base import SchedulerOutput
from .config import KDPM2AncestralConfig, KDPM2Config
from .euler import _denoise, _SigmaScheduler, ancestral_sigmas, euler_step
from .grids import sigma_to_t, spaced_levels, spaced_timesteps


def midpoint_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """sqrt(sigma_{i-1} sigma_i) for each level (its first entry pairs with the last, as diffusers rolls them;
    0 where either is 0), computed as the exp of a log-space midpoint in float32, as diffusers does."""
    return sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()


def dpm2_step(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_mid, sigma_next, x0_mid: torch.Tensor | None = None,
              x_mid: torch.Tensor | None = None) -> torch.Tensor:
    """Without the midpoint's estimate: the Euler half step from sigma to sigma_mid (where the model is evaluated
    next). With it (x0_mid at x_mid): the full step from sigma to sigma_next with the midpoint's slope."""
    if x0_mid is None:
        return euler_step(x, x0, sigma, sigma_mid)
    return x + (x_mid - x0_mid) / sigma_mid * (sigma_next - sigma)


def sample_dpm2(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                mid_timesteps: torch.Tensor, mid_sigmas: torch.Tensor) -> torch.Tensor:
    """Run DPM2 from x at noise level sigmas[0] through sigmas (ending in 0); mid_* : the midpoints' timesteps and
    levels between sigmas[i] and sigmas[i + 1] (the last unused)."""
    for i, t in enumerate(timesteps):
        x0 = _denoise(denoiser, x, t, sigmas[i])
        if sigmas[i + 1] == 0:
            x = euler_step(x, x0, sigmas[i], 0.0)
            continue
        x_mid = dpm2_step(x, x0, sigmas[i], mid_sigmas[i], sigmas[i + 1])
        x = dpm2_step(x, x0, sigmas[i], mid_sigmas[i], sigmas[i + 1],
                      _denoise(denoiser, x_mid, mid_timesteps[i], mid_sigmas[i]), x_mid)
    return x


class KDPM2DiscreteScheduler(_SigmaScheduler):
    """diffusers' KDPM2DiscreteScheduler protocol over `dpm2_step`: the grid lists each step's start and, after
    it, its midpoint (timesteps t0, m1, t1, m2, t2, ...: entries 2k start steps, odd ones are midpoints), with
    `sigmas` and `sigmas_interpol` laid out as diffusers lays them out. State: the step's start (sample)."""
    config_class = KDPM2Config
    order = 2

    def _reset(self) -> None:
        self._start: tuple[int, torch.Tensor] | None = None  # (grid index, sample) of the step in progress

    def _levels(self, num_inference_steps: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """(the steps' timesteps, their noise levels with a final 0 (float32), the log-sigma table)."""
        c = self.config
        table = ve_sigmas(self.alphas_cumprod).numpy()
        log_table = np.log(table)
        steps = spaced_timesteps(num_inference_steps, c.num_train_timesteps, c.timestep_spacing, c.steps_offset,
                                 round_linspace=False).astype(np.float32)
        steps, levels = spaced_levels(c, steps, table, num_inference_steps, round_karras=True)
        return steps, torch.from_numpy(np.concatenate([levels, [0.0]]).astype(np.float32)), log_table

    @staticmethod
    def _laid_out(values: torch.Tensor) -> torch.Tensor:
        """Per-level values in the grid's layout, as diffusers lays them out: the first, then each later one twice."""
        return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])

    def _make_grid(self, num_inference_steps: int, device) -> torch.Tensor:
        steps, sigmas, log_table = self._levels(num_inference_steps)
        mids = midpoint_sigmas(sigmas)
        self.sigmas, self.sigmas_interpol = self._laid_out(sigmas), self._laid_out(mids)
        steps = torch.from_numpy(steps)
        mid_steps = torch.from_numpy(sigma_to_t(mids.numpy(), log_table, float32=True)).to(steps.dtype)
        interleaved = torch.stack((mid_steps[1:-1], steps[1:]), dim=-1).flatten()
        return torch.cat([steps[:1], interleaved]).to(device)

    def _level(self, index: int) -> torch.Tensor:
        """The noise level the model sees at grid entry `index`: a step's start, or its midpoint."""
        return self.sigmas[index] if index % 2 == 0 else self._midpoint(index - 1)

    def _midpoint(self, start: int) -> torch.Tensor:
        """The midpoint's noise level of the step that starts at grid entry `start`."""
        return self.sigmas_interpol[start + 1]

    def _complete(self, start: int, x_start: torch.Tensor, x0_mid: torch.Tensor, x_mid: torch.Tensor,
                  generator, dtype: torch.dtype) -> torch.Tensor:
        """The step that started at grid entry `start`, given the model's estimate at its midpoint."""
        return dpm2_step(x_start, None, self.sigmas[start], self._midpoint(start), self.sigmas[start + 1], x0_mid,
                         x_mid)

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        return sample / ((self._level(self.index_for_timestep(timestep)) ** 2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One grid entry's update: at a step's start the Euler half step to its midpoint, at the midpoint the whole
        step (`generator`: the ancestral form's noise; DPM2 draws none)."""
        i = self.index_for_timestep(timestep)
        x = sample.float()
        x0 = self._x0(model_output, x, self._level(i))
        if i % 2 == 0:
            prev = euler_step(x, x0, self.sigmas[i], self._midpoint(i))
            self._start = (i, x)
        else:
            if self._start is None or self._start[0] != i - 1:
                raise ValueError(f"{type(self).__name__}: timestep {float(timestep):g} is a step's midpoint; call "
                                 "step at its start (the grid entry before it) first")
            prev = self._complete(i - 1, self._start[1], x0, x, generator, model_output.dtype)
            self._start = None
        self._finish_step(i)
        out = SchedulerOutput(prev.to(model_output.dtype), x0.to(model_output.dtype))
        return out if return_dict else out.to_tuple()


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """diffusers' KDPM2AncestralDiscreteScheduler protocol ("DPM2 a"): each step's midpoint lies between sigma and
    sigma_down (the deterministic part of the ancestral step, euler.ancestral_sigmas), the step lands on
    sigma_down with the midpoint's slope, and noise of std sigma_up is added, drawn from the generator; the tables
    (sigmas, sigmas_interpol, sigmas_up, sigmas_down) are laid out as diffusers lays them out."""
    config_class = KDPM2AncestralConfig

    def _make_grid(self, num_inference_steps: int, device) -> torch.Tensor:
        steps, sigmas, log_table = self._levels(num_inference_steps)
        following = sigmas.roll(-1)
        following[-1] = 0.0
        down, up = ancestral_sigmas(sigmas, following)
        down[-1] = 0.0
        mids = sigmas.log().lerp(down.log(), 0.5).exp()
        mids[-2:] = 0.0  # (the last step, onto 0, is an Euler step)
        if not torch.isfinite(mids).all():
            raise ValueError(f"KDPM2AncestralDiscreteScheduler: with this schedule the first noise level "
                             f"({float(sigmas[0]):.4g}) is so far above the next ({float(sigmas[1]):.4g}) that the "
                             "deterministic part of the first step rounds to 0 and its midpoint is undefined "
                             "(diffusers gets NaN there); use 'leading' or 'linspace' timestep_spacing, Karras sigmas, "
                             "or another sampler")
        self.sigmas, self.sigmas_interpol = self._laid_out(sigmas), self._laid_out(mids)
        self.sigmas_up, self.sigmas_down = self._laid_out(up), self._laid_out(down)
        steps = torch.from_numpy(steps)
        mid_steps = torch.from_numpy(sigma_to_t(mids.numpy(), log_table, float32=True)).to(steps.dtype)
        interleaved = torch.stack((mid_steps[:-2], steps[1:]), dim=-1).flatten()
        return torch.cat([steps[:1], interleaved]).to(device)

    def _midpoint(self, start: int) -> torch.Tensor:
        return self.sigmas_interpol[start]

    def _complete(self, start: int, x_start: torch.Tensor, x0_mid: torch.Tensor, x_mid: torch.Tensor,
                  generator, dtype: torch.dtype) -> torch.Tensor:
        """To sigma_down with the midpoint's slope, then fresh noise of std sigma_up (drawn in the model's dtype,
        as diffusers draws it)."""
        prev = dpm2_step(x_start, None, self.sigmas[start], self._midpoint(start), self.sigmas_down[start], x0_mid,
                         x_mid)
        noise = randn(x_mid.shape, generator, x_mid.device, dtype).float()
        return prev + noise * self.sigmas_up[start]
