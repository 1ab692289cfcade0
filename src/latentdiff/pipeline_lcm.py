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

from .pipeline import Generators, LatentDiffusionImg2ImgPipeline, LatentDiffusionPipeline


def _require_lcm(pipe: LatentDiffusionPipeline) -> None:
    if not pipe._guidance_embedded:
        raise ValueError("this U-Net takes no guidance embedding (its config's time_cond_proj_dim is null): it is "
                         "not LCM-distilled. For LCM-LoRA use LatentDiffusionPipeline with an LCMScheduler and "
                         "guidance_scale between 1 and 2")


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
        _require_lcm(self)
        options = {} if original_inference_steps is None else {"original_inference_steps": original_inference_steps}
        return self._text_to_image(
            prompt, None, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, 0.0, generator,
            latents, prompt_embeds, None, output_type, return_dict, clip_skip, callback_on_step_end, progress, 0.0,
            callback_on_step_end_tensor_inputs, timesteps, None, cross_attention_kwargs,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds, grid_options=options)


class LatentConsistencyModelImg2ImgPipeline(LatentDiffusionImg2ImgPipeline):
    """diffusers' LatentConsistencyModelImg2ImgPipeline: its num_inference_steps steps are taken from the first
    `strength` of the distillation grid (LCMScheduler.set_timesteps(strength=)), so that every step runs whatever
    the strength (a Stable Diffusion img2img pipeline runs the last `strength` of a grid of num_inference_steps);
    with `timesteps` given, `strength` selects from them as there."""

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, image=None, num_inference_steps: int = 4, strength: float = 0.8,
        original_inference_steps: int | None = None, timesteps: list[int] | None = None, guidance_scale: float = 8.5,
        num_images_per_prompt: int = 1, generator: Generators = None, prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None, ip_adapter_image_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
        return_dict: bool = True, cross_attention_kwargs: dict | None = None, clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: list[str] | None = None,
        progress: bool = True,
    ):
        _require_lcm(self)
        options = {} if original_inference_steps is None else {"original_inference_steps": original_inference_steps}
        if timesteps is None:
            options["strength"] = strength
        return self._img2img(
            prompt, image, strength, None, num_inference_steps, guidance_scale, num_images_per_prompt, 0.0,
            generator, prompt_embeds, None, output_type, return_dict, clip_skip, callback_on_step_end, progress,
            callback_on_step_end_tensor_inputs, cross_attention_kwargs, timesteps, None,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds, grid_options=options)
