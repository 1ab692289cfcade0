"""Depth-conditioned image to image: Stable Diffusion 2's depth model (stable-diffusion-2-depth), as diffusers'
StableDiffusionDepth2ImgPipeline runs it. Its U-Net takes one channel more than the latents: the image's depth map,
resized to the latents' grid and scaled to [-1, 1] per image, at every step; the rest is img2img (`strength`).

diffusers estimates the depth with a DPT model when none is given; latentdiff runs no depth estimator (it would
import transformers), so `depth_map` is required: from any monocular depth model (DPT, MiDaS, Depth Anything),
larger values nearer, as DPT gives them.

    pipe = LatentDiffusionDepth2ImgPipeline.from_pretrained("stable-diffusion-2-depth")
    out = pipe("a marble statue", image=photo, depth_map=depth, strength=0.7).images[0]
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .lora import lora_call_scale
from .pipeline import Generators, LatentDiffusionImg2ImgPipeline, PipelineOutput


class LatentDiffusionDepth2ImgPipeline(LatentDiffusionImg2ImgPipeline):
    """img2img with a depth-conditioned U-Net (latent channels + 1 in); `depth_map` [B, H, W], [H, W] or
    [B, 1, H, W] (one, or one per prompt), any size and range."""

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, image=None, depth_map: torch.Tensor | None = None,
        strength: float = 0.8, num_inference_steps: int = 50, guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
        generator: Generators = None, prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
        clip_skip: int | None = None, callback_on_step_end: Callable | None = None, progress: bool = True,
        callback_on_step_end_tensor_inputs: list[str] | None = None, cross_attention_kwargs: dict | None = None,
        timesteps: list[int] | None = None, sigmas: list[float] | None = None,
    ):
        """diffusers' call, with depth_map required (see the module's docstring)."""
        self._check_call(output_type, guidance_scale, callback_on_step_end, callback_on_step_end_tensor_inputs,
                         cross_attention_kwargs)
        latent = self.vae.config.latent_channels
        if self.unet.config.in_channels != latent + 1:
            raise ValueError(f"the U-Net takes {self.unet.config.in_channels} input channels; a depth model's takes "
                             f"{latent + 1} (the latents and the depth map): not a depth-to-image model")
        depth = self._checked_depth(depth_map)
        with self._lora_scaled(lora_call_scale(cross_attention_kwargs)):
            pixels, cond, uncond, generators, timesteps = self._image_call(
                "depth-to-image", image, strength, generator, prompt, negative_prompt, prompt_embeds,
                negative_prompt_embeds, num_images_per_prompt, guidance_scale, clip_skip, num_inference_steps,
                timesteps, sigmas)
            n = pixels.shape[0]
            depth = self._per_image(depth, n, num_images_per_prompt)
            size = (pixels.shape[-2] // self.vae_scale_factor, pixels.shape[-1] // self.vae_scale_factor)
            depth = F.interpolate(depth.to(self.device, self.dtype), size=size, mode="bicubic", align_corners=False)
            low, high = depth.amin(dim=(1, 2, 3), keepdim=True), depth.amax(dim=(1, 2, 3), keepdim=True)
            if bool((high <= low).any()):
                raise ValueError("a depth map is flat (one value everywhere): it cannot be scaled to [-1, 1]")
            depth = 2.0 * (depth - low) / (high - low) - 1.0
            latents = self.denoise(self._noised_latents(pixels, generators, timesteps), timesteps, cond, uncond,
                                   guidance_scale, generators, eta, callback_on_step_end, progress, conditioning=depth)
            images = self.decode(latents, output_type)
            return PipelineOutput(images) if return_dict else (images,)

    @staticmethod
    def _checked_depth(depth_map) -> torch.Tensor:
        """[B, 1, H, W] float, finite."""
        if depth_map is None:
            raise ValueError("depth_map is required: latentdiff runs no depth estimator; pass one from a monocular "
                             "depth model (DPT, MiDaS, Depth Anything: larger nearer), [B, H, W] or [H, W]")
        if not isinstance(depth_map, torch.Tensor):
            raise TypeError(f"depth_map must be a tensor, got {type(depth_map).__name__}")
        depth = depth_map.float()
        depth = depth[None, None] if depth.dim() == 2 else depth[:, None] if depth.dim() == 3 else depth
        if depth.dim() != 4 or depth.shape[1] != 1:
            raise ValueError(f"depth_map must be [B, H, W], [H, W] or [B, 1, H, W]; got {tuple(depth_map.shape)}")
        if not torch.isfinite(depth).all():
            raise ValueError("depth_map contains NaN or infinite values")
        return depth
