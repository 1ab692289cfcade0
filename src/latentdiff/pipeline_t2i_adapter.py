"""Text-to-image guided by a T2I-Adapter (models/t2i_adapter.py), as diffusers' StableDiffusionAdapterPipeline:
`LatentDiffusionAdapterPipeline.from_pretrained(folder, adapter=T2IAdapter.from_pretrained(a))`, then
`pipe(prompt, image=control_image)`. The adapter runs once on the control image; every step's U-Net call adds its
feature maps inside the down stages."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .models.t2i_adapter import MultiAdapter, T2IAdapter
from .pipeline import Generators, LatentDiffusionPipeline


class AdaptedUNet:
    """`unet(x, t, context, **kwargs)` with a T2I-Adapter's feature maps for the contexts' batch: per image, or
    twice that ([uncond; cond], the same maps) with guidance."""

    def __init__(self, unet: Callable, maps: list[torch.Tensor]):
        self.unet, self.maps, self.doubled = unet, maps, [torch.cat([m, m]) for m in maps]

    def __call__(self, x: torch.Tensor, t, context: torch.Tensor, **kwargs) -> torch.Tensor:
        maps = self.maps if context.shape[0] == self.maps[0].shape[0] else self.doubled
        return self.unet(x, t, context, down_intrablock_additional_residuals=list(maps), **kwargs)


class LatentDiffusionAdapterPipeline(LatentDiffusionPipeline):
    """Text-to-image with a T2I-Adapter, as diffusers' StableDiffusionAdapterPipeline; with several (a list, or a
    MultiAdapter), one control image each and their feature maps summed with adapter_conditioning_scale's weights."""

    component_names = (*LatentDiffusionPipeline.component_names, "adapter")

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, adapter):
        super().__init__(tokenizer, text_encoder, unet, vae, scheduler)
        if isinstance(adapter, (list, tuple)):
            adapter = adapter[0] if len(adapter) == 1 else MultiAdapter(list(adapter))
        if not isinstance(adapter, (T2IAdapter, MultiAdapter)):
            raise TypeError(f"adapter must be a T2IAdapter (T2IAdapter.from_pretrained(folder)), a list of them or a "
                            f"MultiAdapter; got {type(adapter).__name__}")
        self.adapter = adapter

    def _models(self) -> list[torch.nn.Module]:
        return [*super()._models(), self.adapter]

    def enable_cuda_graphs(self, channels_last: bool = True) -> None:
        raise ValueError("CUDA graphs are not available with a T2I-Adapter (the graphs take no feature maps): use "
                         "pipe.compile() or run eagerly")

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, image=None, height: int | None = None, width: int | None = None,
        num_inference_steps: int = 50, timesteps: list[int] | None = None, sigmas: list[float] | None = None,
        guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
        eta: float = 0.0, generator: Generators = None, latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
        adapter_conditioning_scale: float | list[float] = 1.0, clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: list[str] | None = None,
        progress: bool = True, ip_adapter_image=None, ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ):
        """image: the control image (PIL, resized to height x width with Lanczos as diffusers; or a [B, C, H, W]
        tensor in [0, 1] of that size), one for all prompts or one per prompt; height and width default to its size
        rounded down to a multiple of 8. adapter_conditioning_scale: the feature maps' weight. With several
        adapters, a list of such images (one entry per adapter, sized as the first) and one weight each (or one
        for all)."""
        if isinstance(self.adapter, MultiAdapter):
            pixels, maps = self._multi_adapter_maps(image, height, width, adapter_conditioning_scale)
        else:
            pixels = self.prepare_adapter_image(image, height, width)
            maps = [m * adapter_conditioning_scale for m in self.adapter(pixels.to(self.adapter.device))]
        if not all(torch.isfinite(m).all() for m in maps):
            raise ValueError("the T2I-Adapter's feature maps hold NaN or infinite values (its weights, or the image)")

        def control(unet: Callable, n: int, steps: int) -> AdaptedUNet:
            per_prompt = n // num_images_per_prompt
            if maps[0].shape[0] not in (1, per_prompt):
                raise ValueError(f"got {maps[0].shape[0]} adapter images for {per_prompt} prompts: give one, or one "
                                 "per prompt")
            repeat = n // maps[0].shape[0]
            return AdaptedUNet(unet, [m.repeat_interleave(repeat, dim=0).to(self.dtype) for m in maps])

        return self._text_to_image(
            prompt, negative_prompt, *pixels.shape[-2:], num_inference_steps, guidance_scale, num_images_per_prompt,
            eta, generator, latents, prompt_embeds, negative_prompt_embeds, output_type, return_dict, clip_skip,
            callback_on_step_end, progress, 0.0, callback_on_step_end_tensor_inputs, timesteps, sigmas,
            cross_attention_kwargs, control=control, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds)

    def _multi_adapter_maps(self, images, height, width, scale) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the first adapter's pixels, the summed feature maps) of several adapters."""
        adapters = self.adapter.adapters
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(images) != len(adapters):
            raise ValueError(f"{len(adapters)} T2I-Adapters need one control image each (a list of {len(adapters)}: "
                             f"an image, or a list of images per prompt); got {len(images)}")
        weights = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(adapters)
        first = self.prepare_adapter_image(images[0], height, width, adapters[0].config.in_channels)
        pixels = [first] + [self.prepare_adapter_image(image, *first.shape[-2:], adapter.config.in_channels)
                            for image, adapter in zip(images[1:], adapters[1:])]
        if len({p.shape[0] for p in pixels}) != 1:
            raise ValueError(f"the adapters' control images come in batches of {[p.shape[0] for p in pixels]}: give "
                             "each adapter as many images (one, or one per prompt)")
        return first, self.adapter([p.to(self.adapter.device) for p in pixels], weights)

    def prepare_adapter_image(self, image, height: int | None = None, width: int | None = None,
                              channels: int | None = None) -> torch.Tensor:
        """The control image(s) as a float32 [N, C, H, W] batch in [0, 1] (C: the adapter's input channels, or
        `channels`)."""
        from PIL import Image

        if image is None:
            raise ValueError("the T2I-Adapter pipeline needs image= (the control image: sketch, depth, pose, ...)")
        channels = channels or self.adapter.config.in_channels
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if all(isinstance(im, Image.Image) for im in items):
            height, width = self._size_for_image(items[0].height, items[0].width, height, width)
            mode = {1: "L", 3: "RGB"}.get(channels)
            if mode is None:
                raise ValueError(f"the adapter takes {channels}-channel images: pass a tensor")
            arrays = [np.asarray(im.convert(mode).resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0
                      for im in items]
            pixels = torch.from_numpy(np.stack([a[..., None] if a.ndim == 2 else a for a in arrays]))
            return pixels.permute(0, 3, 1, 2)
        if all(isinstance(im, torch.Tensor) for im in items):
            pixels = torch.cat([t if t.dim() == 4 else t[None] for t in items]).float()
            if pixels.dim() != 4 or pixels.shape[1] != channels:
                raise ValueError(f"the adapter takes images [B, {channels}, H, W]; got {tuple(pixels.shape)}")
            if (height or pixels.shape[2], width or pixels.shape[3]) != tuple(pixels.shape[-2:]):
                raise ValueError(f"the adapter image is {pixels.shape[3]}x{pixels.shape[2]} but height x width is "
                                 f"{width}x{height}: resize the tensor (or pass a PIL image, resized here)")
            self._check_size(*pixels.shape[-2:])
            if not torch.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
                raise ValueError("adapter image values must lie in [0, 1] (8-bit pixels / 255)")
            return pixels
        raise TypeError("image must be a PIL image, a [B, C, H, W] tensor, or a list of either")
