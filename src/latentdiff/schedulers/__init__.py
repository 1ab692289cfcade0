"""Samplers: each a pure function over a tensor of timesteps (or sigmas), plus a diffusers-compatible class.

    from latentdiff.schedulers import DDIMScheduler
    sched = DDIMScheduler.from_config(pipe.scheduler.config)     # any diffusers scheduler_config.json dict
    sched.set_timesteps(25)
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
"""
from __future__ import annotations

from typing import Any

from .base import Scheduler, SchedulerOutput, config_of
from .config import (DDIMConfig, DDIMInverseConfig, DDPMConfig, DEISConfig, DPMSolverConfig, DPMSolverSDEConfig,
                     DPMSolverSinglestepConfig, EulerAncestralConfig, EulerConfig, HeunConfig, KDPM2AncestralConfig,
                     KDPM2Config, LCMConfig, LMSConfig, PNDMConfig, SchedulerConfig, TCDConfig, UniPCConfig,
                     given_keys)
from .ddim import DDIMInverseScheduler, DDIMScheduler, ddim_step, sample_ddim
from .ddpm import DDPMScheduler, ddpm_step, sample_ddpm
from .deis import DEISMultistepScheduler, deis_coefficients, deis_step, sample_deis
from .dpm_sde import BrownianNoise, DPMSolverSDEScheduler, dpmpp_sde_update, sample_dpmpp_sde
from .dpm_singlestep import (DPMSolverSinglestepScheduler, dpmpp_singlestep_update, sample_dpmpp_singlestep,
                             singlestep_orders)
from .dpm_solver import DPMSolverMultistepScheduler, dpmpp_2m_step, sample_dpmpp_2m
from .euler import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                    LMSDiscreteScheduler, euler_ancestral_step, euler_step, heun_step, lms_coefficients, lms_step,
                    sample_euler, sample_euler_ancestral, sample_heun, sample_lms)
from .kdpm2 import (KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, dpm2_step, midpoint_sigmas,
                    sample_dpm2)
from .lcm import LCMScheduler, LCMSchedulerOutput, lcm_step, lcm_timesteps, sample_lcm
from .pndm import PNDMScheduler, multistep_eps, pndm_transfer, sample_pndm
from .tcd import TCDScheduler, TCDSchedulerOutput, sample_tcd, tcd_step
from .unipc import UniPCMultistepScheduler, sample_unipc, unipc_update

# Short names (the CLI's --scheduler) -> classes.
SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm2": KDPM2DiscreteScheduler,
    "dpm2_a": KDPM2AncestralDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "dpm++sde": DPMSolverMultistepScheduler,
    "dpm++3m": DPMSolverMultistepScheduler,
    "dpm++2s": DPMSolverSinglestepScheduler,
    "deis": DEISMultistepScheduler,
    "dpmsolver_sde": DPMSolverSDEScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
    "lcm": LCMScheduler,
    "tcd": TCDScheduler,
}
# Names that stand for a class with these options ("DPM++ 2M SDE" is DPM-Solver++ solving the SDE; "DPM++ 3M" its
# third-order multistep form; "DPM++ 2S" its second-order singlestep form).
NAMED_OPTIONS: dict[str, dict[str, Any]] = {
    "dpm++": {"algorithm_type": "dpmsolver++"},
    "dpm++sde": {"algorithm_type": "sde-dpmsolver++"},
    "dpm++3m": {"algorithm_type": "dpmsolver++", "solver_order": 3},
    "dpm++2s": {"algorithm_type": "dpmsolver++", "solver_order": 2},
}


def scheduler_from_name(name: str, config: Any = None, **overrides: Any) -> Scheduler:
    """The scheduler called `name` (a key of SCHEDULERS: "ddpm", "ddim", "euler", "euler_a", "heun", "dpm++",
    "dpm++sde", "dpm++3m", "dpm++2s", "deis", "dpmsolver_sde", "dpm2", "dpm2_a", "pndm", "unipc", "lms", "lcm",
    "tcd"), built from another scheduler's config (or a diffusers config dict) so it keeps the model's training
    noise schedule and prediction type. DDPM and DDIM clip their x0 estimate only if that config says so (their own
    default clips, which suits pixels, not latents)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = SCHEDULERS[name]
    overrides = {**NAMED_OPTIONS.get(name, {}), **overrides}
    if "clip_sample" not in given_keys(config_of(config)) and "clip_sample" in cls.config_class().keys():
        overrides = {"clip_sample": False, **overrides}
    return cls.from_config(config, **overrides)


__all__ = [
    "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "UniPCMultistepScheduler",
    "LMSDiscreteScheduler", "LCMScheduler", "TCDScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
    "DPMSolverSDEScheduler", "DDIMInverseScheduler",
]
__all__ += [
    "SCHEDULERS", "NAMED_OPTIONS", "Scheduler", "SchedulerConfig", "SchedulerOutput", "scheduler_from_name",
    "DDPMConfig", "DDIMConfig", "EulerConfig", "EulerAncestralConfig", "HeunConfig", "DPMSolverConfig", "PNDMConfig",
    "UniPCConfig", "LMSConfig", "LCMConfig", "LCMSchedulerOutput", "TCDConfig", "TCDSchedulerOutput", "KDPM2Config",
    "KDPM2AncestralConfig", "DPMSolverSinglestepConfig", "DEISConfig", "DPMSolverSDEConfig", "DDIMInverseConfig",
    "ddpm_step", "ddim_step", "euler_step", "euler_ancestral_step", "dpmpp_2m_step", "pndm_transfer", "multistep_eps",
    "unipc_update", "heun_step", "sample_ddpm", "sample_ddim", "sample_euler", "sample_euler_ancestral",
    "sample_heun", "sample_dpmpp_2m", "sample_pndm", "sample_unipc", "lms_coefficients", "lms_step", "sample_lms",
    "lcm_step", "lcm_timesteps", "sample_lcm", "tcd_step", "sample_tcd", "dpm2_step", "midpoint_sigmas",
    "sample_dpm2", "dpmpp_singlestep_update", "sample_dpmpp_singlestep", "singlestep_orders",
    "deis_coefficients", "deis_step", "sample_deis", "BrownianNoise", "dpmpp_sde_update", "sample_dpmpp_sde",
]
