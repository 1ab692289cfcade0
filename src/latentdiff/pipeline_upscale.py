"""Text-guided 4x super-resolution: Stable Diffusion 2.x's x4 upscaler, as diffusers' StableDiffusionUpscalePipeline
runs it. The low-resolution image itself, noised to `noise_level` by the low-resolution scheduler (noise
augmentation: the model was trained to ignore that much degradation), is appended to the latents' channels at every
step, and the noise level goes into the U-Net as its class label; the latents have the low-resolution image's size,
and a VAE of three levels decodes them to 4x that.

    pipe = LatentDiffusionUpscalePipeline.from_pretrained("stable-diffusion-x4-upscaler")
    big = pipe("a white cat", image=small, noise_level=20).images[0]
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from .cuda_graphs import CUDAGraphModel
from .lora import lora_call_scale
from .pipeline import Generators, LatentDiffusionImg2ImgPipeline, PipelineOutput, _per_image_generators
from .schedules import randn

UPSCALER_SCALING = 0.08333  # the x4 upscaler's latent scaling factor


class LatentDiffusionUpscalePipeline(LatentDiffusionImg2ImgPipeline):  # (its image preprocessing)
    """The x4 upscaler: `image` (PIL, a list of them, or a [B, 3, h, w] tensor in [0, 1]; sides multiples of 4) and a
    prompt in, images of 4h x 4w out. `low_res_scheduler` (a DDPMScheduler) noises the image to `noise_level`
    (at most `max_noise_level`). The folder layout is diffusers' (model_index.json's low_res_scheduler and
    max_noise_level), so that either library loads the other's folders."""

    component_names = ("tokenizer", "text_encoder", "unet", "vae", "scheduler", "low_res_scheduler")
    config_names = ("max_noise_level",)

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, low_res_scheduler, max_noise_level: int = 350):
        super().__init__(tokenizer, text_encoder, unet, vae, scheduler)
        self.low_res_scheduler = low_res_scheduler
        self.max_noise_level = int(max_noise_level)
        if getattr(vae.config, "scaling_factor", None) != UPSCALER_SCALING:  # (as diffusers' pipeline sets it)
            warnings.warn(f"the VAE's scaling_factor is {vae.config.scaling_factor}; the x4 upscaler's latents are "
                          f"scaled by {UPSCALER_SCALING}, which is used (set it in vae/config.json to silence this)",
                          stacklevel=2)
            vae.config = vae.config.replace(scaling_factor=UPSCALER_SCALING)

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, image=None, num_inference_steps: int = 75,
        guidance_scale: float = 9.0, noise_level: int = 20, negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1, eta: float = 0.0, generator: Generators = None,
        latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
        clip_skip: int | None = None, callback_on_step_end: Callable | None = None, progress: bool = True,
        callback_on_step_end_tensor_inputs: list[str] | None = None, cross_attention_kwargs: dict | None = None,
        timesteps: list[int] | None = None, sigmas: list[float] | None = None,
    ):
        """diffusers' call (75 steps, guidance 9, noise level 20 by default). Random draws, from each image's
        generator: the noise added to the low-resolution image, then the starting latents."""
        self._check_call(output_type, guidance_scale, callback_on_step_end, callback_on_step_end_tensor_inputs,
                         cross_attention_kwargs)
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) \
                or not 0 <= noise_level <= self.max_noise_level:
            raise ValueError(f"noise_level={noise_level!r} must be an integer in [0, {self.max_noise_level}] "
                             "(max_noise_level): how far the low-resolution image is noised before the U-Net sees it")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be at least 1")
        if image is None:
            raise ValueError("the upscaler needs an image (a PIL image, a [B, 3, H, W] tensor in [0, 1], or a list of "
                             "them)")
        with self._lora_scaled(lora_call_scale(cross_attention_kwargs)):
            pixels = self.preprocess(image)
            height, width = pixels.shape[-2:]
            if height % 4 or width % 4:
                raise ValueError(f"the low-resolution image is {width}x{height}; its sides must be multiples of 4 (as "
                                 f"diffusers resizes them): resize it to {width - width % 4}x{height - height % 4}")
            latent_channels = self.vae.config.latent_channels
            if latent_channels + pixels.shape[1] != self.unet.config.in_channels:
                raise ValueError(f"the U-Net takes {self.unet.config.in_channels} input channels, but the latents "
                                 f"({latent_channels}) and the RGB image (3) make {latent_channels + 3}: not an x4 "
                                 "upscaler's U-Net")
            cond, uncond = self._contexts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                          num_images_per_prompt, self._guided(guidance_scale), clip_skip)
            n = cond.shape[0]
            pixels = self._per_image(pixels.to(self.device, self.dtype), n, num_images_per_prompt)
            generators = _per_image_generators(generator, n)
            self._set_grid(num_inference_steps, timesteps, sigmas)
            noise = randn(tuple(pixels.shape), generators, self.device, self.dtype)
            levels = torch.full((n,), noise_level, dtype=torch.long, device=self.device)
            low_res = self.low_res_scheduler.add_noise(pixels, noise, levels).to(self.dtype)
            start = self._starting_noise(latents, latent_channels, n, height * self.vae_scale_factor,
                                         width * self.vae_scale_factor, generators)
            latents = self.denoise(start, self.scheduler.timesteps, cond, uncond, guidance_scale, generators, eta,
                                   callback_on_step_end, progress, conditioning=low_res,
                                   unet=self._labelled_unet(noise_level))
            images = self.decode(latents, output_type)
            return PipelineOutput(images) if return_dict else (images,)

    def _labelled_unet(self, noise_level: int):
        """The U-Net call of each step, with the noise level as its class label."""
        unet = self._unet_call()
        if isinstance(unet, CUDAGraphModel):
            raise ValueError("CUDA graphs take no class labels (the upscaler's noise level): disable_cuda_graphs() "
                             "first")
        return functools.partial(unet, class_labels=torch.tensor([noise_level], device=self.device))
