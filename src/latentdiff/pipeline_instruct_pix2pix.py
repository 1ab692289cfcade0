"""InstructPix2Pix (Brooks et al. 2023): edit an image by an instruction ("make it blue"), as diffusers'
StableDiffusionInstructPix2PixPipeline: a U-Net with 8 input channels (the latents and the input image's latents,
the posterior's mode unscaled, as the model was trained) guided by text and by image with two scales
(guidance.InstructPix2PixGuidance)."""
from __future__ import annotations

from typing import Callable

import torch

from .guidance import ClassifierFreeGuidance, InstructPix2PixGuidance
from .lora import lora_call_scale
from .pipeline import Generators, LatentDiffusionImg2ImgPipeline, PipelineOutput, _per_image_generators


class LatentDiffusionInstructPix2PixPipeline(LatentDiffusionImg2ImgPipeline):
    """`pipe(instruction, image=photo, image_guidance_scale=1.5)`: the output has the image's size (images read as
    image to image reads them)."""

    _ip2p: tuple[float, torch.Tensor] | None = None  # the running call's (image scale, image latents)

    def _require_ip2p_unet(self) -> None:
        channels, latent = self.unet.config.in_channels, self.vae.config.latent_channels
        if channels != 2 * latent:
            raise ValueError(f"the U-Net takes {channels} input channels: InstructPix2Pix needs {2 * latent} (the "
                             "latents and the image's latents; e.g. timbrooks/instruct-pix2pix)")

    def _guidance(self, unet, cond, uncond, guidance_scale, guidance_rescale, share) -> ClassifierFreeGuidance:
        return InstructPix2PixGuidance(unet, cond, uncond, guidance_scale, *self._ip2p)

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, image=None, num_inference_steps: int = 100,
        guidance_scale: float = 7.5, image_guidance_scale: float = 1.5,
        negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
        generator: Generators = None, latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil", return_dict: bool = True, callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None, cross_attention_kwargs: dict | None = None,
        progress: bool = True,
    ):
        """image: the image to edit (PIL, or a [B, 3, H, W] tensor in [0, 1]; a multiple of 8 in size), one for all
        prompts or one per prompt; image_guidance_scale: how closely the output keeps to it (>= 1; with
        guidance_scale > 1 both guidances run, else the text and image pass alone)."""
        self._check_call(output_type, guidance_scale, callback_on_step_end, callback_on_step_end_tensor_inputs,
                         cross_attention_kwargs)
        self._require_ip2p_unet()
        if image is None:
            raise ValueError("InstructPix2Pix needs image= (the image the instruction edits)")
        with self._lora_scaled(lora_call_scale(cross_attention_kwargs)):
            guided = guidance_scale > 1.0 and image_guidance_scale >= 1.0
            pixels = self.preprocess(image)
            height, width = self._check_size(*pixels.shape[-2:])
            cond, uncond = self._contexts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                          num_images_per_prompt, guided, None)
            n = cond.shape[0]
            pixels = self._per_image(pixels, n, num_images_per_prompt)
            image_latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).mean.to(self.dtype)
            generators = _per_image_generators(generator, n)
            self._set_grid(num_inference_steps, None, None)
            latents = self._starting_noise(latents, self.vae.config.latent_channels, n, height, width, generators)
            self._ip2p = (float(image_guidance_scale), image_latents)
            try:
                latents = self.denoise(latents, self.scheduler.timesteps, cond, uncond, guidance_scale, generators,
                                       eta, callback_on_step_end, progress)
            finally:
                self._ip2p = None
            images = self.decode(latents, output_type)
            return PipelineOutput(images) if return_dict else (images,)
