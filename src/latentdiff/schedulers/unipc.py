"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"):
a multistep solver of the diffusion ODE in log-SNR time, written for the data prediction x0. Each step predicts the
next sample from the last x0 estimates (UniP); once the model has been evaluated there, that new estimate corrects
the prediction before the next step starts from it (UniC), which raises the order by one at no extra model call.
"""
from __future__ import annotations

import math

import torch

from ..guidance import Denoiser
from ..schedules import predict_x0_eps, vp_coefficients
from .base import SchedulerOutput
from .config import UniPCConfig
from .dpm_solver import LogSNRMultistepScheduler, _log_snr


def unipc_update(x: torch.Tensor, estimates: list[torch.Tensor], levels: list[torch.Tensor], sigma_next,
                 order: int, bh2: bool = True, estimate_next: torch.Tensor | None = None) -> torch.Tensor:
    """Move x from VE noise level levels[-1] to sigma_next with the x0 estimates made at `levels` (oldest first;
    the last one at x). Without `estimate_next`, UniP-`order` (the paper's eq. 8 with its B(h) = e^h - 1 for bh2, h
    for bh1), using the last `order` estimates; with the estimate made at sigma_next, UniC-`order` (eq. 7),
    which also weighs that one in. To sigma_next = 0 only order 1 is defined (it returns m_0).

    With lambda = log(alpha / sigma), h = lambda_next - lambda_0, the ratios r_k = (lambda_k - lambda_0) / h of
    earlier estimates m_k and D_k = (m_k - m_0) / r_k:
    x_next = (sigma_next / sigma_0) x - alpha_next (e^-h - 1) m_0 - alpha_next B(h) sum_k rho_k D_k,
    where the weights rho solve sum_k rho_k r_k^(i-1) = i! phi_(i+1)(-h) (-h) / B(h), i = 1..(number of D_k)."""
    coefficients = unipc_coefficients(levels, sigma_next, order, bh2, estimate_next is not None)
    return unipc_apply(x, estimates, coefficients, estimate_next)


def unipc_coefficients(levels: list[torch.Tensor], sigma_next, order: int, bh2: bool = True,
                       corrector: bool = False) -> tuple:
    """The scalars of unipc_update, which depend on the noise levels alone (a scheduler keeps them per step): the
    ratios r_k, the weights rho_k and the factors of x, m_0 and the weighted sum."""
    alpha_next, sigma_vp_next = vp_coefficients(sigma_next)
    alpha_0, sigma_vp_0 = vp_coefficients(levels[-1])
    lambda_0 = _log_snr(alpha_0, sigma_vp_0)
    h = _log_snr(alpha_next, sigma_vp_next) - lambda_0
    ratios = [(_log_snr(*vp_coefficients(levels[-1 - k])) - lambda_0) / h for k in range(1, order)]
    hh = -h
    h_phi_1 = torch.expm1(hh)  # (e^-h - 1): the first-order (DDIM) term
    b_h = torch.expm1(hh) if bh2 else hh
    rows = order if corrector else order - 1  # conditions on the weights
    rhs, phi, factorial = [], h_phi_1 / hh - 1, 1
    for i in range(1, rows + 1):
        rhs.append(phi * factorial / b_h)
        factorial *= i + 1
        phi = phi / hh - 1 / factorial
    terms = len(ratios) + corrector  # (the corrector's difference has r = 1)
    if not terms:
        weights = []
    elif (not corrector and order == 2) or (corrector and order == 1):
        weights = [torch.tensor(0.5)]  # the paper's choice for the lowest orders (as diffusers)
    else:
        system = torch.stack([torch.stack([r ** (i - 1) for r in ratios + [torch.ones(())] * corrector])
                              for i in range(1, rows + 1)])
        weights = list(torch.linalg.solve(system, torch.stack(rhs)))
    return ratios, weights, sigma_vp_next / sigma_vp_0, alpha_next * h_phi_1, alpha_next * b_h


def unipc_apply(x: torch.Tensor, estimates: list[torch.Tensor], coefficients: tuple,
                estimate_next: torch.Tensor | None = None) -> torch.Tensor:
    """unipc_update from its unipc_coefficients."""
    ratios, weights, x_factor, m0_factor, sum_factor = coefficients
    m0 = estimates[-1]
    differences = [(estimates[-1 - k] - m0) / r for k, r in enumerate(ratios, 1)]
    if estimate_next is not None:
        differences.append(estimate_next - m0)  # r = 1
    x_next = x_factor * x - m0_factor * m0
    if weights:  # (B(h) is -inf onto sigma = 0 for bh1: skipped when nothing is weighed, where diffusers' gives NaN)
        x_next = x_next - sum_factor * sum(w * d for w, d in zip(weights, differences))
    return x_next


def sample_unipc(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                 order: int = 2, bh2: bool = True, lower_order_final: bool = True) -> torch.Tensor:
    """Run UniPC from the VP sample x at sigmas[0] through sigmas (ending in 0): at each timestep the model's x0
    estimate first corrects the sample just predicted (not at the first), then the next one is predicted, with the
    order growing to `order` as estimates accumulate (and, with lower_order_final, shrinking over the last steps)."""
    estimates: list[torch.Tensor] = []
    previous: tuple[torch.Tensor, int] | None = None  # (sample the last prediction started from, its order)
    for i, t in enumerate(timesteps):
        alpha, sigma_vp = vp_coefficients(sigmas[i])
        x0, _ = denoiser(x, t, alpha, sigma_vp)
        if previous is not None:
            start, used = previous
            x = unipc_update(start, estimates, list(sigmas[i - len(estimates):i]), sigmas[i], used, bh2, x0)
        estimates = [*estimates, x0][-order:]
        used = min(order, len(timesteps) - i if lower_order_final else order, len(estimates))
        used = 1 if i == len(timesteps) - 1 else used
        previous = (x, used)
        x = unipc_update(x, estimates, list(sigmas[i + 1 - len(estimates):i + 1]), sigmas[i + 1], used, bh2)
    return x


class UniPCMultistepScheduler(LogSNRMultistepScheduler):
    """diffusers' UniPCMultistepScheduler protocol (predict_x0, bh1 or bh2, solver_order 1 to 3, disable_corrector)
    over `unipc_update`, on DPM-Solver's timesteps and noise levels (Karras ones with use_karras_sigmas). The state
    is the last x0 estimates and the sample the last prediction started from; a step that does not follow the
    previous one (a fresh start, img2img) corrects nothing and starts at first order, as in diffusers."""
    config_class = UniPCConfig
    round_karras_timesteps_always = True

    def _reset(self) -> None:
        self._last: int | None = None  # grid index of the last step
        self._estimates: list[torch.Tensor] = []  # x0 estimates of the last steps, oldest first
        self._start: tuple[torch.Tensor, int] | None = None  # (sample the last prediction started from, its order)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        c = self.config
        i = self.index_for_timestep(timestep)
        alpha, sigma_vp = self._vp(i)
        x = sample.float()
        x0 = predict_x0_eps(model_output.float(), x, alpha, sigma_vp, c.prediction_type)[0]
        if self._last != i - 1:
            self._reset()
        elif i - 1 not in c.disable_corrector:  # correct the last prediction with this step's estimate
            start, used = self._start
            x = unipc_apply(start, self._estimates, self._coefficients(i - 1, used, True), x0)
        self._estimates = [*self._estimates, x0][-c.solver_order:]
        order = min(c.solver_order, len(self._grid) - i if c.lower_order_final else math.inf, len(self._estimates))
        if i == len(self._grid) - 1:  # onto sigma = 0: x0 (higher orders divide by h = inf: diffusers' NaN)
            order = 1
        self._start, self._last = (x, order), i
        prev = unipc_apply(x, self._estimates, self._coefficients(i, order, False))
        self._finish_step(i)
        out = SchedulerOutput(prev.to(model_output.dtype), x0.to(model_output.dtype))
        return out if return_dict else out.to_tuple()

    def _coefficients(self, i: int, order: int, corrector: bool) -> tuple:
        """unipc_coefficients of the kept estimates, the newest made at step i, onto the next step's level (kept per
        step: Scheduler._scalar)."""
        return self._scalar(("unipc", i, order, len(self._estimates), corrector), lambda: unipc_coefficients(
            self._levels(i), self.sigmas[i + 1], order, self.config.solver_type == "bh2", corrector), self.sigmas)

    def _levels(self, i: int) -> list[torch.Tensor]:
        """The noise levels of the kept estimates, the newest made at step i."""
        return list(self.sigmas[i + 1 - len(self._estimates):i + 1])
