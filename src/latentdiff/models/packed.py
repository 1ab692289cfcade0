"""Convolution and linear layers for CPU inference whose weights are re-laid out once, for oneDNN or for Winograd.

Why (SD 1.5 U-Net shapes, one thread, fp32, timings as in benchmarks/roofline.py): eager `nn.Conv2d` on the CPU
re-lays out its weight into oneDNN's blocked format on every call -- for a 1280-channel 3x3 conv at 8x8 that costs
as much as the convolution (50 GFLOP/s, 112 with a packed weight; 16x16: 87 -> 113) -- and `nn.Linear` runs MKL's
sgemm, which oneDNN with a packed weight beats by 25-40% on these shapes (8192x1280 @ 1280x320: 70 -> 108 GFLOP/s).
This is the weight pre-packing torch.compile's freezing pass does (torch/_inductor/fx_passes/mkldnn_fusion.py),
without its minutes of compilation. 3x3 stride-1 convs go further with Winograd's algorithms (winograd.py), and
the convs after a 2x nearest upsampling skip making the upsampled map (PackedUpsampleConv). 1x1 convs run as
linears over channels-last pixels: a packed 1x1 conv's speed depends erratically on the shape hint it was packed
for (20-107 GFLOP/s), the linear is steady (~105). On CPUs with AMX, float32 layers run our kernels instead
(amx.py; the layers in amx_layers.py): linear and 1x1 layers, GEGLUs, Winograd's products, and the direct convs of
at least 32 channels in and out. On CPUs where oneDNN has no bfloat16 (AVX2-only), bfloat16 layers are computed by
packed float32 copies (Float32Compute): PyTorch's own bfloat16 kernels are 10-200x slower there (float16 layers
alike, on CPUs without AVX512-FP16).

Packed layers are for inference only, and say so: their forward refuses inputs that require gradients (the oneDNN
ops have no backward); `.to()` to another dtype or device, `state_dict()` and `load_state_dict()` are refused (the
weights are no longer in the checkpoint's layout): cast, load and save before packing.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import amx, fma
from .attention import GEGLU, Attention
from .resnet import Upsample2D, is_3x3_same, upsampling_phases
from .winograd import F2x2, F4x4, recover_filters, transform_filters, transforms, winograd_conv3x3

_ops = torch.ops.mkldnn
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
AMX_MIN_CHANNELS = 32  # 1x1 convs narrower than this (the VAE's 4 -> 4) stay with oneDNN: nothing to gain
WINOGRAD_MIN_CHANNELS = 32  # below this (e.g. conv_in's 4 input channels) the transforms cost more than they save
# F(4x4, 3x3) is faster than F(2x2, 3x3) but stores 4x the filter (2.25x as much as F(2x2)), gains little at low
# resolution (where the wide layers live) and is float32-only. Used for filters of up to this many numbers: in SD 1.5,
# those of the 64x64 and 32x32 levels (320 and 640 channels), where it runs 1.3-1.7x faster than F(2x2).
F4X4_MAX_FILTER = 4_000_000
# An upsampler's conv runs F(4x4) on the upsampled map (WinogradUpsampleConv) from this many channels in and out
WINOGRAD_UPSAMPLE_MIN_CHANNELS = 256


def can_pack(layer: nn.Module) -> bool:
    """Plain nn.Linear and zero-padded, ungrouped nn.Conv2d layers on the CPU, with a PyTorch built with oneDNN, in
    float32, or in bfloat16 where oneDNN runs bfloat16 on this CPU (it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT;
    on an AVX2-only CPU a bfloat16 layer is refused, as float16 ones everywhere: pack_for_inference computes them in
    float32 where oneDNN has no kernels for them, Float32Compute)."""
    dtype = layer.weight.dtype if _packable_kind(layer) else None
    return dtype in PACKABLE_DTYPES and (dtype == torch.float32 or half_supported(dtype))


def _packable_kind(layer: nn.Module) -> bool:
    """A plain nn.Linear or zero-padded, ungrouped nn.Conv2d on the CPU, and a PyTorch built with oneDNN."""
    if type(layer) is nn.Conv2d:
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return False
    elif type(layer) is not nn.Linear:
        return False
    return torch.backends.mkldnn.is_available() and layer.weight.device.type == "cpu"


def needs_float32(layer: nn.Module) -> bool:
    """A bfloat16 or float16 nn.Linear, nn.Conv2d or GEGLU that oneDNN cannot run on this CPU but would pack in
    float32 (pack_for_inference makes it a Float32Compute). Where oneDNN has float16 kernels (AVX512-FP16) float16
    layers stay plain: this module packs no float16 layers."""
    inner = layer.proj if type(layer) is GEGLU and layer.proj.bias is not None else layer
    if not _packable_kind(inner):
        return False
    dtype = inner.weight.dtype
    return dtype in (torch.bfloat16, torch.float16) and not half_supported(dtype)


def bfloat16_supported() -> bool:
    """Whether oneDNN can run (and lay out weights for) bfloat16 on this CPU."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def half_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN has kernels for this half-precision dtype (bfloat16 or float16) on this CPU: without them
    PyTorch's convolutions and matrix products in it are slow fallbacks (see Float32Compute)."""
    if dtype == torch.bfloat16:
        return bfloat16_supported()
    return dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def is_pointwise(conv: nn.Conv2d) -> bool:
    """1x1, stride 1, no padding: a linear layer over each pixel's channels."""
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)


def is_packed(model: nn.Module) -> bool:
    """Whether pack_for_inference() re-laid out any of `model`'s layers."""
    return any(isinstance(m, _Packed) for m in model.modules())


def runs_on_amx(layer: nn.Module) -> bool:
    """Whether a packable float32 layer gets our AMX kernels (amx.py) rather than oneDNN: on CPUs where they run."""
    return layer.weight.dtype == torch.float32 and amx.available()


def runs_on_fma(layer: nn.Module) -> bool:
    """Whether a packable float32 layer's products can go to our AVX2 kernel (fma.py) rather than oneDNN: on CPUs with
    AVX2 and FMA but no AVX-512, where it builds (it makes GEGLUs alone: FmaGEGLU, which checks their width)."""
    return layer.weight.dtype == torch.float32 and fma.available()


def suits_winograd(conv: nn.Conv2d) -> bool:
    return is_3x3_same(conv) and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS


def uses_winograd(conv: nn.Conv2d) -> bool:
    """Whether packing (with Winograd allowed) makes `conv` a WinogradConv2d."""
    return suits_winograd(conv) and not direct_beats_winograd(conv)


def direct_beats_winograd(conv: nn.Conv2d) -> bool:
    """bfloat16 on a CPU with AMX: its tile units run oneDNN's direct bfloat16 convolutions at several TFLOP/s (3.1
    on this project's 2-core AMX host, benchmarks/roofline.py), where Winograd's elementwise transforms cost more
    than its fewer multiplications save (SD 1.5 U-Net forward, batch 2, bfloat16, 2 threads, 2026-12-04: 2.10 s with
    Winograd, 1.82 s without; diffusers 2.41 s)."""
    return conv.weight.dtype == torch.bfloat16 and amx_supported()


def amx_supported() -> bool:
    """Whether this CPU has AMX tile units (oneDNN uses them for bfloat16 matrix products and convolutions); False
    where this PyTorch cannot tell (the check is private API)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


def winograd_pays(shape: torch.Size | tuple, out_channels: int, path: str = "torch") -> bool:
    """Whether Winograd beats the packed direct conv for an input of `shape` [N, C, H, W]. Its transforms are
    many small passes that cost per pixel and channel, so it wins only on wide layers with enough pixels.
    `path` says which kernels run it. "torch": the transforms by PyTorch's elementwise ops, the products by
    torch.bmm. Measured (1 thread, fp32, square inputs; direct time / Winograd time, > 1: Winograd faster):
      16x16: 64 ch 0.31, 128 ch 0.75 (batch 2, 0.15 GFLOP), 256 ch 1.25, 320 ch 1.45, 640 ch 1.89;
      32x32: 64 ch 0.69, 96 ch 1.11, 128 ch 1.40, 320 ch 2.09;  64x64: 64 ch 0.92, 128 ch 1.36;
      128x128: 32 ch 0.40, 128 ch 1.45;  8x8: 128-640 ch 0.56-1.00 (F(2x2)), 1280 ch 1.13;  4x4: 0.16-0.80.
    So: at least 16x16, 96 channels and 0.3 GFLOP, or 8x8 with 1024 channels (SD 1.5 at 512 px meets it in every
    3x3 layer but conv_in; the 16x16 latents of pipelines/tiny-shapes in none).
    "amx": the products and the compiled transforms (winograd.cpp) on an AMX CPU (a float32 WinogradConv2d there),
    whose fixed cost is far smaller (~0.1 against ~0.8 ms a call). "compiled": the compiled transforms, the products
    by torch.bmm (float32 on other CPUs). benchmarks/winograd.py, the 2-core AMX host, 2 threads, 2026-12-05, batch 2
    unless noted, direct / Winograd for compiled (amx): 128 ch 16x16 1.58 (1.51), 64 ch 32x32 1.44 (1.33), 320 ch
    8x8 1.43 (1.04), 640 ch 8x8 1.64 (0.87-0.96), 960 ch 8x8 1.8 (1.8), 1280 ch 8x8 batch 1 1.45 (1.24-1.33); 64 ch
    16x16 1.12 (1.25), 96 ch 8x8 1.33 (1.06), 640 ch 8x8 batch 1 0.93-0.98 (0.60), 640 ch 4x4 0.78-0.88 (0.44-0.48),
    1280 ch 4x4 1.0-1.5 (0.80-0.99), 32 ch 128x128 batch 1 0.91 (0.79). Small inputs are bound by reading the
    transformed filters (1.8x the direct conv's bytes with F(2x2), 4x with F(4x4); on AMX 1.5x that again, as
    bfloat16 parts). With oneDNN and MKL held to AVX2 (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) and the
    transforms built for Haswell, compiled: 64 ch 16x16 2.05, 96 ch 8x8 1.41, 320 ch 8x8 1.90, 64 ch 8x8 1.15, 32 ch
    32x32 1.31; 32 ch 64x64 batch 1 0.64, 640 ch 4x4 0.62, 1280 ch 4x4 0.86. Yet in pipelines/tiny-shapes' U-Net
    (batch 2, 64-channel 16x16 and 8x8 layers, 0.01-0.04 GFLOP) taking Winograd wherever it won alone made the
    forward 5% slower with AVX-512 and 1% faster with AVX2: oneDNN's direct convs add the residual as they write.
    So, compiled: at least 64 channels, 8x8, 128 pixels and 0.12 GFLOP; amx: at least 64 channels and 0.12 GFLOP at
    16x16 and above, 1.5 GFLOP below."""
    n, c, h, w = shape
    side, channels = min(h, w), min(c, out_channels)
    flops = 18 * n * h * w * c * out_channels
    if path == "amx":
        return channels >= 64 and flops >= (1.2e8 if side >= 16 else 1.5e9)
    if path == "compiled":
        return channels >= 64 and side >= 8 and n * h * w >= 128 and flops >= 1.2e8
    if path != "torch":
        raise ValueError(f"winograd_pays: path is 'torch', 'compiled' or 'amx'; got {path!r}")
    return (side >= 16 and channels >= 96 and flops >= 3e8) or (side >= 8 and channels >= 1024)


class _Packed(nn.Module):
    """`weight` holds the re-laid-out weight (not a Parameter), `bias` is a frozen Parameter (so the model's dtype
    and device still read from its parameters). `layer(x, residual)` is residual + layer(x), the sum made by oneDNN
    as it writes the product (a binary post-op), which saves the separate add's pass over memory: the transformer
    blocks' output projections and the residual blocks' second convs (see fused.adds_residual). SD 1.5 shapes,
    bfloat16, 2 threads (AMX host), layer + add alone: 2 x 4096 tokens, 320 -> 320: 2.23 -> 1.08 ms; 2 x 256
    tokens, 1280 -> 1280: 1.20 -> 0.78 ms; 3x3 conv 320 channels at 64x64: 5.7 -> 5.3 ms. In the whole U-Net the
    gain is smaller (the residual arrives cold from memory): forward 1.553 -> 1.532 s; with the convs' adds apart
    again, 1.575 vs 1.593 s (within that host's noise)."""

    adds_residual = True

    # a small float32 layer keeps its weight as it was too (`dense`, at most DENSE_WEIGHTS numbers, as a [out, in]
    # matrix), for calls whose product is small (fewer than DENSE_PRODUCT multiply-adds), which F.linear makes
    # faster than oneDNN: oneDNN's per-call cost (primitive lookup and checks, ~40 us on a 2-core AMD EPYC) is the
    # whole time of such a product. F.linear / packed time, float32, 2 threads, that host, [tokens, in] x [in, out]:
    # [154, 64] x [64, 64] 0.46, [154, 64] x [64, 256] 0.68, [512, 96] x [96, 96] 0.79, [512, 128] x [128, 128]
    # 0.82, [512, 384] x [384, 96] 0.92; [512, 96] x [96, 768] 1.01, [2048, 320] x [320, 320] 1.02 (pipelines/
    # tiny-shapes' text encoder and U-Net are made of such layers). Linear layers and 1x1 convs.
    DENSE_WEIGHTS = 1 << 17
    DENSE_PRODUCT = 1 << 25

    def __init__(self, layer: nn.Linear | nn.Conv2d, packed: torch.Tensor, matrix: torch.Tensor | None = None):
        super().__init__()
        self.weight = packed
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
        self.layer_dtype = layer.weight.dtype  # (the packed weight's may differ: the AMX layers' parts are int16)
        small = matrix is not None and matrix.dtype == torch.float32 and matrix.numel() <= self.DENSE_WEIGHTS
        self.dense = matrix.detach().clone() if small else None

    def _dense_product(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
        """F.linear(x, dense, bias) (+ residual) where this layer keeps `dense` and the product is small; else
        None (then oneDNN's packed product runs)."""
        if self.dense is None or x.numel() * self.dense.shape[0] >= self.DENSE_PRODUCT:
            return None
        y = F.linear(x, self.dense, self.bias)
        return y if residual is None else y.add_(residual)

    @classmethod
    def _require_packable(cls, layer: nn.Module) -> None:
        if not can_pack(layer):
            weight = getattr(layer, "weight", None)
            found = f" ({weight.dtype}, {weight.device})" if isinstance(weight, torch.Tensor) else ""
            raise ValueError(f"{cls.__name__} needs a CPU float32 or bfloat16 nn.Linear or zero-padded, ungrouped "
                             f"nn.Conv2d (bfloat16 only where oneDNN runs it on this CPU: see can_pack); got "
                             f"{layer}{found}: leave it as is")

    def _check(self, x: torch.Tensor) -> None:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{type(self).__name__} is packed for inference and cannot compute gradients: run it "
                               "under torch.no_grad(), or use a model that was not optimized for inference")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(f"{prefix or 'model'}: the weights of a model optimized for inference are re-laid out and "
                           "no longer match the checkpoint format: save the model before optimize_for_inference()")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        raise RuntimeError(f"{prefix or 'model'}: cannot load weights into a layer packed for inference; load them "
                           "first, then call optimize_for_inference()")

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.layer_dtype))  # what .to()/.half()/.cuda() would make of the layer's
        if (probe.dtype, probe.device) != (self.layer_dtype, torch.device("cpu")):
            raise RuntimeError(f"{type(self).__name__}: weights packed for CPU {self.layer_dtype} cannot be moved to "
                               f"{probe.device} {probe.dtype}; call .to() before optimize_for_inference()")
        return super()._apply(fn, recurse)


class PackedLinear(_Packed):
    """nn.Linear with a oneDNN-packed weight: y = x W^T + b over the last dimension (small products: F.linear with
    the weight as it was, see _Packed.DENSE_PRODUCT; `dense=False`: none kept)."""

    def __init__(self, linear: nn.Linear, dense: bool = True):
        self._require_packable(linear)
        super().__init__(linear, _ops._reorder_linear_weight(linear.weight.detach(), None),
                         linear.weight if dense else None)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        y = self._dense_product(x, residual)
        if y is not None:
            return y
        if residual is not None:
            return _ops._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return _ops._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class PackedGEGLU(nn.Module):
    """attention.GEGLU (value * gelu(gate), [value | gate] = x W^T + b) as two packed matrix products whose oneDNN
    epilogues do the rest: the gate's applies the (exact) GELU, the value's multiplies by the gate. No [.., 2 * D]
    projection is written and read back, and no separate GELU and product passes run: SD 1.5's feed-forward at
    64x64 in bfloat16 (2 x 4096 tokens, 320 -> 2 x 1280, 2 threads) ~10.5 against ~16-30 ms for the packed
    projection, GELU and product (a noisy host; benchmarks/unet.py measures the whole U-Net). The products are
    rounded once, from float32, where the plain path rounds the projection and the GELU first."""

    def __init__(self, geglu: GEGLU):
        super().__init__()
        proj = geglu.proj
        value, gate = proj.weight.detach().chunk(2)
        value_bias, gate_bias = proj.bias.detach().chunk(2)
        self.value = PackedLinear(_linear(value, value_bias), dense=False)  # (their products: oneDNN's alone)
        self.gate = PackedLinear(_linear(gate, gate_bias), dense=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.value._check(x)
        gate = _ops._linear_pointwise(x, self.gate.weight, self.gate.bias, "gelu", [], "none")
        return _ops._linear_pointwise.binary(x, gate, self.value.weight, self.value.bias, "mul")


class Float32Compute(_Packed):
    """A bfloat16 (or float16) nn.Linear, nn.Conv2d or GEGLU computed by the packed layer of its float32 copy
    (`inner`: what `packed` makes of it, Winograd's and the upsamplers' fast paths included), for CPUs where oneDNN
    has no kernels in its dtype (bfloat16: AVX2-only CPUs, e.g. AMD EPYC before Zen 4; float16: all but those with
    AVX512-FP16). There PyTorch's own bfloat16 kernels are slow fallbacks: on a 2-core AMD EPYC with AVX2, 2
    threads, a 320-channel 3x3 conv at 32x32 ran at 0.6 GFLOP/s (14 in channels-last), a [2048, 320] x [320, 1280]
    product at 8.8 and torch.bmm at 2.0 (float16: 6-9), against 110-130 in float32, so diffusers' bfloat16 SD 1.5
    U-Net forward (batch 2, 64x64 latents) took 91-103 s in channels-last (more in NCHW), ours with these layers
    12 s (10.8-11.1 s in float32). Inputs are widened to float32 and the output (with the residual, where the block
    hands one over) is rounded to the layer's dtype once: closer to the exact result than half-precision kernels,
    which round their products' inputs too. The float32 weights take twice the layer's memory. The layer's own
    half-precision bias stays its parameter, so the model's dtype still reads as before; `.to()` the same dtype and
    device is a no-op, any other is refused like the other packed layers'."""

    def __init__(self, layer: nn.Module, inner: nn.Module):
        """inner: the packed layer of `layer`'s float32 copy (float32_compute makes both)."""
        if not needs_float32(layer):
            raise ValueError(f"Float32Compute takes a bfloat16 or float16 CPU nn.Linear, nn.Conv2d or GEGLU that "
                             f"oneDNN cannot run on this CPU (see needs_float32); got {layer}: pack it with `packed`")
        source = layer.proj if type(layer) is GEGLU else layer
        # `weight`: an empty stand-in that tells the layer's dtype and device, as a packed layer's weight does
        super().__init__(source, torch.empty(0, dtype=source.weight.dtype))
        self.inner = inner
        self.adds_residual = getattr(inner, "adds_residual", False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        if residual is None:
            return self.inner(x.float()).to(self.layer_dtype)
        return self.inner(x.float(), residual.float()).to(self.layer_dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse=False)  # (refuses another dtype or device; the float32 layer is not cast)
        return self


class Float32ComputeUpsample(Float32Compute):
    """Float32Compute of an upsampler's conv (Upsample2D), whose float32 layer runs on the low-resolution map
    (`upsampled`, see PackedUpsampleConv)."""

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.inner.upsampled(x.float()).to(self.layer_dtype)


def float32_compute(layer: nn.Module, winograd: bool = True, after_upsampling: bool = False) -> Float32Compute:
    """The Float32Compute of a half-precision layer (see needs_float32), its float32 copy packed as `packed`
    would."""
    inner = packed(copy.deepcopy(layer).float(), winograd, after_upsampling)
    return (Float32ComputeUpsample if hasattr(inner, "upsampled") else Float32Compute)(layer, inner)


def _conv3x3(weight: torch.Tensor, bias: nn.Parameter | None) -> nn.Conv2d:
    """A 3x3, padding-1 nn.Conv2d of `weight` (a packed layer's filters, recovered) and the packed layer's own `bias`
    (the same Parameter: its storage shared), to be packed."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1, bias=bias is not None, device="meta")
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = bias
    return conv


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding (contiguous copies of) these tensors, to be packed."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return layer


class PackedConv2d(_Packed):
    """nn.Conv2d with a oneDNN-packed weight; its output is channels-last. A 1x1 conv is a linear over the channels
    of each pixel, and runs as one.

    oneDNN picks its algorithm and weight layout for an input shape, so the weight is packed again, for the shape at
    hand, whenever a call's input shape differs from the last one (a diffusion run repeats one shape). Packed without
    a shape, it ran 1.4-15x slower on small inputs (2 x 96 x 8 x 8: 6.0 ms against 0.4 ms)."""

    def __init__(self, conv: nn.Conv2d):
        self._require_packable(conv)
        weight = conv.weight.detach()
        pointwise = is_pointwise(conv)
        if pointwise:
            packed = _ops._reorder_linear_weight(weight.flatten(1), None)
        else:
            packed = _ops._reorder_convolution_weight(weight, list(conv.padding), list(conv.stride),
                                                      list(conv.dilation), 1, None)
        super().__init__(conv, packed, weight.flatten(1) if pointwise else None)
        self.pointwise = pointwise
        self.padding, self.stride, self.dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
        self.packed_for: torch.Size | None = None  # the input shape the weight is laid out for

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        if self.pointwise:  # [B, C, H, W] channels-last is [B, H, W, C] in memory: a free view
            tokens = x.permute(0, 2, 3, 1)
            extra = None if residual is None else residual.permute(0, 2, 3, 1)
            y = self._dense_product(tokens, extra)
            if y is None:
                y = (_ops._linear_pointwise(tokens, self.weight, self.bias, "none", [], "") if extra is None
                     else _ops._linear_pointwise.binary(tokens, extra, self.weight, self.bias, "add"))
            return y.permute(0, 3, 1, 2)
        if x.shape != self.packed_for:
            self.weight = _ops._reorder_convolution_weight(self.weight.to_dense(), self.padding, self.stride,
                                                           self.dilation, 1, list(x.shape))
            self.packed_for = x.shape
        args = (self.weight, self.bias, self.padding, self.stride, self.dilation, 1)
        if residual is not None:
            return _ops._convolution_pointwise.binary(x, residual, *args, "add", None, None, [], None)
        return _ops._convolution_pointwise(x, *args, "none", [], "")


def filter_from_phases(phases: torch.Tensor) -> torch.Tensor:
    """The 3x3 filter [N, C, 3, 3] whose upsampling_phases are `phases` [4, N, C, 2, 2] (in float64, then phases'
    dtype). Phase (a, b)'s tap (i, j) sums the filter's taps in rows S(a)[i] and columns S(b)[j], with S(0) = ({0},
    {1, 2}) and S(1) = ({0, 1}, {2}): each corner is alone in one tap, each edge tap shares one with a corner, the
    centre one with three of those."""
    p = phases.double()
    w = p.new_empty(*p.shape[1:3], 3, 3)
    w[..., 0, 0], w[..., 0, 2], w[..., 2, 0], w[..., 2, 2] = p[0, ..., 0, 0], p[1, ..., 0, 1], p[2, ..., 1, 0], \
        p[3, ..., 1, 1]
    w[..., 0, 1] = p[1, ..., 0, 0] - w[..., 0, 0]
    w[..., 1, 0] = p[2, ..., 0, 0] - w[..., 0, 0]
    w[..., 1, 2] = p[3, ..., 0, 1] - w[..., 0, 2]
    w[..., 2, 1] = p[3, ..., 1, 0] - w[..., 2, 0]
    w[..., 1, 1] = p[3, ..., 0, 0] - w[..., 0, 0] - w[..., 0, 1] - w[..., 1, 0]
    return w.to(phases.dtype)


class PackedUpsampleConv(PackedConv2d):
    """A PackedConv2d of a 3x3, stride-1, padding-1 conv that can also run on the nearest-neighbour 2x upsampling
    of its input without making it: `upsampled(x)` is self(F.interpolate(x, scale_factor=2)). Nearest upsampling
    repeats each input pixel over a 2x2 block, so the output pixel (2i + a, 2j + b) is a 2x2 conv of the input
    around (i, j) whose taps are sums of the 3x3 filter's: rows (a = 0) [w0, w1 + w2] over input rows i - 1, i;
    (a = 1) [w0 + w1, w2] over i, i + 1; columns alike. One conv with 4x the output channels (the four phases
    (a, b)), padding 1, gives every phase on an (H + 1) x (W + 1) grid; phase (a, b) is its window at offset (a, b),
    interleaved into the output. 16 multiply-adds per input pixel and channel pair instead of 36, and no upsampled
    copy. 2 threads, AMX host, against interpolation and the conv packing would otherwise make: bfloat16 (direct
    conv), SD 1.5's U-Net upsamplers (batch 2) 7.8 -> 6.7 ms at 8x8, 28.5 -> 23.4 at 16x16, 23 -> 13.3 at 32x32,
    its VAE decoder's (batch 1) 33 -> 19 at 64x64, 231 -> 90 at 128x128, 214 -> 200 at 256x256; float32
    (Winograd), 28 -> 31 at 8x8, 131 -> 93 at 16x16, 88 -> 89 at 32x32, 152 -> 124, 604 -> 585, 920 -> 609 for
    the VAE's. The phase filters cost 16/9 of the filter's memory on top of it (the plain conv still serves other
    output sizes)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv)
        if not is_3x3_same(conv):
            raise ValueError(f"PackedUpsampleConv needs a 3x3 conv with stride 1 and padding 1; got {conv}")
        phase_conv = nn.Conv2d(conv.in_channels, 4 * conv.out_channels, 2, padding=1, bias=conv.bias is not None,
                               device="meta")
        # [4 * out, in, 2, 2], phase-major (a, b)
        phase_conv.weight = nn.Parameter(upsampling_phases(conv.weight).flatten(0, 1), requires_grad=False)
        if conv.bias is not None:
            phase_conv.bias = nn.Parameter(conv.bias.detach().repeat(4), requires_grad=False)
        self.phases = PackedConv2d(phase_conv)

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        grid = self.phases(x).permute(0, 2, 3, 1).unflatten(3, (2, 2, -1))  # [N, H + 1, W + 1, a, b, C]
        out = grid.new_empty(n, h, 2, w, 2, grid.shape[-1])  # [N, H, a, W, b, C]: channels-last [N, C, 2H, 2W]
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a, :, b] = grid[:, a:a + h, b:b + w, a, b]
        return out.view(n, 2 * h, 2 * w, -1).permute(0, 3, 1, 2)


class WinogradConv2d(_Packed):
    """A 3x3, stride-1, padding-1 nn.Conv2d computed with Winograd's F(4x4, 3x3) (small float32 filters) or
    F(2x2, 3x3) from pre-transformed filters, for inputs on which that pays (`winograd_pays`). Smaller inputs run a
    packed direct conv, whose filters are recovered from the transformed ones when first needed (U = G g G^T, so
    g = G+ U G+^T with G+ the left inverse of G; exact up to the rounding of U's dtype).

    On CPUs with AMX a float32 layer keeps its transformed filters as AMX parts (`weight`: int16, 1.5x the float32
    bytes) and makes the products of each transform point with amx.points: SD 1.5's products 1.1-1.9x torch.bmm's
    (the points shared out among the threads, so each point's filters are read from memory once), errors below.
    On every CPU where g++ builds them, float32 layers' input and output transforms run as one vector pass each
    (winograd.cpp) instead of one PyTorch op per term: with the AMX products, SD 1.5's U-Net forward 3.09 -> 2.82 s,
    the VAE decode 8.5 -> 7.0 s (fp32, 2 threads)."""

    def __init__(self, conv: nn.Conv2d):
        self._require_packable(conv)
        if not suits_winograd(conv):
            raise ValueError(f"WinogradConv2d needs a 3x3 conv with stride 1, padding 1, no dilation and at least "
                             f"{WINOGRAD_MIN_CHANNELS} channels in and out; got {conv}: use PackedConv2d")
        weight = conv.weight.detach()
        large = weight.dtype != torch.float32 or weight.numel() > F4X4_MAX_FILTER
        filters = transform_filters(weight, F2x2 if large else F4x4)  # [points, C, K]
        self.on_amx = runs_on_amx(conv)
        super().__init__(conv, amx.pack_points(filters.transpose(1, 2)) if self.on_amx else filters)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.direct: nn.Module | None = None  # a PackedConv2d, or on AMX CPUs an AmxConv2d

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x)
        if winograd_pays(x.shape, self.out_channels, self.path(x)):
            return winograd_conv3x3(x, self.weight, self.bias, self._points if self.on_amx else None,
                                    self.out_channels, residual=residual)
        if self.direct is None:
            self.direct = packed(self._recovered_conv(), winograd=False)
        return self.direct(x, residual)

    def _recovered_conv(self) -> nn.Conv2d:
        """The conv whose filters these are (recovered from the transformed ones), sharing self.bias's storage, for
        the direct layer (`packed(..., winograd=False)`) that runs where Winograd does not pay."""
        return _conv3x3(recover_filters(self.filters()), self.bias)

    def path(self, x: torch.Tensor) -> str:
        """Which kernels make the Winograd conv of x (see winograd_pays)."""
        if self.on_amx:
            return "amx"
        compiled = x.dtype == torch.float32 and transforms() is not None
        return "compiled" if compiled else "torch"

    def filters(self) -> torch.Tensor:
        """The transformed filters, [points, C, K] in the layer's dtype."""
        if not self.on_amx:
            return self.weight
        return amx.unpack_points(self.weight, self.out_channels, self.in_channels).transpose(1, 2)

    def _points(self, v: torch.Tensor) -> torch.Tensor:
        return amx.points(v, self.weight, self.out_channels)


class WinogradUpsampleConv(WinogradConv2d):
    """The conv of an upsampler (Upsample2D) as a WinogradConv2d whose `upsampled(x)` (= self(F.interpolate(x,
    scale_factor=2))) runs F(4x4, 3x3) on the 2x nearest upsampling of x, which the compiled input transform reads
    from x without making it: 2.25 multiplies per output against the four upsampling phases' 4 (PackedUpsampleConv,
    AmxUpsampleConv). Where Winograd does not pay on the upsampled size (`winograd_pays`), the phases of the filters
    recovered from the transformed ones run, built when first needed. For float32 layers of at least
    WINOGRAD_UPSAMPLE_MIN_CHANNELS channels in and out whose filters F(4x4) takes (`suits_winograd_upsampling`).
    `benchmarks/winograd.py --upsamplers` (2 threads, AMX host): against AMX's phases, SD's VAE decoder 1.14-1.43x,
    SD 1.5's U-Net 640 ch 32 -> 64 1.13x, 256-320 ch at 16 -> 32 1.3x; narrower layers lose (128 ch 0.88x, 64 ch
    0.90x), and so do F(2x2)'s (1280 ch 0.67-1.07x); with the AMX kernels off, against oneDNN's phases, 1.37-1.59x on
    those SD layers. Whole VAE decode (interleaved A/B): 3.13 -> 3.00 s, without the AMX kernels 3.47 -> 3.21 s."""

    def __init__(self, conv: nn.Conv2d):
        if not suits_winograd_upsampling(conv):
            raise ValueError(f"WinogradUpsampleConv needs a float32 3x3 conv with stride 1 and padding 1, at least "
                             f"{WINOGRAD_UPSAMPLE_MIN_CHANNELS} channels in and out, filters of at most "
                             f"{F4X4_MAX_FILTER} numbers and the compiled Winograd transforms; got {conv} in "
                             f"{conv.weight.dtype}: use PackedUpsampleConv")
        super().__init__(conv)
        self.phases: nn.Module | None = None  # a PackedUpsampleConv, or on AMX CPUs an AmxUpsampleConv

    def upsampled(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        n, c, h, w = x.shape
        path = self.path(x)
        if path != "torch" and winograd_pays((n, c, 2 * h, 2 * w), self.out_channels, path):
            return winograd_conv3x3(x, self.weight, self.bias, self._points if self.on_amx else None,
                                    self.out_channels, upsample=True)
        if self.phases is None:
            self.phases = packed(self._recovered_conv(), winograd=False, after_upsampling=True)
        return self.phases.upsampled(x)


def suits_winograd_upsampling(conv: nn.Conv2d) -> bool:
    """Whether WinogradUpsampleConv takes this conv of an upsampler (see it)."""
    return (can_pack(conv) and suits_winograd(conv) and conv.weight.dtype == torch.float32
            and conv.weight.numel() <= F4X4_MAX_FILTER
            and min(conv.in_channels, conv.out_channels) >= WINOGRAD_UPSAMPLE_MIN_CHANNELS
            and transforms() is not None)


def packed(layer: nn.Module, winograd: bool = True, after_upsampling: bool = False) -> nn.Module:
    """The packed stand-in for `layer` (`after_upsampling`: the conv of an Upsample2D), or `layer` itself when it
    cannot be packed."""
    from .amx_layers import (AmxConv2d, AmxGEGLU, AmxLinear, AmxPointwiseConv, AmxUpsampleConv, FmaGEGLU,
                             suits_amx_conv)  # (they build on this module's classes)

    if needs_float32(layer):
        return float32_compute(layer, winograd, after_upsampling)
    for geglu in (AmxGEGLU, FmaGEGLU):
        if type(layer) is GEGLU and geglu.suits(layer):
            return geglu(layer)
    if type(layer) is GEGLU and can_pack(layer.proj) and layer.proj.bias is not None:
        return PackedGEGLU(layer)
    if not can_pack(layer):
        return layer
    if type(layer) is nn.Linear:
        return AmxLinear(layer) if runs_on_amx(layer) else PackedLinear(layer)
    if after_upsampling and is_3x3_same(layer):
        if winograd and suits_winograd_upsampling(layer):
            return WinogradUpsampleConv(layer)
        return AmxUpsampleConv(layer) if suits_amx_conv(layer) else PackedUpsampleConv(layer)
    if winograd and uses_winograd(layer):
        return WinogradConv2d(layer)
    if suits_amx_conv(layer):
        return AmxPointwiseConv(layer) if is_pointwise(layer) else AmxConv2d(layer)
    return PackedConv2d(layer)


@torch.no_grad()
def pack_for_inference(model: nn.Module, winograd: bool = True) -> nn.Module:
    """Switch `model` to eval mode, channels-last and frozen parameters, and replace (in place) every CPU
    float32/bfloat16 nn.Conv2d and nn.Linear by its packed version (3x3 stride-1 convs by Winograd ones when
    `winograd`, which run a direct conv on inputs too small for Winograd to pay; the conv of an Upsample2D by a
    PackedUpsampleConv, which the upsampler runs on its input). On a CPU without oneDNN bfloat16 (AVX2-only), a
    bfloat16 layer becomes a Float32Compute (its packed float32 copy between bfloat16 inputs and outputs: twice its
    weight memory; SD 1.5's U-Net forward 12 s there, diffusers' in channels-last 91-103 s), and so does a float16
    layer on a CPU without oneDNN float16 (all but AVX512-FP16 ones). Layers that cannot be packed (other dtypes or
    devices, no oneDNN: see `can_pack`) are left as they are, so this is safe anywhere; returns `model`. A float32
    or bfloat16 model's attention layers run the AMX kernel (amx.py) where this CPU has AMX and it builds (a
    bfloat16 model's its AVX-512 build where the CPU has AVX512-BF16 instead), and there a float32 model's linear
    layers and GEGLUs become AmxLinear and AmxGEGLU, its direct convs AmxConv2d and AmxUpsampleConv where they have
    the channels (suits_amx_conv); on a CPU with AVX2 but no AVX-512 its GEGLUs become FmaGEGLU and its attention
    layers run fma.attention (half precision computed in float32 there too). (Large activations still get fresh
    pages from malloc on every call: see allocator.keep_freed_buffers, process-wide, which the command line's
    --optimize also sets.)"""
    model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    on_cpu = [p.dtype for p in model.parameters() if p.device.type == "cpu"]
    attend = None
    if any(dtype in PACKABLE_DTYPES and amx.runs_attention(dtype) for dtype in on_cpu):
        attend = amx.attention
    elif any(dtype in fma.DTYPES for dtype in on_cpu) and fma.available():
        attend = fma.attention
    for layer in model.modules() if attend else ():
        if isinstance(layer, Attention):
            layer.attend = attend
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            replacement = packed(child, winograd, after_upsampling=type(parent) is Upsample2D)
            if replacement is not child:
                setattr(parent, name, replacement)
    return model
