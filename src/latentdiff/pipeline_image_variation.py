"""Image variations: Stable Diffusion fine-tuned to be conditioned on an image instead of a prompt
(lambdalabs/sd-image-variations-diffusers), as diffusers' StableDiffusionImageVariationPipeline runs it. The
context is one token: the CLIP image embedding (CLIPVisionModelWithProjection's image_embeds, the U-Net's
cross-attention width) of the input image, prepared by the folder's CLIPImageProcessor; the unconditional context
for guidance is zeros. There is no tokenizer or text encoder.

    pipe = LatentDiffusionImageVariationPipeline.from_pretrained("sd-image-variations-diffusers")
    out = pipe(photo, guidance_scale=3.0, num_images_per_prompt=4)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from .ip_adapter import clip_vision
from .pipeline import Generators, LatentDiffusionPipeline, PipelineOutput, _per_image_generators


def default_feature_extractor(image_encoder):
    """The CLIP image preprocessing for `image_encoder`'s input size (resize the short side, centre crop, CLIP's
    mean and std), as published image-variation folders configure it."""
    size = image_encoder.config.image_size
    return clip_vision("CLIPImageProcessor")(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


class LatentDiffusionImageVariationPipeline(LatentDiffusionPipeline):
    """`pipe(image).images`: new images like `image` (a PIL image, a list of them, or a tensor of pixel values
    already prepared for the image encoder, [B, 3, S, S])."""

    component_names = ("image_encoder", "feature_extractor", "unet", "vae", "scheduler")

    def __init__(self, image_encoder, unet, vae, scheduler, feature_extractor=None):
        super().__init__(None, None, unet, vae, scheduler)
        if image_encoder is None:
            raise ValueError("an image variation pipeline needs its image_encoder (transformers' "
                             "CLIPVisionModelWithProjection)")
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor or default_feature_extractor(image_encoder)

    # ---- what a pipeline without a text encoder does not have --------------------------------------------------
    @classmethod
    def from_single_file(cls, path, *args, **kwargs):
        raise ValueError(f"{cls.__name__}.from_single_file: image variation models are published as diffusers "
                         "folders (lambdalabs/sd-image-variations-diffusers); load the folder with from_pretrained")

    def _unsupported(self, what: str):
        raise ValueError(f"{what}: the image variation pipeline has no text encoder and no IP-Adapter support (as "
                         "in diffusers); use LatentDiffusionPipeline for text prompts")

    def load_lora_weights(self, *args, **kwargs):
        self._unsupported("load_lora_weights")

    def load_textual_inversion(self, *args, **kwargs):
        self._unsupported("load_textual_inversion")

    def load_ip_adapter(self, *args, **kwargs):
        self._unsupported("load_ip_adapter")

    def encode_prompt(self, *args, **kwargs):
        self._unsupported("encode_prompt")

    # ---- the image context --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image, device=None, num_images_per_prompt: int = 1,
                     do_classifier_free_guidance: bool = False) -> torch.Tensor:
        """The contexts of `image` ([B * num_images_per_prompt, 1, D]: each image's CLIP embedding, repeated), with
        guidance preceded by as many zero contexts (the unconditional ones), as diffusers' _encode_image."""
        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, torch.Tensor):
            if image.ndim != 4 or image.shape[1] != 3:
                raise ValueError(f"image tensor of shape {tuple(image.shape)}: give pixel values prepared for the "
                                 "image encoder, [B, 3, S, S] (pipe.feature_extractor(images).pixel_values), or "
                                 "PIL images")
            pixels = image
        elif isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
            pixels = self.feature_extractor(images=list(image), return_tensors="pt").pixel_values
        else:
            raise TypeError(f"image must be a PIL image, a list of PIL images or a tensor of pixel values; got "
                            f"{type(image).__name__}{' (empty)' if isinstance(image, (list, tuple)) else ''}")
        weight = next(self.image_encoder.parameters())
        embeds = self.image_encoder(pixels.to(weight.device, weight.dtype)).image_embeds
        width = self.unet.config.cross_attention_dim
        if embeds.shape[-1] != width:
            raise ValueError(f"the image encoder makes {embeds.shape[-1]}-wide embeddings but the U-Net attends to "
                             f"{width}-wide contexts: not an image variation pair (its U-Net is fine-tuned on the "
                             "encoder's projected embeddings)")
        context = embeds[:, None].to(device or self.device, self.dtype).repeat_interleave(num_images_per_prompt, 0)
        return torch.cat([torch.zeros_like(context), context]) if do_classifier_free_guidance else context

    # ---- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self, image=None, height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
        guidance_scale: float = 7.5, num_images_per_prompt: int = 1, eta: float = 0.0,
        generator: Generators = None, latents: torch.Tensor | None = None, output_type: str = "pil",
        return_dict: bool = True, callback: Callable | None = None, callback_steps: int = 1,
        callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: list[str] | None = None,
        timesteps: list[int] | None = None, sigmas: list[float] | None = None, progress: bool = True,
    ):
        """diffusers' arguments, its legacy `callback(step, timestep, latents)` every `callback_steps` steps
        included; and ours: callback_on_step_end, timesteps / sigmas (a grid in full), progress."""
        self._check_call(output_type, guidance_scale, callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._require_plain_unet()
        if image is None:
            raise ValueError("the image variation pipeline needs image= (the image to make variations of)")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be at least 1")
        if callback is not None:
            if callback_on_step_end is not None:
                raise ValueError("pass callback (diffusers' legacy form) or callback_on_step_end, not both")
            if not isinstance(callback_steps, int) or callback_steps < 1:
                raise ValueError(f"callback_steps={callback_steps!r} must be a positive integer")
        height, width = self._check_size(height, width)
        guided = self._guided(guidance_scale)
        context = self.encode_image(image, self.device, num_images_per_prompt, guided)
        uncond, cond = context.chunk(2) if guided else (None, context)
        n = cond.shape[0]
        generators = _per_image_generators(generator, n)
        steps = self._set_grid(num_inference_steps, timesteps, sigmas)
        latents = self._starting_noise(latents, self.unet.config.in_channels, n, height, width, generators)
        if callback is not None:
            callback_on_step_end = self._legacy_callback(callback, callback_steps, steps)
        latents = self.denoise(latents, self.scheduler.timesteps, cond, uncond, guidance_scale, generators, eta,
                               callback_on_step_end, progress)
        images = self.decode(latents, output_type)
        return PipelineOutput(images) if return_dict else (images,)

    def _legacy_callback(self, callback: Callable, every: int, steps: int) -> Callable:
        """diffusers' callback(step, timestep, latents) as a callback_on_step_end: called after the loop's entry
        i where a step of the scheduler's order ends (and after the last), when i is a multiple of `every`, with
        step = i // order, as diffusers calls it."""
        order = self.scheduler.order
        entries = len(self.scheduler.timesteps)
        warmup = entries - steps * order

        def on_step_end(pipe, i, t, tensors):
            ends = i == entries - 1 or (i + 1 > warmup and (i + 1) % order == 0)
            if ends and i % every == 0:
                callback(i // order, t, tensors["latents"])
            return tensors

        return on_step_end

