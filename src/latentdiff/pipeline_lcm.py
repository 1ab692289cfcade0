"""Latent consistency models (Luo et al. 2023), as diffusers' LatentConsistencyModelPipeline runs them: an
LCM-distilled U-Net (its config's time_cond_proj_dim) takes the guidance scale as an input, the embedding of
w = guidance_scale - 1, and makes an image in 1-8 unguided steps of the LCMScheduler (schedulers/lcm.py).

Every pipeline here handles such a U-Net as diffusers' do (one U-Net call per step, the guidance scale embedded);
this class adds diffusers' LCM defaults (4 steps, guidance 8.5) and `original_inference_steps`. For LCM-LoRA on an
ordinary Stable Diffusion use LatentDiffusionPipeline with an LCMScheduler and guidance_scale 1-2 instead.
"""
from __future__ import annotations

from typing import Callable

import torch

from .pipeline import Generators, LatentDiffusionPipeline


class LatentConsistencyModelPipeline(LatentDiffusionPipeline):
    """diffusers' LatentConsistencyModelPipeline: same arguments and defaults, same images."""

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
        num_inference_steps: int = 4, original_inference_steps: int | None = None,
        timesteps: list[int] | None = None, guidance_scale: float = 8.5, num_images_per_prompt: int = 1,
        generator: Generators = None, latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None, ip_adapter_image_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
        return_dict: bool = True, cross_attention_kwargs: dict | None = None, clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: list[str] | None = None,
        progress: bool = True,
    ):
        """`original_inference_steps`: the size of the distillation grid the steps are taken from (the scheduler
        config's, 50, by default); `guidance_scale`: what the U-Net was distilled to follow (w + 1; there is no
        negative prompt: the U-Net runs once per step)."""
        if not self._guidance_embedded:
            raise ValueError("this U-Net takes no guidance embedding (its config's time_cond_proj_dim is null): it is "
                             "not LCM-distilled. For LCM-LoRA use LatentDiffusionPipeline with an LCMScheduler and "
                             "guidance_scale between 1 and 2")
        options = {} if original_inference_steps is None else {"original_inference_steps": original_inference_steps}
        return self._text_to_image(
            prompt, None, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, 0.0, generator,
            latents, prompt_embeds, None, output_type, return_dict, clip_skip, callback_on_step_end, progress, 0.0,
            callback_on_step_end_tensor_inputs, timesteps, None, cross_attention_kwargs,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds, grid_options=options)
