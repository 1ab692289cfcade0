"""Euler and Euler-ancestral samplers in sigma space (Karras et al. 2022), where x = x0 + sigma eps and the model
sees x / sqrt(1 + sigma^2), the variance-preserving sample it was trained on."""
from __future__ import annotations

import numpy as np
import torch

from ..guidance import Denoiser
from ..schedules import randn, ve_sigmas, vp_coefficients
from .base import Scheduler, SchedulerOutput
from .config import EulerAncestralConfig, EulerConfig, HeunConfig, LMSConfig
from .grids import sigma_grid, sigma_to_t, spaced_levels, spaced_timesteps


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
    finite_terminal_sigma = True

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
        grid = sigma_grid(c)
        if timesteps is not None and grid is not None:
            raise ValueError(f"custom timesteps with {grid[0]}=True: that grid places the timesteps itself; pass "
                             f"sigmas=, or turn {grid[0]} off")
        if timesteps is not None:
            steps = timesteps.astype(np.float32)
        else:
            steps = spaced_timesteps(num_inference_steps, c.num_train_timesteps, c.timestep_spacing, c.steps_offset,
                                     round_linspace=False).astype(np.float32)
        # (Karras, exponential or beta sigmas: Euler, Heun, LMS, Euler-ancestral having no such keys; sigma_min and
        # sigma_max are Euler's keys, Heun has none)
        steps, sigmas = spaced_levels(c, steps, table, num_inference_steps, c.get("sigma_min"), c.get("sigma_max"))
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
        i = self.index_for_timestep(timestep)
        return sample / self._scalar(("scale", i), lambda: (self.sigmas[i] ** 2 + 1) ** 0.5, self.sigmas)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """x0 + sigma eps at grid timesteps (one per sample), the sample scale these samplers work in."""
        sigma = self.sigmas[[self.index_for_timestep(t) for t in torch.as_tensor(timesteps).reshape(-1)]]
        sigma = sigma.to(original_samples).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + noise * sigma

    def _x0(self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma) in sample space (Karras et al. 2022, tab. 1: x0 = c_skip x + c_out F): for eps, x - sigma F;
        for v, x / (sigma^2 + 1) - sigma F / sqrt(sigma^2 + 1). Not through the VP sample x / sqrt(sigma^2 + 1):
        at large sigma (Karras grids over linear or cosine betas) that rounds x away."""
        out = model_output.float()
        if self.config.prediction_type == "epsilon":
            return x - sigma * out
        return x / (sigma**2 + 1) - (sigma / (sigma**2 + 1) ** 0.5) * out


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


def heun_step(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next, x0_next: torch.Tensor | None = None,
              x_next: torch.Tensor | None = None) -> torch.Tensor:
    """Karras et al. 2022, Algorithm 1: the Euler step from sigma to sigma_next, corrected, given the estimate
    x0_next made at its result x_next, with the mean of the slopes at both ends (Heun's method)."""
    slope = (x - x0) / sigma
    if x0_next is not None:
        slope = (slope + (x_next - x0_next) / sigma_next) / 2
    return x + slope * (sigma_next - sigma)


def sample_heun(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Run Heun from x at noise level sigmas[0] through sigmas, which end in 0: two model calls a step, one for the
    last (an Euler step onto sigma = 0, where the slope is not defined)."""
    for i, t in enumerate(timesteps):
        x0 = _denoise(denoiser, x, t, sigmas[i])
        x_next = heun_step(x, x0, sigmas[i], sigmas[i + 1])
        if i + 1 < len(timesteps):
            x_next = heun_step(x, x0, sigmas[i], sigmas[i + 1], _denoise(denoiser, x_next, timesteps[i + 1],
                                                                        sigmas[i + 1]), x_next)
        x = x_next
    return x


class HeunDiscreteScheduler(_SigmaScheduler):
    """diffusers' HeunDiscreteScheduler protocol over `heun_step`: each timestep but the first is listed twice, for
    the Euler step that ends there and for its correction (the second model call), as are their noise levels;
    grid entries 2k are Euler steps, 2k + 1 their corrections. The state is the Euler step's start (sample, x0
    estimate)."""
    config_class = HeunConfig
    order = 2
    custom_grids = frozenset({"timesteps"})

    def _reset(self) -> None:
        self._euler: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (grid index, sample, x0 estimate)

    def _make_grid(self, num_inference_steps: int, device, timesteps: np.ndarray | None = None) -> torch.Tensor:
        steps = super()._make_grid(num_inference_steps, device, timesteps=timesteps)
        sigmas = self.sigmas
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        return torch.cat([steps[:1], steps[1:].repeat_interleave(2)])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        i = self.index_for_timestep(timestep)
        x = sample.float()
        x0 = self._x0(model_output, x, self.sigmas[i])
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if self._starts_step(i):  # an Euler step from sigmas[i]
            self._euler = (i, x, x0)
            prev = heun_step(x, x0, self.sigmas[i], self.sigmas[i + 1])
        else:  # its correction, with the estimate made where it ended
            if self._euler is None or self._euler[0] != i - 1:  # (lookups start steps at even entries)
                raise RuntimeError(f"HeunDiscreteScheduler: grid entry {i} corrects the Euler step of entry {i - 1}, "
                                   "which was not taken")
            _, start, start_x0 = self._euler
            prev = heun_step(start, start_x0, self.sigmas[i - 1], self.sigmas[i], x0, x)
            self._euler = None
        self._finish_step(i)
        out = SchedulerOutput(prev.to(model_output.dtype), x0.to(model_output.dtype))
        return out if return_dict else out.to_tuple()


def lms_coefficients(sigmas: list[float]) -> list[float]:
    """The weights of the linear multistep step from sigmas[0] to sigmas[1] given the slopes at sigmas[0],
    sigmas[-1], ..., sigmas[-(order - 1)] (the list: [sigma_next, sigma_now, sigma_prev, ...]): each slope's
    Lagrange basis polynomial over those noise levels, integrated from sigma_now to sigma_next (Karras et al. 2022's
    "LMS" sampler, Crowson's k-diffusion). The polynomials have degree order - 1 <= 3, so a 4-point Gauss-Legendre
    rule integrates them exactly (float64)."""
    sigma_next, *nodes = (float(s) for s in sigmas)
    points, weights = np.polynomial.legendre.leggauss(4)
    half = (sigma_next - nodes[0]) / 2
    taus = nodes[0] + half * (points + 1)
    out = []
    for j, node in enumerate(nodes):
        basis = np.ones_like(taus)
        for k, other in enumerate(nodes):
            if k != j:
                basis *= (taus - other) / (node - other)
        out.append(float(half * np.dot(weights, basis)))
    return out


def lms_step(x: torch.Tensor, slopes: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """x + sum_j c_j d_j: slopes d = (x - x0) / sigma, newest first, with lms_coefficients' weights."""
    for coefficient, slope in zip(coefficients, slopes):
        x = x + coefficient * slope
    return x


def sample_lms(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
               order: int = 4) -> torch.Tensor:
    """Run LMS of up to `order` from x at noise level sigmas[0] through sigmas (ending in 0)."""
    slopes: list[torch.Tensor] = []
    for i, t in enumerate(timesteps):
        slopes = [(x - _denoise(denoiser, x, t, sigmas[i])) / sigmas[i], *slopes][:order]
        x = lms_step(x, slopes, lms_coefficients([sigmas[i + 1]] + [sigmas[i - k] for k in range(len(slopes))]))
    return x


class LMSDiscreteScheduler(_SigmaScheduler):
    """diffusers' LMSDiscreteScheduler protocol over `lms_step`: the linear multistep method on the probability-flow
    ODE in sigma, of the order step() is given (4 by default) once that many slopes are at hand. Its state is the
    last steps' (index, slope). A step that does not follow them (img2img's first) starts afresh at first order,
    where diffusers' applies the order's weights to the one slope it has."""
    config_class = LMSConfig

    def _reset(self) -> None:
        self._slopes: list[tuple[int, torch.Tensor]] = []  # newest first

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True, generator=None):
        """`generator`: unused (deterministic), taken as every latentdiff scheduler takes it."""
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order={order!r}: a positive int (diffusers' default 4)")
        i = self.index_for_timestep(timestep)
        sigma = self.sigmas[i]
        x0 = self._x0(model_output, sample.float(), sigma).to(sample.dtype)
        slopes = [(sample - x0) / sigma]
        for k, (index, slope) in enumerate(self._slopes, 1):
            if index != i - k or len(slopes) == order:
                break
            slopes.append(slope)
        self._slopes = [(i, slopes[0])] + [(i - k, s) for k, s in enumerate(slopes[1:order - 1], 1)]
        levels = [self.sigmas[i + 1]] + [self.sigmas[i - k] for k in range(len(slopes))]
        prev = lms_step(sample, slopes, lms_coefficients(levels))
        self._finish_step(i)
        out = SchedulerOutput(prev, x0)
        return out if return_dict else out.to_tuple()
