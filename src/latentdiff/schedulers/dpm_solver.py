"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2 with the midpoint form of diffusers): a second
order multistep solver of the diffusion ODE in log-SNR time that reuses the previous step's x0 estimate (its
third-order form, 3M, the last two); and its SDE form (algorithm_type "sde-dpmsolver++", "DPM++ 2M SDE"), which
solves the reverse SDE instead and adds fresh noise at every step."""
from __future__ import annotations

import numpy as np
import torch

from ..guidance import Denoiser
from ..schedules import predict_x0_eps, randn, ve_sigmas, vp_coefficients
from .base import Scheduler, SchedulerOutput
from .config import DPMSolverConfig
from .grids import sigma_grid, spaced_levels, spaced_timesteps


def _log_snr(alpha: torch.Tensor, sigma_vp: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha_t / sigma_t) (+inf at sigma = 0), from vp_coefficients(sigma)."""
    return torch.log(alpha) - torch.log(sigma_vp)


def dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor | None, sigma_prev, sigma,
                  sigma_next, noise: torch.Tensor | None = None) -> torch.Tensor:
    """From VP sample x at VE level `sigma` to `sigma_next`, with h = lambda_next - lambda:
    x_next = (sigma_t,next / sigma_t) x - alpha_next (e^-h - 1) D, where D = x0 (first order: DDIM written in
    data prediction, DPM-Solver++ sec. 4) or, given the previous estimate x0_prev at `sigma_prev`,
    D = x0 + (x0 - x0_prev) / (2 r) with r = (lambda - lambda_prev) / h (the 2M update, Algorithm 2). At
    sigma_next = 0 the first-order step returns x0.
    Given `noise` (standard normal, like x), the SDE form (Lu et al. 2022, sec. 5 / appendix): x_next =
    (sigma_t,next / sigma_t) e^-h x + alpha_next (1 - e^-2h) D + sigma_t,next sqrt(1 - e^-2h) noise."""
    history = [] if x0_prev is None else [(x0_prev, sigma_prev)]
    return dpmpp_step(x, [(x0, sigma), *history], sigma_next, noise)


def dpmpp_step(x: torch.Tensor, estimates: list, sigma_next, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DPM-Solver++ multistep update of order len(estimates) (1 to 3) from the sample x at the newest
    estimate's noise level to `sigma_next`. `estimates`: [(x0, sigma), (x0_prev, sigma_prev), ...], newest first.
    Order 2 is dpmpp_2m_step's; order 3 (DPM++ 3M) corrects D with the first and second divided differences of the
    last three estimates in log-SNR time, D1 and D2, weighted by the phi functions of h (phi_2, phi_3 terms;
    DPM-Solver++, appendix B). `noise`: the SDE form."""
    coefficients = dpmpp_coefficients([sigma for _, sigma in estimates], sigma_next, noise is not None)
    return dpmpp_update(x, [x0 for x0, _ in estimates], coefficients, noise)


def dpmpp_coefficients(levels: list, sigma_next, sde: bool = False) -> tuple[list, list]:
    """The scalars of dpmpp_step from the noise levels of its estimates (newest first) to `sigma_next`: they depend
    on the levels alone, so a scheduler works them out once per step of its grid (some forty operations on 0-dim
    tensors, which cost host time, not arithmetic). (divisors, weights): the divided differences' factors (order 2:
    D's weight of x0 - x0_prev; order 3: r0, r1, r0 / (r0 + r1), r0 + r1) and the weight of each term of the update,
    [x, D] (orders 1, 2) or [x, x0, D1, D2] (order 3), then the noise's (`sde`); dpmpp_update adds them up."""
    sigma, *older = levels
    alpha_next, sigma_vp_next = vp_coefficients(sigma_next)
    alpha, sigma_vp = vp_coefficients(sigma)
    log_snr = _log_snr(alpha, sigma_vp)
    h = _log_snr(alpha_next, sigma_vp_next) - log_snr
    lambdas = [log_snr] + [_log_snr(*vp_coefficients(s)) for s in older]
    decay = torch.exp(-2.0 * h) if sde else None
    noise = [sigma_vp_next * torch.sqrt(1.0 - decay)] if sde else []
    # (a term subtracted in the paper's formula is added with its weight negated: the same bits)
    if len(older) < 2:
        divisors = [0.5 / ((log_snr - lambdas[1]) / h)] if older else []
        if not sde:
            return divisors, [sigma_vp_next / sigma_vp, -(alpha_next * (torch.exp(-h) - 1.0))]
        return divisors, [sigma_vp_next / sigma_vp * torch.exp(-h), alpha_next * (1 - decay), *noise]
    r0, r1 = (lambdas[0] - lambdas[1]) / h, (lambdas[1] - lambdas[2]) / h
    divisors = [r0, r1, r0 / (r0 + r1), r0 + r1]
    if not sde:
        phi = torch.exp(-h) - 1.0
        return divisors, [sigma_vp_next / sigma_vp, -(alpha_next * phi), alpha_next * (phi / h + 1.0),
                          -(alpha_next * ((phi + h) / h ** 2 - 0.5))]
    return divisors, [sigma_vp_next / sigma_vp * torch.exp(-h), alpha_next * (1.0 - decay),
                      alpha_next * ((1.0 - decay) / (-2.0 * h) + 1.0),
                      alpha_next * ((1.0 - decay - 2.0 * h) / (2.0 * h) ** 2 - 0.5), *noise]


def dpmpp_update(x: torch.Tensor, estimates: list[torch.Tensor], coefficients: tuple[list, list],
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """dpmpp_step from the x0 estimates (newest first) and their dpmpp_coefficients: D = x0 + c (x0 - x0_prev) at
    order 2; D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1) and D2 = (D1_0 - D1_1) / (r0 + r1) from the divided
    differences D1_0 = (x0 - x0_1) / r0 and D1_1 = (x0_1 - x0_2) / r1 at order 3; then the weighted sum."""
    divisors, weights = coefficients
    if len(estimates) < 3:
        x0 = estimates[0]
        terms = [x, x0 if len(estimates) == 1 else x0 + divisors[0] * (x0 - estimates[1])]
    else:
        (x0, x0_1, x0_2), (r0, r1, share, span) = estimates, divisors
        d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
        change = d1_0 - d1_1
        terms = [x, x0, d1_0 + share * change, change / span]
    if noise is not None:
        terms.append(noise)
    out = weights[0] * terms[0]
    for weight, term in zip(weights[1:], terms[1:]):
        out = out + weight * term
    return out


def solver_order_at(i: int, steps: int, history: int, solver_order: int, lower_order_final: bool) -> int:
    """The order of step i of `steps` with `history` earlier estimates at hand, as diffusers picks it: as high as
    the config and the history allow, first order onto noise level 0 (the last step), and at most second order in
    the step before when lower_order_final and fewer than 15 steps (stability with few steps)."""
    if i == steps - 1:
        return 1
    order = min(solver_order, 1 + history)
    return min(order, 2) if i == steps - 2 and lower_order_final and steps < 15 else order


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                    sde: bool = False, generator=None, order: int = 2, lower_order_final: bool = True) -> torch.Tensor:
    """Run DPM-Solver++(2M) from the VP sample x at sigmas[0] through sigmas (ending in 0). The first step has no
    history and the last one lands on sigma = 0, so both are first order. `sde`: the SDE form, its noise drawn
    from `generator` (one per image, or one for all) at every step. `order` 1 or 3: DPM-Solver++ 1S (DDIM) or 3M
    (solver_order_at picks each step's)."""
    estimates: list = []
    for i, t in enumerate(timesteps):
        alpha, sigma_vp = vp_coefficients(sigmas[i])
        x0, _ = denoiser(x, t, alpha, sigma_vp)
        estimates = [(x0, sigmas[i]), *estimates][:3]
        used = solver_order_at(i, len(timesteps), len(estimates) - 1, order, lower_order_final)
        noise = randn(x.shape, generator, x.device, torch.float32) if sde else None
        x = dpmpp_step(x, estimates[:used], sigmas[i + 1], noise)
    return x


class LogSNRMultistepScheduler(Scheduler):
    """What the log-SNR multistep solvers (DPM-Solver++, UniPC) share as diffusers sets them up: timesteps spaced
    over n + 1 points with the last dropped ("leading", "linspace"; "trailing" as is) or placed at Karras noise
    levels, a VE noise level per step and 0 after the last, and add_noise at those levels."""
    round_karras_timesteps_always = False  # DPM-Solver keeps the cosine schedule's fractional Karras timesteps
    finite_terminal_sigma = True

    def __init__(self, **config):
        super().__init__(**config)
        self.sigmas = ve_sigmas(self.alphas_cumprod)

    def _make_grid(self, num_inference_steps: int, device, timesteps: np.ndarray | None = None) -> torch.Tensor:
        c, n = self.config, num_inference_steps
        table = ve_sigmas(self.alphas_cumprod).numpy()
        grid = sigma_grid(c)
        if timesteps is not None:
            if grid is not None:
                raise ValueError(f"custom timesteps with {grid[0]}=True: that grid places the timesteps itself; "
                                 f"turn {grid[0]} off")
            steps = timesteps.astype(np.int64)  # (as diffusers: whole training steps)
        elif c.timestep_spacing == "trailing":
            steps = spaced_timesteps(n, c.num_train_timesteps, "trailing")
        else:  # diffusers spaces n + 1 points and drops the last (t = 0 or steps_offset) for these solvers
            steps = spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing, c.steps_offset, drop_last=True)
        # (a sigma grid spans the whole training table here; diffusers truncates exponential and beta timesteps)
        steps, sigmas = spaced_levels(c, steps, table, n, table[0].item(), table[-1].item(), round_karras=(
            self.round_karras_timesteps_always or c.beta_schedule != "squaredcos_cap_v2"))
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [self._last_level(sigmas)]]).astype(np.float32))
        return torch.from_numpy(steps).to(device=device, dtype=torch.int64)

    def _last_level(self, sigmas: np.ndarray) -> float:
        """The noise level sampling ends at, after the grid's `sigmas`: 0 (DEIS ends elsewhere)."""
        return 0.0

    def _vp(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """vp_coefficients of grid step i's noise level, kept per step (Scheduler._scalar)."""
        return self._scalar(("vp", i), lambda: vp_coefficients(self.sigmas[i]), self.sigmas)

    def _estimate(self, model_output: torch.Tensor, sample: torch.Tensor, i: int, generator=None,
                  variance_noise: torch.Tensor | None = None):
        """(x, x0, noise) for a step at grid index i, in float32: the sample, its x0 estimate from the model's output,
        and the SDE form's noise (`variance_noise`, or drawn from `generator`; None for the ODE)."""
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = (variance_noise.to(model_output.device, torch.float32) if variance_noise is not None else
                     randn(model_output.shape, generator, model_output.device, torch.float32))
        alpha, sigma_vp = self._vp(i)
        x = sample.float()
        return x, predict_x0_eps(model_output.float(), x, alpha, sigma_vp, self.config.prediction_type)[0], noise

    def _history(self, i: int, estimate: torch.Tensor, levels) -> list[tuple[torch.Tensor, object]]:
        """[(estimate, its noise level), ...] of step i and of the steps just before it, newest first (a step that
        does not follow the last ones starts afresh), keeping this step's and the one before for the next step."""
        kept = [(estimate, levels[i])]
        for k, (index, earlier) in enumerate(self._previous, 1):
            if index != i - k:
                break
            kept.append((earlier, levels[index]))
        self._previous = [(i, estimate)] + [(index, e) for index, e in self._previous[:1] if index == i - 1]
        return kept

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """alpha x0 + sigma eps at the noise level the grid assigns to each (grid) timestep."""
        sigma = self.sigmas[[self.index_for_timestep(t) for t in torch.as_tensor(timesteps).reshape(-1)]]
        alpha, sigma_vp = vp_coefficients(sigma.to(original_samples).reshape(-1, *([1] * (original_samples.ndim - 1))))
        return alpha * original_samples + sigma_vp * noise


class DPMSolverMultistepScheduler(LogSNRMultistepScheduler):
    """diffusers' DPMSolverMultistepScheduler protocol (algorithm_type "dpmsolver++" or "sde-dpmsolver++",
    solver_order 1 to 3 (2: "DPM++ 2M", 3: "DPM++ 3M"), midpoint) over `dpmpp_step`. The only state is the last
    steps' (index, x0), reset by set_timesteps; a step that does not follow them (a fresh start, img2img) is first
    order, as in diffusers. The SDE
    form draws its noise from `generator` in every step (or takes `variance_noise`), as diffusers' does."""
    config_class = DPMSolverConfig
    custom_grids = frozenset({"timesteps"})

    def _reset(self) -> None:
        self._previous: list[tuple[int, torch.Tensor]] = []  # the last steps' (grid index, x0 estimate), newest first

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        i = self.index_for_timestep(timestep)
        x, x0, noise = self._estimate(model_output, sample, i, generator, variance_noise)
        kept = self._history(i, x0, self.sigmas)
        order = solver_order_at(i, len(self._grid), len(kept) - 1, self.config.solver_order,
                                self.config.lower_order_final)
        sde = noise is not None  # (the levels of kept[:order] are those of grid steps i, i - 1, ...)
        coefficients = self._scalar(("dpmpp", i, order, sde), lambda: dpmpp_coefficients(
            [sigma for _, sigma in kept[:order]], self.sigmas[i + 1], sde), self.sigmas)
        prev = dpmpp_update(x, [x0 for x0, _ in kept[:order]], coefficients, noise)
        self._finish_step(i)
        out = SchedulerOutput(prev.to(model_output.dtype), x0.to(model_output.dtype))
        return out if return_dict else out.to_tuple()
