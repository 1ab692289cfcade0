"""Samplers against closed-form results, independent of diffusers, and the model wrappers (denoiser, guidance).

For data x0 ~ N(mu, s^2) and x_t = a x0 + b eps the optimal noise predictor is known exactly:
E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2). Sampling from it must give back N(mu, s^2).

First-order samplers cannot do that to 2% in 50 steps, however correct: with the exact predictor a DDIM step
shrinks the centred sample by cos(dtheta) relative to the exact flow, theta = atan(b / (a s)) (Cauchy-Schwarz), so
n steps over a quarter turn lose about pi^2 / (8 n) of the std, 2.5% at n = 50, and ancestral steps lose more
(the variance of x0 given x_t is dropped). So first-order samplers get 4% (deterministic) or 8% (ancestral) at 50
steps and 2% at 500, where the error has shrunk like 1/n; and DDIM must match the exact discrete recursion of its
own variance at 50 steps. DDPM (1000 steps) and DPM-Solver++ (second order) must be within 2% at once.
"""
import math

import pytest
import torch

from latentdiff import schedulers as S
from latentdiff.guidance import ClassifierFreeGuidance, Denoiser, guide
from latentdiff.schedules import ve_sigmas, vp_coefficients, x0_eps_to_v

MU, STD, N = 1.5, 1.0, 20_000
CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading")


def gaussian_model(alphas_cumprod: torch.Tensor, prediction_type: str):
    """The exact eps (or v) predictor for N(MU, STD^2) data. Like a network it knows its noise level only through
    t: log sigma interpolated linearly between training steps (exact at integer t)."""
    log_sigma = ve_sigmas(alphas_cumprod).double().log()

    def model(x, t):
        t = float(t)
        i = min(int(math.floor(t)), len(log_sigma) - 2)
        alpha, sigma = vp_coefficients(torch.exp(log_sigma[i] + (t - i) * (log_sigma[i + 1] - log_sigma[i])))
        eps = sigma * (x - alpha * MU) / (alpha**2 * STD**2 + sigma**2)
        if prediction_type == "epsilon":
            return eps
        return x0_eps_to_v((x - sigma * eps) / alpha, eps, alpha, sigma)

    return model


def standard_normal(n: int) -> torch.Tensor:
    """Standardised draws: the start carries no sampling error, so deterministic samplers show only their own."""
    z = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (z - z.mean()) / z.std()


def sample(kind: str, prediction_type: str, steps: int) -> torch.Tensor:
    """Start from the exact marginal q(x_t) at the first timestep and run the pure sampler function."""
    name = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "ddim_eta1": "DDIMScheduler",
            "euler": "EulerDiscreteScheduler", "euler_karras": "EulerDiscreteScheduler",
            "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
            "dpm++_karras": "DPMSolverMultistepScheduler"}[kind]
    extra = {"use_karras_sigmas": True} if kind.endswith("karras") else {}
    extra |= {"clip_sample": False} if kind.startswith("dd") else {}
    sched = getattr(S, name)(**CONFIG, prediction_type=prediction_type, **extra)
    sched.set_timesteps(steps)
    abar = sched.alphas_cumprod.double()
    denoiser = Denoiser(gaussian_model(abar, prediction_type), prediction_type)
    z, g = standard_normal(N), torch.Generator().manual_seed(1)
    ts = sched.timesteps
    if kind.startswith("dd"):
        a, b = abar[ts[0]] ** 0.5, (1 - abar[ts[0]]) ** 0.5
        x = a * MU + (a**2 * STD**2 + b**2) ** 0.5 * z
        if kind == "ddpm":
            return S.sample_ddpm(denoiser, x, ts, abar, generator=g)
        return S.sample_ddim(denoiser, x, ts, abar, eta=1.0 if kind == "ddim_eta1" else 0.0, generator=g)
    sigmas = sched.sigmas.double()
    if kind.startswith("dpm"):  # works on the variance-preserving sample
        a, b = vp_coefficients(sigmas[0])
        return S.sample_dpmpp_2m(denoiser, a * MU + (a**2 * STD**2 + b**2) ** 0.5 * z, ts, sigmas)
    x = MU + (STD**2 + sigmas[0] ** 2) ** 0.5 * z  # Euler's sigma space: x = x0 + sigma eps
    if kind == "euler_a":
        return S.sample_euler_ancestral(denoiser, x, ts, sigmas, generator=g)
    return S.sample_euler(denoiser, x, ts, sigmas)


def relative_errors(x: torch.Tensor) -> tuple[float, float]:
    return abs(x.mean().item() / MU - 1), abs(x.std().item() / STD - 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind, steps", [("ddpm", 1000), ("dpm++", 50), ("dpm++_karras", 50)])
def test_exact_samplers_recover_the_gaussian(kind, steps, prediction_type):
    mean_err, std_err = relative_errors(sample(kind, prediction_type, steps))
    assert mean_err < 0.02 and std_err < 0.02, (mean_err, std_err)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["ddim", "ddim_eta1", "euler", "euler_karras", "euler_a"])
def test_first_order_samplers_converge_to_the_gaussian(kind, prediction_type):
    mean_err, std_err = relative_errors(sample(kind, prediction_type, 50))
    assert mean_err < 0.02 and std_err < (0.08 if kind in ("ddim_eta1", "euler_a") else 0.04), (mean_err, std_err)
    mean_err, std_err = relative_errors(sample(kind, prediction_type, 500))
    assert mean_err < 0.02 and std_err < 0.02, (mean_err, std_err)


def ddim_std(timesteps: torch.Tensor, abar: torch.Tensor, eta: float) -> float:
    """The std DDIM must produce with the exact predictor: each step maps the centred sample y = x_t - a mu to
    (a_p a s^2 + d b) / (a^2 s^2 + b^2) y plus noise of std sigma_eta (Song et al. 2021, eqs. 12 and 16), with
    d = sqrt(1 - a_p^2 - sigma_eta^2); the variance follows in closed form."""
    stride, var = len(abar) // len(timesteps), None
    for t in timesteps:
        a2 = abar[t]
        ap2 = abar[t - stride] if t >= stride else torch.tensor(1.0, dtype=abar.dtype)
        var = a2 * STD**2 + 1 - a2 if var is None else var
        std = eta * ((1 - ap2) / (1 - a2) * (1 - a2 / ap2)) ** 0.5
        gain = (ap2**0.5 * a2**0.5 * STD**2 + (1 - ap2 - std**2) ** 0.5 * (1 - a2) ** 0.5) / (a2 * STD**2 + 1 - a2)
        var = gain**2 * var + std**2
    return var.sqrt().item()


@pytest.mark.parametrize("eta, kind, tolerance", [(0.0, "ddim", 1e-6), (1.0, "ddim_eta1", 0.015)])
def test_ddim_matches_its_exact_discrete_recursion(eta, kind, tolerance):
    sched = S.DDIMScheduler(**CONFIG, clip_sample=False)
    sched.set_timesteps(50)
    x = sample(kind, "epsilon", 50)
    expected = ddim_std(sched.timesteps, sched.alphas_cumprod.double(), eta)
    assert abs(x.std().item() / expected - 1) < tolerance
    assert expected < 0.98  # the 50-step shortfall is DDIM's own, not a bug


def test_a_wrong_predictor_is_caught():
    """The check has teeth: a predictor for the wrong data (mu shifted by 10%) fails it."""
    global MU
    right = MU
    try:
        MU = right * 1.1
        x = sample("dpm++", "epsilon", 50)
    finally:
        MU = right
    assert relative_errors(x)[0] > 0.05


# ---- the wrappers -------------------------------------------------------------------------------------------------
def test_denoiser_gives_x0_and_eps_for_both_parameterisations():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    alpha, sigma = vp_coefficients(torch.tensor(1.7))
    x = alpha * x0 + sigma * eps
    for kind, out in (("epsilon", eps), ("v_prediction", x0_eps_to_v(x0, eps, alpha, sigma))):
        got_x0, got_eps = Denoiser(lambda x_, t_: out, kind)(x, torch.tensor(10), alpha, sigma)
        assert torch.allclose(got_x0, x0, atol=1e-5) and torch.allclose(got_eps, eps, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        Denoiser(lambda x_, t_: x_, "sample")


def test_classifier_free_guidance_wraps_the_model():
    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2)).view(-1, 1) + t

    x, t = torch.ones(2, 4), torch.tensor(3.0)
    cond, uncond = torch.full((2, 5, 8), 2.0), torch.full((2, 5, 8), 0.5)
    out = ClassifierFreeGuidance(model, cond, uncond, scale=7.0)(x, t)
    assert calls == [4]  # one batched call over [uncond, cond]
    assert torch.allclose(out, guide(model(x, t, uncond), model(x, t, cond), 7.0))
    assert torch.allclose(out, torch.full((2, 4), 0.5 + 3 + 7.0 * (2.0 - 0.5)))
    calls.clear()
    for scale, negative in ((1.0, uncond), (0.5, uncond), (7.0, None)):  # conditional pass only
        assert torch.equal(ClassifierFreeGuidance(model, cond, negative, scale)(x, t), model(x, t, cond))
    assert calls == [2, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="shape"):
        ClassifierFreeGuidance(model, cond, uncond[:1])

    def shared_model(x, t, context):  # takes each sample once for all its contexts, as our U-Net does
        calls.append(x.shape[0])
        return model(torch.cat([x] * (context.shape[0] // x.shape[0])), t, context)

    calls.clear()
    assert torch.equal(ClassifierFreeGuidance(shared_model, cond, uncond, 7.0, share_sample=True)(x, t), out)
    assert calls == [2, 4]  # the model got x once


def test_guidance_rescale():
    """guide(..., rescale=phi) (Lin et al. 2024, sec. 3.4): phi = 1 gives each sample the conditional output's std
    with the guided output's direction, phi mixes linearly, 0 is plain guidance; outside [0, 1] is refused."""
    g = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) * 2.0
    plain = guide(uncond, cond, 7.5)
    assert torch.equal(guide(uncond, cond, 7.5, 0.0), plain)
    full = guide(uncond, cond, 7.5, 1.0)
    torch.testing.assert_close(full.flatten(1).std(1), cond.flatten(1).std(1))
    ratio = full / plain  # one positive factor per sample
    assert (ratio.flatten(1).std(1) < 1e-5).all() and (ratio > 0).all()
    assert (ratio.flatten(1).mean(1) < 0.5).all()  # guidance at 7.5 had inflated the spread
    torch.testing.assert_close(guide(uncond, cond, 7.5, 0.7), 0.7 * full + 0.3 * plain)
    model = lambda x, t, context: x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # noqa: E731
    x = torch.randn(3, 4, 8, 8, generator=g)
    c, u = torch.full((3, 5, 8), 2.0), torch.full((3, 5, 8), 0.5)
    torch.testing.assert_close(ClassifierFreeGuidance(model, c, u, 7.5, rescale=0.7)(x, 0),
                               guide(model(x, 0, u), model(x, 0, c), 7.5, 0.7))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"guidance_rescale=.* must lie in \[0, 1\]"):
            ClassifierFreeGuidance(model, c, u, 7.5, rescale=bad)
