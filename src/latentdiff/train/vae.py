"""VAE training: an AutoencoderKL learns to reconstruct images through a small, nearly Gaussian latent.

The loss is L1 + L2 reconstruction through a posterior sample plus a small KL term (loss.VAEObjective); there is no
perceptual or adversarial term, so reconstructions are softer than SD's VAE, which is fine for simple data. At the
end the latents' standard deviation over some training images sets `scaling_factor = 1 / std`, so that the
diffusion model sees unit-variance latents (as SD's 0.18215 was chosen), and `<output_dir>/vae` is written.

With a KL weight as small as SD's (1e-6), nothing holds the posterior variance of latent positions the decoder
ignores: some drift to std in the thousands. A posterior *sample* is then mostly that noise, the latent std it gives
is meaningless (scaling_factor ~0.03 instead of ~0.3) and a diffusion model trained on such samples learns noise.
`deterministic_encoder: true` exports the encoder as a point estimate instead: the log-variance half of quant_conv
is pinned to the posterior's clamp floor (-30, std 3e-7), so `encode(x).sample() == encode(x).mean` in latentdiff
and diffusers alike, and scaling_factor comes from the means.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from ..data.folder import prepare_image
from .data import TrainingView, build_source
from .loop import FitResult, Trainer, make_accelerator, make_optimizer
from .loss import VAEObjective, draw


def load_vae(config):
    from ..models.vae import AutoencoderKL, VAEConfig

    if config.pretrained_vae:
        return AutoencoderKL.from_pretrained(config.pretrained_vae)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return AutoencoderKL(VAEConfig.from_dict(config.vae))


LOGVAR_FLOOR = -30.0  # DiagonalGaussian clamps log-variances to [-30, 20], as diffusers does


def latent_std(vae, source, resolution: int, num_images: int, seed: int = 0, batch_size: int = 16,
               of: str = "samples") -> float:
    """Standard deviation of the latents over the first `num_images` images (centre crops): of posterior samples
    z = mean + std * eps (`of="samples"`), the latents a diffusion model trained on this VAE sees, or of the
    posterior means (`of="means"`)."""
    if of not in ("samples", "means"):
        raise ValueError(f"of={of!r}: choose 'samples' or 'means'")
    samples, means = latent_stds(vae, source, resolution, num_images, seed, batch_size)
    return samples if of == "samples" else means


@torch.no_grad()
def latent_stds(vae, source, resolution: int, num_images: int, seed: int = 0, batch_size: int = 16
                ) -> tuple[float, float]:
    """(std of posterior samples, std of posterior means), from one encoding of the images (see latent_std)."""
    generator = torch.Generator().manual_seed(seed)
    sums = torch.zeros(2, 3, dtype=torch.float64)  # [samples, means] x [sum, sum of squares, count]
    for posterior in _posteriors(vae, source, resolution, num_images, batch_size):
        for row, z in enumerate((posterior.sample(generator), posterior.mean)):
            z = z.double().cpu()
            sums[row] += torch.tensor([z.sum().item(), z.pow(2).sum().item(), z.numel()], dtype=torch.float64)
    mean = sums[:, 0] / sums[:, 2]
    std = (sums[:, 1] / sums[:, 2] - mean**2).sqrt()
    return float(std[0]), float(std[1])


def _posteriors(vae, source, resolution: int, num_images: int, batch_size: int = 16):
    """The encoder's posteriors of the first `num_images` images (centre crops), a batch at a time."""
    indices = range(min(num_images, len(source)))
    for start in range(0, len(indices), batch_size):
        pixels = torch.stack([prepare_image(source.load(i)[0], resolution)
                              for i in indices[start:start + batch_size]])
        yield vae.encode(pixels.to(vae.device, vae.dtype))


@torch.no_grad()
def make_deterministic(vae):
    """Pin the log-variance outputs of quant_conv to LOGVAR_FLOOR: encode() then returns (numerically) a point mass
    at the posterior mean. Works on any AutoencoderKL with a quant_conv (in latentdiff and diffusers)."""
    if getattr(vae, "quant_conv", None) is None:
        raise ValueError("deterministic_encoder needs a VAE with quant_conv (use_quant_conv: true)")
    c = vae.config.latent_channels
    vae.quant_conv.weight[c:] = 0.0
    vae.quant_conv.bias[c:] = LOGVAR_FLOOR
    return vae


@torch.no_grad()
def fold_latent_map(vae, matrix: torch.Tensor, offset: torch.Tensor):
    """Re-express a deterministic VAE's latents as z' = matrix @ z + offset (over the channels of each latent pixel)
    without changing what it reconstructs: the map goes into the mean half of quant_conv and its inverse into
    post_quant_conv, so latentdiff and diffusers read it from the weights alike. Deterministic encoders only
    (make_deterministic): the posterior of a stochastic one would lose its diagonal covariance."""
    c = vae.config.latent_channels
    q, p = getattr(vae, "quant_conv", None), getattr(vae, "post_quant_conv", None)
    if q is None or p is None:
        raise ValueError("a latent map needs a VAE with quant_conv and post_quant_conv (use_quant_conv and "
                         "use_post_quant_conv: true)")
    if not (torch.all(q.weight[c:] == 0) and torch.all(q.bias[c:] == LOGVAR_FLOOR)):
        raise ValueError("a latent map needs a deterministic encoder: set deterministic_encoder: true (or call "
                         "make_deterministic first)")
    matrix, offset = matrix.double().cpu(), offset.double().cpu()
    if matrix.shape != (c, c) or offset.shape != (c,):
        raise ValueError(f"a latent map of {c} channels needs a {c}x{c} matrix and {c} offsets, got "
                         f"{tuple(matrix.shape)} and {tuple(offset.shape)}")
    inverse = torch.linalg.inv(matrix)
    encode_w, encode_b = q.weight[:c, :, 0, 0].double().cpu(), q.bias[:c].double().cpu()
    decode_w, decode_b = p.weight[:, :, 0, 0].double().cpu(), p.bias.double().cpu()
    q.weight[:c, :, 0, 0] = (matrix @ encode_w).to(q.weight)
    q.bias[:c] = (matrix @ encode_b + offset).to(q.bias)
    p.weight[:, :, 0, 0] = (decode_w @ inverse).to(p.weight)
    p.bias.copy_((decode_b - decode_w @ inverse @ offset).to(p.bias))
    return vae


def balancing_map(means: torch.Tensor, power: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent map (for fold_latent_map) that centres the channels and scales each principal direction of their
    covariance over all latent pixels by eigenvalue^-power: 0 only centres, 0.5 whitens, 0.25 evens the directions'
    spreads out halfway on a log scale, so that information in small directions (colour, after anchor_weight) grows
    without blowing sparse, low-variance directions up into heavy tails as whitening does. `means`: posterior means
    [N, C, h, w] of training images. Returns (matrix, offset)."""
    pixels = means.double().movedim(1, -1).reshape(-1, means.shape[1])
    eigenvalues, basis = torch.linalg.eigh(torch.cov(pixels.T))
    matrix = basis @ torch.diag(eigenvalues.clamp(min=1e-12 * eigenvalues.max()).pow(-power)) @ basis.T
    return matrix, -matrix @ pixels.mean(0)


@torch.no_grad()
def colour_discriminant_map(vae, means: torch.Tensor, size: int, floor: float = 0.1
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent map (for fold_latent_map) that spreads the shapes palette's colours apart in the space a diffusion
    model denoises. `means`: posterior means [N, C, h, w] of training images. The map centres each channel (an
    offset shared by every latent is variance that carries nothing, yet it counts in the std that sets
    scaling_factor), whitens the channels' covariance over all latent pixels, then weighs each whitened direction
    by the square root of its share of the colours' spread (per-pixel differences between every two palette
    colours, a circle in the centre on each background, each size; Fisher's discriminant, softened), at least
    `floor`, so that no direction is lost. Returns (matrix, offset)."""
    from ..evaluation import palette_latents

    whiten, offset = balancing_map(means, power=0.5)  # centre and whiten
    scatter = torch.zeros_like(whiten)
    count = 0
    for z in palette_latents(vae, size):
        z = z.double().cpu().movedim(1, -1).reshape(len(z), -1, z.shape[1]) @ whiten.T
        differences = (z[:, None] - z[None, :]).reshape(-1, z.shape[-1])
        scatter += differences.T @ differences
        count += len(differences)
    shares, directions = torch.linalg.eigh(scatter / count)
    gains = (shares.clamp(min=0) / shares.max()).sqrt().clamp(min=floor)
    weigh = directions @ torch.diag(gains) @ directions.T
    return weigh @ whiten, weigh @ offset


class VAETask:
    """The pieces Trainer drives (see loop.py)."""

    def __init__(self, config, accelerator, vae):
        if config.gradient_checkpointing:
            raise ValueError("gradient_checkpointing is not supported by train_vae.py; set it to false")
        self.config, self.accelerator = config, accelerator
        objective = VAEObjective(vae, config.l1_weight, config.l2_weight, config.kl_weight, config.anchor_weight)
        optimizer, lr_scheduler = make_optimizer([{"params": list(vae.parameters())}], config)
        self.objective, self.optimizer, self.lr_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)
        self.models, self.checkpoint_objects = [self.objective], []
        self.source = build_source(config)
        self.view = TrainingView(self.source, config.resolution, config.seed, random_crop=not config.center_crop,
                                 random_flip=config.random_flip, patch_size=config.patch_size)
        f, size = vae.vae_scale_factor, config.patch_size or config.resolution
        if size % f:
            raise ValueError(f"patch_size / resolution {size} is not a multiple of the VAE's downsampling factor {f}")
        self.latent_shape = (vae.config.latent_channels, size // f, size // f)

    @property
    def vae(self):
        return self.accelerator.unwrap_model(self.objective).vae

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        device = self.accelerator.device
        noise = draw(batch["seed"], self.latent_shape, 1, device=device).posterior_noise
        return self.objective(batch["pixel_values"].to(device), noise)

    def after_optimizer_step(self) -> None:
        pass

    @torch.no_grad()
    def validate(self, step: int) -> None:
        """Originals (top row) over their reconstructions through the posterior mean (bottom row)."""
        from ..pipeline import to_images
        from .text_to_image import save_grid

        if self.accelerator.is_main_process:
            vae = self.vae.eval()
            count = min(8, len(self.source))
            pixels = torch.stack([prepare_image(self.source.load(i)[0], self.config.resolution)
                                  for i in range(count)]).to(vae.device)
            reconstruction = vae(pixels)
            vae.train()
            save_grid([to_images(pixels, "pil"), to_images(reconstruction, "pil")],
                      Path(self.config.output_dir) / "validation" / f"step-{step:07d}.png")
        self.accelerator.wait_for_everyone()

    def export(self) -> None:
        """`<output_dir>/vae` in fp32, with scaling_factor = 1 / (std of the posterior latents); with
        deterministic_encoder, the encoder pinned to its mean (see the module's docstring)."""
        if self.accelerator.is_main_process:
            config = self.config
            vae = self.vae.eval().to("cpu", torch.float32)
            if config.deterministic_encoder:
                make_deterministic(vae)
            size = config.export_resolution or config.resolution
            source = self.source if size == config.resolution else build_source(replace(config, resolution=size))
            if config.latent_map:
                with torch.no_grad():
                    means = torch.cat([p.mean for p in _posteriors(vae, source, size, config.scale_samples)])
                if config.latent_map == "balanced":
                    fold_latent_map(vae, *balancing_map(means, config.latent_map_power))
                else:
                    from ..evaluation import colour_separation

                    before = colour_separation(vae, size, scaling_factor=1.0 / means.double().std().item())["min"]
                    fold_latent_map(vae, *colour_discriminant_map(vae, means, size))
                    print(f"latent_map: colours: the closest two colours' scaled latents were {before:.2f} apart "
                          "before the map", flush=True)
            std, means_std = latent_stds(vae, source, size, config.scale_samples, config.seed)
            if std > 3 * means_std:
                warnings.warn(f"posterior samples have std {std:.3g}, {std / means_std:.1f}x that of the posterior "
                              "means: the encoder's variance has run away at some latent positions, so a diffusion "
                              "model would be trained on noise. Set deterministic_encoder: true or a larger "
                              "kl_weight.", stacklevel=1)
            vae.config = vae.config.replace(scaling_factor=1.0 / std)
            final = Path(self.config.output_dir) / "vae"
            tmp = final.with_name(".tmp-vae")
            shutil.rmtree(tmp, ignore_errors=True)
            vae.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            print(f"wrote {final} (latent std {std:.4f}, scaling_factor {1.0 / std:.5f})", flush=True)
            if config.dataset == "shapes" and config.check_reconstructions:
                from ..evaluation import colour_separation, evaluate_vae

                scores = evaluate_vae(vae, config.check_reconstructions, size)
                separation = colour_separation(vae, size)
                print("reconstructions read back by the analyzer: "
                      + ", ".join(f"{k} {v:.1%}" for k, v in scores.items())
                      + f"; closest two colours' latents {separation['min']:.2f} apart (mean over backgrounds and "
                        f"sizes {separation['mean']:.2f}; see evaluation.colour_separation)", flush=True)
                scores.update({f"colour_separation_{k}": v for k, v in separation.items()})
                (Path(config.output_dir) / "reconstruction.json").write_text(json.dumps(scores, indent=1) + "\n")
        self.accelerator.wait_for_everyone()


def train_vae(config) -> FitResult:
    """Train as `config` (a VAETrainConfig) says; call under `accelerate launch` or plainly (one process)."""
    accelerator = make_accelerator(config)
    task = VAETask(config, accelerator, load_vae(config))
    return Trainer(config, accelerator, task).fit()
