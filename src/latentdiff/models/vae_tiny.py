"""The tiny autoencoder TAESD (Bohan 2023, "Tiny AutoEncoder for Stable Diffusion"; diffusers' AutoencoderTiny): a
plain convolutional encoder and decoder (no attention, no normalisation, 2.4M parameters at SD's sizes) trained to
map images to the SD VAE's latent space and back, for previews and fast decoding (a 512 px image: 0.44 s
optimized for inference on a 2-core CPU against 3.0 s for the SD VAE; benchmarks/vae.py --model tiny):
`pipe.vae = AutoencoderTiny.from_pretrained("taesd")`. Its latents need no scaling (scaling_factor 1) and
its encoder gives one latent per image, not a distribution. Module names equal diffusers' state-dict keys.

    encoder: x in [-1, 1] -> (x + 1) / 2 -> conv -> per stage: [stride-2 conv] + blocks -> conv to latent_channels
    decoder: z -> 3 tanh(z / 3) -> conv, act -> per stage: blocks, [upsample, conv] -> conv to RGB -> 2 y - 1
    block:   relu(conv3(act(conv2(act(conv1(x))))) + skip(x)), skip a 1x1 conv only where the width changes
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..config import ConfigMixin, ModelMixin, returned

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish}


@dataclasses.dataclass(frozen=True)
class TinyVAEConfig(ConfigMixin):
    """diffusers' AutoencoderTiny config, its defaults (TAESD for SD 1.x/2.x). diffusers also writes
    `block_out_channels` (the decoder's, from which pipelines compute the 8x scale) and `force_upcast: false`."""

    diffusers_class: ClassVar[str] = "AutoencoderTiny"
    fixed: ClassVar[dict[str, Any]] = {"shift_factor": 0.0, "force_upcast": False}

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0  # scale_latents(): latents <-> [0, 1] (to store them as images)
    latent_shift: float = 0.5
    scaling_factor: float = 1.0
    block_out_channels: tuple[int, ...] | None = None  # (written by diffusers: the decoder's; see vae_scale_factor)

    def __post_init__(self):
        if self.block_out_channels is None:
            object.__setattr__(self, "block_out_channels", self.decoder_block_out_channels)

    @property
    def force_upcast(self) -> bool:  # (no normalisation to overflow: decodes in fp16 as it is)
        return False

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        for side in ("encoder", "decoder"):
            widths, blocks = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if not widths or len(widths) != len(blocks):
                raise ValueError(f"TinyVAEConfig: {side}_block_out_channels {widths} and num_{side}_blocks {blocks} "
                                 "must be non-empty lists of the same length (one entry per stage)")
            if len(set(widths)) != 1:  # (diffusers' layers keep the width within each stage's convs)
                raise ValueError(f"TinyVAEConfig: {side}_block_out_channels {widths}: latentdiff, as diffusers, "
                                 "builds AutoencoderTiny with one width for every stage")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"TinyVAEConfig: act_fn {self.act_fn!r}: choose one of {sorted(ACTIVATIONS)}")
        if self.block_out_channels != self.decoder_block_out_channels:
            raise ValueError(f"TinyVAEConfig: block_out_channels {self.block_out_channels} must equal "
                             f"decoder_block_out_channels {self.decoder_block_out_channels} (diffusers writes them so)")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "force_upcast": False, "shift_factor": 0.0}


class TinyBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, act_fn: str):
        super().__init__()
        act = ACTIVATIONS[act_fn]
        self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), act(),
                                  nn.Conv2d(out_channels, out_channels, 3, padding=1), act(),
                                  nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (nn.Identity() if in_channels == out_channels else
                     nn.Conv2d(in_channels, out_channels, 1, bias=False))
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Module):
    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        layers, width = [], config.in_channels
        for i, (out, blocks) in enumerate(zip(config.encoder_block_out_channels, config.num_encoder_blocks)):
            layers.append(nn.Conv2d(width, out, 3, padding=1) if i == 0 else
                          nn.Conv2d(width, out, 3, padding=1, stride=2, bias=False))
            layers += [TinyBlock(out, out, config.act_fn) for _ in range(blocks)]
            width = out
        layers.append(nn.Conv2d(width, config.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers((images + 1) / 2)  # (TAESD works on images in [0, 1])


class TinyDecoder(nn.Module):
    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        widths, stages = config.decoder_block_out_channels, len(config.decoder_block_out_channels)
        layers = [nn.Conv2d(config.latent_channels, widths[0], 3, padding=1), ACTIVATIONS[config.act_fn]()]
        for i, (width, blocks) in enumerate(zip(widths, config.num_decoder_blocks)):
            last = i == stages - 1
            layers += [TinyBlock(width, width, config.act_fn) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=config.upsampling_scaling_factor, mode=config.upsample_fn))
            layers.append(nn.Conv2d(width, config.out_channels if last else width, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        soft_clamped = torch.tanh(latents / 3) * 3  # (|z| < 3, smoothly)
        return self.layers(soft_clamped) * 2 - 1  # (to [-1, 1])


class PointMass:
    """What AutoencoderTiny.encode returns bare: one latent per image, in the posterior's interface (mean = mode =
    every sample, no spread) so that pipelines treat both autoencoders alike; `.latents` as diffusers names it."""

    def __init__(self, latents: torch.Tensor):
        self.latents = self.mean = latents

    @property
    def latent_dist(self) -> PointMass:
        return self

    def mode(self) -> torch.Tensor:
        return self.latents

    def sample(self, generator=None) -> torch.Tensor:  # (generator accepted as diffusers' is: nothing to draw)
        return self.latents


class TinyEncoderOutput(NamedTuple):
    latents: torch.Tensor


class TinyDecoderOutput(NamedTuple):
    sample: torch.Tensor


class AutoencoderTiny(ModelMixin):
    """encode(images) -> PointMass (return_dict=True: `.latents`, as diffusers); decode(latents) -> images in
    [-1, 1]. `enable_slicing()` runs a batch's images one at a time."""

    config_class = TinyVAEConfig

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = TinyEncoder(config), TinyDecoder(config)
        self.use_slicing = False

    @property
    def vae_scale_factor(self) -> int:
        return self.config.vae_scale_factor

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, *args, **kwargs) -> None:
        raise NotImplementedError("AutoencoderTiny has no tiled mode in latentdiff (it holds little memory: no "
                                  "attention, 64 channels); use enable_slicing() to decode a batch an image at a time")

    def disable_tiling(self) -> None:
        pass

    def encode(self, images: torch.Tensor, return_dict: bool | None = None):
        latents = self._sliced(self.encoder, images, self.config.in_channels, "images")
        if return_dict is None:
            return PointMass(latents)
        return returned(latents, return_dict, TinyEncoderOutput)

    def decode(self, latents: torch.Tensor, return_dict: bool | None = None, generator=None):
        """Images in [-1, 1]; `generator` is accepted as diffusers' is, and unused."""
        images = self._sliced(self.decoder, latents, self.config.latent_channels, "latents")
        return returned(images, return_dict, TinyDecoderOutput)

    def forward(self, images: torch.Tensor, return_dict: bool | None = None) -> torch.Tensor:
        """Reconstruct `images` through their latents."""
        return self.decode(self.encode(images).latents, return_dict)

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to [0, 1] (to store them as 8-bit images): a latent of latent_magnitude lands at the top."""
        return (latents / (2 * self.config.latent_magnitude) + self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, stored: torch.Tensor) -> torch.Tensor:
        return (stored - self.config.latent_shift) * (2 * self.config.latent_magnitude)

    def _sliced(self, network: nn.Module, x: torch.Tensor, channels: int, name: str) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"AutoencoderTiny: {name} must be [B, {channels}, H, W], got {tuple(x.shape)}")
        if self.use_slicing:
            return torch.cat([network(part) for part in x.split(1)])
        return network(x)
