"""What every scheduler class shares: config I/O in diffusers' format, the training noise schedule, the timestep
grid and finding where a timestep sits in it.

The classes are thin adapters: the math lives in pure functions (schedules.py and each sampler's module). A step
is located from its timestep, not from a hidden counter, so `step` may start anywhere in the grid (img2img) and
a loop may be rerun. The only memory is where the last step ended, used to tell repeated timesteps apart (a
rounded Karras grid can repeat one) and, for DPM-Solver, its previous x0 estimate.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..schedules import (alphas_cumprod, make_betas, predict_x0_eps, q_sample, rescale_zero_terminal_snr,
                         v_target)
from .config import SchedulerConfig
from .grids import check_num_inference_steps

CONFIG_NAME = "scheduler_config.json"
DIFFUSERS_FORMAT_VERSION = "0.30.0"  # the diffusers release whose scheduler_config.json format we write


@dataclass
class SchedulerOutput:
    """`prev_sample` is the next loop input; `pred_original_sample` the current x0 estimate (for previews)."""
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def to_tuple(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.prev_sample, self.pred_original_sample

    def __getitem__(self, index: int) -> torch.Tensor | None:
        return self.to_tuple()[index]


def _scalar_timestep(timestep) -> float:
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"expected one timestep, got a tensor of shape {tuple(timestep.shape)}; pass one "
                             "element of scheduler.timesteps")
        return float(timestep.reshape(()).item())
    return float(timestep)


def config_of(config: Any) -> Any:
    """A config mapping as given, or the `config` of a scheduler object (ours or diffusers')."""
    if config is not None and not hasattr(config, "keys"):
        config = getattr(config, "config", config)
    return config


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


class Scheduler:
    """Base of the diffusers-compatible scheduler classes; subclasses define `config_class` and `_make_grid`."""
    config_class: ClassVar[type[SchedulerConfig]] = SchedulerConfig
    config_name: ClassVar[str] = CONFIG_NAME
    order: ClassVar[int] = 1
    init_noise_sigma: float = 1.0
    # which of set_timesteps' `timesteps=` and `sigmas=` (a grid given in full) the class takes, as diffusers' does
    custom_grids: ClassVar[frozenset[str]] = frozenset()
    # with rescale_betas_zero_snr: whether the last abar is raised from 0 to 2^-24, so that the sampler's noise level
    # there (sqrt((1 - abar) / abar), 4096) is finite; the samplers in sigma or log-SNR need it, as in diffusers
    finite_terminal_sigma: ClassVar[bool] = False

    def __init__(self, **config: Any):
        unknown = sorted(set(config) - set(self.config_class().keys()))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no option(s) {unknown}; its options are "
                             f"{self.config_class().keys()} (use from_config to load another scheduler's config)")
        self.config = self.config_class(**config)
        c = self.config
        self.betas = make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end, c.trained_betas)
        zero_snr = getattr(c, "rescale_betas_zero_snr", False)
        if zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod(self.betas)
        if zero_snr and self.finite_terminal_sigma:
            self.alphas_cumprod[-1] = 2.0**-24  # (fp16's smallest subnormal, as diffusers' classes set it)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1)
        self._grid: np.ndarray | None = None  # float64 copy of the timesteps for lookups; None: not set yet
        self._begin_index: int | None = None
        self._next_index: int | None = None
        self._scalars: tuple = (None, None, {})  # (made from which tensor, its version, key -> value): _scalar
        self._reset()

    # ---- config I/O -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any = None, **overrides: Any) -> Scheduler:
        """Build from a diffusers config dict (any scheduler's) or another scheduler's `config`; `overrides` win."""
        if isinstance(config, (str, os.PathLike)):
            raise TypeError(f"from_config takes a config mapping, not the path {str(config)!r}; use "
                            f"{cls.__name__}.from_pretrained(folder)")
        return cls(**dict(cls.config_class.from_mapping(config_of(config), **overrides)))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None, **overrides: Any) -> Scheduler:
        """Load `path/[subfolder/]scheduler_config.json` (path may also be the json file itself)."""
        path = Path(path) / (subfolder or "")
        file = path if path.is_file() else path / CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} at {file}; give a scheduler folder (for a pipeline folder "
                                    "pass subfolder='scheduler')")
        with open(file, encoding="utf-8") as f:
            return cls.from_config(json.load(f), **overrides)

    def save_config(self, folder: str | os.PathLike) -> Path:
        """Write scheduler_config.json with diffusers' class name, so diffusers loads it too."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
                **self.config.to_dict()}
        file = folder / CONFIG_NAME
        file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return file

    def __repr__(self) -> str:
        changed = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
                   if getattr(self.config, f.name) != f.default}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- the timestep grid ------------------------------------------------------------------------------------
    def _make_grid(self, num_inference_steps: int, device, **custom: np.ndarray) -> torch.Tensor:
        """Set the per-step tables of this sampler and return its timesteps; `custom`: timesteps= or sigmas= as
        given to set_timesteps (checked), for a class whose custom_grids names it."""
        raise NotImplementedError

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None) -> None:
        """The grid of `num_inference_steps` steps the config spaces; or, where the class takes it (custom_grids,
        as in diffusers), the timesteps themselves (descending) or the noise levels (descending, the last one
        where sampling ends, usually 0)."""
        custom = {name: value for name, value in (("timesteps", timesteps), ("sigmas", sigmas)) if value is not None}
        levels = getattr(self, "sigmas", None)
        if (num_inference_steps is not None) + len(custom) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas to set_timesteps")
        if custom:
            (name, values), = custom.items()
            if name not in self.custom_grids:
                takers = sorted(cls.__name__ for cls in _subclasses(Scheduler) if name in cls.custom_grids)
                raise ValueError(f"{type(self).__name__} takes no custom {name} (as diffusers' does not); "
                                 f"{', '.join(takers)} do")
            values = self._checked_grid(name, values)
            n = len(values) - (name == "sigmas")
            self.timesteps = self._make_grid(n, device, **{name: values})
        else:
            n = check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
            self.timesteps = self._make_grid(n, device)
        self._keep_levels(levels)
        self.num_inference_steps = n
        self._reset()
        self._grid = self.timesteps.detach().cpu().double().numpy()
        self._begin_index = None
        self._next_index = None

    def _keep_levels(self, before: torch.Tensor | None) -> None:
        """After _make_grid: where its noise levels (`sigmas`) equal those before it (the same grid again, as in
        every call of a pipeline), keep the earlier tensor, and with it the steps' scalars (_scalar); a tensor made
        under inference mode is copied into a normal one (which keeps a version counter)."""
        levels = getattr(self, "sigmas", None)
        if not isinstance(levels, torch.Tensor) or levels is before:
            return
        if (isinstance(before, torch.Tensor) and not before.is_inference() and before.shape == levels.shape
                and before.dtype == levels.dtype and before.device == levels.device and torch.equal(before, levels)):
            self.sigmas = before
        elif levels.is_inference():
            with torch.inference_mode(False):
                self.sigmas = levels.clone()

    def _checked_grid(self, name: str, values) -> np.ndarray:
        values = np.asarray(torch.as_tensor(values).detach().cpu(), dtype=np.float64)
        least = 2 if name == "sigmas" else 1
        if values.ndim != 1 or len(values) < least or not np.isfinite(values).all():
            raise ValueError(f"{name} must be a list of at least {least} finite numbers; got {values.tolist()}")
        if np.any(np.diff(values) >= 0):
            raise ValueError(f"{name} must decrease strictly (sampling goes from noise to data); got {values.tolist()}")
        top = self.config.num_train_timesteps - 1
        if name == "timesteps" and not 0 <= values[-1] <= values[0] <= top:
            raise ValueError(f"timesteps must lie in [0, {top}] (the training steps); got {values.tolist()}")
        if name == "sigmas" and values[-1] < 0:
            raise ValueError(f"sigmas must not be negative; got {values.tolist()}")
        return values

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start sampling at `timesteps[begin_index]` (img2img); call after set_timesteps. len(timesteps) is allowed:
        nothing is left to run (img2img at strength 0)."""
        if self._grid is None:
            raise ValueError("call set_timesteps(num_inference_steps) before set_begin_index")
        if not 0 <= begin_index <= len(self._grid):
            raise ValueError(f"begin_index={begin_index} is out of range for {len(self._grid)} timesteps")
        self._begin_index = int(begin_index)

    def start_index(self, steps_done: int) -> int:
        """The grid index of the step that follows `steps_done` of the num_inference_steps: where img2img starts
        (set_begin_index). Each step takes `order` grid entries here; PNDM's grid is laid out otherwise."""
        if self._grid is None:
            raise ValueError("call set_timesteps(num_inference_steps) before start_index")
        return min(steps_done * self.order, len(self._grid))

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        """Index of the step that comes next, once a step has been taken."""
        return self._next_index

    def index_for_timestep(self, timestep) -> int:
        """Position of `timestep` in the grid: the step after the last one taken if it matches (so repeated
        timesteps are walked in order), otherwise its first occurrence at or after the begin index that starts a
        step (see _starts_step)."""
        if self._grid is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before stepping")
        t = _scalar_timestep(timestep)
        i = self._next_index
        if i is not None and i < len(self._grid) and abs(self._grid[i] - t) <= 1e-4:
            return i
        start = self._begin_index or 0
        hits = np.flatnonzero(np.abs(self._grid[start:] - t) <= 1e-4)
        if hits.size == 0:
            where = f" at or after begin_index={start}" if start else ""
            raise ValueError(f"timestep {t:g} is not in this scheduler's timesteps{where}; pass elements of "
                             "scheduler.timesteps (after set_timesteps)")
        starts = [h for h in hits if self._starts_step(start + int(h))]
        return start + int((starts or hits)[0])

    def _starts_step(self, index: int) -> bool:
        """Whether grid entry `index` begins a step rather than continuing the one the entry before began. A grid of
        `order` entries per step (Heun's, DPM2's, DPM++ SDE's: a step's start, then its second evaluation) starts
        steps at multiples of the order: a timestep listed twice starts a step at its second entry (the first ends
        the step before), as diffusers' lookup has it, so a loop over timesteps[order * k:] (img2img) begins with a
        step's start. PNDM lays its grid out otherwise (its own)."""
        return index % self.order == 0

    def _reset(self) -> None:
        """Forget the steps taken (a new grid, or a step that does not follow the last): a multistep sampler's
        history. Called when the scheduler is built and by set_timesteps."""

    def _scalar(self, key: tuple, make: Callable[[], Any], source: torch.Tensor):
        """make(), kept under `key` while `source` (the tensor make() reads: the grid's noise levels, the training
        schedule) is the same tensor, unchanged: the 0-dim tensors a step derives from it (some tens of operations,
        host time) are worked out once rather than in every step of every call. Nothing is kept for an inference
        tensor (it has no version counter)."""
        made_from, version, values = self._scalars
        now = None if source.is_inference() else source._version
        if made_from is not source or version != now or now is None:
            values = {}
            self._scalars = (source, now, values)
        value = values.get(key)
        if value is None:
            with torch.inference_mode(False):  # (kept for later calls, which may run with autograd)
                value = values[key] = make()
        return value

    def _finish_step(self, index: int) -> None:
        self._next_index = index + 1

    def _clipped_estimates(self, model_output: torch.Tensor, x: torch.Tensor,
                           abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) at level abar for the DDPM/DDIM family's configs: x0 clipped to +-clip_sample_range where
        clip_sample says so, eps from the unclipped output (as diffusers computes them)."""
        c = self.config
        x0, eps = predict_x0_eps(model_output.float(), x, abar**0.5, (1 - abar) ** 0.5, c.prediction_type)
        return (x0.clamp(-c.clip_sample_range, c.clip_sample_range) if c.clip_sample else x0), eps

    # ---- training-time helpers and protocol defaults ----------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) at integer training timesteps, one per sample."""
        return q_sample(original_samples, noise, timesteps, self.alphas_cumprod)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target at integer training timesteps."""
        return v_target(sample, noise, timesteps, self.alphas_cumprod)
