"""DPM-Solver++ SDE ("DPM++ SDE" in Stable Diffusion web UIs; Crowson's k-diffusion sample_dpmpp_sde with r = 1/2,
after Lu et al. 2022): two model calls a step, in sigma space with t = -log sigma. A step from sigma to sigma_next
first takes an ancestral DPM-Solver++(1) step to the midpoint sigma_mid = sqrt(sigma sigma_next) (deterministically
to sigma_down, then noise of std sigma_up), evaluates the model there, and takes the whole step again from its start
with that estimate, ancestrally too. The last step, onto 0, is an Euler step.

Its noise is a Brownian motion over the noise levels (torchsde's BrownianInterval, as in k-diffusion and diffusers):
the increment between two levels, not fresh noise per call, so the noise a step adds does not depend on how the
levels are divided into steps."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..guidance import Denoiser
from ..schedules import ve_sigmas
from .base import SchedulerOutput
from .config import DPMSolverSDEConfig
from .euler import _denoise, _SigmaScheduler, euler_step
from .grids import sigma_to_t, spaced_levels, spaced_timesteps


class BrownianNoise:
    """Standard normal noise for a step between two noise levels: the Brownian increment W(b) - W(a) of torchsde's
    BrownianInterval over [sigma_min, sigma_max] (diffusers' settings: tol 1e-6, pool 24, halfway tree), divided by
    sqrt(|b - a|). `seeds`: one int (one tree for the whole batch, as diffusers' noise_sampler_seed) or one per
    sample (each image its own tree)."""

    def __init__(self, like: torch.Tensor, sigma_min: float, sigma_max: float, seeds: int | Sequence[int]):
        try:
            import torchsde
        except ImportError as e:
            raise ImportError("DPMSolverSDEScheduler draws its noise from a Brownian tree: pip install torchsde "
                              "(or latentdiff[sde])") from e
        self.batched = not isinstance(seeds, int)
        size = like.shape[1:] if self.batched else like.shape
        sigma_min, sigma_max = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)  # (float32, as diffusers')
        self.trees = [torchsde.BrownianInterval(t0=sigma_min, t1=sigma_max, size=size, dtype=like.dtype,
                                                device=like.device, entropy=seed, tol=1e-6, pool_size=24,
                                                halfway_tree=True)
                      for seed in (seeds if self.batched else [seeds])]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """The increment from `sigma` to `sigma_next` (float32 tensors), scaled to unit variance."""
        low, high, sign = (sigma, sigma_next, 1.0) if sigma < sigma_next else (sigma_next, sigma, -1.0)
        with warnings.catch_warnings():  # a level computed as exp(-(-log sigma)) may lie an ulp outside the tree's
            warnings.filterwarnings("ignore", "Should have t[ab]", UserWarning)  # span (torchsde says so; harmless)
            w = torch.stack([tree(low, high) for tree in self.trees]) * sign
        return (w if self.batched else w[0]) / (sigma_next - sigma).abs().sqrt()


def midpoint_sigma(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """exp(-(t + (t_next - t) / 2)) with t = -log sigma: the geometric midpoint, computed as diffusers does."""
    t, t_next = -sigma.log(), -sigma_next.log()
    return (-(t + (t_next - t) * 0.5)).exp()


def _round_trip(sigma: torch.Tensor) -> torch.Tensor:
    """exp(-t) for t = -log sigma, where diffusers queries the noise (sigma itself up to rounding)."""
    return sigma.log().exp()


def dpmpp_sde_update(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_to, noise: torch.Tensor,
                     s_noise: float = 1.0) -> torch.Tensor:
    """An ancestral DPM-Solver++(1) step from x at `sigma` towards `sigma_to`: deterministically to sigma_down,
    x0 + (sigma_down / sigma) (x - x0), then noise of std sigma_up, where sigma_up^2 + sigma_down^2 = sigma_to^2
    (sigma_up at most sigma_to). Computed through t = -log sigma as diffusers computes it."""
    t = -sigma.log()
    sigma_from = (-t).exp()
    sigma_up = torch.minimum(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    t_down = -sigma_down.log()
    prev = ((-t_down).exp() / sigma_from) * x - (t - t_down).expm1() * x0
    return prev + noise * s_noise * sigma_up


def sample_dpmpp_sde(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor,
                     mid_timesteps: torch.Tensor, noise: BrownianNoise, s_noise: float = 1.0) -> torch.Tensor:
    """Run DPM++ SDE from x at noise level sigmas[0] through sigmas (ending in 0); mid_timesteps[i]: the timestep of
    the midpoint between sigmas[i] and sigmas[i + 1] (the last unused); `noise`: the Brownian noise."""
    for i, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = _denoise(denoiser, x, t, sigma)
        if sigma_next == 0:
            x = euler_step(x, x0, sigma, sigma_next)
            continue
        mid = midpoint_sigma(sigma, sigma_next)
        x_mid = dpmpp_sde_update(x, x0, sigma, mid, noise(_round_trip(sigma), mid), s_noise)
        x0_mid = _denoise(denoiser, x_mid, mid_timesteps[i], mid)
        end = _round_trip(sigma_next)
        x = dpmpp_sde_update(x, x0_mid, sigma, end, noise(_round_trip(sigma), end), s_noise)
    return x


class DPMSolverSDEScheduler(_SigmaScheduler):
    """diffusers' DPMSolverSDEScheduler protocol over `dpmpp_sde_update`: the grid lists each step's start and,
    after it, the timestep of its midpoint (t0, m1, t1, m2, t2, ...; entries 2k start steps), `sigmas` laid out as
    Heun's (the first level, then each later one twice). The Brownian tree is seeded by the config's
    noise_sampler_seed when set (diffusers' only way); otherwise from the step's `generator` (one tree per
    generator when given one per image), or from torch's global generator without one, as diffusers draws it.
    It is planted at a loop's first step. State: the step's start (sample) and the tree."""
    config_class = DPMSolverSDEConfig
    order = 2

    def _reset(self) -> None:
        self._start: tuple[int, torch.Tensor] | None = None  # (grid index, sample) of the step in progress
        self._noise: BrownianNoise | None = None

    def _make_grid(self, num_inference_steps: int, device) -> torch.Tensor:
        c = self.config
        table = ve_sigmas(self.alphas_cumprod).numpy()
        log_table = np.log(table)
        steps = spaced_timesteps(num_inference_steps, c.num_train_timesteps, c.timestep_spacing, c.steps_offset,
                                 round_linspace=False)
        steps, sigmas = spaced_levels(c, steps, table, num_inference_steps)
        log_levels = -np.log(sigmas)  # the midpoints' timesteps, from the float64 levels (as diffusers)
        mids = np.exp(-(log_levels[:-1] + np.diff(log_levels) * 0.5))
        mid_steps = sigma_to_t(mids, log_table)
        levels = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.sigmas = torch.cat([levels[:1], levels[1:-1].repeat_interleave(2), levels[-1:]])
        interleaved = np.stack([mid_steps, steps[1:]], axis=-1).reshape(-1)
        return torch.from_numpy(np.concatenate([steps[:1], interleaved])).to(device)

    def _level(self, index: int) -> torch.Tensor:
        """The noise level the model sees at grid entry `index`: a step's start, or its midpoint."""
        if index % 2 == 0:
            return self.sigmas[index]
        return midpoint_sigma(self.sigmas[index - 1], self.sigmas[index])

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        return sample / ((self._level(self.index_for_timestep(timestep)) ** 2 + 1) ** 0.5)

    def _plant(self, like: torch.Tensor, generator) -> BrownianNoise:
        def draw(g) -> int:
            return int(torch.randint(0, 2**63 - 1, [], generator=g).item())

        seed = self.config.noise_sampler_seed
        if seed is None:
            gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
            if len(gens) > 1 and len(gens) != like.shape[0]:
                raise ValueError(f"got {len(gens)} generators for a batch of {like.shape[0]}; give one generator per "
                                 "sample or a single generator")
            seed = [draw(g) for g in gens] if len(gens) > 1 else draw(gens[0])
        positive = self.sigmas[self.sigmas > 0]
        return BrownianNoise(like, positive.min().item(), positive.max().item(), seed)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, s_noise: float = 1.0):
        """One grid entry's update: at a step's start the ancestral step to its midpoint, at the midpoint the
        whole step from its start; the last step (onto 0) is an Euler step."""
        i = self.index_for_timestep(timestep)
        if self._noise is None or i != self._next_index:  # a loop begins: plant its Brownian tree
            self._noise = self._plant(sample, generator)
        x = sample.float()
        x0 = self._x0(model_output, x, self._level(i))
        if i % 2 == 0:
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            if sigma_next == 0:
                prev = euler_step(x, x0, sigma, sigma_next)
            else:
                mid = midpoint_sigma(sigma, sigma_next)
                prev = dpmpp_sde_update(x, x0, sigma, mid, self._noise(_round_trip(sigma), mid).float(), s_noise)
                self._start = (i, x)
        else:
            if self._start is None or self._start[0] != i - 1:
                raise ValueError(f"DPMSolverSDEScheduler: timestep {float(timestep):g} is a step's midpoint; call "
                                 "step at its start (the grid entry before it) first")
            sigma, sigma_next = self.sigmas[i - 1], self.sigmas[i]
            end = _round_trip(sigma_next)
            noise = self._noise(_round_trip(sigma), end).float()
            prev = dpmpp_sde_update(self._start[1], x0, sigma, end, noise, s_noise)
            self._start = None
        self._finish_step(i)
        out = SchedulerOutput(prev.to(model_output.dtype), x0.to(model_output.dtype))
        return out if return_dict else out.to_tuple()
