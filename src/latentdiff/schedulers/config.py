"""Scheduler configs that read and write diffusers' `scheduler_config.json`.

One frozen dataclass per scheduler whose fields are exactly the keys diffusers' class of the same name takes,
with the same defaults, so a config round-trips through diffusers unchanged. A config is also a read-only
mapping (`dict(config)`, `config["beta_schedule"]`), like diffusers' FrozenDict.

Every key we hold is validated: a value we do not implement is a ValueError naming the key and the values we do.
Keys of *other* diffusers schedulers (a DDIM config handed to Euler) are ignored while they are harmless, and
refused when ignoring them would silently change the noise levels the model is sampled at.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ..schedules import BETA_SCHEDULES, PREDICTION_TYPES
from .grids import SIGMA_GRIDS, TIMESTEP_SPACINGS

# Options of other diffusers schedulers that only tune that scheduler's own algorithm (PNDM's skip_prk_steps,
# DPM-Solver's solver_order, DDIM's set_alpha_to_one, ...): meaningless to the others, ignored at any value.
ALGORITHM_LOCAL_KEYS = frozenset({
    "algorithm_type", "clip_sample", "clip_sample_range", "disable_corrector", "dynamic_thresholding_ratio",
    "euler_at_final", "final_sigmas_type", "flow_shift", "interpolation_type", "lambda_min_clipped",
    "lower_order_final", "noise_sampler_seed", "original_inference_steps", "predict_x0", "rho", "sample_max_value",
    "set_alpha_to_one", "sigma_data", "sigma_max", "sigma_min", "sigma_schedule", "skip_prk_steps", "solver_order",
    "solver_p", "solver_type", "time_shift_type", "timestep_scaling", "variance_type",
})
# Options that change which noise levels are visited (or what the model output means). Ignored only when off.
SCHEDULE_KEYS_OFF = {
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
    "use_flow_sigmas": False, "use_dynamic_shifting": False, "thresholding": False, "rescale_betas_zero_snr": False,
    "timestep_type": "discrete", "shift_terminal": None,
}


def given_keys(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keys a diffusers config sets itself: not its metadata (_class_name, ...) nor the keys diffusers only
    filled in with their defaults (those it lists in _use_default_values)."""
    config = dict(config or {})
    defaulted = set(config.get("_use_default_values") or ())
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps True apart from 1 (and False apart from 0)."""
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class SchedulerConfig(Mapping):
    """Keys shared by every diffusers noise scheduler (the training noise schedule and the timestep grid)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    scheduler_name: ClassVar[str] = "Scheduler"
    # The values this implementation supports, for the keys that take a choice.
    supported: ClassVar[dict[str, tuple]] = {
        "beta_schedule": BETA_SCHEDULES, "prediction_type": PREDICTION_TYPES, "timestep_spacing": TIMESTEP_SPACINGS,
    }
    # Values diffusers' class of this name replaces by its own when built (another solver's solver_type, say).
    aliases: ClassVar[dict[str, dict[Any, Any]]] = {}
    # Keys above that diffusers' class of this name does not take (DPM-Solver singlestep spaces its grid one way
    # only): held at their defaults, neither listed, written nor read from another scheduler's config.
    absent: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if field.name in self.absent and getattr(self, field.name) != field.default:
                raise ValueError(f"{self.scheduler_name} has no option {field.name} (diffusers' has none either)")
            object.__setattr__(self, field.name, self._checked(field, getattr(self, field.name)))
        for key, replace in self.aliases.items():
            if getattr(self, key) in replace:
                object.__setattr__(self, key, replace[getattr(self, key)])
        for key, allowed in self.supported.items():
            value = getattr(self, key)
            if not any(_same(value, a) for a in allowed):
                raise ValueError(f"{self.scheduler_name}: {key}={value!r} is not supported; supported values: "
                                 f"{', '.join(map(repr, allowed))}")
        grids = [key for key in SIGMA_GRIDS if getattr(self, key, False)]
        if len(grids) > 1:
            raise ValueError(f"{self.scheduler_name}: {' and '.join(grids)} are both set; only one noise-level grid "
                             "can be used (as in diffusers)")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps} must be at least 1")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset={self.steps_offset} must be >= 0")
        uses_range = self.trained_betas is None and self.beta_schedule in ("linear", "scaled_linear")
        if uses_range and not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"beta_start={self.beta_start} and beta_end={self.beta_end} must satisfy "
                             "0 < beta_start <= beta_end < 1")

    def _checked(self, field: dataclasses.Field, value: Any) -> Any:
        """Check a value against the field's annotation; ints pass as floats, lists as tuples."""
        kind = str(field.type)
        if value is None and "None" in kind:
            return None
        if kind.startswith("bool"):
            ok = isinstance(value, bool)
        elif kind.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif kind.startswith("str"):
            ok = isinstance(value, str)
        elif kind.startswith("tuple[int"):  # step indices (UniPC's disable_corrector)
            ok = isinstance(value, (list, tuple)) and all(type(v) is int for v in value)
            value = tuple(value) if ok else value
        else:  # trained_betas: a sequence of numbers
            try:
                value = tuple(float(v) for v in value)
                ok = True
            except (TypeError, ValueError):
                ok = False
        if not ok:
            raise ValueError(f"{self.scheduler_name}: {field.name}={value!r} has the wrong type; expected {kind}")
        return value

    # ---- read-only mapping, like diffusers' FrozenDict --------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def keys(self):
        return [f.name for f in dataclasses.fields(self) if f.name not in self.absent]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.items()}

    def replace(self, **changes) -> SchedulerConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any] | None = None, **overrides) -> SchedulerConfig:
        """Our keys from a diffusers config of any scheduler (see the module docstring for the rules)."""
        items = {**given_keys(config), **overrides}
        own = {f.name for f in dataclasses.fields(cls)} - cls.absent
        kept, unknown = {}, []
        for key, value in items.items():
            if key.startswith("_"):
                continue
            if key in own:
                kept[key] = value
            elif key in SCHEDULE_KEYS_OFF:
                off = SCHEDULE_KEYS_OFF[key]
                if not (_same(value, off) or (value is None and off is False)):
                    raise ValueError(f"{cls.scheduler_name} does not support {key}={value!r} (an option of another "
                                     f"scheduler); set {key}={off!r} or choose a scheduler that supports it")
            elif key not in ALGORITHM_LOCAL_KEYS and key not in cls.absent:  # (diffusers' class ignores those)
                unknown.append(key)
        if unknown:
            warnings.warn(f"{cls.scheduler_name}: ignoring config keys no diffusers scheduler we know uses: "
                          f"{sorted(unknown)}", stacklevel=3)
        return cls(**kept)


@dataclass(frozen=True)
class _ZeroSNRKeyConfig(SchedulerConfig):
    """The schedulers whose diffusers class takes rescale_betas_zero_snr (PNDM's does not)."""
    rescale_betas_zero_snr: bool = False

    supported: ClassVar[dict[str, tuple]] = {**SchedulerConfig.supported, "rescale_betas_zero_snr": (False, True)}


@dataclass(frozen=True)
class DDPMConfig(_ZeroSNRKeyConfig):
    """variance_type None is what diffusers' DDPM does when handed a DPM-Solver config: "fixed_small"."""
    variance_type: str | None = "fixed_small"
    clip_sample: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0

    scheduler_name: ClassVar[str] = "DDPMScheduler"
    supported: ClassVar[dict[str, tuple]] = {
        **_ZeroSNRKeyConfig.supported, "variance_type": ("fixed_small", None), "thresholding": (False,),
    }


@dataclass(frozen=True)
class DDIMConfig(_ZeroSNRKeyConfig):
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0

    scheduler_name: ClassVar[str] = "DDIMScheduler"
    supported: ClassVar[dict[str, tuple]] = {**_ZeroSNRKeyConfig.supported, "thresholding": (False,)}


@dataclass(frozen=True)
class DDIMInverseConfig(_ZeroSNRKeyConfig):
    """diffusers' DDIMInverseScheduler's keys and defaults (its grid: "leading" or "trailing" spacing)."""
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    clip_sample_range: float = 1.0

    scheduler_name: ClassVar[str] = "DDIMInverseScheduler"


@dataclass(frozen=True)
class EulerConfig(_ZeroSNRKeyConfig):
    timestep_spacing: str = "linspace"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    scheduler_name: ClassVar[str] = "EulerDiscreteScheduler"
    supported: ClassVar[dict[str, tuple]] = {
        **_ZeroSNRKeyConfig.supported, "interpolation_type": ("linear",), "use_karras_sigmas": (False, True, None),
        "use_exponential_sigmas": (False, True, None), "use_beta_sigmas": (False, True, None),
        "timestep_type": ("discrete",),
        "final_sigmas_type": ("zero", "sigma_min"),
    }


@dataclass(frozen=True)
class EulerAncestralConfig(_ZeroSNRKeyConfig):
    timestep_spacing: str = "linspace"

    scheduler_name: ClassVar[str] = "EulerAncestralDiscreteScheduler"


@dataclass(frozen=True)
class _SigmaGridConfig(SchedulerConfig):
    """The noise-level grid keys of diffusers' samplers in sigma without zero-SNR rescaling (Heun, LMS, DPM2, DPM
    SDE): Karras, exponential or beta sigmas or none, "linspace" spacing by default."""
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    timestep_spacing: str = "linspace"


@dataclass(frozen=True)
class KDPM2Config(_SigmaGridConfig):
    """diffusers' KDPM2DiscreteScheduler's keys and defaults (its beta range defaults to Stable Diffusion's)."""
    beta_start: float = 0.00085
    beta_end: float = 0.012

    scheduler_name: ClassVar[str] = "KDPM2DiscreteScheduler"


@dataclass(frozen=True)
class KDPM2AncestralConfig(KDPM2Config):
    """diffusers' KDPM2AncestralDiscreteScheduler's keys and defaults: KDPM2's."""
    scheduler_name: ClassVar[str] = "KDPM2AncestralDiscreteScheduler"


@dataclass(frozen=True)
class LMSConfig(_SigmaGridConfig):
    """diffusers' LMSDiscreteScheduler's keys and defaults."""
    scheduler_name: ClassVar[str] = "LMSDiscreteScheduler"


@dataclass(frozen=True)
class DPMSolverConfig(_ZeroSNRKeyConfig):
    """DPM-Solver++ of solver_order 1 to 3 (2M by default), as an ODE or an SDE solver (algorithm_type).
    lower_order_final caps the second-to-last step at second order under 15 steps; euler_at_final is accepted
    at either value: with the final noise level 0 (final_sigmas_type "zero") the last step is first order
    anyway. A variance_type that is not learned (what a DDPM config carries) has no effect, as in diffusers."""
    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    use_lu_lambdas: bool | None = False
    use_flow_sigmas: bool | None = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    variance_type: str | None = None
    timestep_spacing: str = "linspace"
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    scheduler_name: ClassVar[str] = "DPMSolverMultistepScheduler"
    aliases: ClassVar[dict[str, dict[Any, Any]]] = {
        "solver_type": dict.fromkeys(("logrho", "bh1", "bh2"), "midpoint"), "algorithm_type": {"deis": "dpmsolver++"}}
    supported: ClassVar[dict[str, tuple]] = {
        **_ZeroSNRKeyConfig.supported, "solver_order": (1, 2, 3), "thresholding": (False,),
        "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"), "solver_type": ("midpoint",),
        "use_karras_sigmas": (False, True, None),
        "use_exponential_sigmas": (False, True, None), "use_beta_sigmas": (False, True, None),
        "use_lu_lambdas": (False, None),
        "use_flow_sigmas": (False, None), "final_sigmas_type": ("zero",), "lambda_min_clipped": (-math.inf,),
        "variance_type": (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
        "use_dynamic_shifting": (False,),
    }


@dataclass(frozen=True)
class DPMSolverSinglestepConfig(DPMSolverConfig):
    """diffusers' DPMSolverSinglestepScheduler's keys and defaults: DPM-Solver++ singlestep of solver_order 1 to 3
    ("DPM++ 2S" at 2), as an ODE or an SDE solver; the multistep class's keys but those its diffusers class does not
    take (absent): no timestep_spacing nor steps_offset (its grid is always "linspace"), no zero-SNR rescaling, Lu
    lambdas or euler_at_final. With the final noise level 0 ("zero", the only one supported), diffusers turns
    lower_order_final on whatever the config says (the key is kept, and has no effect)."""
    lower_order_final: bool = False

    scheduler_name: ClassVar[str] = "DPMSolverSinglestepScheduler"
    absent: ClassVar[frozenset[str]] = frozenset(
        {"timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "use_lu_lambdas", "euler_at_final"})


@dataclass(frozen=True)
class DEISConfig(DPMSolverConfig):
    """diffusers' DEISMultistepScheduler's keys and defaults: the log-rho multistep DEIS of solver_order 1 to 3; the
    DPM-Solver multistep keys but those its diffusers class does not take (absent: no zero-SNR rescaling, final
    noise level choice, Lu lambdas, euler_at_final, lambda clipping or variance_type). A DPM-Solver config's
    algorithm_type and solver_type become DEIS's own, as diffusers' class does."""
    algorithm_type: str = "deis"
    solver_type: str = "logrho"

    scheduler_name: ClassVar[str] = "DEISMultistepScheduler"
    absent: ClassVar[frozenset[str]] = frozenset(
        {"rescale_betas_zero_snr", "final_sigmas_type", "use_lu_lambdas", "euler_at_final", "lambda_min_clipped",
         "variance_type"})
    aliases: ClassVar[dict[str, dict[Any, Any]]] = {
        "algorithm_type": dict.fromkeys(("dpmsolver", "dpmsolver++"), "deis"),
        "solver_type": dict.fromkeys(("midpoint", "heun", "bh1", "bh2"), "logrho")}
    supported: ClassVar[dict[str, tuple]] = {
        **SchedulerConfig.supported, "solver_order": (1, 2, 3), "thresholding": (False,), "algorithm_type": ("deis",),
        "solver_type": ("logrho",), "use_karras_sigmas": (False, True), "use_exponential_sigmas": (False, True),
        "use_beta_sigmas": (False, True), "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,),
    }


@dataclass(frozen=True)
class DPMSolverSDEConfig(_SigmaGridConfig):
    """diffusers' DPMSolverSDEScheduler's keys and defaults (Stable Diffusion's beta range); noise_sampler_seed
    seeds its Brownian tree (None: see DPMSolverSDEScheduler)."""
    beta_start: float = 0.00085
    beta_end: float = 0.012
    noise_sampler_seed: int | None = None

    scheduler_name: ClassVar[str] = "DPMSolverSDEScheduler"


@dataclass(frozen=True)
class PNDMConfig(SchedulerConfig):
    """skip_prk_steps True (Stable Diffusion 1.x's setting): the linear multistep method alone, started with one
    pseudo improved Euler step; False: three pseudo Runge-Kutta steps first (the paper's F-PNDM)."""
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False

    scheduler_name: ClassVar[str] = "PNDMScheduler"


@dataclass(frozen=True)
class UniPCConfig(_ZeroSNRKeyConfig):
    """UniPC in data prediction (predict_x0), with either B(h) (solver_type), up to order 3."""
    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    solver_p: None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    timestep_spacing: str = "linspace"
    final_sigmas_type: str = "zero"
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: float | None = None
    sigma_max: float | None = None
    shift_terminal: float | None = None

    scheduler_name: ClassVar[str] = "UniPCMultistepScheduler"
    aliases: ClassVar[dict[str, dict[Any, Any]]] = {"solver_type": dict.fromkeys(("midpoint", "heun", "logrho"), "bh2")}
    supported: ClassVar[dict[str, tuple]] = {
        **_ZeroSNRKeyConfig.supported, "solver_order": (1, 2, 3), "thresholding": (False,), "predict_x0": (True,),
        "solver_type": ("bh1", "bh2"), "solver_p": (None,), "use_flow_sigmas": (False,),
        "final_sigmas_type": ("zero",),
        "use_dynamic_shifting": (False,), "sigma_min": (None,), "sigma_max": (None,), "shift_terminal": (None,),
    }


@dataclass(frozen=True)
class LCMConfig(DDIMConfig):
    """diffusers' LCMScheduler's keys and defaults: DDIM's and the distillation grid's (Stable Diffusion's noise
    schedule by default; timestep_spacing and steps_offset are kept but unused: the grid is the distillation grid
    of original_inference_steps steps)."""
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    clip_sample: bool = False
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    scheduler_name: ClassVar[str] = "LCMScheduler"

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"LCMScheduler: original_inference_steps={self.original_inference_steps} must lie in "
                             f"[1, num_train_timesteps={self.num_train_timesteps}]")


@dataclass(frozen=True)
class TCDConfig(LCMConfig):
    """diffusers' TCDScheduler's keys and defaults: LCMScheduler's."""
    scheduler_name: ClassVar[str] = "TCDScheduler"


@dataclass(frozen=True)
class HeunConfig(_SigmaGridConfig):
    """diffusers' HeunDiscreteScheduler's keys and defaults (its beta range defaults to Stable Diffusion's)."""
    beta_start: float = 0.00085
    beta_end: float = 0.012
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    scheduler_name: ClassVar[str] = "HeunDiscreteScheduler"
