"""Generation guided by ControlNets (models/controlnet.py), as diffusers' StableDiffusionControlNet(Img2Img,
Inpaint)Pipeline: `LatentDiffusionControlNetPipeline.from_pretrained(folder, controlnet=ControlNetModel.
from_pretrained(cn))`, then `pipe(prompt, image=control_image)`. Each step runs the ControlNet(s) on the latents, the
text and the control image, and the U-Net with their residuals added (ControlledUNet, the U-Net call that the
shared denoising loop makes)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models.controlnet import ControlNetModel, MultiControlNetModel
from .pipeline import (Generators, LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline,
                       LatentDiffusionPipeline, _require_traceable)


class ControlledUNet:
    """The U-Net call of a denoising run, `unet(x, t, context)`, with the ControlNets' residuals added. Call i is
    step i: `scales[i]` holds each ControlNet's scale there (0: not run). `images`: one control image per sample of
    x's batch, per ControlNet. `guess_mode`: the ControlNets see the conditional contexts only (the second half of
    a guided batch) and the unconditional rows get no residuals."""

    def __init__(self, unet: Callable, controlnets: Sequence[ControlNetModel], images: Sequence[torch.Tensor],
                 scales: Sequence[Sequence[float]], guess_mode: bool):
        self.unet, self.controlnets, self.images, self.scales = unet, list(controlnets), list(images), scales
        self.guess_mode, self.step = guess_mode, 0
        self._halves: tuple[torch.Tensor, torch.Tensor] | None = None  # (contexts, their conditional half)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        scales = self.scales[min(self.step, len(self.scales) - 1)]
        self.step += 1
        active = [(net, image, s) for net, image, s in zip(self.controlnets, self.images, scales) if s != 0]
        if not active:  # (adding zero residuals would change nothing)
            return self.unet(x, t, context)
        if self.guess_mode and context.shape[0] > 2 * self.images[0].shape[0]:
            raise ValueError("guess mode (or a ControlNet with global_pool_conditions) with perturbed-attention "
                             "guidance is not supported: pass pag_scale=0 or guess_mode=False")
        guided_rows = context.shape[0] // 2 if self.guess_mode and context.shape[0] > self.images[0].shape[0] else 0
        net_x, net_context = x, context
        if guided_rows:  # the conditional half of the contexts (and of x, unless x is shared by both halves)
            net_context = self._conditional_half(context)
            net_x = x if x.shape[0] == guided_rows else x[guided_rows:]
        down = mid = None
        for net, image, scale in active:
            image = image if image.shape[0] == net_x.shape[0] else image.repeat(net_x.shape[0] // image.shape[0], 1,
                                                                                   1, 1)
            latents = net_x[:, :net.config.in_channels]  # (an inpainting U-Net's mask channels are not the net's)
            d, m = net(latents, t, net_context, image, scale, guess_mode=self.guess_mode)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        if guided_rows:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return self.unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    def _conditional_half(self, context: torch.Tensor) -> torch.Tensor:
        """context[B:], the same view for the same contexts (so that the text-key caches hit every step)."""
        if self._halves is None or self._halves[0] is not context:
            self._halves = (context, context[context.shape[0] // 2:])
        return self._halves[1]


def _per_net(value, n: int, name: str) -> list:
    """A value given once or one per ControlNet, as a list of n."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} ControlNets: give one value, or one per "
                         "ControlNet")
    return values


class ControlNetMixin:
    """What the ControlNet pipelines share: the `controlnet` component (one ControlNetModel, or several: a list or a
    MultiControlNetModel), its control images, and the U-Net call of the denoising loop with its residuals."""

    component_names = (*LatentDiffusionPipeline.component_names, "controlnet")

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler, controlnet):
        super().__init__(tokenizer, text_encoder, unet, vae, scheduler)
        if isinstance(controlnet, (list, tuple)):
            controlnet = controlnet[0] if len(controlnet) == 1 else MultiControlNetModel(controlnet)
        if not isinstance(controlnet, (ControlNetModel, MultiControlNetModel)):
            raise TypeError(f"controlnet must be a ControlNetModel or a list of them (ControlNetModel."
                            f"from_pretrained(folder)); got {type(controlnet).__name__}")
        self.controlnet = controlnet

    def _models(self) -> list[torch.nn.Module]:
        return [*super()._models(), self.controlnet]

    def _denoisers(self) -> list[torch.nn.Module]:
        return [*super()._denoisers(), self.controlnet]

    @property
    def _nets(self) -> list[ControlNetModel]:
        net = self.controlnet
        return list(net.nets) if isinstance(net, MultiControlNetModel) else [net]

    def enable_cuda_graphs(self, channels_last: bool = True) -> None:
        raise ValueError("CUDA graphs are not available with ControlNets (the graphs take no residuals): use "
                         "pipe.compile() (which compiles the ControlNets too) or run eagerly")

    def optimize_for_inference(self, winograd: bool = True):
        """As LatentDiffusionPipeline's, and the ControlNets packed the same way (after compile(): left to
        torch.compile, as the U-Net)."""
        super().optimize_for_inference(winograd)
        if self._compile_options is None:
            for net in self._nets:
                net.optimize_for_inference(winograd)
        return self

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        self._compiled_nets = {}  # (their frozen weights are the old ones, as the U-Net's)
        return self

    def _forget_compiled(self) -> None:
        super()._forget_compiled()
        self._compiled_nets = {}

    def disable_compile(self) -> None:
        super().disable_compile()
        self._compiled_nets = {}

    def _net_calls(self, nets: list[ControlNetModel]) -> list:
        """The ControlNets as a denoising run calls them: under compile(), each through torch.compile too (compiled
        on its first call, with the U-Net's settings), else as they are."""
        if self._compile_options is None:
            return nets
        cache = self.__dict__.setdefault("_compiled_nets", {})
        calls = []
        for net in nets:
            entry = cache.get(id(net))
            if entry is None or entry[0] is not net:
                _require_traceable(net, "a ControlNet")
                entry = cache[id(net)] = (net, self._compiled_call(net))
            calls.append(self._looped(entry[1]))
        return calls

    def _controlled(self, control_image, height: int | None, width: int | None, scale, start, end,
                    guess_mode: bool, num_images_per_prompt: int) -> tuple[Callable, tuple[int, int]]:
        """The checked ControlNet arguments of a call as (control(unet, n, steps) -> the U-Net call of the
        denoising loop, (height, width) of the control images)."""
        nets = self._nets
        self._check_controlnets(nets)
        images = self._control_images(control_image, len(nets), height, width)
        scales = [float(s) for s in _per_net(scale, len(nets), "controlnet_conditioning_scale")]
        starts = _per_net(start, len(nets), "control_guidance_start")
        ends = _per_net(end, len(nets), "control_guidance_end")
        for a, b in zip(starts, ends):
            if not 0.0 <= a < b <= 1.0:
                raise ValueError(f"control_guidance_start={a}, control_guidance_end={b}: need 0 <= start < end <= 1 "
                                 "(the fraction of the steps in which a ControlNet acts)")
        guess_mode = guess_mode or nets[0].config.global_pool_conditions

        def control(unet: Callable, n: int, steps: int) -> ControlledUNet:
            per_prompt = n // num_images_per_prompt
            batch = []
            for im, net in zip(images, nets):
                if im.shape[0] not in (1, per_prompt):
                    raise ValueError(f"got {im.shape[0]} control images for {per_prompt} prompts: give one control "
                                     "image, or one per prompt")
                batch.append(im.repeat_interleave(n // im.shape[0], dim=0).to(self.device, net.dtype))
            # step i acts where it lies within [start, end] of the run (diffusers' rule), else scale 0
            windows = list(zip(scales, starts, ends))
            per_step = [[s * (0.0 if i / steps < a or (i + 1) / steps > b else 1.0) for s, a, b in windows]
                        for i in range(steps)]
            return ControlledUNet(unet, self._net_calls(nets), batch, per_step, guess_mode)

        return control, tuple(images[0].shape[-2:])

    def _image_and_control(self, image, control_image, scale, start, end, guess_mode: bool,
                           num_images_per_prompt: int) -> tuple:
        """For img2img and inpainting: the image's pixels (preprocessed once, here; the call takes the tensor) and
        the ControlNets' step call, their control images at the image's size (see _controlled)."""
        pixels = None if image is None else self.preprocess(image)
        size = (None, None) if pixels is None else pixels.shape[-2:]
        control, _ = self._controlled(control_image, *size, scale, start, end, guess_mode, num_images_per_prompt)
        return pixels, control

    def _check_controlnets(self, nets: list[ControlNetModel]) -> None:
        unet = self.unet.config
        for i, net in enumerate(nets):
            config = net.config
            keys = ("block_out_channels", "down_block_types", "cross_attention_dim")
            mismatched = [key for key in keys if getattr(config, key) != getattr(unet, key)]
            if config.in_channels != self.vae.config.latent_channels:  # (the latents, without inpainting's mask)
                mismatched.append("in_channels")
            if config.per_block("layers_per_block") != unet.per_block("layers_per_block"):
                mismatched.append("layers_per_block")
            if mismatched:
                name = "the ControlNet" if len(nets) == 1 else f"ControlNet {i}"
                raise ValueError(f"{name} was made for another U-Net architecture: its {', '.join(mismatched)} "
                                 f"differ from the U-Net's ({', '.join(repr(getattr(unet, k)) for k in mismatched)}); "
                                 "use a ControlNet trained for this base model (SD 1.x ControlNets for SD 1.x)")

    def _control_images(self, image, count: int, height: int | None, width: int | None) -> list[torch.Tensor]:
        """One float32 [N, C, H, W] batch per ControlNet."""
        if image is None:
            raise ValueError("a ControlNet pipeline needs the control image (edges, depth, pose, ...): image= in "
                             "LatentDiffusionControlNetPipeline, control_image= in its img2img and inpainting twins")
        if count == 1:
            per_net = [image]
        else:
            if not isinstance(image, (list, tuple)):
                raise TypeError(f"with {count} ControlNets, image must be a list with one control image (or batch "
                                "of them) per ControlNet")
            if any(isinstance(entry, (list, tuple)) for entry in image):  # [prompt][ControlNet], as diffusers
                image = [list(entries) for entries in zip(*image)]
            if len(image) != count:
                raise ValueError(f"got {len(image)} control images for {count} ControlNets: give one per ControlNet")
            per_net = list(image)
        images = []
        for entry, net in zip(per_net, self._nets):
            batch = self.prepare_control_image(entry, height, width)
            if batch.shape[1] != net.config.conditioning_channels:
                raise ValueError(f"the control image has {batch.shape[1]} channels but the ControlNet takes "
                                 f"{net.config.conditioning_channels}")
            images.append(batch)
            height, width = batch.shape[-2:]  # (the first image's size for the rest, as diffusers)
        return images

    def prepare_control_image(self, image, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """A control image (or a list of them) as a float32 [N, C, H, W] batch in [0, 1] of height x width (where
        given; else its own size rounded down to a multiple of 8), resized as diffusers does."""
        from PIL import Image

        items = list(image) if isinstance(image, (list, tuple)) else [image]
        if not items:
            raise ValueError("image is an empty list: give at least one control image")
        first = items[0]
        if isinstance(first, Image.Image):
            if not all(isinstance(im, Image.Image) for im in items):
                raise TypeError("a list of control images must all be PIL images, or all tensors / arrays")
            size = self._size_for_image(first.height, first.width, height, width)
            arrays = [np.asarray(_resized(im.convert("RGB"), size), dtype=np.float32) / 255.0 for im in items]
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        if isinstance(first, np.ndarray):
            arrays = [a if a.ndim == 4 else a[None] for a in items]
            if not all(isinstance(a, np.ndarray) and a.ndim == 4 for a in arrays):
                raise ValueError("control image arrays must be [H, W, C] or [B, H, W, C]")
            stacked = np.concatenate(arrays)
            scale = 255.0 if stacked.dtype == np.uint8 else 1.0
            pixels = torch.from_numpy(stacked.astype(np.float32) / scale).permute(0, 3, 1, 2)
        elif isinstance(first, torch.Tensor):
            tensors = [t if t.dim() == 4 else t[None] for t in items]
            if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors):
                raise ValueError("control image tensors must be [C, H, W] or [B, C, H, W]")
            pixels = torch.cat([t.float().cpu() for t in tensors])
        else:
            raise TypeError(f"the control image must be a PIL image, a tensor or a numpy array (or a list of them); "
                            f"got {type(first).__name__}")
        if not torch.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ValueError("control image values must lie in [0, 1] (8-bit pixels / 255); got values in "
                             f"[{pixels.min().item():.4g}, {pixels.max().item():.4g}]")
        size = self._size_for_image(pixels.shape[2], pixels.shape[3], height, width)
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size)  # (nearest, as diffusers)
        return pixels



class LatentDiffusionControlNetPipeline(ControlNetMixin, LatentDiffusionPipeline):
    """Text-to-image with one ControlNet or several, as diffusers' StableDiffusionControlNetPipeline."""

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, image=None, height: int | None = None, width: int | None = None,
        num_inference_steps: int = 50, timesteps: list[int] | None = None, sigmas: list[float] | None = None,
        guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
        eta: float = 0.0, generator: Generators = None, latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0, guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None, callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None, progress: bool = True, ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ):
        """image: the control image (PIL, a [C, H, W] / [B, C, H, W] tensor or an [H, W, C] / [B, H, W, C] array,
        values in [0, 1]; a list of them), one for all prompts or one per prompt; with several ControlNets, a list
        with one such entry per ControlNet. It is resized to height x width where given (PIL: Lanczos, tensors:
        nearest, as diffusers), which default to its own size rounded down to a multiple of 8 (the VAE's scale).
        controlnet_conditioning_scale: the residuals' weight (one, or one per ControlNet). control_guidance_start /
        _end: the fraction of the steps in which each ControlNet acts (outside it, it is not run). guess_mode:
        the ControlNets see the prompt only, not the negative prompt, with residuals weighted by depth (diffusers'
        guess mode; a guidance scale of 3-5 suits it); on by itself for ControlNets with global_pool_conditions."""
        control, (height, width) = self._controlled(
            image, height, width, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
            guess_mode, num_images_per_prompt)
        return self._text_to_image(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, eta,
            generator, latents, prompt_embeds, negative_prompt_embeds, output_type, return_dict, clip_skip,
            callback_on_step_end, progress, 0.0, callback_on_step_end_tensor_inputs, timesteps, sigmas,
            cross_attention_kwargs, control=control, ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds)


class LatentDiffusionControlNetImg2ImgPipeline(ControlNetMixin, LatentDiffusionImg2ImgPipeline):
    """Image to image with ControlNets, as diffusers' StableDiffusionControlNetImg2ImgPipeline: `image` is the
    start (noised as `strength` says), `control_image` what the ControlNets follow (resized to `image`'s size)."""

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, image=None, control_image=None, strength: float = 0.8,
        num_inference_steps: int = 50, guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1, eta: float = 0.0, generator: Generators = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
        controlnet_conditioning_scale: float | list[float] = 0.8, guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None, callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None, progress: bool = True,
        timesteps: list[int] | None = None, sigmas: list[float] | None = None, ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ):
        """As LatentDiffusionImg2ImgPipeline's call, with the ControlNet arguments of
        LatentDiffusionControlNetPipeline's (`control_image` there is `image`; the scale's default is diffusers'
        0.8 here)."""
        image, control = self._image_and_control(image, control_image, controlnet_conditioning_scale,
                                                 control_guidance_start, control_guidance_end, guess_mode,
                                                 num_images_per_prompt)
        return self._img2img(prompt, image, strength, negative_prompt, num_inference_steps, guidance_scale,
                             num_images_per_prompt, eta, generator, prompt_embeds, negative_prompt_embeds,
                             output_type, return_dict, clip_skip, callback_on_step_end, progress,
                             callback_on_step_end_tensor_inputs, cross_attention_kwargs, timesteps, sigmas,
                             control=control, ip_adapter_image=ip_adapter_image,
                             ip_adapter_image_embeds=ip_adapter_image_embeds)


class LatentDiffusionControlNetInpaintPipeline(ControlNetMixin, LatentDiffusionInpaintPipeline):
    """Inpainting with ControlNets, as diffusers' StableDiffusionControlNetInpaintPipeline (a plain or an inpainting
    U-Net; the ControlNets see the latents, not the mask channels): `control_image` is resized to `image`'s size."""

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, image=None, mask_image=None, control_image=None,
        strength: float = 1.0, num_inference_steps: int = 50, guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
        generator: Generators = None, latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
        cross_attention_kwargs: dict | None = None, controlnet_conditioning_scale: float | list[float] = 0.5,
        guess_mode: bool = False, control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0, clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs: list[str] | None = None,
        progress: bool = True, timesteps: list[int] | None = None, sigmas: list[float] | None = None,
        ip_adapter_image=None, ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ):
        """As LatentDiffusionInpaintPipeline's call, with the ControlNet arguments of
        LatentDiffusionControlNetPipeline's (`control_image` there is `image`; the scale's default is diffusers'
        0.5 here)."""
        image, control = self._image_and_control(image, control_image, controlnet_conditioning_scale,
                                                 control_guidance_start, control_guidance_end, guess_mode,
                                                 num_images_per_prompt)
        return self._inpaint(prompt, image, mask_image, strength, negative_prompt, num_inference_steps,
                             guidance_scale, num_images_per_prompt, eta, generator, latents, prompt_embeds,
                             negative_prompt_embeds, output_type, return_dict, clip_skip, callback_on_step_end,
                             progress, callback_on_step_end_tensor_inputs, cross_attention_kwargs, timesteps, sigmas,
                             control=control, ip_adapter_image=ip_adapter_image,
                             ip_adapter_image_embeds=ip_adapter_image_embeds)


def _resized(image, size: tuple[int, int]):
    from PIL import Image

    height, width = size
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)
