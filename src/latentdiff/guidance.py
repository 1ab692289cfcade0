"""Wrappers around the network, so that samplers only ever see `denoiser(x, t, alpha, sigma) -> (x0, eps)`.

k-diffusion's idea (Karras et al. 2022, sec. 5): a sampler needs a denoiser, not a U-Net. `Denoiser` turns an
eps- or v-predicting model into x0 and eps estimates; `ClassifierFreeGuidance` wraps the model itself, so
guidance is invisible to every sampler. Guiding the raw output is the same as guiding eps or x0, because for a
fixed (x, t) both are affine in the output.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .schedules import PREDICTION_TYPES, predict_x0_eps

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guide(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float, rescale: float = 0.0,
          out_perturbed: torch.Tensor | None = None, perturbed_scale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance, out_u + s (out_c - out_u) (Ho & Salimans 2022, eq. 6 written for eps).

    `rescale` = phi > 0: large scales inflate the output's spread and over-expose images, so the guided output is
    also scaled, per sample, to the standard deviation of the conditional output, and that is mixed in with weight
    phi (Lin et al. 2024, sec. 3.4; they suggest 0.7). The spread is that of the raw model output, as in diffusers'
    pipelines (the rescaling, unlike guidance itself, is not affine, so the space it is done in matters).

    `out_perturbed`: the conditional output with perturbed self-attention (PerturbedAttentionGuidance), pushed away
    from with weight perturbed_scale, before any rescaling."""
    out = out_uncond + scale * (out_cond - out_uncond)
    if out_perturbed is not None:
        out = out + perturbed_scale * (out_cond - out_perturbed)
    if rescale:
        dims = tuple(range(1, out.dim()))
        matched = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        out = rescale * matched + (1.0 - rescale) * out
    return out


class ClassifierFreeGuidance:
    """`model(x, t, context)` as a `model(x, t)` that applies guidance with one batched call over [uncond, cond].

    With scale <= 1 (or no unconditional context) only the conditional pass runs, as in diffusers' pipelines.
    `rescale`: see guide(). `share_sample`: the model takes x once for both contexts (our U-Net does: it then runs
    its layers before the first cross-attention once) instead of torch.cat([x, x])."""

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 cond: torch.Tensor, uncond: torch.Tensor | None = None, scale: float = 7.5, rescale: float = 0.0,
                 share_sample: bool = False):
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance_rescale={rescale} must lie in [0, 1]: 0 turns it off, 1 matches the "
                             "conditional output's spread fully (Lin et al. 2024 suggest 0.7)")
        if uncond is not None and uncond.shape != cond.shape:
            raise ValueError(f"unconditional context has shape {tuple(uncond.shape)} but the conditional one has "
                             f"{tuple(cond.shape)}; encode both with the same batch size and sequence length")
        self.model, self.cond, self.uncond = model, cond, uncond
        self.scale, self.rescale, self.share_sample = float(scale), float(rescale), share_sample
        # one tensor for every step (no concatenation per step; a U-Net caching the text's keys sees the same one)
        self.contexts = torch.cat([uncond, cond]) if self.guided else None

    @property
    def guided(self) -> bool:
        return self.uncond is not None and self.scale > 1.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self.model(x, t, self.cond)
        x = x if self.share_sample else torch.cat([x, x])
        out_uncond, out_cond = self.model(x, t, self.contexts).chunk(2)
        return guide(out_uncond, out_cond, self.scale, self.rescale)


class PerturbedAttentionGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance plus perturbed-attention guidance (Ahn et al. 2024, eq. 11): one more pass on the
    conditional context in which the self-attention of `layers` (models.attention.Attention) sees an identity
    attention map (each token attends to itself alone: a degraded prediction with the image's structure gone), and
    the output is pushed away from it: u + s (c - u) + p (c - perturbed); without guidance (scale <= 1) c + p (c -
    perturbed). The passes run as one batch over [uncond, cond, cond] (or [cond, cond] without an unconditional
    context), as diffusers' PAG pipelines run them; the batch keeps its layout for the whole call (guidance turned
    off part-way only drops u from the result). `pag_scale(t)`: p at timestep t."""

    def __init__(self, model, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float, rescale: float,
                 share_sample: bool, layers: list, pag_scale: Callable[[torch.Tensor], float]):
        super().__init__(model, cond, uncond, scale, rescale, share_sample)
        self.layers, self.pag_scale = layers, pag_scale
        self.contexts = torch.cat([cond, cond] if uncond is None else [uncond, cond, cond])

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        contexts = self.contexts
        k = contexts.shape[0] // x.shape[0]
        for layer in self.layers:
            layer.perturbed = self.cond.shape[0]
        try:
            out = self.model(x if self.share_sample else torch.cat([x] * k), t, contexts)
        finally:
            for layer in self.layers:
                layer.perturbed = 0
        *out_uncond, out_cond, out_perturbed = out.chunk(contexts.shape[0] // self.cond.shape[0])
        if self.guided:
            return guide(out_uncond[0], out_cond, self.scale, self.rescale, out_perturbed, self.pag_scale(t))
        return guide(out_cond, out_cond, 1.0, 0.0, out_perturbed, self.pag_scale(t))


class InstructPix2PixGuidance(ClassifierFreeGuidance):
    """InstructPix2Pix's two-scale guidance (Brooks et al. 2023, eq. 3): the U-Net sees the input image's latents
    as extra channels, and three passes, [text + image, image only, neither] (the unconditional text, zero image
    latents), combine as u + s_image (image - u) + s_text (text - image). Guided when scale > 1 and image_scale >=
    1 (as diffusers); else the text + image pass alone. The branches differ in their input channels, so the sample
    is not shared."""

    def __init__(self, model, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float, image_scale: float,
                 image_latents: torch.Tensor):
        self.image_scale, self.image_latents = float(image_scale), image_latents  # (before: `guided` reads it)
        super().__init__(model, cond, uncond, scale)
        if uncond is not None:
            self.contexts = torch.cat([cond, uncond, uncond])
            self.images = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])

    @property
    def guided(self) -> bool:
        return self.uncond is not None and self.scale > 1.0 and self.image_scale >= 1.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self.model(torch.cat([x, self.image_latents], dim=1), t, self.cond)
        out = self.model(torch.cat([torch.cat([x] * 3), self.images], dim=1), t, self.contexts)
        out_text, out_image, out_uncond = out.chunk(3)
        return out_uncond + self.scale * (out_text - out_image) + self.image_scale * (out_image - out_uncond)


class Denoiser:
    """An eps- or v-predicting `model(x, t)` as D(x, t, alpha, sigma) -> (x0, eps) for x = alpha x0 + sigma eps."""

    def __init__(self, model: Model, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
        self.model, self.prediction_type = model, prediction_type

    def __call__(self, x: torch.Tensor, t: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        return predict_x0_eps(self.model(x, t), x, alpha, sigma, self.prediction_type)
