"""The diffusion math in latentdiff.schedules: schedules bit-identical to diffusers', the forward process, SNR,
v targets and the conversions between eps, v and x0 predictions."""
import math

import pytest
import torch

from latentdiff import schedules as sch

RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


def diffusers_ddpm(beta_schedule, **kw):
    import diffusers

    start, end = RANGES[beta_schedule]
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end,
                                   beta_schedule=beta_schedule, **kw)


@pytest.mark.parametrize("beta_schedule", list(RANGES))
def test_tables_are_identical_to_diffusers(beta_schedule):
    ref = diffusers_ddpm(beta_schedule)
    betas = sch.make_betas(beta_schedule, 1000, *RANGES[beta_schedule])
    assert betas.dtype == torch.float32 and torch.equal(betas, ref.betas)
    abar = sch.alphas_cumprod(betas)
    assert torch.equal(abar, ref.alphas_cumprod)
    assert torch.equal(sch.ve_sigmas(abar), ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5)


def test_schedules_follow_their_papers():
    lin = sch.linear_betas(1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    sl = sch.scaled_linear_betas(1000, 0.00085, 0.012)
    assert torch.allclose(sl.sqrt().diff(), torch.full((999,), (0.012**0.5 - 0.00085**0.5) / 999), atol=1e-7)
    cos = sch.cosine_betas(1000).double()
    abar = torch.cumprod(1 - cos, 0)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal eq. 17
    assert abar[499].item() == pytest.approx(f(0.5) / f(0.0), rel=1e-5)
    assert cos.max().item() == pytest.approx(0.999)  # the cap
    trained = sch.make_betas("linear", 4, trained_betas=[0.1, 0.2, 0.3, 0.4])
    assert torch.equal(trained, torch.tensor([0.1, 0.2, 0.3, 0.4]))


def test_bad_schedules_are_named():
    with pytest.raises(ValueError, match="beta_schedule"):
        sch.make_betas("sigmoid")
    with pytest.raises(ValueError, match="trained_betas"):
        sch.make_betas("linear", 10, trained_betas=[0.1, 0.2])
    with pytest.raises(ValueError, match="trained_betas"):
        sch.make_betas("linear", 2, trained_betas=[0.1, 1.5])


@pytest.mark.parametrize("beta_schedule", list(RANGES))
def test_q_sample_and_velocity_match_diffusers(beta_schedule):
    ref = diffusers_ddpm(beta_schedule)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 5, 5, generator=g), torch.randn(6, 4, 5, 5, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    abar = sch.alphas_cumprod(sch.make_betas(beta_schedule, 1000, *RANGES[beta_schedule]))
    assert torch.equal(sch.q_sample(x0, noise, t, abar), ref.add_noise(x0, noise, t))
    assert torch.equal(sch.v_target(x0, noise, t, abar), ref.get_velocity(x0, noise, t))
    with pytest.raises(ValueError, match="integer"):
        sch.q_sample(x0, noise, t.float(), abar)


def test_forward_process_has_the_right_moments():
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: mean sqrt(abar) x0 and variance 1 - abar, per sample."""
    abar = sch.alphas_cumprod(sch.scaled_linear_betas(1000))
    t = torch.tensor([10, 600])
    x0 = torch.full((2, 200_000), 2.0)
    xt = sch.q_sample(x0, torch.randn(2, 200_000, generator=torch.Generator().manual_seed(1)), t, abar)
    assert torch.allclose(xt.mean(1), 2 * abar[t].sqrt(), atol=0.01)
    assert torch.allclose(xt.var(1), 1 - abar[t], atol=0.01)


def test_snr():
    abar = sch.alphas_cumprod(sch.linear_betas(1000))
    t = torch.tensor([0, 500, 999])
    s = sch.snr(t, abar)
    assert torch.allclose(s, abar[t] / (1 - abar[t]))
    assert bool((s.diff() < 0).all())  # noise dominates as t grows


def test_prediction_conversions_are_consistent():
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    alpha = torch.tensor(0.6, dtype=torch.float64)
    sigma = (1 - alpha**2) ** 0.5
    x = alpha * x0 + sigma * eps
    v = sch.x0_eps_to_v(x0, eps, alpha, sigma)
    for out, kind in ((eps, "epsilon"), (v, "v_prediction")):
        got_x0, got_eps = sch.predict_x0_eps(out, x, alpha, sigma, kind)
        assert torch.allclose(got_x0, x0) and torch.allclose(got_eps, eps)
    assert torch.allclose(sch.x0_to_eps(x0, x, alpha, sigma), eps)
    assert torch.allclose(sch.v_to_eps(v, x, alpha, sigma), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        sch.predict_x0_eps(eps, x, alpha, sigma, "sample")


def test_vp_and_ve_views_agree():
    abar = sch.alphas_cumprod(sch.scaled_linear_betas(1000))
    alpha, sigma = sch.vp_coefficients(sch.ve_sigmas(abar))
    assert torch.allclose(alpha, abar.sqrt(), rtol=1e-5) and torch.allclose(sigma, (1 - abar).sqrt(), rtol=1e-5)


def test_randn_draws_like_diffusers():
    from diffusers.utils.torch_utils import randn_tensor

    one = torch.Generator().manual_seed(3)
    assert torch.equal(sch.randn((2, 3), one), randn_tensor((2, 3), generator=torch.Generator().manual_seed(3)))
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    rows = sch.randn((2, 3), gens)
    assert torch.equal(rows[1:], torch.randn((1, 3), generator=torch.Generator().manual_seed(6)))
    ref = randn_tensor((2, 3), generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    assert torch.equal(rows, ref)
    with pytest.raises(ValueError, match="generators"):
        sch.randn((3, 3), gens)
