"""The diffusion process itself: noise schedules, the closed-form forward process and the conversions between
what a network predicts (eps, v or x0).

Notation (variance preserving, Ho et al. 2020): a sample at step t is x_t = alpha_t * x0 + sigma_t * eps with
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and abar_t = prod_{s<=t} (1 - beta_s). The samplers in sigma
space (Euler, Karras et al. 2022) use the variance-exploding view of the same process, x = x_t / alpha_t =
x0 + s * eps with s = sigma_t / alpha_t; `ve_sigmas` and `vp_coefficients` convert between the two.

Numerics follow diffusers on purpose (float32 betas from torch.linspace, a float64 cosine schedule rounded to
float32, cumprod in float32), so that the same config gives bit-identical tables.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ---- beta schedules -----------------------------------------------------------------------------------------
def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Betas evenly spaced from beta_start to beta_end (Ho et al. 2020, sec. 4: 1e-4 to 0.02 over T=1000)."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule (Rombach et al. 2022, the CompVis "linear" schedule): sqrt(beta) evenly spaced."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def cosine_betas(num_train_timesteps: int = 1000, max_beta: float = 0.999, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008, and
    beta_t = 1 - abar(t+1)/abar(t) capped at 0.999 so that the last steps stay finite."""
    def abar(u: float) -> float:
        return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / num_train_timesteps) / abar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, trained_betas: Sequence[float] | None = None) -> torch.Tensor:
    """The betas a diffusers scheduler config describes; `trained_betas`, when given, wins over the schedule."""
    if trained_betas is not None:
        betas = torch.tensor(list(trained_betas), dtype=torch.float32)
        if betas.ndim != 1 or len(betas) != num_train_timesteps:
            raise ValueError(f"trained_betas has {betas.numel()} values but num_train_timesteps is "
                             f"{num_train_timesteps}; give one beta per training step")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("trained_betas must all lie strictly between 0 and 1")
        return betas
    if beta_schedule == "linear":
        return linear_betas(num_train_timesteps, beta_start, beta_end)
    if beta_schedule == "scaled_linear":
        return scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; use one of {BETA_SCHEDULES} "
                     "or give trained_betas")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """The betas rescaled so that the last step's signal is exactly zero (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps Are Flawed", Algorithm 1): sqrt(abar) is shifted so its last value is 0 and scaled
    so its first is unchanged. The model then learns to start from pure noise, as sampling does (with v-prediction:
    eps-prediction carries no information at zero SNR). float32 in diffusers' order of operations."""
    root = alphas_cumprod(betas).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    abar = ((root - last) * (first / (first - last))) ** 2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4), kept in float32 like diffusers."""
    return torch.cumprod(1.0 - betas, dim=0)


def ve_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise level of the variance-exploding view, s_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, tab. 1)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the variance-preserving sample for VE noise level s: 1/sqrt(1+s^2), s/sqrt(1+s^2)."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


# ---- the forward process q(x_t | x_0) ------------------------------------------------------------------------
def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] coefficients reshaped to broadcast over a [B, ...] batch."""
    return values.flatten().reshape(-1, *([1] * (like.ndim - 1)))


def abar_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t of each sample's timestep, on `like`'s device and dtype, shaped to broadcast over `like`'s batch."""
    timesteps = torch.as_tensor(timesteps, device=like.device)
    if timesteps.is_floating_point():
        raise ValueError("timesteps must be integer training steps (0..T-1), got a floating-point tensor")
    return _per_sample(alphas_cumprod.to(device=like.device, dtype=like.dtype)[timesteps], like)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, one t per sample (Ho et al. 2020, eq. 4)."""
    abar = abar_at(alphas_cumprod, timesteps, x0)
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) (Kingma et al. 2021), e.g. for min-SNR loss weights (Hang et al.
    2023)."""
    abar = alphas_cumprod[torch.as_tensor(timesteps, device=alphas_cumprod.device)]
    return abar / (1 - abar)


def v_target(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Velocity v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, sec. 4 and app. D), one t per sample."""
    abar = abar_at(alphas_cumprod, timesteps, x0)
    return abar**0.5 * noise - (1 - abar) ** 0.5 * x0


# ---- converting predictions (x_t = alpha x0 + sigma eps, v = alpha eps - sigma x0) -----------------------------
def eps_to_x0(eps: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return (x - sigma * eps) / alpha


def x0_to_eps(x0: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return (x - alpha * x0) / sigma


def v_to_x0(v: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """alpha x - sigma v = x0 because alpha^2 + sigma^2 = 1."""
    return alpha * x - sigma * v


def v_to_eps(v: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return alpha * v + sigma * x


def x0_eps_to_v(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    return alpha * eps - sigma * x0


def predict_x0_eps(output: torch.Tensor, x: torch.Tensor, alpha, sigma,
                   prediction_type: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a network `output` of the given kind at the VP sample x = alpha x0 + sigma eps."""
    if prediction_type == "epsilon":
        return eps_to_x0(output, x, alpha, sigma), output
    if prediction_type == "v_prediction":
        return v_to_x0(output, x, alpha, sigma), v_to_eps(output, x, alpha, sigma)
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")


# ---- noise ---------------------------------------------------------------------------------------------------
def randn(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator] | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise drawn the way diffusers draws it: on the generator's device then moved, and with a list
    of generators one row each, so a seed gives the same image whatever batch it is generated in."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one generator per "
                             "sample or a single generator")
        else:
            rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
            return torch.cat(rows).to(device)
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)
