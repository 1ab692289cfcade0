"""Convolutional building blocks shared by the U-Net and the VAE (names match diffusers' state-dict keys)."""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from .fused import adds_residual
from .group_norm import group_norm

# the time embedding (already through SiLU) [B, D], or each block's projection of it (a row of unet.TimeTable)
TimeInput = torch.Tensor | dict[nn.Module, torch.Tensor]


def is_plain_conv(layer: nn.Module) -> bool:
    """A plain nn.Conv2d (not a packed or LoRA layer, whose types are their own), ungrouped, without hooks: one whose
    weight may be computed with directly in place of calling it."""
    return (type(layer) is nn.Conv2d and layer.groups == 1
            and not (layer._forward_hooks or layer._forward_pre_hooks))


def is_3x3_same(conv: nn.Conv2d) -> bool:
    """3x3, stride 1, padding 1, no dilation: the output has the input's size."""
    return conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)


def pointwise_weight(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The [out, in] matrix of `layer` where computing it on the CPU as a matrix product pays: a plain 1x1 conv (no
    stride, padding, groups or hooks; not re-laid out by optimize_for_inference, whose layers have their own types)
    on a CPU map of at most 16x16 pixels, or any bfloat16 map in NCHW. oneDNN's conv re-lays out its input and output
    around the product, a cost small maps do not amortise. Measured (AMD EPYC, 2 threads; conv time / product time):
    float32, 128 ch 4x4 batch 2 (1 MFLOP) 114 vs 15 us; 160 -> 64 ch 16x16 1.62, 128 ch 16x16 channels-last 1.23,
    320 ch 16x16 1.00, 1280 ch 8x8 1.19; but 320 ch 32x32 0.83, 64 ch 64x64 0.95, 64 -> 32 ch 128x128 0.94;
    bfloat16 NCHW 1.03 (640 -> 320 ch 64x64) to 2.73 (256 -> 128 ch 256x256). None otherwise (GPUs keep the conv:
    not measured there)."""
    if (is_plain_conv(layer) and x.is_cpu and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.padding in ((0, 0), "valid") and layer.dilation == (1, 1)
            and (x.shape[-2] * x.shape[-1] <= 256 or (x.dtype == torch.bfloat16 and x.is_contiguous()))):
        return layer.weight.flatten(1)
    return None


def conv1x1(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for a [B, C, H, W] map, as a matrix product where pointwise_weight() allows (the output keeps x's
    memory format: contiguous or channels-last)."""
    weight = pointwise_weight(layer, x)
    if weight is None or x.dim() != 4:
        return layer(x)
    if x.is_contiguous():  # out[b] = W @ x[b] over [C, H*W], plus the bias per row
        flat = x.flatten(2)
        weight = weight.expand(x.shape[0], *weight.shape)
        out = torch.matmul(weight, flat) if layer.bias is None else torch.baddbmm(layer.bias[:, None], weight, flat)
        return out.unflatten(2, x.shape[2:])
    if x.is_contiguous(memory_format=torch.channels_last):  # the pixels are [B, H, W, C] rows
        return F.linear(x.permute(0, 2, 3, 1), weight, layer.bias).permute(0, 3, 1, 2)
    return layer(x)


def _unseen(layer: nn.Module) -> bool:
    """Whether no forward hook (the layer's own, or a global one) can have kept the layer's last output, so that
    its caller may write over it."""
    return not (layer._forward_hooks or nn.modules.module._global_forward_hooks)


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
        h = group_norm(self.norm2, h, silu=True, shift=shift, reuse=_unseen(self.conv1))  # (over conv1's output)
        h = self.dropout(h) if self.training else h  # (eval: dropout is the identity; skip its call)
        skip = x if self.conv_shortcut is None else conv1x1(self.conv_shortcut, x)
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


def upsampling_phases(weight: torch.Tensor) -> torch.Tensor:
    """The four 2x2 filters [4, N, C, 2, 2] (phases (a, b) in row-major order) that a 3x3 filter [N, C, 3, 3]
    becomes on the nearest-neighbour 2x upsampling of its input (see PackedUpsampleConv), in weight's dtype (the
    taps summed in float64, 64 filters at a time: the float64 temporaries of a whole 512-channel filter came to
    ~90 MiB, more than the tiled VAE decode's working memory could spare)."""
    phases = weight.new_empty(4, *weight.shape[:2], 2, 2, requires_grad=False)
    for start in range(0, weight.shape[0], 64):
        w = weight[start:start + 64].detach().double()
        for a in (0, 1):
            rows = _phase_taps(w, 2, a)
            for b in (0, 1):
                phases[2 * a + b, start:start + 64] = _phase_taps(rows, 3, b)
    return phases


def _phase_taps(w: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
    """A 3x3 filter's 3 taps along `dim` as the 2 that phase 0 or 1 of a nearest 2x upsampling sees: (t0, t1 + t2)
    or (t0 + t1, t2)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack((t0, t1 + t2) if phase == 0 else (t0 + t1, t2), dim)


def upsampled_conv(x: torch.Tensor, phases: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv(nearest 2x upsampling of x) for a 3x3, padding-1 conv given as its upsampling_phases [4, N, C, 2, 2]:
    the output's pixels (2i + a, 2j + b) are phase (a, b)'s 2x2 conv of the input padded by 1, at offset (a, b),
    written into the output in place (x's memory format). 16 multiply-adds per input pixel and channel pair
    instead of 36, and no upsampled copy: at most a quarter of the output alive beside it (see
    packed.PackedUpsampleConv, which makes the four phases in one conv)."""
    n, _, h, w = x.shape
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    out = torch.empty(n, phases.shape[1], 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=layout)
    padded = F.pad(x, (1, 1, 1, 1))
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a::2, b::2] = F.conv2d(padded[:, :, a:a + h + 1, b:b + w + 1], phases[2 * a + b], bias)
    return out


# while kept_phases() is active: [(the weight of the upsampler that ran last, its version, its phase filters)]
_kept_phases: contextvars.ContextVar[list | None] = contextvars.ContextVar("kept_phases", default=None)


@contextlib.contextmanager
def kept_phases():
    """Within it, an Upsample2D that runs on its filter's phases reuses those it made at its last call while its
    weight is the same, unchanged tensor (one upsampler's at a time): a tiled pass calls each upsampler once per
    tile and GroupNorm pass (the SD VAE decode at 512 px, 64 px tiles: 192 calls of the last upsampler, 48 of the
    one before, whose 512-channel phases take ~24 ms to make)."""
    token = _kept_phases.set([None])
    try:
        yield
    finally:
        _kept_phases.reset(token)


class Upsample2D(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv. `size` overrides the target (the U-Net passes
    the skip connection's size so that odd latent sizes line up). `phases=True` (the VAE decoder's): without
    autograd on the CPU, on inputs of 16x16 pixels or more, the conv runs on the phases of its filter
    (upsampled_conv), made for each call (16/9 of the filter, for the call only). Float32, 2 threads, AMD EPYC,
    interpolate + conv against the phases: the SD VAE decoder's upsampler at 64x64 (512 ch) 399 -> 171 ms, SD 1.5's
    U-Net one at 32x32 (320 ch, batch 2) 79.9 -> 39.8 ms; 8x8 maps lose (96 ch, batch 2: 520 -> 639 us). Only the
    VAE's use it: its upsampled maps are far larger than its filters, so the call holds less memory at its peak,
    where the U-Net's 1280-channel filters (105 MB of phases) outweigh its small maps."""

    def __init__(self, channels: int, phases: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.phases = phases

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        doubled = size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
        upsampled = getattr(self.conv, "upsampled", None)  # packed.PackedUpsampleConv: no upsampled copy made
        if upsampled is not None and doubled:
            return upsampled(x)
        if doubled and self.phases and self._phases_pay(x):
            return upsampled_conv(x, self._phases(), self.conv.bias)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)

    def _phases(self) -> torch.Tensor:
        weight, kept = self.conv.weight, _kept_phases.get()
        try:
            version = weight._version
        except RuntimeError:  # (an inference tensor keeps no version)
            kept = None
        if kept is None:
            return upsampling_phases(weight)
        last = kept[0]
        if last is None or last[0] is not weight or last[1] != version:
            last = kept[0] = (weight, version, upsampling_phases(weight))
        return last[2]

    def _phases_pay(self, x: torch.Tensor) -> bool:
        return (x.is_cpu and x.shape[-2] * x.shape[-1] >= 256 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and is_plain_conv(self.conv) and is_3x3_same(self.conv))
