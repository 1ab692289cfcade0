"""The scheduler classes against diffusers' classes of the same name (timesteps, sigmas, whole seeded trajectories,
img2img starts, add_noise) and their config handling: round trips through diffusers, cross-loading, clear errors."""
import copy
import inspect
import itertools
import json
import logging
import warnings

import numpy as np
import pytest
import torch

from latentdiff import schedulers as S
from latentdiff.guidance import Denoiser

logging.getLogger("diffusers").setLevel(logging.ERROR)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # inside diffusers
              pytest.mark.filterwarnings("ignore:Should have t:UserWarning")]  # torchsde, under diffusers' DPM++ SDE

NAMES = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
         "HeunDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "UniPCMultistepScheduler",
         "LMSDiscreteScheduler", "LCMScheduler", "TCDScheduler", "KDPM2DiscreteScheduler",
         "KDPM2AncestralDiscreteScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
         "DPMSolverSDEScheduler", "DDIMInverseScheduler"]
RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}
STEPS = (10, 25, 50)
SPACINGS = ("leading", "trailing", "linspace")


def variants(name):
    """Options swept on top of schedule x prediction x spacing x steps, per scheduler."""
    if name == "DDPMScheduler":
        return [dict(clip_sample=False), dict(clip_sample=True, steps_offset=1)]
    if name == "DDIMInverseScheduler":  # (inversion: from clean latents towards noise)
        return [dict(clip_sample=False), dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                dict(clip_sample=True)]
    if name == "DDIMScheduler":
        return [dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1, eta=0.0),
                dict(clip_sample=False, eta=0.8), dict(clip_sample=True, eta=0.0)]
    if name == "DPMSolverMultistepScheduler":  # "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE (Karras)", 3M, 1S
        return [dict(use_karras_sigmas=False), dict(use_karras_sigmas=True),
                dict(algorithm_type="sde-dpmsolver++"), dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
                dict(solver_order=3), dict(solver_order=3, lower_order_final=False),
                dict(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), dict(solver_order=1)]
    if name == "DPMSolverSinglestepScheduler":  # "DPM++ 2S" (Karras), its SDE form, orders 3 and 1
        return [dict(), dict(use_karras_sigmas=True), dict(algorithm_type="sde-dpmsolver++"),
                dict(solver_order=3), dict(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
                dict(solver_order=1)]
    if name == "DEISMultistepScheduler":
        return [dict(), dict(use_karras_sigmas=True), dict(solver_order=3), dict(solver_order=1),
                dict(solver_order=3, use_karras_sigmas=True, lower_order_final=False)]
    if name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"):
        return [dict(use_karras_sigmas=False), dict(use_karras_sigmas=True)]
    if name == "UniPCMultistepScheduler":  # (bh1 and lower_order_final=False: test_unipc_onto_sigma_zero)
        return [dict(), dict(use_karras_sigmas=True), dict(solver_order=3, disable_corrector=[1])]
    if name == "TCDScheduler":  # gamma: its default 0.3, deterministic, fully stochastic
        return [dict(), dict(eta=0.0), dict(eta=1.0)]
    if name == "PNDMScheduler":  # PLMS as Stable Diffusion 1.x ships it; the Runge-Kutta start
        return [dict(skip_prk_steps=True, steps_offset=1), dict(skip_prk_steps=False, set_alpha_to_one=True)]
    return [{}]


def fake_model(x, t):
    """A fixed smooth nonlinear function of (x, t), standing in for a U-Net."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.tanh(0.7 * x + torch.sin(t / 137.0)) * 0.8 + 0.1 * x


def pair(name, **config):
    """Ours and diffusers' scheduler from the same explicit, full config (all of our keys; keys the class does not
    take, as DPM-Solver singlestep takes no timestep_spacing, are left out)."""
    import diffusers

    cls = getattr(S, name)
    if name == "DPMSolverSDEScheduler":  # (diffusers' takes no generator: the Brownian tree's seed is the config's)
        config = {"noise_sampler_seed": 7, **config}
    ours = cls(**{k: v for k, v in config.items() if k not in cls.config_class.absent})
    return ours, reference_scheduler(getattr(diffusers, name), dict(ours.config))


_REFERENCES = {}


def reference_scheduler(cls, config: dict):
    """A new diffusers `cls(**config)`: a copy of one built once per class and config. diffusers' DPM2 constructors
    convert each of the 1000 training noise levels to a timestep through numpy one at a time (a quarter of a second
    per scheduler), and the sweeps below build the same one for each step count."""
    key = (cls, repr(sorted(config.items())))
    if key not in _REFERENCES:
        _REFERENCES[key] = cls(**config)
    return copy.deepcopy(_REFERENCES[key])


def run(sched, x, generator, timesteps=None, **step_kwargs):
    if "generator" in inspect.signature(sched.step).parameters:  # diffusers' deterministic PNDM takes none
        step_kwargs["generator"] = generator
    for t in sched.timesteps if timesteps is None else timesteps:
        out = fake_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **step_kwargs).prev_sample
    return x


def assert_close(ours, ref, what):
    err = (ours - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err <= 1e-5, f"{what}: relative max difference {err:.2e}"


# each scheduler on every pair of beta schedule and spacing, with the prediction types alternating: every pair of any
# two of the three settings is met (all 18 combinations took 2x the time: diffusers' DPM2, LMS, DEIS and DPM-SDE are
# slow; their DPM2 grids alone took ~40 s of the suite)
CASES = [(name, beta_schedule, ["epsilon", "v_prediction"][(r + s) % 2], spacing)
         for name in NAMES for r, beta_schedule in enumerate(RANGES) for s, spacing in enumerate(SPACINGS)]


@pytest.mark.parametrize("name, beta_schedule, prediction_type, spacing", CASES)
def test_trajectories_match_diffusers(name, beta_schedule, prediction_type, spacing):
    start, end = RANGES[beta_schedule]
    if name == "DPMSolverSinglestepScheduler" and spacing != "linspace":
        return  # its grid is always linspace (test_dpm_singlestep_orders_and_grid)
    if name == "DDIMInverseScheduler" and spacing == "linspace":  # (diffusers' refuses it too, in set_timesteps)
        with pytest.raises(ValueError, match="'leading' or 'trailing'"):
            S.DDIMInverseScheduler(timestep_spacing=spacing).set_timesteps(10)
        return
    config = dict(beta_schedule=beta_schedule, beta_start=start, beta_end=end, prediction_type=prediction_type,
                  timestep_spacing=spacing)
    # (DPM-SDE's Brownian tree, in ours and diffusers', costs the most per step: 50 steps on SD's schedule only)
    steps = STEPS[:2] if name == "DPMSolverSDEScheduler" and beta_schedule != "scaled_linear" else STEPS
    # each variant at one step count, in turn over the variants and the cases, so that each meets every step count,
    # as does every beta schedule and every spacing (each variant at all three in every case took 3x the time)
    turn = list(RANGES).index(beta_schedule) + SPACINGS.index(spacing)
    for i, extra in enumerate(variants(name)):
        n = steps[(i + turn) % len(steps)]
        if name == "KDPM2AncestralDiscreteScheduler" and undefined_midpoint(n, **config, **extra):
            continue
        same_trajectory(name, n, extra, **config)


@pytest.mark.parametrize("grid", ["use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("name, extra", [
    ("EulerDiscreteScheduler", {}), ("EulerDiscreteScheduler", {"sigma_min": 0.05, "sigma_max": 10.0}),
    ("HeunDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    ("DPMSolverSinglestepScheduler", {}), ("LMSDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {}), ("DPMSolverSDEScheduler", {}), ("UniPCMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {"solver_order": 3}), ("DEISMultistepScheduler", {})])
def test_exponential_and_beta_sigmas_match_diffusers(name, extra, grid):
    """use_exponential_sigmas: noise levels evenly spaced in log sigma; use_beta_sigmas: at the quantiles of
    Beta(0.6, 0.6), crowded at both ends (from the spaced grid's ends for Euler and Heun, or Euler's sigma_min /
    sigma_max; from the training table's for DPM-Solver, whose timesteps diffusers then truncates rather than
    rounds): the same grid and trajectory as diffusers'."""
    # (10 steps and 25 in turn over the schedules and spacings: both for each took 2x the time)
    for k, (beta_schedule, spacing) in enumerate(itertools.product(("scaled_linear", "squaredcos_cap_v2"), SPACINGS)):
        if name == "DPMSolverSinglestepScheduler" and spacing != "linspace":
            continue  # (its grid is always linspace)
        n = (10, 25)[(k // 3 + k % 3) % 2]
        start, end = RANGES[beta_schedule]
        config = dict(beta_schedule=beta_schedule, beta_start=start, beta_end=end, timestep_spacing=spacing)
        options = {grid: True, **extra}
        if name == "KDPM2AncestralDiscreteScheduler" and undefined_midpoint(n, **config, **options):
            continue
        ours = same_trajectory(name, n, options, **config)
        levels = ours.sigmas[:-1].double().log()
        if not name.startswith(("Heun", "KDPM2", "DPMSolverSDE")):  # (these list their levels twice)
            if grid == "use_exponential_sigmas":
                steps = levels[1:] - levels[:-1]
                assert torch.allclose(steps, steps[:1].expand_as(steps), atol=1e-4)  # evenly spaced in log sigma
            else:  # the largest steps in sigma in the middle, the smallest at both ends
                steps = (ours.sigmas[:n - 1] - ours.sigmas[1:n]).double()
                assert steps[n // 2 - 1] > max(steps[0], steps[-1])
    with pytest.raises(ValueError, match=f"use_karras_sigmas and {grid} are both set"):
        getattr(S, name)(use_karras_sigmas=True, **{grid: True})


def test_beta_quantiles_match_scipy():
    """The Beta distribution's quantiles behind use_beta_sigmas (and its CDF), against scipy's, to float64
    rounding, including the tails where the CDF is flat."""
    import scipy.stats

    from latentdiff.schedulers.grids import beta_quantile, incomplete_beta

    for a, b in [(0.6, 0.6), (0.5, 0.5), (2.0, 5.0), (5.0, 2.0), (1.0, 1.0), (0.3, 3.0), (10.0, 10.0)]:
        ps = np.concatenate([np.linspace(0, 1, 201), [1e-12, 1e-8, 1 - 1e-9]])
        got = np.array([beta_quantile(float(p), a, b) for p in ps])
        np.testing.assert_allclose(got, scipy.stats.beta.ppf(ps, a, b), rtol=0, atol=1e-14)
        xs = np.linspace(0, 1, 101)
        np.testing.assert_allclose([incomplete_beta(float(x), a, b) for x in xs], scipy.stats.beta.cdf(xs, a, b),
                                   rtol=0, atol=1e-14)


def undefined_midpoint(n: int, **config) -> bool:
    """Whether diffusers' DPM2 ancestral grid of n steps holds a NaN midpoint (on a far-spaced first step the
    deterministic part underflows; which grids do depends on the CPU's float rounding: cosine-schedule grids of 2 to
    10 steps on the machines seen), in which case ours must refuse it, naming the cause."""
    ours, ref = pair("KDPM2AncestralDiscreteScheduler", **config)
    ref.set_timesteps(n)
    if torch.isfinite(ref.sigmas_interpol).all():
        return False
    with pytest.raises(ValueError, match="its midpoint is undefined"):
        ours.set_timesteps(n)
    return True


def test_dpm2_ancestral_refuses_exactly_the_grids_where_diffusers_has_no_midpoint():
    config = dict(beta_schedule="squaredcos_cap_v2", beta_start=1e-4, beta_end=0.02)
    refused = [(spacing, n) for spacing in SPACINGS for n in range(1, 12)
               if undefined_midpoint(n, timestep_spacing=spacing, **config)]
    assert refused and ("leading", 10) not in refused  # (some grids are refused, not all)


def same_trajectory(name: str, n: int, extra: dict, **config):
    """Ours and diffusers' scheduler of `config` and `extra` (whose "eta" goes to step) sample alike over n steps:
    the same grid, noise levels and starting scale, and a trajectory of fake_model within 1e-5. Returns ours. Beta
    grids: fractional timesteps and noise levels equal to float rounding (their quantiles are ours, diffusers' are
    scipy's: both within 1e-15 of the true ones, not always the same float)."""
    extra = dict(extra)
    step_kwargs = {"eta": extra.pop("eta")} if "eta" in extra else {}
    ours, ref = pair(name, **config, **extra)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(0)  # diffusers' own lookup trips over the repeated timesteps of rounded grids
    what = f"{name} {extra} {step_kwargs} n={n}"
    assert ours.timesteps.dtype == ref.timesteps.dtype, what
    if extra.get("use_beta_sigmas") and ours.timesteps.is_floating_point():
        torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=1e-12, atol=1e-9, msg=what)
    else:
        assert torch.equal(ours.timesteps, ref.timesteps), what
    if hasattr(ours, "sigmas") and extra.get("use_beta_sigmas"):
        torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=2e-7, atol=0, msg=what)  # (1 float32 ulp)
    elif hasattr(ours, "sigmas"):
        assert torch.equal(ours.sigmas, ref.sigmas), what
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma), what
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod), what
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n)) * float(ref.init_noise_sigma)
    a = run(ours, x, torch.Generator().manual_seed(1), **step_kwargs)
    b = run(ref, x, torch.Generator().manual_seed(1), **step_kwargs)
    assert torch.isfinite(a).all(), what
    if name == "DEISMultistepScheduler":
        assert_deis_close(a, b, ref, x, n, what)
    else:
        assert_close(a, b, what)
    return ours


def assert_deis_close(ours, ref32, ref, x, n, what):
    """diffusers' DEIS adds x / alpha and the noise estimates' large terms of opposite signs, with its coefficients
    in float32 even for float64 samples: from the noisiest levels it loses digits (2.5e-2 in a first step from
    the cosine schedule's t = 999; ours, written without that cancellation, 3e-7). So the reference here is
    diffusers' run in float64 throughout (its noise levels made float64); ours stays within 1e-5 of it or, where
    diffusers' float32 run errs more (Karras noise levels from the cosine schedule's sigma 2e4), within that."""
    ref.set_timesteps(n)
    ref.set_begin_index(0)
    ref.sigmas = ref.sigmas.double()
    exact = run(ref, x.double(), None)
    scale = max(1.0, exact.abs().max().item())
    err = (ours.double() - exact).abs().max().item() / scale
    err32 = (ref32.double() - exact).abs().max().item() / scale
    assert err <= max(1e-5, err32), f"{what}: relative max difference {err:.2e} (diffusers' float32: {err32:.2e})"


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("PNDMScheduler", "LMSDiscreteScheduler",
                                                                 "DDIMInverseScheduler")])
def test_img2img_start_and_add_noise_match_diffusers(name):  # PNDM: test_pndm_img2img_start; LMS: test_lms_img2img
    """Start part-way: add_noise at timesteps[k], then step over timesteps[k:] (with and without set_begin_index)."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    if name in ("DDPMScheduler", "DDIMScheduler"):
        config["clip_sample"] = False
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for begin in (True, False):
        ours, ref = pair(name, **config)
        ours.set_timesteps(20)
        ref.set_timesteps(20)
        k = ours.start_index(7)  # 7 of 20 steps done (Heun's grid has two entries a step)
        assert k == 7 * ours.order
        if hasattr(ref, "set_begin_index"):  # diffusers' DDPM and DDIM have none
            ref.set_begin_index(k)
        if begin:
            ours.set_begin_index(k)
        t0 = ours.timesteps[k:k + 1].repeat(2)
        xa, xb = ours.add_noise(x0, noise, t0), ref.add_noise(x0, noise, t0)
        assert_close(xa, xb, f"{name} add_noise")
        a = run(ours, xa, torch.Generator().manual_seed(2), ours.timesteps[k:])
        b = run(ref, xb, torch.Generator().manual_seed(2), ref.timesteps[k:])
        assert_close(a, b, f"{name} img2img begin_index={begin}")


def test_lms_img2img_starts_at_first_order():
    """Started part-way, LMS has one slope: its first step is Euler's, and the order then grows as the slopes come
    (diffusers' applies the weights of order min(step index + 1, 4) to the one slope it has there instead). From a
    start at step 0 the two agree (test_trajectories_match_diffusers)."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    lms, euler = S.LMSDiscreteScheduler(**config), S.EulerDiscreteScheduler(**config)
    for sched in (lms, euler):
        sched.set_timesteps(20)
        sched.set_begin_index(7)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    t = lms.timesteps[7]
    assert_close(lms.step(fake_model(x, t), t, x).prev_sample, euler.step(fake_model(x, t), t, x).prev_sample, "LMS")
    assert [round(c, 6) for c in S.lms_coefficients([0.0, 1.0])] == [-1.0]  # first order: sigma_next - sigma
    # order 2 over nodes 2, 3 from 2 to 1: the Adams-Bashforth weights times the step (-1): -1.5 and +0.5
    assert [round(c, 6) for c in S.lms_coefficients([1.0, 2.0, 3.0])] == [-1.5, 0.5]


def test_begin_index_bounds():
    sched = S.EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.set_begin_index(0)
    sched.set_timesteps(10)
    sched.set_begin_index(10)  # img2img at strength 0: nothing left to run
    with pytest.raises(ValueError, match="begin_index=11"):
        sched.set_begin_index(11)
    sched.set_begin_index(4)
    with pytest.raises(ValueError, match="begin_index=4"):  # a timestep before the start is not in the grid
        sched.step(torch.zeros(1, 1), sched.timesteps[2], torch.zeros(1, 1))


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_add_noise_at_training_timesteps_matches_diffusers(name):
    ours, ref = pair(name, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (5,), generator=g)
    assert torch.equal(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert torch.equal(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))


@pytest.mark.parametrize("name", NAMES)
def test_steps_are_stateless_and_reruns_agree(name):
    """A second loop without set_timesteps gives the same result; a step at a foreign timestep is refused."""
    sched = getattr(S, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(12)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    first = run(sched, x, torch.Generator().manual_seed(3))
    again = run(sched, x, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="timestep"):
        sched.step(x, 0.5, x)


@pytest.mark.parametrize("name, extra, levels, scale", [
    ("DPMSolverMultistepScheduler", {}, "sigmas", 1.5),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "sigmas", 1.5),
    ("UniPCMultistepScheduler", {"solver_order": 3}, "sigmas", 1.5),
    ("DEISMultistepScheduler", {"solver_order": 3}, "sigmas", 1.5),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "sigmas", 1.5),
    ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1}, "alphas_cumprod", 0.9),
    ("PNDMScheduler", {"skip_prk_steps": False, "prediction_type": "v_prediction"}, "alphas_cumprod", 0.9),
])
def test_step_scalars_are_kept_only_for_the_same_levels(name, extra, levels, scale):
    """DPM-Solver++, UniPC, DEIS, PNDM and the Euler family (scale_model_input) work each step's scalars out once
    and keep them for later calls while the levels they come from (the grid's sigmas, the training schedule) are
    the same tensor, unchanged: a loop after other grids, or under inference mode, is bit-identical to a new
    scheduler's, and levels edited in place are seen."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def loop(sched, steps, scale=None):
        sched.set_timesteps(steps)
        if scale is not None:
            getattr(sched, levels).mul_(scale)
        return run(sched, x * sched.init_noise_sigma, torch.Generator().manual_seed(3))

    def fresh(steps, scale=None):
        return loop(getattr(S, name)(**extra), steps, scale)

    sched = getattr(S, name)(**extra)
    for steps in (12, 5, 12, 7, 12):
        assert torch.equal(loop(sched, steps), fresh(steps)), steps
    with torch.inference_mode():
        assert torch.equal(loop(sched, 12), fresh(12))
    edited = loop(sched, 12, scale)  # (the same grid as the kept scalars', then its levels changed)
    assert not torch.equal(edited, fresh(12))
    assert torch.equal(edited, fresh(12, scale))
    if levels == "sigmas":  # (set_timesteps makes them anew; the training schedule stays edited)
        assert torch.equal(loop(sched, 12), fresh(12))


@pytest.mark.parametrize("name, sampler", [
    ("DDPMScheduler", S.sample_ddpm), ("DDIMScheduler", S.sample_ddim), ("EulerDiscreteScheduler", S.sample_euler),
    ("EulerAncestralDiscreteScheduler", S.sample_euler_ancestral), ("DPMSolverMultistepScheduler", S.sample_dpmpp_2m),
    ("UniPCMultistepScheduler", S.sample_unipc), ("LMSDiscreteScheduler", S.sample_lms),
    ("DEISMultistepScheduler", S.sample_deis),
])
def test_pure_samplers_equal_the_scheduler_loops(name, sampler):
    sched = getattr(S, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                             prediction_type="v_prediction", **({"clip_sample": False} if "DD" in name else {}))
    sched.set_timesteps(15)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    denoiser = Denoiser(fake_model, "v_prediction")
    if name in ("DDPMScheduler", "DDIMScheduler"):
        kwargs = dict(alphas_cumprod=sched.alphas_cumprod, generator=torch.Generator().manual_seed(1))
    elif name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                  "LMSDiscreteScheduler", "DEISMultistepScheduler"):
        kwargs = dict(sigmas=sched.sigmas)
    else:
        kwargs = dict(sigmas=sched.sigmas, generator=torch.Generator().manual_seed(1))
    got = sampler(denoiser, x, sched.timesteps, **kwargs)
    assert_close(got, run(sched, x, torch.Generator().manual_seed(1)), name)
    if name == "DPMSolverMultistepScheduler":  # 3M too
        sched = S.DPMSolverMultistepScheduler.from_config(sched.config, solver_order=3)
        sched.set_timesteps(15)
        got = sampler(denoiser, x, sched.timesteps, order=3, **kwargs)
        assert_close(got, run(sched, x, torch.Generator().manual_seed(1)), "3M")


@pytest.mark.parametrize("config", [dict(solver_type="bh1"), dict(lower_order_final=False),
                                    dict(solver_order=3, lower_order_final=False, solver_type="bh1")])
def test_unipc_onto_sigma_zero(config):
    """The step onto sigma = 0 returns the x0 estimate. There diffusers' UniPC gives NaN with bh1 (B(h) = h = -inf
    times a zero correction) and fails with lower_order_final=False (higher orders divide by h = inf); every step
    before matches it."""
    ours, ref = pair("UniPCMultistepScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                     **config)
    for n in (5, 12):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        a = b = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n))
        for t in ours.timesteps[:-1]:
            a = ours.step(fake_model(a, t), t, a).prev_sample
            b = ref.step(fake_model(b, t), t, b).prev_sample
        assert_close(a, b, f"{config} n={n}")
        t = ours.timesteps[-1]
        last = ours.step(fake_model(a, t), t, a)
        assert torch.equal(last.prev_sample, last.pred_original_sample)
        try:  # if this fails, diffusers' last step works: compare it
            assert not torch.isfinite(ref.step(fake_model(b, t), t, b).prev_sample).all()
        except torch.linalg.LinAlgError:  # order 3 there: a singular system (every ratio is 0)
            pass


AYS_TIMESTEPS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # "Align Your Steps" for SD 1.5 (10 steps)
AYS_SIGMAS = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029, 0.0]  # 11 steps


@pytest.mark.parametrize("name, grid", [("EulerDiscreteScheduler", dict(timesteps=AYS_TIMESTEPS)),
                                        ("HeunDiscreteScheduler", dict(timesteps=AYS_TIMESTEPS)),
                                        ("EulerDiscreteScheduler", dict(sigmas=AYS_SIGMAS)),
                                        ("DPMSolverMultistepScheduler", dict(timesteps=AYS_TIMESTEPS)),
                                        ("DPMSolverSinglestepScheduler", dict(timesteps=AYS_TIMESTEPS))])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_custom_grids_match_diffusers(name, grid, prediction_type):
    """set_timesteps(timesteps=...) / (sigmas=...) where diffusers' class takes them: the same grid and noise
    levels, the same trajectory."""
    ours, ref = pair(name, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                     prediction_type=prediction_type)
    ours.set_timesteps(**grid)
    ref.set_timesteps(**grid)
    ref.set_begin_index(0)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    assert ours.num_inference_steps == ref.num_inference_steps == 10 + ("sigmas" in grid)
    assert len(ours.timesteps) == ours.num_inference_steps * ours.order - (ours.order - 1)
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(ref.init_noise_sigma)
    assert_close(run(ours, x, None), run(ref, x, None), f"{name} {list(grid)}")


def test_custom_grid_errors():
    euler = S.EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="DDIMScheduler takes no custom timesteps .*DPMSolverMultistepScheduler, "
                                         "DPMSolverSinglestepScheduler, EulerDiscreteScheduler, "
                                         "HeunDiscreteScheduler, LCMScheduler, TCDScheduler do"):
        S.DDIMScheduler().set_timesteps(timesteps=AYS_TIMESTEPS)
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler takes no custom sigmas"):
        S.DPMSolverMultistepScheduler().set_timesteps(sigmas=AYS_SIGMAS)
    with pytest.raises(ValueError, match="exactly one of num_inference_steps, timesteps or sigmas"):
        euler.set_timesteps(10, timesteps=AYS_TIMESTEPS)
    with pytest.raises(ValueError, match="exactly one"):
        euler.set_timesteps()
    with pytest.raises(ValueError, match="timesteps must decrease strictly"):
        euler.set_timesteps(timesteps=AYS_TIMESTEPS[::-1])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        euler.set_timesteps(timesteps=[1200, 500, 3])
    with pytest.raises(ValueError, match="sigmas must be a list of at least 2 finite numbers"):
        euler.set_timesteps(sigmas=[3.0])
    with pytest.raises(ValueError, match="custom timesteps with use_karras_sigmas=True"):
        S.DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=AYS_TIMESTEPS)


def test_dpmpp_2m_sde_pure_sampler_and_variance_noise():
    """The SDE form: sample_dpmpp_2m(sde=True) draws the scheduler's noise from the same generator; given the
    noise as variance_noise, the scheduler draws none; per-image generators make each image its own."""
    sched = S.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    sched.set_timesteps(12)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    looped = run(sched, x, torch.Generator().manual_seed(1))
    got = S.sample_dpmpp_2m(Denoiser(fake_model), x, sched.timesteps, sched.sigmas, sde=True,
                            generator=torch.Generator().manual_seed(1))
    assert_close(got, looped, "sample_dpmpp_2m(sde=True)")
    assert (looped - run(sched, x, torch.Generator().manual_seed(2))).abs().max() > 1e-2  # the noise matters
    g, y = torch.Generator().manual_seed(1), x
    for t in sched.timesteps:
        noise = torch.randn(x.shape, generator=g)
        y = sched.step(fake_model(y, t), t, y, variance_noise=noise, generator=torch.Generator()).prev_sample
    assert_close(y, looped, "variance_noise")
    gens = lambda: [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]  # noqa: E731
    pair_run = run(sched, x, gens())
    alone = run(sched, x[1:], [torch.Generator().manual_seed(6)])
    assert_close(pair_run[1:], alone, "per-image generators")


def test_heun_pure_sampler_equals_the_scheduler_loop():
    """sample_heun walks the distinct timesteps, two model calls a step; the class lists them as diffusers does."""
    sched = S.HeunDiscreteScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                    use_karras_sigmas=True)
    sched.set_timesteps(9)
    assert len(sched.timesteps) == 17 and torch.equal(sched.timesteps[1::2], sched.timesteps[2::2])
    levels = torch.cat([sched.timesteps[:1], sched.timesteps[1::2]])
    sigmas = torch.cat([sched.sigmas[:1], sched.sigmas[1::2]])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    got = S.sample_heun(Denoiser(fake_model, "v_prediction"), x, levels, sigmas)
    assert_close(got, run(sched, x, None), "sample_heun")
    sched.set_begin_index(3)  # a timestep listed twice, looked up afresh: its Euler step (entry 4), not entry 3
    assert sched.index_for_timestep(sched.timesteps[3]) == 4


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_pure_sampler_equals_the_scheduler_loop(skip_prk_steps):
    """sample_pndm steps between the distinct timesteps (midpoints at t - stride // 2); the class walks diffusers'
    grid, whose Runge-Kutta midpoints are the next timestep + stride // 2: the same points for an even stride."""
    sched = S.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                            skip_prk_steps=skip_prk_steps)
    for n in (10, 15):  # strides 100 and 66
        sched.set_timesteps(n)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(n))
        levels = torch.arange(n - 1, -1, -1) * (1000 // n) + 1  # "leading" spacing, steps_offset 1
        got = S.sample_pndm(Denoiser(fake_model), x, levels, sched.alphas_cumprod, sched.final_alpha_cumprod,
                            runge_kutta=not skip_prk_steps)
        assert_close(got, run(sched, x, None), f"n={n}")


def pndm_pair(skip_prk_steps, n):
    ours, ref = pair("PNDMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                     steps_offset=1, skip_prk_steps=skip_prk_steps)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    return ours, ref


def test_pndm_img2img_start():
    """img2img after s of n steps starts at start_index(s), at the s-th noise level; with no history there its first
    step is first order (diffusers' own first step), then Adams-Bashforth of growing order. diffusers' img2img slices
    PNDM's grid by step count instead (so its sample's noise level and timestep part by a step); its scheduler,
    driven with the same start (its counter moved past the predictor/corrector pair after one step), is the
    reference. The Runge-Kutta grid: a start inside it runs whole Runge-Kutta steps, one past it equals PLMS's."""
    n, g = 20, torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    plms, _ = pndm_pair(True, n)
    prk, _ = pndm_pair(False, n)
    levels = plms.timesteps[torch.arange(len(plms.timesteps)) != 1]  # the distinct timesteps
    assert [plms.start_index(s) for s in (0, 1, 7, n)] == [0, 2, 8, n + 1]
    assert [prk.start_index(s) for s in (0, 1, 3, 7, n)] == [0, 4, 12, 16, n + 9]
    for s in (1, 7):
        ours, ref = pndm_pair(True, n)
        k = ours.start_index(s)
        assert ours.timesteps[k] == levels[s] and torch.equal(ours.timesteps[k:], levels[s:])
        ours.set_begin_index(k)
        x = ours.add_noise(x0, noise, ours.timesteps[k:k + 1].repeat(2))
        a = run(ours, x, None, ours.timesteps[k:])
        b = x
        for j, t in enumerate(ours.timesteps[k:]):
            ref.counter = 2 if j else 0
            b = ref.step(fake_model(b, t), t, b).prev_sample
        assert_close(a, b, f"PLMS img2img from step {s}")
        if s == 7:  # past the Runge-Kutta steps both grids hold the same timesteps from there
            other, _ = pndm_pair(False, n)
            other.set_begin_index(other.start_index(s))
            assert torch.equal(other.timesteps[other.start_index(s):], ours.timesteps[k:])
            assert torch.equal(run(other, x, None, other.timesteps[other.start_index(s):]), a)
    ours, ref = pndm_pair(False, n)  # one whole Runge-Kutta step from the second noise level
    ours.set_begin_index(4)
    ref.counter = 4
    a = b = x0
    for t in ours.timesteps[4:8]:
        a = ours.step(fake_model(a, t), t, a).prev_sample
        b = ref.step(fake_model(b, t), t, b).prev_sample
    assert_close(a, b, "a Runge-Kutta step begun at the second noise level")
    with pytest.raises(ValueError, match="inside a Runge-Kutta step"):
        ours.set_begin_index(5)
        ours.step(x0, ours.timesteps[5], x0)
    # a fresh loop over a timestep listed twice begins with the entry that starts a step
    for sched, k, first in ((plms, 1, 2), (prk, 3, 4), (prk, 7, 8)):
        sched.set_timesteps(n)
        assert sched.index_for_timestep(sched.timesteps[k]) == first


# ---- configs ----------------------------------------------------------------------------------------------------
CONFIGS = {
    "DDPMScheduler": dict(clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing"),
    "DDIMScheduler": dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "EulerDiscreteScheduler": dict(use_karras_sigmas=True, prediction_type="v_prediction"),
    "EulerAncestralDiscreteScheduler": dict(timestep_spacing="leading", steps_offset=1),
    "DPMSolverMultistepScheduler": dict(use_karras_sigmas=True, lower_order_final=False),
    "PNDMScheduler": dict(skip_prk_steps=True, steps_offset=1),
    "UniPCMultistepScheduler": dict(solver_order=3, disable_corrector=[2], use_karras_sigmas=True),
    "HeunDiscreteScheduler": dict(use_karras_sigmas=True, timestep_spacing="trailing"),
    "LMSDiscreteScheduler": dict(use_karras_sigmas=True, prediction_type="v_prediction", steps_offset=1),
    "LCMScheduler": dict(original_inference_steps=100, timestep_scaling=5.0, prediction_type="v_prediction"),
    "TCDScheduler": dict(original_inference_steps=25, clip_sample=True),
    "KDPM2DiscreteScheduler": dict(use_karras_sigmas=True, timestep_spacing="trailing"),
    "KDPM2AncestralDiscreteScheduler": dict(use_karras_sigmas=True, prediction_type="v_prediction"),
    "DPMSolverSinglestepScheduler": dict(use_karras_sigmas=True, solver_order=3, algorithm_type="sde-dpmsolver++"),
    "DEISMultistepScheduler": dict(use_karras_sigmas=True, solver_order=3, timestep_spacing="trailing"),
    "DPMSolverSDEScheduler": dict(use_karras_sigmas=True, noise_sampler_seed=11, timestep_spacing="trailing"),
    "DDIMInverseScheduler": dict(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"),
}


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_diffusers(name, tmp_path):
    import diffusers

    ours = getattr(S, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **CONFIGS[name])
    ours.save_config(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name
    ref = getattr(diffusers, name).from_pretrained(tmp_path / "a")
    assert {k: ref.config[k] for k in ours.config} == ours.config.to_dict()
    ref.save_config(tmp_path / "b")
    back = getattr(S, name).from_pretrained(tmp_path / "b")
    assert back.config == ours.config and dict(back.config) == dict(ours.config)
    assert back.config.beta_schedule == "scaled_linear" and back.config["beta_end"] == 0.012


def test_trained_betas(tmp_path):
    import diffusers

    betas = torch.linspace(1e-4, 0.03, 100).tolist()
    ours, ref = pair("DDIMScheduler", num_train_timesteps=100, trained_betas=betas, clip_sample=False)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    ours.save_config(tmp_path)
    assert torch.equal(diffusers.DDIMScheduler.from_pretrained(tmp_path).betas, ours.betas)
    assert S.DDIMScheduler.from_pretrained(tmp_path).config == ours.config
    with pytest.raises(ValueError, match="trained_betas"):
        S.DDIMScheduler(num_train_timesteps=99, trained_betas=betas)


def test_from_config_across_schedulers_keeps_the_training_schedule():
    import diffusers

    euler = S.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                     prediction_type="v_prediction")
    ddim = S.DDIMScheduler.from_config(euler.config)
    assert (ddim.config.beta_schedule, ddim.config.prediction_type) == ("scaled_linear", "v_prediction")
    assert ddim.config.timestep_spacing == "linspace"  # shared keys carry over, as in diffusers
    for source in NAMES:  # every class takes every other class's config, ours and diffusers'
        src = getattr(S, source).from_config(ddim.config)
        theirs = getattr(diffusers, source)(**dict(src.config)).config
        for name in NAMES:
            getattr(S, name).from_config(src.config)
            getattr(S, name).from_config(theirs)
    pndm = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
            "clip_sample": False}  # Stable Diffusion 1.5's scheduler_config.json
    dpm = S.scheduler_from_name("dpm++", pndm, use_karras_sigmas=True)
    assert isinstance(dpm, S.DPMSolverMultistepScheduler) and dpm.config.use_karras_sigmas
    assert dpm.config.steps_offset == 1 and dpm.config.beta_end == 0.012
    # DDPM's and DDIM's x0 clipping (their default) only where the source config asks for it
    plain_dpm = S.DPMSolverMultistepScheduler().config
    assert not S.scheduler_from_name("ddim", plain_dpm).config.clip_sample
    defaulted = {"_use_default_values": ["clip_sample"], "clip_sample": True}  # diffusers filled it in
    assert not S.scheduler_from_name("ddpm", defaulted).config.clip_sample
    assert S.scheduler_from_name("ddim", {"clip_sample": True}).config.clip_sample
    assert S.scheduler_from_name("ddim", plain_dpm, clip_sample=True).config.clip_sample
    assert S.DDIMScheduler.from_config(plain_dpm).config.clip_sample  # from_config itself is diffusers'
    plms = S.scheduler_from_name("pndm", pndm)
    assert plms.config.skip_prk_steps and not plms.config.set_alpha_to_one and plms.config.steps_offset == 1
    assert S.DDIMScheduler.from_config(plms.config).config.set_alpha_to_one is False  # a shared key carries over
    assert {n: type(S.scheduler_from_name(n)).__name__ for n in S.SCHEDULERS} == {
        "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
        "dpm++sde": "DPMSolverMultistepScheduler", "dpm++3m": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler",
        "unipc": "UniPCMultistepScheduler", "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler",
        "lcm": "LCMScheduler", "tcd": "TCDScheduler", "dpm2": "KDPM2DiscreteScheduler",
        "dpm2_a": "KDPM2AncestralDiscreteScheduler", "dpm++2s": "DPMSolverSinglestepScheduler",
        "deis": "DEISMultistepScheduler", "dpmsolver_sde": "DPMSolverSDEScheduler"}
    # another solver's solver_type becomes this one's, as diffusers' classes do it
    assert S.UniPCMultistepScheduler.from_config(S.DPMSolverMultistepScheduler().config).config.solver_type == "bh2"
    unipc = S.UniPCMultistepScheduler().config
    assert S.DPMSolverMultistepScheduler.from_config(unipc).config.solver_type == "midpoint"
    sde = S.scheduler_from_name("dpm++sde", pndm, use_karras_sigmas=True)
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.use_karras_sigmas
    assert S.scheduler_from_name("dpm++", sde.config).config.algorithm_type == "dpmsolver++"
    three = S.scheduler_from_name("dpm++3m", sde.config).config
    assert (three.solver_order, three.algorithm_type) == (3, "dpmsolver++")


BAD = [
    ("DDIMScheduler", {"beta_schedule": "sigmoid"}, "beta_schedule"),
    ("DDIMScheduler", {"prediction_type": "sample"}, "prediction_type"),
    ("EulerDiscreteScheduler", {"timestep_spacing": "uniform"}, "timestep_spacing"),
    ("DDIMScheduler", {"thresholding": True}, "thresholding"),
    ("DDPMScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("HeunDiscreteScheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),  # (nor Heun, LMS)
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("DPMSolverMultistepScheduler", {"solver_order": 4}, "solver_order"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun"}, "solver_type"),
    ("DDIMScheduler", {"num_train_timesteps": "1000"}, "num_train_timesteps"),
    ("DDIMScheduler", {"clip_sample": 1}, "clip_sample"),
    ("DDIMScheduler", {"beta_start": 0.5, "beta_end": 0.1}, "beta_start"),
    ("DDIMScheduler", {"steps_offset": -1}, "steps_offset"),
    ("DDIMScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas"),  # another scheduler's, not harmless
    ("EulerAncestralDiscreteScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("EulerDiscreteScheduler", {"thresholding": True}, "thresholding"),
    ("PNDMScheduler", {"prediction_type": "sample"}, "prediction_type"),
    ("PNDMScheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),  # diffusers' PNDM has no such key
    ("PNDMScheduler", {"skip_prk_steps": "yes"}, "skip_prk_steps"),
    ("UniPCMultistepScheduler", {"predict_x0": False}, "predict_x0"),
    ("HeunDiscreteScheduler", {"beta_schedule": "exp"}, "beta_schedule"),
    ("UniPCMultistepScheduler", {"solver_order": 4}, "solver_order"),
    ("UniPCMultistepScheduler", {"disable_corrector": [1.5]}, "disable_corrector"),
    ("UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
    ("DPMSolverSinglestepScheduler", {"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
    ("DPMSolverSinglestepScheduler", {"solver_type": "heun"}, "solver_type"),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
    ("DEISMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
]


@pytest.mark.parametrize("name, config, key", BAD)
def test_bad_config_values_name_the_key(name, config, key):
    with pytest.raises(ValueError, match=key):
        getattr(S, name).from_config(config)


def test_harmless_and_unknown_keys():
    sched = S.EulerDiscreteScheduler.from_config({"skip_prk_steps": True, "solver_order": 3, "clip_sample": True,
                                                  "set_alpha_to_one": False, "use_lu_lambdas": False,
                                                  "_use_default_values": ["timestep_spacing"],
                                                  "timestep_spacing": "leading"})
    assert sched.config.timestep_spacing == "linspace"  # a key diffusers only defaulted is not carried over
    with pytest.warns(UserWarning, match="beta_shedule"):
        S.DDIMScheduler.from_config({"beta_shedule": "linear"})
    with pytest.raises(ValueError, match="no option"):
        S.DDIMScheduler(use_karras_sigmas=False)  # the constructor takes only its own keys
    with pytest.raises(ValueError, match="unknown scheduler"):
        S.scheduler_from_name("klms")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        S.DDIMScheduler.from_pretrained("/nonexistent/folder")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.DDIMScheduler.from_config(S.DPMSolverMultistepScheduler().config)


@pytest.mark.parametrize("name", NAMES)
def test_bad_num_inference_steps(name):
    sched = getattr(S, name).from_config(dict(steps_offset=1, timestep_spacing="leading"))
    for n in (0, -3, 1001, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(n)
    if name in ("LCMScheduler", "TCDScheduler"):  # (their steps come from the distillation grid: no offset)
        with pytest.raises(ValueError, match="num_inference_steps=51 is more than original_inference_steps=50"):
            sched.set_timesteps(51)
    elif name == "DPMSolverSinglestepScheduler":  # (its linspace grid of n + 1 points takes no offset)
        with pytest.raises(ValueError, match="num_inference_steps=1000 is more than .* can place apart"):
            sched.set_timesteps(1000)
    elif name not in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"):
        with pytest.raises(ValueError, match="steps_offset"):
            sched.set_timesteps(1000)  # leading spacing + offset would step past the last training step
    else:  # which spaces n + 1 points (as diffusers' does): 999 steps reach past T, 1000 repeat timestep 1 (NaN)
        with pytest.raises(ValueError, match="num_inference_steps=999 with steps_offset=1 gives timestep 1000"):
            sched.set_timesteps(999)
        for spacing in ("leading", "linspace"):
            with pytest.raises(ValueError, match=f"num_inference_steps=1000 is more than timestep_spacing="
                                                 f"'{spacing}' can place apart over 1000 training steps"):
                getattr(S, name)(steps_offset=1, timestep_spacing=spacing).set_timesteps(1000)
    if name == "PNDMScheduler":  # its Runge-Kutta start takes three steps (diffusers' fails with a numpy error)
        for n in (1, 2, 3):
            with pytest.raises(ValueError, match=f"skip_prk_steps=False needs num_inference_steps > 3.*got {n}"):
                sched.set_timesteps(n)
        plms = getattr(S, name)(skip_prk_steps=True)
        plms.set_timesteps(1)
        assert plms.timesteps.tolist() == [0]  # leading spacing, as diffusers'
    if name != "DDPMScheduler":  # DDPM, like diffusers', walks every training step before set_timesteps
        fresh = getattr(S, name)()
        with pytest.raises(ValueError, match="set_timesteps"):
            fresh.step(torch.zeros(1, 4, 2, 2), 999, torch.zeros(1, 4, 2, 2))


ZERO_SNR = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
            "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler"]


@pytest.mark.parametrize("name, spacing", list(itertools.product(ZERO_SNR, ["trailing", "linspace", "leading"])))
def test_zero_terminal_snr_matches_diffusers(name, spacing):
    """rescale_betas_zero_snr (Lin et al. 2024): the rescaled betas, the grids (from pure noise with "trailing"
    spacing) and the v-prediction trajectories, as diffusers' classes give them (the sigma and log-SNR samplers
    raise the last abar to 2^-24)."""
    for extra, n in itertools.product(variants(name), (4, 25)):
        ours = same_trajectory(name, n, extra, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                               prediction_type="v_prediction", timestep_spacing=spacing, rescale_betas_zero_snr=True)
    floor = 2.0**-24 if hasattr(ours, "sigmas") else 0.0
    assert ours.alphas_cumprod[-1] == floor and ours.alphas_cumprod[0] == S.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod[0]


@pytest.mark.parametrize("karras", [False, True])
def test_dpm2_grid_midpoints_and_pure_sampler(karras):
    """DPM2's grid (each step's start, then its midpoint) and both noise-level tables equal diffusers'; the pure
    sampler over the same grid gives the class's trajectory."""
    import diffusers

    ours, ref = pair("KDPM2DiscreteScheduler", beta_schedule="scaled_linear", use_karras_sigmas=karras)
    ours.set_timesteps(12)
    ref.set_timesteps(12)
    assert torch.equal(ours.timesteps, ref.timesteps) and len(ours.timesteps) == 2 * 12 - 1
    torch.testing.assert_close(ours.sigmas_interpol, ref.sigmas_interpol, rtol=0, atol=0, equal_nan=True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * ours.init_noise_sigma
    expected = run(ours, x, None)
    ours.set_timesteps(12)
    steps = ours.timesteps[0::2]
    mids = torch.cat([ours.timesteps[1::2], ours.timesteps[-1:]])
    levels = torch.cat([ours.sigmas[0::2], ours.sigmas[-1:]])
    mid_levels = torch.cat([ours.sigmas_interpol[1::2], ours.sigmas_interpol[-1:]])
    got = S.sample_dpm2(Denoiser(fake_model), x, steps, levels, mids, mid_levels)
    assert_close(got, expected, "sample_dpm2")
    assert isinstance(ref, diffusers.KDPM2DiscreteScheduler)


def test_dpm_singlestep_orders_and_grid():
    """DPM++ 2S: each step's order as diffusers lists it (groups, a first-order last step), its grid whatever the
    config's timestep_spacing (diffusers' class takes none: from_config drops it and steps_offset, as diffusers'
    does; the constructor refuses them), the pure sampler equal to the class's loop, also in its SDE form."""
    import diffusers

    for order, n in itertools.product((1, 2, 3), range(1, 12)):
        ref = diffusers.DPMSolverSinglestepScheduler(solver_order=order)
        ref.set_timesteps(n)
        assert S.singlestep_orders(n, order) == ref.order_list, (order, n)
    leading = dict(S.DDIMScheduler(timestep_spacing="leading", steps_offset=1).config)
    sched = S.DPMSolverSinglestepScheduler.from_config(leading)
    assert "timestep_spacing" not in sched.config and "steps_offset" not in dict(sched.config)
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert S.DDIMScheduler.from_config(sched.config).config.timestep_spacing == "leading"  # (DDIM's own default)
    with pytest.raises(ValueError, match=r"has no option\(s\) \['steps_offset'\]"):
        S.DPMSolverSinglestepScheduler(steps_offset=1)
    for sde in (False, True):
        sched = S.DPMSolverSinglestepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               prediction_type="v_prediction", solver_order=3,
                                               algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++")
        sched.set_timesteps(14)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        got = S.sample_dpmpp_singlestep(Denoiser(fake_model, "v_prediction"), x, sched.timesteps, sched.sigmas,
                                        order=3, sde=sde, generator=torch.Generator().manual_seed(1))
        assert_close(got, run(sched, x, torch.Generator().manual_seed(1)), f"sample_dpmpp_singlestep sde={sde}")


def test_dpmpp_sde_noise_pure_sampler_and_generators(monkeypatch):
    """DPM++ SDE's Brownian noise: the pure sampler with a tree of the config's seed gives the class's trajectory;
    without a seed the tree comes from the step's generator (one per image: each image as if alone; none: torch's
    global generator, as diffusers'); without torchsde a clear error."""
    import sys

    sched = S.DPMSolverSDEScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                    use_karras_sigmas=True, noise_sampler_seed=5)
    sched.set_timesteps(8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    looped = run(sched, x, None)
    positive = sched.sigmas[sched.sigmas > 0]
    noise = S.BrownianNoise(x, positive.min().item(), positive.max().item(), 5)
    got = S.sample_dpmpp_sde(Denoiser(fake_model, "v_prediction"), x, sched.timesteps[0::2],
                             torch.cat([sched.sigmas[0::2], sched.sigmas[-1:]]), sched.timesteps[1::2], noise)
    assert_close(got, looped, "sample_dpmpp_sde")
    unseeded = S.DPMSolverSDEScheduler.from_config(sched.config, noise_sampler_seed=None)
    unseeded.set_timesteps(8)
    gens = lambda: [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]  # noqa: E731
    both = run(unseeded, x, gens())
    assert_close(both[1:], run(unseeded, x[1:], [torch.Generator().manual_seed(6)]), "per-image trees")
    assert (both - run(unseeded, x, [torch.Generator().manual_seed(9)] * 2)).abs().max() > 1e-2  # the noise shows
    with pytest.raises(ValueError, match="got 3 generators for a batch of 2"):
        run(unseeded, x, [torch.Generator()] * 3)
    torch.manual_seed(3)
    first = run(unseeded, x, None)
    torch.manual_seed(3)
    assert torch.equal(first, run(unseeded, x, None))
    monkeypatch.setitem(sys.modules, "torchsde", None)
    unseeded.set_timesteps(8)
    with pytest.raises(ImportError, match="pip install torchsde"):
        run(unseeded, x, None)


def test_ddim_inversion_round_trip():
    """DDIM inverted then run forward over the same grid comes back to the start (the model's output changes
    slowly with t here, as a trained U-Net's does at fine steps): what inversion is for."""
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    inverse, forward = S.DDIMInverseScheduler(**config), S.DDIMScheduler(**config)
    inverse.set_timesteps(200)
    forward.set_timesteps(200)
    assert torch.equal(inverse.timesteps, forward.timesteps.flip(0))
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5

    def model(x, t):  # an eps-predictor smooth in x and t
        return 0.3 * torch.tanh(x) + 0.01 * torch.sin(torch.as_tensor(float(t)) / 300)

    noised = run_with(inverse, x0, model)
    assert (noised - x0).abs().max() > 0.5  # it went somewhere
    back = run_with(forward, noised, model)
    assert (back - x0).abs().max() < 0.03


def run_with(sched, x, model):
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x
