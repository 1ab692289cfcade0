"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"): classical ODE methods
(Runge-Kutta, Adams-Bashforth linear multistep) applied to the noise prediction, with the deterministic DDIM update
as the "transfer" that moves a sample between noise levels. Stable Diffusion 1.x ships it as PLMS: linear multistep
only (skip_prk_steps), started with one pseudo improved Euler step.
"""
from __future__ import annotations

import torch

from ..guidance import Denoiser
from ..schedules import predict_x0_eps
from .base import Scheduler, SchedulerOutput
from .config import PNDMConfig
from .grids import spaced_timesteps

RK_STEPS = 3  # PNDM proper runs this many pseudo Runge-Kutta steps (4 model calls each) before going multistep


def pndm_transfer(x: torch.Tensor, eps: torch.Tensor, abar, abar_prev) -> torch.Tensor:
    """The paper's eq. 9: the sample at cumulative alpha `abar` moved to `abar_prev` along the noise estimate eps,
    x' = sqrt(abar'/abar) x - (abar' - abar) eps / (abar sqrt(1 - abar') + sqrt(abar (1 - abar) abar')): DDIM's
    deterministic step with x0 eliminated. Evaluated in diffusers' order: near abar = 0 (the cosine schedule's
    last training steps) both terms are large and nearly cancel, so the order of the roundings shows."""
    return pndm_update(x, eps, pndm_coefficients(abar, abar_prev))


def pndm_coefficients(abar, abar_prev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scalars of pndm_transfer: sqrt(abar' / abar), abar' - abar and the denominator (a scheduler keeps them
    per pair of levels)."""
    abar, abar_prev = torch.as_tensor(abar), torch.as_tensor(abar_prev)
    denominator = abar * (1 - abar_prev) ** 0.5 + (abar * (1 - abar) * abar_prev) ** 0.5
    return (abar_prev / abar) ** 0.5, abar_prev - abar, denominator


def pndm_update(x: torch.Tensor, eps: torch.Tensor, coefficients: tuple) -> torch.Tensor:
    """pndm_transfer from its pndm_coefficients."""
    scale, change, denominator = coefficients
    return scale * x - change * eps / denominator


def multistep_eps(history: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the last noise estimates (oldest first, newest last) of order len(history),
    1 to 4 (the paper's eq. 12 at order 4; lower orders while the history fills). Any linear parameterisation of the
    network's output combines the same way."""
    e = history[::-1]  # e[0] the newest
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24


def sample_pndm(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                final_alpha_cumprod: float = 1.0, stride: int | None = None,
                runge_kutta: bool = False) -> torch.Tensor:
    """Run PNDM from x at timesteps[0] over the given (distinct, descending) timesteps, each step going from t to
    t - stride (stride defaults to T // len(timesteps); below 0 the level is `final_alpha_cumprod`).
    runge_kutta=False (PLMS): one pseudo improved Euler step (two model calls), then Adams-Bashforth of growing
    order up to 4. True (F-PNDM): the first three steps by pseudo 4th-order Runge-Kutta with midpoints at
    t - stride // 2 (four model calls each), then 4th-order Adams-Bashforth on their estimates. The noise estimates
    are combined, where the scheduler class (as diffusers) combines the network's outputs: the same for an
    eps-predicting model."""
    stride = stride or len(alphas_cumprod) // len(timesteps)
    final = torch.as_tensor(float(final_alpha_cumprod))

    def abar(t: int) -> torch.Tensor:
        return alphas_cumprod[t] if t >= 0 else final

    def eps_at(sample: torch.Tensor, t: int) -> torch.Tensor:
        a = abar(t)
        return denoiser(sample, torch.tensor(t), a**0.5, (1 - a) ** 0.5)[1]

    history: list[torch.Tensor] = []
    for i, t in enumerate(int(t) for t in timesteps):
        e = eps_at(x, t)
        history = [*history[-3:], e]
        if runge_kutta and i < RK_STEPS:
            half = t - stride // 2
            e2 = eps_at(pndm_transfer(x, e, abar(t), abar(half)), half)
            e3 = eps_at(pndm_transfer(x, e2, abar(t), abar(half)), half)
            e4 = eps_at(pndm_transfer(x, e3, abar(t), abar(t - stride)), t - stride)
            e = e / 6 + e2 / 3 + e3 / 3 + e4 / 6
        elif i == 0 and not runge_kutta:  # improved Euler: average the slopes at both ends of the step
            e = (e + eps_at(pndm_transfer(x, e, abar(t), abar(t - stride)), t - stride)) / 2
        else:
            e = multistep_eps(history)
        x = pndm_transfer(x, e, abar(t), abar(t - stride))
    return x


class PNDMScheduler(Scheduler):
    """diffusers' PNDMScheduler protocol over `pndm_transfer` and `multistep_eps`, with its timesteps: with
    skip_prk_steps the second timestep is listed twice (the Euler predictor, then its correction from the first),
    without it the 3 Runge-Kutta steps take four entries each (start, two midpoints, end) before one entry per step.
    As in diffusers a step goes from t to t - T // num_inference_steps, whatever the spacing.

    The state is the last network outputs and, within a predictor/corrector or Runge-Kutta group, its start sample.
    A step that does not follow the previous one (a fresh loop, img2img) starts a new history: first order, then
    Adams-Bashforth of growing order. img2img starts at `start_index`: diffusers' img2img slices PNDM's timesteps as
    if it had one entry per step, so there its sample's noise level and the timestep it is given part by a step."""
    config_class = PNDMConfig

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _reset(self) -> None:
        self._history: list[torch.Tensor] = []  # the network's outputs at the last noise levels, newest last
        self._group: tuple[torch.Tensor, torch.Tensor] | None = None  # (start sample, its outputs weighted so far)

    @property
    def _rk_entries(self) -> int:
        return 0 if self.config.skip_prk_steps else 4 * RK_STEPS

    def _make_grid(self, num_inference_steps: int, device) -> torch.Tensor:
        c, n = self.config, num_inference_steps
        levels = spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing, c.steps_offset).astype("int64")
        self._stride = c.num_train_timesteps // n
        if c.skip_prk_steps:
            grid = [*levels[:1], *levels[1:2], *levels[1:]]  # the second level twice: predictor, corrector
        else:
            if n <= RK_STEPS:
                raise ValueError(f"PNDMScheduler with skip_prk_steps=False needs num_inference_steps > {RK_STEPS} "
                                 f"(its Runge-Kutta start alone takes {RK_STEPS} steps); got {n}. Use more steps or "
                                 "skip_prk_steps=True")
            mid = self._stride // 2
            grid = [t for g in range(RK_STEPS) for t in (levels[g], levels[g + 1] + mid, levels[g + 1] + mid,
                                                          levels[g + 1])]
            grid += list(levels[RK_STEPS:])
        return torch.tensor([int(t) for t in grid], dtype=torch.int64, device=device)

    def start_index(self, steps_done: int) -> int:
        """The grid index of the step that follows `steps_done` of the num_inference_steps (img2img's start)."""
        n, size = self.num_inference_steps, len(self._grid)
        if steps_done >= n:
            return size
        if self.config.skip_prk_steps:
            return steps_done + (steps_done > 0)  # past the predictor/corrector pair
        return 4 * steps_done if steps_done <= RK_STEPS else steps_done + 3 * RK_STEPS

    def _abar(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _starts_step(self, index: int) -> bool:
        """All entries but the predictor's correction (PLMS' entry 1) and the Runge-Kutta midpoints and ends."""
        if self.config.skip_prk_steps:
            return index != 1
        return index >= self._rk_entries or index % 4 == 0

    def _move(self, x: torch.Tensor, output: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        """pndm_transfer from t to t_prev of x, with the noise estimate that the (combined) network output gives
        at (x, t). Like diffusers, a v-predicting model's outputs are combined as they come and turned into a noise
        estimate at the start of the move, not one by one where each was made."""
        a = self._abar(t)
        eps = output if self.config.prediction_type == "epsilon" else predict_x0_eps(
            output, x, a**0.5, (1 - a) ** 0.5, self.config.prediction_type)[1]
        if t_prev < 0:  # (to final_alpha_cumprod: the last step, computed afresh)
            return pndm_update(x, eps, pndm_coefficients(a, self.final_alpha_cumprod))
        # (the scalars of the training schedule's levels, kept: see Scheduler._scalar)
        coefficients = self._scalar(("transfer", t, t_prev), lambda: pndm_coefficients(a, self.alphas_cumprod[t_prev]),
                                    self.alphas_cumprod)
        return pndm_update(x, eps, coefficients)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        i = self.index_for_timestep(timestep)
        t, stride = int(self._grid[i]), self._stride
        x, out = sample.float(), model_output.float()
        follows = self._next_index == i  # the previous step was entry i - 1
        if not follows:
            self._reset()
        if i < self._rk_entries:
            prev = self._runge_kutta(i, t, x, out)
        elif self.config.skip_prk_steps and i == 1 and follows:  # correct the predictor with the slopes' mean
            start, first = self._group
            prev = self._move(start, (out + first) / 2, t + stride, t)
            self._group = None
        else:
            self._history = [*self._history[-3:], out]
            if i == 0 and self.config.skip_prk_steps:
                self._group = (x, out)
            prev = self._move(x, multistep_eps(self._history), t, t - stride)
        self._finish_step(i)
        result = SchedulerOutput(prev.to(sample.dtype))
        return result if return_dict else result.to_tuple()

    def _runge_kutta(self, i: int, t: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Entry i of the Runge-Kutta steps: at a group's start its output is kept (as the multistep history's)
        and the sample moves half a step; at the midpoints and the end the group's start sample moves with that
        entry's output, at the end with the weighted sum o1/6 + o2/3 + o3/3 + o4/6."""
        phase, mid = i % 4, self._stride // 2
        if phase == 0:
            self._history.append(out)
            self._group = (x, out / 6)
            return self._move(x, out, t, t - mid)
        if self._group is None:
            raise ValueError(f"PNDMScheduler: timestep {t} is inside a Runge-Kutta step (grid entry {i}) that was not "
                             f"started; begin at grid entry {i - phase} (start_index gives where img2img starts)")
        start, total = self._group
        begin = int(self._grid[i - phase])
        if phase == 3:
            self._group = None
            return self._move(start, total + out / 6, begin, t)
        self._group = (start, total + out / 3)
        return self._move(start, out, begin, t - (mid if phase == 2 else 0))
