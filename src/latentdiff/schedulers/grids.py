"""Where a sampler evaluates the model: the inference timesteps and the matching noise levels.

Computed with numpy in the same dtypes diffusers uses (float64 arithmetic over float32 tables), so that timesteps
and sigmas come out identical for the same config.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps={num_inference_steps} is out of range; it must be between 1 and "
                         f"num_train_timesteps={num_train_timesteps}")
    return int(num_inference_steps)


def spaced_timesteps(num_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0,
                     round_linspace: bool = True, drop_last: bool = False) -> np.ndarray:
    """`num_steps` training timesteps, descending, spread over 0..T-1 as in Lin et al. 2023, table 2.

    leading:  0, k, 2k, ... (k = T // n) plus `steps_offset`: never reaches the noisiest step T-1.
    trailing: T-1, T-1-T/n, ... rounded: starts at the noisiest step.
    linspace: n evenly spaced points from 0 to T-1 (kept fractional when `round_linspace` is False, as Euler does).
    `drop_last`: space num_steps + 1 points and drop the last, as diffusers' DPM-Solver does for leading and
    linspace. A grid that would leave the training range or repeat a timestep (more steps than the spacing can
    place apart) is an error, not a sampler run that ends in NaN.
    """
    points = num_steps + drop_last
    if spacing == "linspace":
        steps = np.linspace(0, num_train_timesteps - 1, points)
        steps = steps.round() if round_linspace else steps
    elif spacing == "leading":
        steps = (np.arange(0, points) * (num_train_timesteps // points)).round() + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / points)) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}")
    steps = steps if spacing == "trailing" else steps[::-1].copy()
    steps = steps[:-1] if drop_last else steps
    if steps.max() > num_train_timesteps - 1:
        raise ValueError(f"num_inference_steps={num_steps} with steps_offset={steps_offset} gives timestep "
                         f"{int(steps.max())}, past the last training step {num_train_timesteps - 1}; use fewer "
                         "steps or a smaller steps_offset")
    if np.any(np.diff(steps) >= 0):
        raise ValueError(f"num_inference_steps={num_steps} is more than timestep_spacing={spacing!r} can place "
                         f"apart over {num_train_timesteps} training steps (timesteps would repeat); use fewer steps")
    return steps


def interp_sigmas(timesteps: np.ndarray, sigma_table: np.ndarray) -> np.ndarray:
    """Noise levels at (possibly fractional) timesteps, linear in sigma between training steps."""
    return np.interp(timesteps, np.arange(0, len(sigma_table)), sigma_table)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, rho = 7.
    Spends more steps at low noise, where the ODE curves most."""
    ramp = np.linspace(0, 1, num_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Noise levels evenly spaced in log sigma from sigma_max down to sigma_min (diffusers' use_exponential_sigmas)."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_steps))


def beta_sigmas(sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6,
                beta: float = 0.6) -> np.ndarray:
    """Noise levels at the quantiles of a Beta(alpha, beta) distribution (Lee et al. 2024, "Beta Sampling is All You
    Need"; diffusers' use_beta_sigmas, alpha = beta = 0.6): sigma_min + q (sigma_max - sigma_min) for q the quantile
    of 1 - i/(n-1), i = 0..n-1. With alpha, beta < 1 the density is highest at both ends, so the steps crowd at the
    highest and the lowest noise levels and spread out in between."""
    quantiles = [beta_quantile(1.0 - p, alpha, beta) for p in np.linspace(0, 1, num_steps)]
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


def beta_quantile(p: float, a: float, b: float) -> float:
    """The x in [0, 1] where the regularized incomplete beta function I_x(a, b) (the CDF of Beta(a, b)) reaches p:
    Newton's method on I_x - p, kept inside a shrinking bracket (bisection where a Newton step would leave it), to
    float64 resolution. Above the median it solves for 1 - x (I_{1-x}(b, a) = 1 - p, exact in float64), where the
    CDF's flat upper tail would otherwise turn its rounding into a large error in x."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    if p > 0.5:
        return 1.0 - beta_quantile(1.0 - p, b, a)
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)  # log B(a, b)
    low, high, x = 0.0, 1.0, 0.5
    for _ in range(200):
        f = incomplete_beta(x, a, b) - p
        if f == 0.0:
            return x
        if f > 0:
            high = x
        else:
            low = x
        density = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_norm)
        step = x - f / density
        x_new = step if low < step < high else 0.5 * (low + high)
        if x_new == x or high - low <= 4 * math.ulp(x):
            return x_new
        x = x_new
    return x


def incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) = B(x; a, b) / B(a, b), for a, b > 0: its continued
    fraction (Abramowitz & Stegun 26.5.8) evaluated by the modified Lentz method, on the side of the mean where it
    converges fast (I_x(a, b) = 1 - I_{1-x}(b, a) on the other)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300

    def nonzero(v: float) -> float:
        return v if abs(v) > tiny else tiny

    # 1 / (1 + d1 / (1 + d2 / (1 + ...))) with d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)) and
    # d_{2m} = m (b-m) x / ((a+2m-1)(a+2m))
    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, 1000):
        for coefficient in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / nonzero(1.0 + coefficient * d)
            c = nonzero(1.0 + coefficient / c)
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * fraction / a


# the config keys that ask for a noise-level grid, and its function (sigma_min, sigma_max, num_steps) -> levels
SIGMA_GRIDS: dict[str, Callable[[float, float, int], np.ndarray]] = {
    "use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas, "use_beta_sigmas": beta_sigmas,
}


def sigma_grid(config) -> tuple[str, Callable[[float, float, int], np.ndarray]] | None:
    """The noise-level grid a scheduler config asks for in place of its spaced timesteps' levels: the key that asks
    for it and its function (SIGMA_GRIDS), or None (the configs refuse two at once)."""
    for key, grid in SIGMA_GRIDS.items():
        if config.get(key):
            return key, grid
    return None


def spaced_levels(config, steps: np.ndarray, table: np.ndarray, n: int, low: float | None = None,
                  high: float | None = None, round_karras: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, noise levels) of a grid of n steps: the spaced `steps` with their levels in the training `table`
    (interp_sigmas), or where the config asks for a sigma grid (sigma_grid: Karras, exponential, beta), that grid
    from `low` to `high` (by default the spaced levels' ends) with the fractional timesteps that fall on it
    (sigma_to_t); `round_karras`: a Karras grid's timesteps rounded to whole steps (diffusers rounds them for some
    solvers and leaves exponential and beta ones fractional)."""
    sigmas = interp_sigmas(steps, table)
    grid = sigma_grid(config)
    if grid is None:
        return steps, sigmas
    key, spaced = grid
    sigmas = spaced(sigmas[-1].item() if low is None else low, sigmas[0].item() if high is None else high, n)
    steps = sigma_to_t(sigmas, np.log(table))
    return (steps.round() if round_karras and key == "use_karras_sigmas" else steps), sigmas


def sigma_to_t(sigmas: np.ndarray, log_sigma_table: np.ndarray, float32: bool = False) -> np.ndarray:
    """The fractional training timestep of each noise level: linear interpolation in log sigma between the two
    neighbouring training steps (the inverse of the table, clipped to its ends); `float32`: the last interpolation
    in float32 (as diffusers' KDPM2 computes its midpoints' timesteps)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigma_table[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigma_table.shape[0] - 2)
    high = low + 1
    w = (log_sigma_table[low] - log_sigma) / (log_sigma_table[low] - log_sigma_table[high])
    w = np.clip(w, 0, 1)
    if float32:
        low, high = low.astype(np.float32), high.astype(np.float32)
    return ((1 - w) * low + w * high).reshape(np.shape(sigmas))
