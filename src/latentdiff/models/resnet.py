"""Convolutional building blocks shared by the U-Net and the VAE (names match diffusers' state-dict keys)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused import adds_residual
from .group_norm import group_norm

# the time embedding (already through SiLU) [B, D], or each block's projection of it (a row of unet.TimeTable)
TimeInput = torch.Tensor | dict[nn.Module, torch.Tensor]


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the (optional) timestep embedding, twice, with a residual connection
    (the residual block of Ho et al. 2020 / Rombach et al. 2022)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int = 32,
                 eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: TimeInput | None = None) -> torch.Tensor:
        """temb: the timestep embedding already through SiLU (the U-Net applies it once for all its blocks), or a
        dict holding this block's projection of it."""
        h = self.conv1(group_norm(self.norm1, x, silu=True))
        if self.time_emb_proj is None:
            shift = None
        else:  # added to every pixel
            shift = temb[self] if isinstance(temb, dict) else self.time_emb_proj(temb)
        h = group_norm(self.norm2, h, silu=True, shift=shift)
        h = self.dropout(h) if self.training else h  # (eval: dropout is the identity; skip its call)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        if adds_residual(self.conv2):  # packed for the CPU: the conv adds the skip as it writes its output
            return self.conv2(h, skip)
        return skip + self.conv2(h)


class Downsample2D(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv. The U-Net pads 1 on every side; the VAE encoder pads only
    right and bottom (`asymmetric=True`), as the original LDM autoencoder does."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv. `size` overrides the target (the U-Net passes
    the skip connection's size so that odd latent sizes line up)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        upsampled = getattr(self.conv, "upsampled", None)  # packed.PackedUpsampleConv: no upsampled copy made
        if upsampled is not None and (size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])):
            return upsampled(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
