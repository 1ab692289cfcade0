"""Euler and Euler-ancestral samplers in sigma space (Karras et al. 2022), where x = x0 + sigma eps and the model
sees x / sqrt(1 + sigma^2), the variance-preserving sample it was trained on."""
from __future__ import annotations

import numpy as np
import torch

from ..guidance import Denoiser
from ..schedules import predict_x0_eps, randn, ve_sigmas, vp_coefficients
from .base import Scheduler, SchedulerOutput
from .config import EulerAncestralConfig, EulerConfig
from .grids import interp_sigmas, karras_sigmas, sigma_to_t, spaced_timesteps


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eqs. 1
    and 3 with sigma(t) = t; their Algorithm 1 without the second-order correction)."""
    return x + (x - x0) / sigma * (sigma_next - sigma)


def ancestral_sigmas(sigma, sigma_next) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add fresh noise of std sigma_up, so that
    sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's get_ancestral_step with eta = 1; Song et al. 2021b)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def euler_ancestral_step(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next, noise: torch.Tensor) -> torch.Tensor:
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
    return euler_step(x, x0, sigma, sigma_down) + noise * sigma_up


def _denoise(denoiser: Denoiser, x: torch.Tensor, t, sigma) -> torch.Tensor:
    alpha, sigma_vp = vp_coefficients(sigma)
    return denoiser(x * alpha, t, alpha, sigma_vp)[0]


def sample_euler(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Run Euler from x (at noise level sigmas[0], i.e. x = x0 + sigmas[0] eps) through sigmas, which end in 0."""
    for i, t in enumerate(timesteps):
        x = euler_step(x, _denoise(denoiser, x, t, sigmas[i]), sigmas[i], sigmas[i + 1])
    return x


def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                           generator=None) -> torch.Tensor:
    """Run Euler-ancestral from x at noise level sigmas[0]; noise is drawn at every step."""
    for i, t in enumerate(timesteps):
        x0 = _denoise(denoiser, x, t, sigmas[i])
        x = euler_ancestral_step(x, x0, sigmas[i], sigmas[i + 1], randn(x.shape, generator, x.device, x.dtype))
    return x


class _SigmaScheduler(Scheduler):
    """Shared by the Euler samplers: a grid of timesteps (float, fractional with Karras sigmas or "linspace"
    spacing, as in diffusers) with their noise levels, and samples kept at scale sqrt(1 + sigma^2)."""

    def __init__(self, **config):
        super().__init__(**config)
        self.timesteps = self.timesteps.float()
        self.sigmas = torch.cat([ve_sigmas(self.alphas_cumprod).flip(0), torch.zeros(1)])

    def _make_grid(self, num_inference_steps: int, device, timesteps: np.ndarray | None = None,
                   sigmas: np.ndarray | None = None) -> torch.Tensor:
        c = self.config
        table = ve_sigmas(self.alphas_cumprod).numpy()
        if sigmas is not None:  # the noise levels as given (their last one ends sampling), timesteps to match
            self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
            return torch.from_numpy(sigma_to_t(sigmas[:-1].astype(np.float32), np.log(table)).astype(np.float32)
                                    ).to(device)
        if timesteps is not None and c.get("use_karras_sigmas"):
            raise ValueError("custom timesteps with use_karras_sigmas=True: Karras sigmas place the timesteps "
                             "themselves; pass sigmas=, or turn use_karras_sigmas off")
        if timesteps is not None:
            steps = timesteps.astype(np.float32)
        else:
            steps = spaced_timesteps(num_inference_steps, c.num_train_timesteps, c.timestep_spacing, c.steps_offset,
                                     round_linspace=False).astype(np.float32)
        sigmas = interp_sigmas(steps, table)
        if c.get("use_karras_sigmas"):  # Euler only; Euler-ancestral has no such key
            sigmas = karras_sigmas(c.sigma_min if c.sigma_min is not None else sigmas[-1].item(),
                                   c.sigma_max if c.sigma_max is not None else sigmas[0].item(), num_inference_steps)
            steps = sigma_to_t(sigmas, np.log(table))
        last = table[0] if c.get("final_sigmas_type") == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        return torch.from_numpy(steps.astype(np.float32)).to(device)

    @property
    def init_noise_sigma(self) -> float:
        """Std of the starting noise: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (as in diffusers)."""
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma_max.item()
        return ((sigma_max**2 + 1) ** 0.5).item()

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / sqrt(1 + sigma^2): the variance-preserving sample the U-Net was trained on."""
        sigma = self.sigmas[self.index_for_timestep(timestep)]
        return sample / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """x0 + sigma eps at grid timesteps (one per sample), the sample scale these samplers work in."""
        sigma = self.sigmas[[self.index_for_timestep(t) for t in torch.as_tensor(timesteps).reshape(-1)]]
        sigma = sigma.to(original_samples).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + noise * sigma

    def _x0(self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        alpha, sigma_vp = vp_coefficients(sigma)
        return predict_x0_eps(model_output.float(), x * alpha, alpha, sigma_vp, self.config.prediction_type)[0]


class EulerDiscreteScheduler(_SigmaScheduler):
    """diffusers' EulerDiscreteScheduler protocol over `euler_step`: optional Karras sigmas, no churn."""
    config_class = EulerConfig
    custom_grids = frozenset({"timesteps", "sigmas"})

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        i = self.index_for_timestep(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.float()
        x0 = self._x0(model_output, x, sigma)
        prev = euler_step(x, x0, sigma, sigma_next).to(model_output.dtype)
        self._finish_step(i)
        out = SchedulerOutput(prev, x0.to(model_output.dtype))
        return out if return_dict else out.to_tuple()


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """diffusers' EulerAncestralDiscreteScheduler protocol over `euler_ancestral_step`."""
    config_class = EulerAncestralConfig

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        i = self.index_for_timestep(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.float()
        x0 = self._x0(model_output, x, sigma)
        noise = randn(model_output.shape, generator, model_output.device, model_output.dtype).float()
        prev = euler_ancestral_step(x, x0, sigma, sigma_next, noise).to(model_output.dtype)
        self._finish_step(i)
        out = SchedulerOutput(prev, x0.to(model_output.dtype))
        return out if return_dict else out.to_tuple()
