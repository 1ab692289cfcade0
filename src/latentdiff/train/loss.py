"""The training objectives, as functions of tensors and explicit random draws.

Latent diffusion (Rombach et al. 2022, eq. 2): z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps with t ~ U{0..T-1} and
eps ~ N(0, I); the U-Net regresses eps (Ho et al. 2020, eq. 14) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0
(Salimans & Ho 2022). The VAE: an L1 + L2 reconstruction through a posterior sample plus a small KL term
(Kingma & Welling 2014; the KL weight as in Rombach et al. 2022, without their perceptual and GAN losses).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..schedules import abar_at, predict_x0_eps, q_sample, snr, v_target


@dataclass
class Draws:
    """Everything random about one training batch: timesteps [B], the diffusion noise eps and the posterior's
    standard-normal noise (both shaped like the latents), and a uniform number in [0, 1) per sample for objectives
    that draw one more value (consistency distillation's guidance scale); with input perturbation, the noise that
    makes z_t (the target stays `noise`)."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    posterior_noise: torch.Tensor
    uniform: torch.Tensor | None = None
    input_noise: torch.Tensor | None = None


@dataclass(frozen=True)
class DrawSpec:
    """What a sample's random draws depend on besides its seed (see `draw_sample`)."""

    latent_shape: tuple[int, ...]
    num_train_timesteps: int
    noise_offset: float = 0.0
    timestep_bias: tuple[int, int, float] | None = None  # (begin, end, portion): see `draw`
    input_perturbation: float = 0.0


def draw_sample(seed: int, spec: DrawSpec) -> dict[str, torch.Tensor]:
    """The draws of one sample, by Draws' names (timesteps [1], noise, posterior_noise, uniform [1], and
    input_noise with input perturbation), from a CPU generator seeded by its seed alone. Each later addition is
    drawn after the earlier ones (the uniform, then the perturbation), so those stay what they were."""
    g = torch.Generator().manual_seed(seed)
    if spec.timestep_bias is not None and torch.rand((), generator=g).item() < spec.timestep_bias[2]:
        t = torch.randint(spec.timestep_bias[0], spec.timestep_bias[1], (1,), generator=g)
    else:
        t = torch.randint(0, spec.num_train_timesteps, (1,), generator=g)
    post = torch.randn(spec.latent_shape, generator=g)
    eps = torch.randn(spec.latent_shape, generator=g)
    if spec.noise_offset:
        # offset noise (Guttenberg 2023): a per-channel constant lets the model shift an image's mean brightness
        eps = eps + spec.noise_offset * torch.randn((spec.latent_shape[0], 1, 1), generator=g)
    out = {"timesteps": t, "noise": eps, "posterior_noise": post, "uniform": torch.rand(1, generator=g)}
    if spec.input_perturbation:
        # input perturbation (Ning et al. 2023): z_t is made from eps + gamma * xi while the target stays eps, so
        # that training sees inputs off the forward process, as sampling does once its predictions err
        out["input_noise"] = eps + spec.input_perturbation * torch.randn(spec.latent_shape, generator=g)
    return out


def draw(seeds: torch.Tensor, latent_shape: tuple[int, ...], num_train_timesteps: int, noise_offset: float = 0.0,
         device: torch.device | str = "cpu", timestep_bias: tuple[int, int, float] | None = None,
         input_perturbation: float = 0.0) -> Draws:
    """Per-sample draws, each from a CPU generator seeded by that sample's seed: a sample's noise depends on
    its seed only, not on the batch, the process or the device it lands on. `timestep_bias = (begin, end, portion)`
    draws that portion of the timesteps from [begin, end) instead of the whole range. (The training data loader
    makes the same draws in its workers: TrainingView with a DrawSpec.)"""
    spec = DrawSpec(tuple(latent_shape), num_train_timesteps, noise_offset, timestep_bias, input_perturbation)
    samples = [draw_sample(seed, spec) for seed in seeds.tolist()]
    joined = {key: (torch.cat if key in ("timesteps", "uniform") else torch.stack)([s[key] for s in samples])
              for key in samples[0]}
    return Draws(**{key: value.to(device) for key, value in joined.items()})


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 13 and sec. 3.4): min(SNR, gamma) / SNR for an eps loss,
    min(SNR, gamma) / (SNR + 1) for a v loss. They stop the many nearly noise-free steps from dominating."""
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"prediction_type={prediction_type!r}: min-SNR weighting supports 'epsilon' and 'v_prediction'")


def high_noise_weights(snr_t: torch.Tensor, cap: float, prediction_type: str, after_min_snr: bool = False
                       ) -> torch.Tensor:
    """min(1 + 1/SNR, cap) for an eps loss: EDM's loss weighting (Karras et al. 2022, eq. 8 with sigma_data = 1,
    sigma^2 = 1/SNR) rewritten for an eps target and capped. An eps error at high noise becomes an x0 error 1/sqrt(SNR)
    times larger, so a plain eps loss gives the steps that decide an image's layout (where the object goes) almost
    no weight; this restores it, leaving steps with SNR >= 1/(cap - 1) near weight 1.

    A plain v loss is already the eps loss times 1 + 1/SNR, so it gets 1. Min-SNR's v weights divide that factor out
    again (both parameterisations then weigh the x0 error by min(SNR, gamma)), so after them (`after_min_snr`) a v
    loss gets the eps factor too, and the two weigh every timestep's x0 error alike."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r}: high-noise weighting supports 'epsilon' and "
                         "'v_prediction'")
    if prediction_type == "v_prediction" and not after_min_snr:
        return torch.ones_like(snr_t)
    return torch.clamp(1.0 + 1.0 / snr_t, max=cap)


def diffusion_loss(unet, z0: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                   snr_gamma: float | None = None, high_noise_weight: float | None = None, reduction: str = "mean",
                   input_noise: torch.Tensor | None = None, dream: float | None = None) -> torch.Tensor:
    """Mean over the batch of the (optionally min-SNR and high-noise weighted) per-sample MSE between the U-Net's
    prediction at z_t and its target; reduction="none": the per-sample values. `input_noise`: the noise z_t is
    made from, where it is not `noise` (input perturbation; the target is made from `noise`). `dream`: DREAM's
    detail preservation p (see dream_rectified)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: choose 'mean' or 'none'")
    z_t = q_sample(z0, noise if input_noise is None else input_noise, timesteps, alphas_cumprod)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = v_target(z0, noise, timesteps, alphas_cumprod)
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
    if dream is not None:
        z_t, target = dream_rectified(unet, z_t, target, timesteps, context, noise, alphas_cumprod, dream,
                                      prediction_type)
    prediction = unet(z_t, timesteps, context)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    snr_t = snr(timesteps, alphas_cumprod.to(timesteps.device))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(snr_t, snr_gamma, prediction_type)
    if high_noise_weight is not None:
        per_sample = per_sample * high_noise_weights(snr_t, high_noise_weight, prediction_type,
                                                     after_min_snr=snr_gamma is not None)
    return per_sample.mean() if reduction == "mean" else per_sample


def dream_rectified(unet, z_t: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, context, noise,
                    alphas_cumprod: torch.Tensor, detail_preservation: float = 1.0, prediction_type: str = "epsilon"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """DREAM (Zhou et al. 2023, "Diffusion Rectification and Estimation-Adaptive Models"), as diffusers' scripts
    apply it: the model's own eps estimate at z_t (one pass without gradients) gives its error d = eps - eps_hat,
    scaled by lambda = sqrt(1 - abar_t) ** p; the input moves to z_t + sqrt(1 - abar_t) lambda d and the target to
    eps + lambda d, so that training sees the inputs its own errors would make at sampling time. Returns the
    (input, target) pair; eps prediction only (diffusers has no v form either)."""
    if prediction_type != "epsilon":
        raise ValueError(f"DREAM is defined for eps prediction; this model predicts {prediction_type!r}: turn "
                         "dream_training off")
    sigma = (1.0 - abar_at(alphas_cumprod, timesteps, z_t)).sqrt()
    with torch.no_grad():
        error = (noise - unet(z_t, timesteps, context)) * sigma ** detail_preservation
    return z_t + sigma * error, target + error


class VAEObjective(nn.Module):
    """L1 + L2 reconstruction of the images through a posterior sample, plus kl_weight * KL(q(z|x) || N(0, I)).

    A module so that Accelerate can wrap it (DDP synchronises gradients of what runs through forward). The KL is
    summed over the latent and divided by the number of pixel values, so that kl_weight has the meaning it has in
    the LDM code, whose reconstruction term is a sum over pixels (1e-6 there)."""

    def __init__(self, vae, l1_weight: float = 1.0, l2_weight: float = 1.0, kl_weight: float = 1e-6,
                 anchor_weight: float = 0.0):
        super().__init__()
        self.vae, self.l1_weight, self.l2_weight, self.kl_weight = vae, l1_weight, l2_weight, kl_weight
        self.anchor_weight = anchor_weight
        if anchor_weight and vae.config.latent_channels < vae.config.in_channels:
            raise ValueError(f"anchor_weight needs at least as many latent channels as image channels "
                             f"({vae.config.latent_channels} < {vae.config.in_channels}); set it to 0")

    def forward(self, pixels: torch.Tensor, posterior_noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        posterior = self.vae.encode(pixels)
        z = posterior.mean + posterior.std * posterior_noise.to(posterior.mean.dtype)
        error = self.vae.decode(z).float() - pixels.float()
        l1, l2 = error.abs().mean(), error.pow(2).mean()
        kl = posterior.kl().float().mean() / pixels[0].numel()
        loss = self.l1_weight * l1 + self.l2_weight * l2 + self.kl_weight * kl
        logs = {"l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}
        if self.anchor_weight:
            # the first image-channels of the latent should read as the image's average over each latent pixel
            factor = pixels.shape[-1] // posterior.mean.shape[-1]
            pooled = F.avg_pool2d(pixels.float(), factor)
            anchor = (posterior.mean[:, :pixels.shape[1]].float() - pooled).pow(2).mean()
            loss = loss + self.anchor_weight * anchor
            logs["anchor"] = anchor.detach()
        return loss, logs


def consistency_distillation_loss(student, teacher, z0: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
                                  draws: Draws, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                                  ddim_timesteps: int = 50, guidance_range: tuple[float, float] = (3.0, 15.0),
                                  huber_c: float | None = 0.001, timestep_scaling: float = 10.0,
                                  target_model=None) -> torch.Tensor:
    """Latent consistency distillation (Luo et al. 2023, Algorithm 1; as diffusers' LCM-LoRA script): at a
    timestep t of the DDIM grid k-1, 2k-1, ..., T-1 (k = T // ddim_timesteps; t drawn from draws.timesteps), the
    teacher's classifier-free-guided DDIM step from z_t to t - k (guidance w in guidance_range, from
    draws.uniform, in LCM's form cond + w (cond - uncond)) gives z_prev; the student's consistency function
    f(z, t) = c_skip(t) z + c_out(t) x0(z, t) at z_t is pulled to its own (no gradient) f at z_prev. Pseudo-Huber
    distance sqrt(d^2 + c^2) - c (huber_c; None: squared error), the mean over every latent value.

    `student(x, t, context)` with gradients; `teacher(x, t, contexts)` the frozen model, called without gradients
    on [uncond; cond] with x shared (our U-Net's k contexts per sample); the student's target pass runs without
    gradients too, through `target_model` where given (the student unwrapped from DDP, say)."""
    from ..schedulers.lcm import boundary_scalings

    total = len(alphas_cumprod)
    k = total // ddim_timesteps
    index = (draws.timesteps * ddim_timesteps) // total  # (uniform over the grid when the timesteps are)
    start = (index + 1) * k - 1
    prev = (start - k).clamp(min=0)
    abar = alphas_cumprod.to(z0.device)

    def coefficients(t: torch.Tensor):
        a = abar[t].view(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def consistency(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = predict_x0_eps(out.float(), x, *coefficients(t), prediction_type)[0]
        c_skip, c_out = (c.to(x.dtype).view(-1, 1, 1, 1) for c in boundary_scalings(t, timestep_scaling))
        return c_skip * x + c_out * x0

    z_t = q_sample(z0, draws.noise, start, abar)
    predicted = consistency(student(z_t, start, context), z_t, start)
    with torch.no_grad():
        out_uncond, out_cond = teacher(z_t, start, torch.cat([uncond, context])).float().chunk(2)
        x0_u, eps_u = predict_x0_eps(out_uncond, z_t, *coefficients(start), prediction_type)
        x0_c, eps_c = predict_x0_eps(out_cond, z_t, *coefficients(start), prediction_type)
        low, high = guidance_range
        w = (low + (high - low) * draws.uniform.float()).view(-1, 1, 1, 1)
        x0, eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
        alpha_prev, sigma_prev = coefficients(prev)
        z_prev = alpha_prev * x0 + sigma_prev * eps
        target = consistency((target_model or student)(z_prev, prev, context), z_prev, prev)
    difference = predicted.float() - target.float()
    if huber_c is None:
        return (difference**2).mean()
    return (torch.sqrt(difference**2 + huber_c**2) - huber_c).mean()
