"""DEIS (Zhang and Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"), its multistep
"log-rho" form as diffusers implements it: the probability-flow ODE in rho = sigma / alpha (the VE noise level)
reads d(x / alpha) = eps d rho, so a step integrates the noise estimates over rho exactly, after fitting the last
ones with a polynomial in log rho (Lagrange interpolation, order 1 to 3; order 1 is DDIM).

As diffusers' DEISMultistepScheduler, sampling stops at the smallest training noise level (sigma_min, not 0), and
with Karras sigmas its last step goes from that level to itself, so the last step moves nothing there."""
from __future__ import annotations

import numpy as np
import torch

from ..guidance import Denoiser
from ..schedules import predict_x0_eps, ve_sigmas, vp_coefficients
from .base import SchedulerOutput
from .config import DEISConfig
from .dpm_solver import LogSNRMultistepScheduler
from .grids import sigma_grid


def deis_coefficients(rho_next: float, rhos: list[float]) -> list[float]:
    """w_k = integral from rhos[0] to rho_next of l_k(log rho) d rho, for the Lagrange basis polynomials l_k in
    log rho through the nodes log(rhos) (newest first; l_k is 1 at node k, 0 at the others). With u = log rho the
    integrand is p(u) e^u, whose antiderivative is e^u (p - p' + p'' - ...) for a polynomial p. In float64."""
    nodes = np.log(np.asarray(rhos, dtype=np.float64))
    ends = np.log(np.asarray([rhos[0], rho_next], dtype=np.float64))
    weights = []
    for k, node in enumerate(nodes):
        others = np.delete(nodes, k)
        basis = np.poly1d(np.poly(others) / np.prod(node - others))
        terms, derivative, sign = np.poly1d([0.0]), basis, 1.0
        while derivative.order > 0 or derivative.coeffs.any():
            terms, derivative, sign = terms + sign * derivative, derivative.deriv(), -sign
        start, end = np.exp(ends) * terms(ends)
        weights.append(float(end - start))
    return weights


def deis_step(x0: torch.Tensor, estimates: list, sigma_next: float, weights: list[float] | None = None) -> torch.Tensor:
    """To `sigma_next` from the noise level of the newest estimate (VE levels, i.e. rho, as Python floats), given
    its x0 and the noise estimates [(eps, sigma), ...], newest first, 1 to 3 of them (the order). The exponential
    integrator's x_next = alpha_next (x / alpha + sum_k w_k eps_k), w = deis_coefficients, written with
    x / alpha = x0 + rho eps_0 and sum_k w_k = rho_next - rho:
    x_next = alpha_next (x0 + rho_next eps_0 + sum_(k>0) w_k (eps_k - eps_0)). At high noise x / alpha and the
    weights are large and of opposite signs; this form adds no such pair (in float32 the first form loses up to
    three digits over a step from the noisiest level of the cosine schedule). `weights`: deis_coefficients of
    these levels, where the caller has them."""
    alpha_next = vp_coefficients(sigma_next)[0]
    (eps, _), older = estimates[0], estimates[1:]
    total = x0 + sigma_next * eps
    if older:
        weights = weights or deis_coefficients(sigma_next, [sigma for _, sigma in estimates])
        for w, (eps_k, _) in zip(weights[1:], older):
            total = total + w * (eps_k - eps)
    return alpha_next * total


def deis_order_at(i: int, steps: int, history: int, solver_order: int, lower_order_final: bool) -> int:
    """diffusers' choice: as high as the config and the history allow, and under 15 steps with lower_order_final,
    first order at the last step and at most second order at the one before (sampling ends at sigma_min > 0, so
    with 15 steps or more the last step keeps its order)."""
    short = lower_order_final and steps < 15
    order = min(solver_order, 1 + history)
    if short and i == steps - 1:
        return 1
    return min(order, 2) if short and i == steps - 2 else order


def sample_deis(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                order: int = 2, lower_order_final: bool = True) -> torch.Tensor:
    """Run multistep DEIS of `order` (1 to 3) from the VP sample x at sigmas[0] through sigmas (len(timesteps) + 1
    levels; DEISMultistepScheduler's end at sigma_min)."""
    estimates: list = []
    levels = sigmas.double().tolist()
    for i, t in enumerate(timesteps):
        alpha, sigma_vp = vp_coefficients(sigmas[i])
        x0, eps = denoiser(x, t, alpha, sigma_vp)
        estimates = [(eps, levels[i]), *estimates][:3]
        used = deis_order_at(i, len(timesteps), len(estimates) - 1, order, lower_order_final)
        x = deis_step(x0, estimates[:used], levels[i + 1])
    return x


class DEISMultistepScheduler(LogSNRMultistepScheduler):
    """diffusers' DEISMultistepScheduler protocol (algorithm_type "deis", solver_type "logrho", solver_order 1 to
    3) over `deis_step`: DPM-Solver's grids (timestep spacings, Karras sigmas at rounded timesteps) ending at the
    smallest training noise level. The only state is the last steps' (index, eps), reset by set_timesteps; a step
    that does not follow them is first order, as in diffusers."""
    config_class = DEISConfig
    round_karras_timesteps_always = True

    def _last_level(self, sigmas: np.ndarray) -> float:
        """diffusers' ends: Karras, exponential and beta grids repeat their last level; the others end at the first
        training step's level."""
        return sigmas[-1] if sigma_grid(self.config) is not None else ve_sigmas(self.alphas_cumprod)[0].item()

    def _make_grid(self, num_inference_steps: int, device, **custom) -> torch.Tensor:
        timesteps = super()._make_grid(num_inference_steps, device, **custom)
        self._levels = self.sigmas.double().tolist()  # (read once here, not in every step)
        return timesteps

    def _reset(self) -> None:
        self._previous: list[tuple[int, torch.Tensor]] = []  # the last steps' (grid index, eps), newest first

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        i = self.index_for_timestep(timestep)
        alpha, sigma_vp = self._vp(i)
        x = sample.float()
        x0, eps = predict_x0_eps(model_output.float(), x, alpha, sigma_vp, self.config.prediction_type)
        kept = self._history(i, eps, self._levels)
        order = deis_order_at(i, len(self._grid), len(kept) - 1, self.config.solver_order,
                              self.config.lower_order_final)
        levels = [sigma for _, sigma in kept[:order]]  # (those of grid steps i, i - 1, ...: kept per step)
        weights = self._scalar(("deis", i, order), lambda: deis_coefficients(self._levels[i + 1], levels), self.sigmas)
        prev = deis_step(x0, kept[:order], self._levels[i + 1], weights)
        self._finish_step(i)
        out = SchedulerOutput(prev.to(model_output.dtype), x0.to(model_output.dtype))
        return out if return_dict else out.to_tuple()
