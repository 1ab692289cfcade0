"""Float32 layers on our AMX kernels (amx.py), for CPUs with AMX: what pack_for_inference() (packed.py) makes of a
float32 model's linear layers (AmxLinear, AmxPointwiseConv for 1x1 convs), its feed-forwards' GEGLUs (AmxGEGLU), its
direct convs (AmxConv2d) and its upsamplers' convs (AmxUpsampleConv) there. Packed layers as packed.py's (the same
_Packed contract: inference only, weights re-laid out, no casting, saving or loading), their products as exact as
PyTorch's float32 ones and faster than oneDNN's. FmaGEGLU: AmxGEGLU on our AVX2 kernel (fma.py), for CPUs with AVX2
but no AVX-512."""
from __future__ import annotations

import torch
from torch import nn

from . import amx, fma
from .attention import GEGLU
from .packed import (AMX_MIN_CHANNELS, _conv3x3, _linear, _Packed, can_pack, filter_from_phases, is_3x3_same,
                     is_pointwise, runs_on_amx, runs_on_fma, upsampling_phases)


class AmxLinear(_Packed):
    """A float32 nn.Linear on AMX tiles (amx.linear: three bfloat16 parts per number, six tile products
    per product, as exact as oneDNN's float32 product and 1.2-1.8x faster on SD 1.5's layers), for CPUs with AMX.
    `weight` holds the packed parts (int16, as _Packed's re-laid-out weights: not the layer's dtype; the model's
    parameters, its biases, stay float32); `layer(x, residual)` adds the residual as it writes the output."""

    kernels = amx  # the module of the kernels (FmaGEGLU: fma, the same API)
    needs = "a CPU with AMX"
    runs = staticmethod(runs_on_amx)  # whether the kernels take a (packable) layer

    def __init__(self, linear: nn.Linear):
        self._require_packable(linear)
        if not self.runs(linear):
            why = self.kernels.unavailable() or "the kernels did not build"
            raise ValueError(f"{type(self).__name__} needs a float32 nn.Linear and {self.needs} ({why}); got "
                             f"{linear} in {linear.weight.dtype}: use PackedLinear")
        super().__init__(linear, self.kernels.pack_linear(linear.weight))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        return self.kernels.linear(x, self.weight, self.out_features, self.bias, residual)


class AmxPointwiseConv(AmxLinear):
    """A float32 1x1, stride-1 nn.Conv2d (a linear layer over each pixel's channels) on AMX tiles, as AmxLinear; a
    channels-last input is read as [B, H, W, C] rows without a copy, and the output is channels-last."""

    pointwise = True

    def __init__(self, conv: nn.Conv2d):
        if not is_pointwise(conv):
            raise ValueError(f"AmxPointwiseConv needs a 1x1 conv with stride 1 and no padding; got {conv}")
        super().__init__(_linear(conv.weight.detach().flatten(1), None if conv.bias is None else conv.bias.detach()))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        tokens = None if residual is None else residual.permute(0, 2, 3, 1)
        return super().forward(x.permute(0, 2, 3, 1), tokens).permute(0, 3, 1, 2)


class AmxGEGLU(AmxLinear):
    """attention.GEGLU in float32 on AMX tiles: its projection by amx.linear, which applies the gate
    (value * gelu(gate), exact GELU) as it writes the output; the projection's rows re-ordered 16 values, their 16
    gates, ... so that each pair of output tiles holds both. SD 1.5's 64x64 feed-forward (2 x 4096 tokens, 320 ->
    2 x 1280, 2 threads, AMX host): ~40 against ~70 ms for PackedGEGLU (oneDNN, float32)."""

    adds_residual = False
    group = 16  # the kernel's tiles: so many values, then their gates

    def __init__(self, geglu: GEGLU):
        proj = geglu.proj
        if not self.suits(geglu):
            raise ValueError(f"{type(self).__name__} needs a float32 GEGLU with a bias and a width (half the "
                             f"projection) that is a multiple of 16, and {self.needs}; got {proj}: use PackedGEGLU")
        order = torch.arange(proj.out_features).view(2, -1, self.group).transpose(0, 1).reshape(-1)
        super().__init__(_linear(proj.weight.detach()[order], proj.bias.detach()[order]))
        self.out_features = proj.out_features // 2

    @classmethod
    def suits(cls, geglu: GEGLU) -> bool:
        proj = geglu.proj
        return can_pack(proj) and cls.runs(proj) and proj.bias is not None and proj.out_features % 32 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.kernels.linear(x, self.weight, 2 * self.out_features, self.bias, geglu=True)


class FmaGEGLU(AmxGEGLU):
    """AmxGEGLU on fma.py's AVX2 kernel, for CPUs with AVX2 and FMA but no AVX-512 (`weight`: the float32 projection
    in 16-column panels, 8 values and their 8 gates each). SD 1.5's U-Net forward (batch 2, 64x64, float32, 2
    threads, AVX2 AMD EPYC, in-process A/B): 1.05x with these for PackedGEGLU's oneDNN products."""

    kernels = fma
    needs = "a CPU with AVX2 and FMA but no AVX-512"
    runs = staticmethod(runs_on_fma)
    group = fma.GEGLU_GROUP


def suits_amx_conv(conv: nn.Conv2d) -> bool:
    """Whether AmxConv2d takes this (packable) conv: float32 on a CPU where the AMX kernels run, equal strides, no
    dilation, at least AMX_MIN_CHANNELS channels in and out (narrower ones waste the tiles: SD 1.5's conv_in and
    conv_out, 4 channels, ran 0.4-0.5x oneDNN's)."""
    return (runs_on_amx(conv) and conv.stride[0] == conv.stride[1] and conv.dilation == (1, 1)
            and min(conv.in_channels, conv.out_channels) >= AMX_MIN_CHANNELS)


class AmxConv2d(_Packed):
    """A float32 nn.Conv2d on AMX tiles (amx.conv2d: each output pixel a row of AmxLinear's products, its patch
    the row's depth, gathered as the inputs are split into bfloat16 parts, so no unfolded copy), for CPUs with AMX;
    the output is channels-last, `layer(x, residual)` adds the residual as it writes. Against oneDNN's packed float32
    direct conv (benchmarks/conv_amx.py, 2 threads, AMX host, 2026-12-05): SD 1.5's stride-2 downsamplers 1.7-2.0x,
    its 4x4 layers 1.9x, pipelines/tiny-shapes' 3x3 layers 1.2-1.4x; errors against float64 2-9x smaller."""

    def __init__(self, conv: nn.Conv2d):
        self._require_packable(conv)
        if not suits_amx_conv(conv):
            here = "" if amx.available() else f" (not here: {amx.unavailable() or 'the AMX kernels did not build'})"
            raise ValueError(f"AmxConv2d needs a float32 nn.Conv2d with equal strides, no dilation and at least "
                             f"{AMX_MIN_CHANNELS} channels in and out, on a CPU with AMX{here}; got {conv} in "
                             f"{conv.weight.dtype}: use PackedConv2d")
        super().__init__(conv, amx.pack_conv(conv.weight))
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, list(conv.stride), list(conv.padding)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        return amx.conv2d(x, self.weight, self.out_channels, self.kernel_size, self.stride[0], self.padding,
                          self.bias, residual)


class AmxUpsampleConv(_Packed):
    """PackedUpsampleConv on AMX tiles: `upsampled(x)` = conv(F.interpolate(x, scale_factor=2)) as four 2x2 phase
    convs (amx.upsample_conv2d), each writing its pixels of the output in place (no (H + 1) x (W + 1) grid of all
    four, no interleaving copy). Against PackedUpsampleConv's oneDNN phases (benchmarks/conv_amx.py, 2 threads, AMX
    host): 1.7-2.0x on SD 1.5's U-Net upsamplers, 1.3-1.5x on its VAE decoder's, 1.5-1.6x on tiny-shapes'. In
    interleaved A/Bs of whole optimized models (with AmxConv2d): SD 1.5's VAE decode 3.49 -> 3.27 s, its U-Net 2.97
    -> 2.90 s, tiny-shapes' U-Net 10.3 -> 9.35 ms; the VAE's upsamplers and SD 1.5's 640-channel one have since gone
    to packed.WinogradUpsampleConv (faster again there). `weight` holds the four phase filters' parts alone (16/9 of
    the filter, at 1.5x the float32 bytes); called on an input of another size (an odd skip connection), it runs an
    AmxConv2d of the filter recovered from them (exact up to float32 rounding), built when first needed."""

    def __init__(self, conv: nn.Conv2d):
        self._require_packable(conv)
        if not (suits_amx_conv(conv) and is_3x3_same(conv)):
            raise ValueError(f"AmxUpsampleConv needs a float32 3x3 conv with stride 1 and padding 1 that AmxConv2d "
                             f"takes (see suits_amx_conv); got {conv} in {conv.weight.dtype}: use PackedUpsampleConv")
        super().__init__(conv, torch.stack([amx.pack_conv(phase) for phase in upsampling_phases(conv.weight)]))
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.direct: AmxConv2d | None = None

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return amx.upsample_conv2d(x, self.weight, self.out_channels, self.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.direct is None:
            phases = torch.stack([amx.unpack_conv(p, self.out_channels, self.in_channels, (2, 2))
                                  for p in self.weight])
            self.direct = AmxConv2d(_conv3x3(filter_from_phases(phases), self.bias))  # (sharing self.bias)
        return self.direct(x, residual)
