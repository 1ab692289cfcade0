"""The U-Net's stages: a down block per resolution, the middle block, an up block per resolution.

Each stage is a stack of layers, a layer being a ResNet block followed (in the cross-attention variants) by a spatial
transformer that attends to the text (Rombach et al. 2022, sec. 3.3). Whether a stage has attention is decided when
it is built: stages without it hold parameterless `NoAttention` stand-ins, so every forward reads the same
`x = attn(resnet(x, emb), ctx)` and the state-dict keys stay diffusers' (`down_blocks.0.attentions.1....`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .resnet import Downsample2D, ResnetBlock2D, TimeInput, Upsample2D

# builds the spatial transformer of a stage from its channel count (None: the stage has no attention)
TransformerFactory = Callable[[int], nn.Module]


class NoAttention(nn.Module):
    """Stands in for the transformer in stages without attention (diffusers' DownBlock2D / UpBlock2D). It has no
    parameters, hence no state-dict keys."""

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return x


def _attentions(make_transformer: TransformerFactory | None, channels: int, n: int) -> nn.ModuleList:
    return nn.ModuleList(make_transformer(channels) if make_transformer else NoAttention() for _ in range(n))


class DownBlock(nn.Module):
    """`layers` x (ResNet, attention) at one resolution, then a stride-2 conv unless it is the last stage
    (diffusers' CrossAttnDownBlock2D with a transformer factory, DownBlock2D without). Returns the output and the
    skip connections it leaves for the up path: every layer's output and the downsampled one."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, layers: int,
                 make_transformer: TransformerFactory | None, downsample: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(layers)
        )
        self.attentions = _attentions(make_transformer, out_channels, layers)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor, emb: TimeInput, ctx: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
        """`residual`: a T2I-Adapter's feature map for this stage, added where diffusers adds it: to the last layer's
        output in a stage with attention, else to the stage's output (the downsampled one where it downsamples),
        skip connection included."""
        attention = not isinstance(self.attentions[0], NoAttention)
        skips = []
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            x = attn(resnet(x, emb), ctx)
            if residual is not None and attention and i == len(self.resnets) - 1:
                x = _add_map(x, residual)
            skips.append(x)
        for downsample in self.downsamplers:
            x = downsample(x)
            skips.append(x)
        if residual is not None and not attention:
            x = skips[-1] = _add_map(x, residual)
        return x, skips


def _add_map(x: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
    """x + a T2I-Adapter's feature map (of x's shape, or one map for the whole batch)."""
    if feature_map.shape[1:] != x.shape[1:] or feature_map.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"a T2I-Adapter feature map of shape {tuple(feature_map.shape)} where the U-Net's stage has "
                         f"{tuple(x.shape)}: the adapter was made for another U-Net, or its image for another size")
    return x + feature_map


class MidBlock(nn.Module):
    """ResNet, transformer, ResNet at the lowest resolution (diffusers' UNetMidBlock2DCrossAttn)."""

    def __init__(self, channels: int, temb_channels: int, make_transformer: TransformerFactory, groups: int,
                 eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2))
        self.attentions = _attentions(make_transformer, channels, 1)

    def forward(self, x: torch.Tensor, emb: TimeInput, ctx: torch.Tensor) -> torch.Tensor:
        first, second = self.resnets
        (attn,) = self.attentions
        return second(attn(first(x, emb), ctx), emb)


class UpBlock(nn.Module):
    """One (ResNet, attention) layer per skip connection it consumes: each layer concatenates the next skip (last
    in, first out) to its input. Then nearest x2 upsampling and a conv, unless it is the last stage (diffusers'
    CrossAttnUpBlock2D / UpBlock2D)."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: Sequence[int], temb_channels: int,
                 make_transformer: TransformerFactory | None, upsample: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((in_channels if i == 0 else out_channels) + skip, out_channels, temb_channels, groups, eps)
            for i, skip in enumerate(skip_channels)
        )
        self.attentions = _attentions(make_transformer, out_channels, len(skip_channels))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])
        self.freeu: tuple[float, float] | None = None  # (b, s) of FreeU (see free_u), set by the U-Net's enable_freeu

    def forward(self, x: torch.Tensor, emb: TimeInput, ctx: torch.Tensor, skips: Sequence[torch.Tensor],
                size: tuple[int, int] | None = None) -> torch.Tensor:
        """`skips` in the order the down path made them; `size` is the resolution of the next stage up, so that
        odd sizes (13 -> 7 on the way down) come back exactly (7 -> 13, not 14)."""
        for resnet, attn, skip in zip(self.resnets, self.attentions, reversed(skips)):
            if self.freeu is not None:
                x, skip = free_u(x, skip, *self.freeu)
            x = attn(resnet(torch.cat([x, skip], dim=1), emb), ctx)
        for upsample in self.upsamplers:
            x = upsample(x, size)
        return x


def free_u(x: torch.Tensor, skip: torch.Tensor, b: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU (Si et al. 2024): before an up layer joins the backbone's features x and a skip connection, the first
    half of x's channels is amplified by b and the skip's lowest spatial frequencies (the 2x2 around the centre of
    its shifted spectrum) are scaled by s, so that the backbone's denoising counts more than the skip's high-frequency
    detail. The FFT runs in float32 (half-precision FFTs are unsupported or unstable)."""
    half = x.shape[1] // 2
    x = torch.cat([x[:, :half] * b, x[:, half:]], dim=1)
    spectrum = torch.fft.fftshift(torch.fft.fftn(skip.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = spectrum.shape[-2:]
    scale = torch.ones(spectrum.shape[-2:], device=skip.device)
    scale[h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1] = s
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * scale, dim=(-2, -1)), dim=(-2, -1)).real
    return x, filtered.to(skip.dtype)
