"""Perturbed-attention guidance (Ahn et al. 2024), as diffusers' StableDiffusionPAGPipeline: besides (or instead
of) classifier-free guidance, each step runs the U-Net once more on the prompt with the self-attention of chosen
layers perturbed (an identity attention map) and steers away from that structure-less prediction
(guidance.PerturbedAttentionGuidance). No training, no new weights.
"""
from __future__ import annotations

import re
import torch

from .guidance import ClassifierFreeGuidance, PerturbedAttentionGuidance
from .pipeline import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline, LatentDiffusionPipeline
from .pipeline_controlnet import LatentDiffusionControlNetInpaintPipeline, LatentDiffusionControlNetPipeline


class PAGMixin:
    """Perturbed-attention guidance for a pipeline class (put first among the bases): its call takes `pag_scale`
    (3.0 by default, as diffusers'; 0 turns it off) and `pag_adaptive_scale` (the scale falls by that much per
    timestep below 1000, to 0); the perturbed layers are set by `from_pretrained(folder, pag_applied_layers=...)`
    or `set_pag_applied_layers` ("mid" by default)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pag_applied_layers = ["mid"]
        self._pag: tuple[float, float] | None = None  # the running call's (pag_scale, pag_adaptive_scale)

    @classmethod
    def _optional(cls, components: dict) -> dict:
        optional = super()._optional(components)
        if "pag_applied_layers" in components:
            optional["pag_applied_layers"] = components.pop("pag_applied_layers")
        return optional

    @classmethod
    def from_pipe(cls, pipe, **components):
        """As the pipelines' from_pipe; from a PAG pipeline its perturbed layers carry over (unless given)."""
        if isinstance(pipe, PAGMixin):
            components.setdefault("pag_applied_layers", pipe.pag_applied_layers)
        return super().from_pipe(pipe, **components)

    def _with(self, optional: dict):
        if "pag_applied_layers" in optional:
            self.set_pag_applied_layers(optional.pop("pag_applied_layers"))
        return super()._with(optional)

    def set_pag_applied_layers(self, pag_applied_layers: str | list[str]) -> None:
        """The self-attention layers to perturb, as diffusers finds them: each entry a regular expression searched
        in the names of the U-Net's self-attention modules ("mid", "down_blocks.2", "up_blocks.1.attentions.0",
        ...); every entry must find one."""
        layers = [pag_applied_layers] if isinstance(pag_applied_layers, str) else list(pag_applied_layers)
        if not layers or not all(isinstance(layer, str) for layer in layers):
            raise ValueError(f"pag_applied_layers={pag_applied_layers!r}: give a layer name or a list of them "
                             "(regular expressions over the U-Net's module names, e.g. 'mid', 'down_blocks.1')")
        for layer in layers:
            self._perturbed_layers([layer])
        self.pag_applied_layers = layers

    def _perturbed_layers(self, names: list[str]) -> list:
        """The U-Net's self-attention modules (attn1) that the entries of `names` match, as diffusers matches them."""
        found = []
        for entry in names:
            try:
                pattern = re.compile(entry)
            except re.error as e:
                raise ValueError(f"pag_applied_layers entry {entry!r} is not a regular expression: {e}") from None
            matches = [module for name, module in self.unet.named_modules()
                       if name.endswith("attn1") and pattern.search(name)]
            if not matches:
                raise ValueError(f"pag_applied_layers entry {entry!r} matches no self-attention of the U-Net (their "
                                 "names are like 'mid_block.attentions.0.transformer_blocks.0.attn1')")
            found += [m for m in matches if all(m is not f for f in found)]
        return found

    @property
    def pag_scale(self) -> float:
        return self._pag[0] if self._pag else 0.0

    @property
    def do_perturbed_attention_guidance(self) -> bool:
        return self.pag_scale > 0

    def _guidance(self, unet, cond, uncond, guidance_scale, guidance_rescale, share) -> ClassifierFreeGuidance:
        if not self.do_perturbed_attention_guidance:
            return super()._guidance(unet, cond, uncond, guidance_scale, guidance_rescale, share)
        scale, adaptive = self._pag

        def pag_scale(t) -> float:  # (read on the host only when it varies with t)
            return max(scale - adaptive * (1000 - float(t)), 0.0) if adaptive > 0 else scale

        return PerturbedAttentionGuidance(unet, cond, uncond, guidance_scale, guidance_rescale, share,
                                          self._perturbed_layers(self.pag_applied_layers), pag_scale)

    @torch.no_grad()
    def __call__(self, *args, pag_scale: float = 3.0, pag_adaptive_scale: float = 0.0, **kwargs):
        """The pipeline's call with `pag_scale` and `pag_adaptive_scale` (see the class)."""
        for name, value in (("pag_scale", pag_scale), ("pag_adaptive_scale", pag_adaptive_scale)):
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ValueError(f"{name}={value!r} must be a number >= 0 (0 turns it off)")
        if pag_scale > 0 and self._graphed is not None:
            raise ValueError("CUDA graphs replay the U-Net without perturbed attention: disable_cuda_graphs() first "
                             "(or pag_scale=0)")
        self._pag = (float(pag_scale), float(pag_adaptive_scale))
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._pag = None


class LatentDiffusionPAGPipeline(PAGMixin, LatentDiffusionPipeline):
    """Text to image with perturbed-attention guidance (PAGMixin), as diffusers' StableDiffusionPAGPipeline."""


class LatentDiffusionPAGImg2ImgPipeline(PAGMixin, LatentDiffusionImg2ImgPipeline):
    """Image to image with perturbed-attention guidance, as diffusers' StableDiffusionPAGImg2ImgPipeline."""


class LatentDiffusionPAGInpaintPipeline(PAGMixin, LatentDiffusionInpaintPipeline):
    """Inpainting with perturbed-attention guidance, as diffusers' StableDiffusionPAGInpaintPipeline."""


class LatentDiffusionControlNetPAGPipeline(PAGMixin, LatentDiffusionControlNetPipeline):
    """ControlNet-guided text to image with perturbed-attention guidance, as diffusers'
    StableDiffusionControlNetPAGPipeline: the ControlNets see every pass of the batch (the perturbed one too), the
    perturbation is the U-Net's alone. Not in guess mode."""


class LatentDiffusionControlNetPAGInpaintPipeline(PAGMixin, LatentDiffusionControlNetInpaintPipeline):
    """ControlNet-guided inpainting with perturbed-attention guidance, as diffusers'
    StableDiffusionControlNetPAGInpaintPipeline. Not in guess mode."""
