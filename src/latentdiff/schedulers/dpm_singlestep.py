"""DPM-Solver++ singlestep (Lu et al. 2022, "DPM-Solver++", Algorithm 1; "DPM++ 2S" at order 2): the grid is cut
into groups of up to `solver_order` steps. A group's first step is a first-order (DDIM) step; its next steps
evaluate the model at the points the earlier steps reached, and each solves again from the group's first sample
with the estimates gathered so far (the multistep solver, dpm_solver.py, instead reuses the estimates of earlier
groups). The order at each step is diffusers' `get_order_list` with a last step of order 1 onto noise level 0."""
from __future__ import annotations

import torch

from ..guidance import Denoiser
from ..schedules import randn, vp_coefficients
from .base import SchedulerOutput
from .config import DPMSolverSinglestepConfig
from .dpm_solver import LogSNRMultistepScheduler, dpmpp_step


def singlestep_orders(steps: int, solver_order: int) -> list[int]:
    """The order of each of `steps` steps: groups 1, 2, (3), ..., the tail cut short so that the last group ends
    on the last step, which is first order (it lands on noise level 0). diffusers' list with lower_order_final,
    which it turns on whenever the final noise level is 0."""
    group = list(range(1, solver_order + 1))
    whole, left = divmod(steps, solver_order)
    if left == 0 and solver_order > 1:  # the last group is one step shorter, and the step left over is first order
        orders = group * (whole - 1) + group[:-1] + [1]
    else:
        orders = group * whole + group[:left]
    orders[-1] = 1
    return orders


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    alpha, sigma_vp = vp_coefficients(sigma)
    return torch.log(alpha) - torch.log(sigma_vp)


def dpmpp_singlestep_update(x: torch.Tensor, estimates: list, sigma_next,
                            noise: torch.Tensor | None = None) -> torch.Tensor:
    """From the sample x at the first estimate's noise level to `sigma_next`, with the group's estimates
    [(x0, sigma), ...] oldest first (1 to 3 of them: the order of the update). With h = lambda_next - lambda_start
    and D1 = (x0_newest - x0_start) / r, r = (lambda_newest - lambda_start) / h, the ODE step is
    x_next = (sigma_t,next / sigma_t) x - alpha_next (e^-h - 1) (x0_start + D1 / 2) at order 2 and
    x_next = (sigma_t,next / sigma_t) x - alpha_next (e^-h - 1) x0_start + alpha_next ((e^-h - 1) / h + 1) D1 at
    order 3 (the midpoint forms; order 3 reads only the first and newest estimates, the middle one having placed
    the newest). `noise`: the SDE form, whose noise scale is sigma_t,next sqrt(1 - e^-2h), as in dpmpp_step."""
    if len(estimates) == 1:
        return dpmpp_step(x, estimates, sigma_next, noise)
    (x0, sigma), (newest, sigma_newest) = estimates[0], estimates[-1]
    alpha_next, sigma_vp_next = vp_coefficients(sigma_next)
    sigma_vp = vp_coefficients(sigma)[1]
    log_snr = _log_snr(sigma)
    h = _log_snr(sigma_next) - log_snr
    d1 = (newest - x0) / ((_log_snr(sigma_newest) - log_snr) / h)
    if noise is None:
        phi = torch.exp(-h) - 1.0  # (the ODE's e^-h - 1, which is negative)
        x_next = (sigma_vp_next / sigma_vp) * x - (alpha_next * phi) * x0
        if len(estimates) == 2:
            return x_next - (0.5 * (alpha_next * phi)) * d1
        return x_next + (alpha_next * (phi / h + 1.0)) * d1
    decay = 1.0 - torch.exp(-2.0 * h)
    x_next = (sigma_vp_next / sigma_vp * torch.exp(-h)) * x + (alpha_next * decay) * x0
    if len(estimates) == 2:
        x_next = x_next + (0.5 * (alpha_next * decay)) * d1
    else:
        x_next = x_next + (alpha_next * (decay / (-2.0 * h) + 1.0)) * d1
    return x_next + (sigma_vp_next * torch.sqrt(decay)) * noise


def sample_dpmpp_singlestep(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                            order: int = 2, sde: bool = False, generator=None) -> torch.Tensor:
    """Run DPM-Solver++ singlestep of `order` (1 to 3) from the VP sample x at sigmas[0] through sigmas (ending in
    0): the group of each step as singlestep_orders lays them out. `sde`: the SDE form, its noise drawn from
    `generator` at every step."""
    estimates: list = []
    start = x
    for i, (t, order_i) in enumerate(zip(timesteps, singlestep_orders(len(timesteps), order))):
        alpha, sigma_vp = vp_coefficients(sigmas[i])
        x0, _ = denoiser(x, t, alpha, sigma_vp)
        if order_i == 1:
            start, estimates = x, []
        estimates.append((x0, sigmas[i]))
        noise = randn(x.shape, generator, x.device, torch.float32) if sde else None
        x = dpmpp_singlestep_update(start, estimates, sigmas[i + 1], noise)
    return x


class DPMSolverSinglestepScheduler(LogSNRMultistepScheduler):
    """diffusers' DPMSolverSinglestepScheduler protocol (algorithm_type "dpmsolver++" or "sde-dpmsolver++",
    solver_order 1 to 3, midpoint) over `dpmpp_singlestep_update`. Its grid is always "linspace" (N + 1 points,
    the last dropped), or Karras noise levels at rounded timesteps. The state is the current group: where it began
    (grid index and sample) and its estimates, reset by set_timesteps; a step that does not continue the group (a
    fresh start, img2img) starts a new one at first order, as in diffusers."""
    config_class = DPMSolverSinglestepConfig
    custom_grids = frozenset({"timesteps"})
    round_karras_timesteps_always = True

    def _make_grid(self, num_inference_steps: int, device, **custom) -> torch.Tensor:
        steps = super()._make_grid(num_inference_steps, device, **custom)
        self._orders = singlestep_orders(len(steps), self.config.solver_order)  # each grid step's order
        return steps

    def _reset(self) -> None:
        self._group: tuple[int, torch.Tensor, list] | None = None  # (first grid index, its sample, [(x0, sigma)])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        i = self.index_for_timestep(timestep)
        x, x0, noise = self._estimate(model_output, sample, i, generator, variance_noise)
        group = self._group
        if self._orders[i] == 1 or group is None or group[0] + len(group[2]) != i:  # (not the group's next step)
            group = self._group = (i, x, [])
        group[2].append((x0, self.sigmas[i]))
        prev = dpmpp_singlestep_update(group[1], group[2], self.sigmas[i + 1], noise)
        self._finish_step(i)
        out = SchedulerOutput(prev.to(model_output.dtype), x0.to(model_output.dtype))
        return out if return_dict else out.to_tuple()
