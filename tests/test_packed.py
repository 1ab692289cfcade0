"""Inference packing (models/packed.py, models/winograd.py, UNet2DConditionModel.optimize_for_inference) and the
chunked feed-forward: the fast paths must compute what the plain model computes, and refuse what they cannot do
(gradients, casting, saving or loading after packing) with an error that says what to do."""
from __future__ import annotations

import copy

import pytest
import torch

import torch.nn.functional as F

from latentdiff.models import allocator, amx, attention, fma, native, packed, winograd
from latentdiff.models.fused import adds_residual
from latentdiff.models.amx_layers import AmxConv2d, AmxGEGLU, AmxLinear, AmxPointwiseConv, AmxUpsampleConv, FmaGEGLU
from latentdiff.models.packed import (_Packed, Float32Compute, Float32ComputeUpsample, PackedConv2d, PackedGEGLU,
                                      PackedLinear, PackedUpsampleConv, WinogradConv2d, WinogradUpsampleConv,
                                      pack_for_inference)
from latentdiff.models.resnet import Upsample2D
from latentdiff.models.unet import UNet2DConditionModel, UNetConfig

pytestmark = [pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN"),
              pytest.mark.usefixtures("one_thread")]
needs_transforms = pytest.mark.skipif(
    winograd.transforms() is None, reason=f"no compiled Winograd transforms: {native.unavailable() or 'build failed'}")
needs_bf16 = pytest.mark.skipif(not packed.bfloat16_supported(),
                                reason="oneDNN has no bfloat16 on this CPU (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)")

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
SMALL = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=24, attention_head_dim=2,
             down_block_types=(CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP))

# what pack_for_inference() makes of a float32 nn.Linear, a conv (not Winograd's), an upsampler's conv and a GEGLU: our
# AMX kernels on CPUs with AMX, else oneDNN's (GEGLUs: our AVX2 kernel on CPUs with AVX2 but no AVX-512)
FLOAT32_LINEAR = AmxLinear if amx.available() else PackedLinear
FLOAT32_GEGLU = AmxGEGLU if amx.available() else FmaGEGLU if fma.available() else PackedGEGLU
FLOAT32_CONV = AmxConv2d if amx.available() else PackedConv2d
FLOAT32_UPSAMPLE_CONV = AmxUpsampleConv if amx.available() else PackedUpsampleConv


def make(seed: int = 0, dtype=torch.float32, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(UNetConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised layer may hide a wrong path
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype)


def inputs(height: int, width: int, dtype=torch.float32, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, height, width, generator=g).to(dtype), torch.tensor([981, 250][:batch]),
            torch.randn(batch, 7, 24, generator=g).to(dtype))


@pytest.fixture
def always_winograd(monkeypatch):
    """Winograd layers take their Winograd path even on the small inputs of these tests (where, by
    packed.winograd_pays, a direct conv is faster and is what they would run)."""
    monkeypatch.setattr(packed, "winograd_pays", lambda shape, out_channels, path="torch": True)


def optimized_copy(model: UNet2DConditionModel, **kwargs) -> UNet2DConditionModel:
    twin = UNet2DConditionModel(model.config).to(model.dtype)
    twin.load_state_dict(model.state_dict())
    return twin.optimize_for_inference(**kwargs)


@pytest.mark.parametrize("overrides, height, width, use_winograd", [
    (dict(), 16, 16, True),
    (dict(), 13, 11, True),  # odd sizes: partial Winograd tiles; packed weights do not depend on the input size
    (dict(), 13, 11, False),
    (dict(), 16, 8, False),  # even sizes: the upsamplers compute on the 2x upsampling without making it
    (dict(use_linear_projection=True, transformer_layers_per_block=2), 8, 24, True),
])
@pytest.mark.usefixtures("always_winograd")
@torch.no_grad()
def test_optimized_model_matches_the_plain_one(overrides, height, width, use_winograd):
    model = make(**overrides)
    fast = optimized_copy(model, winograd=use_winograd)
    kinds = {type(m) for m in fast.modules()}
    assert torch.nn.Conv2d not in kinds and torch.nn.Linear not in kinds
    assert (WinogradConv2d in kinds) == use_winograd
    assert any(isinstance(m, FLOAT32_CONV) and m.stride == [2, 2] for m in fast.modules())
    assert all(isinstance(block.upsamplers[0].conv, FLOAT32_UPSAMPLE_CONV) for block in fast.up_blocks[:-1])
    proj_in = fast.down_blocks[1].attentions[0].proj_in  # a 1x1 conv in SD 1.x, a linear in SD 2.x
    if overrides:
        assert isinstance(proj_in, FLOAT32_LINEAR)
    else:
        assert isinstance(proj_in, AmxPointwiseConv if amx.available() else PackedConv2d) and proj_in.pointwise
    sample, t, ctx = inputs(height, width)
    expected = model(sample, t, ctx)
    got = fast(sample, t, ctx)
    assert got.shape == expected.shape and expected.std() > 0.1
    assert (got - expected).abs().max() <= 1e-4
    # channels-last in, or a single sample: same answer
    cl = sample.contiguous(memory_format=torch.channels_last)
    assert (fast(cl, t, ctx) - expected).abs().max() <= 1e-4
    assert (fast(sample[1:], t[1:], ctx[1:]) - expected[1:]).abs().max() <= 1e-4


@pytest.mark.parametrize("algorithm", [winograd.F2x2, winograd.F4x4])
@pytest.mark.parametrize("height, width", [(8, 8), (7, 5), (1, 1), (40, 3)])
def test_winograd_conv_matches_conv2d(algorithm, height, width, monkeypatch):
    monkeypatch.setattr(winograd, "MIN_TILES", 4)  # several slices of tile rows even at these sizes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, height, width, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(5, 8, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    filters = winograd.transform_filters(weight, algorithm)
    assert filters.shape == ((algorithm.m + 2) ** 2, 8, 5)
    expected = F.conv2d(x, weight, bias, padding=1)
    got = winograd.winograd_conv3x3(x, filters, bias)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    got = winograd.winograd_conv3x3(x.contiguous(memory_format=torch.channels_last), filters)
    torch.testing.assert_close(got, F.conv2d(x, weight, padding=1), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"needs \[K, C, 3, 3\] filters"):
        winograd.transform_filters(weight[..., :2])


@needs_transforms
@pytest.mark.parametrize("algorithm", [winograd.F2x2, winograd.F4x4])
@pytest.mark.parametrize("channels,out_channels,height,width,bias", [
    (40, 24, 13, 7, True),  # ragged tiles at the bottom and right; channels not a multiple of 16
    (32, 48, 8, 8, False),
])
@torch.no_grad()
def test_fused_winograd_transforms_match_pytorchs(algorithm, channels, out_channels, height, width, bias,
                                                  monkeypatch):
    """The compiled input and output transforms (winograd.cpp) give the convolution that PyTorch's elementwise ops
    give, as exactly, over several slices of tile rows."""
    monkeypatch.setattr(winograd, "MIN_TILES", 4)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, channels, height, width, generator=g)
    weight, b = torch.randn(out_channels, channels, 3, 3, generator=g), torch.randn(out_channels, generator=g)
    b = b if bias else None
    filters = winograd.transform_filters(weight, algorithm)
    exact = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    theirs = winograd.winograd_conv3x3(x, filters, b, fused_transforms=False)
    ours = winograd.winograd_conv3x3(x, filters, b, fused_transforms=True)
    assert ours.shape == exact.shape and ours.is_contiguous(memory_format=torch.channels_last)
    error, their_error = ((y.double() - exact).abs().max().item() for y in (ours, theirs))
    assert error <= 1.25 * their_error + 1e-6, (error, their_error)
    assert torch.equal(winograd.winograd_conv3x3(x, filters, b), ours)  # their default on float32 CPU tensors
    # channels-last, and a view of a wider map (rows further apart than a row's pixels): read in place, same bits
    wider = torch.zeros(2, channels, height, width + 3).contiguous(memory_format=torch.channels_last)
    wider[..., 1:width + 1] = x
    for view in (x.contiguous(memory_format=torch.channels_last), wider[..., 1:width + 1]):
        assert torch.equal(winograd.winograd_conv3x3(view, filters, b), ours)

    def transposed(v):  # the same products, handed back as a non-contiguous view
        return torch.bmm(filters.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    got = winograd.winograd_conv3x3(x, filters, b, transposed, out_channels, fused_transforms=True)
    assert (got.double() - exact).abs().max().item() <= 1.25 * their_error + 1e-6
    torch.set_num_threads(3)
    try:
        assert torch.equal(winograd.winograd_conv3x3(x, filters, b), ours)  # tiles shared out differently, same bits
    finally:
        torch.set_num_threads(1)


def test_fused_winograd_transforms_refuse_what_they_cannot_take():
    filters = winograd.transform_filters(torch.randn(16, 16, 3, 3))
    x = torch.randn(1, 16, 8, 8, dtype=torch.bfloat16)
    assert winograd.winograd_conv3x3(x, filters.bfloat16()).dtype == torch.bfloat16  # PyTorch's ops then
    with pytest.raises(ValueError, match="take float32 CPU tensors.*fused_transforms=None"):
        winograd.winograd_conv3x3(x, filters.bfloat16(), fused_transforms=True)


def test_winograd_algorithm_follows_size_and_dtype(monkeypatch):
    monkeypatch.setattr(packed, "F4X4_MAX_FILTER", 64 * 64 * 9)
    small, large = torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Conv2d(64, 96, 3, padding=1)
    assert WinogradConv2d(small).weight.shape[0] == 36 and WinogradConv2d(large).weight.shape[0] == 16


@needs_bf16
def test_winograd_uses_f2x2_in_bfloat16():
    small = torch.nn.Conv2d(64, 64, 3, padding=1).bfloat16()
    assert WinogradConv2d(small).weight.shape[0] == 16  # F(4x4) is too inexact in bfloat16


@pytest.mark.usefixtures("always_winograd")
def test_recover_filters_inverts_the_transform():
    weight = torch.randn(5, 8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for algorithm in (winograd.F2x2, winograd.F4x4):
        recovered = winograd.recover_filters(winograd.transform_filters(weight, algorithm))
        torch.testing.assert_close(recovered, weight, rtol=0, atol=1e-12)


def test_winograd_is_used_where_it_pays():
    # SD 1.5 at 512 px, batch 2 (one guided step): every 3x3 conv of the U-Net (latents 64..8 px) and of the VAE
    # decoder (64..512 px) takes Winograd; the U-Net of pipelines/tiny-shapes (16x16 latents, 64-128 channels) none
    for channels, side in [(320, 64), (640, 32), (1280, 16), (1280, 8), (512, 64), (256, 512), (128, 512)]:
        assert packed.winograd_pays((2, channels, side, side), channels), (channels, side)
    for channels, side in [(64, 16), (96, 8), (128, 4), (128, 16), (640, 8), (1280, 4), (32, 128), (64, 64)]:
        assert not packed.winograd_pays((2, channels, side, side), channels), (channels, side)
    # with the products and transforms on AMX it pays on smaller inputs too, still not on the smallest
    for channels, side in [(320, 64), (1280, 8), (128, 16), (64, 32), (960, 8), (256, 512)]:
        assert packed.winograd_pays((2, channels, side, side), channels, "amx"), (channels, side)
    for channels, side in [(64, 16), (96, 8), (128, 8), (640, 8), (1280, 4), (640, 4), (32, 128)]:
        assert not packed.winograd_pays((2, channels, side, side), channels, "amx"), (channels, side)
    # with the compiled transforms and torch.bmm's products: from 8x8, 64 channels, 128 pixels and 0.12 GFLOP
    for channels, side in [(320, 64), (1280, 8), (128, 16), (640, 8), (320, 8), (64, 32), (256, 512)]:
        assert packed.winograd_pays((2, channels, side, side), channels, "compiled"), (channels, side)
    for channels, side in [(64, 16), (96, 8), (64, 8), (32, 32), (640, 4), (1280, 4), (32, 128)]:
        assert not packed.winograd_pays((2, channels, side, side), channels, "compiled"), (channels, side)
    with pytest.raises(ValueError, match="path is 'torch', 'compiled' or 'amx'"):
        packed.winograd_pays((2, 64, 8, 8), 64, "fused")
    assert not packed.winograd_pays((1, 640, 8, 8), 640, "compiled")  # 64 pixels: bound by reading the filters


@torch.no_grad()
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 2e-2,
                                                                                   marks=needs_bf16)])
def test_winograd_layer_runs_small_inputs_as_a_direct_conv(dtype, tolerance):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(96, 96, 3, padding=1).to(dtype)
    layer = WinogradConv2d(conv)
    for side, direct in [(4, True), (64, False)]:  # 4x4: a packed direct conv; 64x64: Winograd
        x = torch.randn(2, 96, side, side).to(dtype)
        assert packed.winograd_pays(x.shape, 96, layer.path(x)) is not direct
        expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        got = layer(x)
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
        assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < tolerance
        # built at the first small input, kept for the next
        assert isinstance(layer.direct, FLOAT32_CONV if dtype == torch.float32 else PackedConv2d)
    assert layer.direct.bias is not None and layer.direct.bias.data_ptr() == layer.bias.data_ptr()


@torch.no_grad()
def test_optimized_bfloat16_agrees_with_fp32():
    # where oneDNN has no bfloat16 (AVX2-only CPUs) the layers stay plain and the model still runs
    model = make()
    sample, t, ctx = inputs(16, 16)
    expected = model(sample, t, ctx)
    fast = optimized_copy(model.to(torch.bfloat16))
    assert fast.dtype == torch.bfloat16
    kinds, supported = {type(m) for m in fast.modules()}, packed.bfloat16_supported()
    assert torch.nn.Linear not in kinds and (Float32Compute in kinds) != supported  # (AVX2: computed in float32)
    got = fast(sample.bfloat16(), t, ctx.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).norm() / expected.norm() < 3e-2


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_layers_compute_in_float32_where_onednn_has_no_kernels_for_them(dtype, monkeypatch):
    """On AVX2-only CPUs (forced here for bfloat16; float16 on all CPUs but AVX512-FP16 ones) a half-precision
    linear, conv or GEGLU runs as the packed layer of its float32 copy: its dtype in and out, rounded once (so no
    further from float64 than the plain layer), the residual added before the rounding, an upsampler's conv on the
    low-resolution map; the layers keep telling their dtype, and refuse what the other packed layers refuse."""
    monkeypatch.setattr(packed, "bfloat16_supported", lambda: False)
    if packed.half_supported(dtype):
        pytest.skip("oneDNN has float16 kernels on this CPU (AVX512-FP16): float16 layers stay plain")
    torch.manual_seed(0)
    plain = [torch.nn.Linear(40, 24), torch.nn.Conv2d(32, 48, 3, padding=1), attention.GEGLU(40, 64),
             torch.nn.Conv2d(32, 32, 1)]
    plain = torch.nn.Sequential(*plain, Upsample2D(32)).to(dtype)
    exact = copy.deepcopy(plain).double()
    model = pack_for_inference(copy.deepcopy(plain))
    assert [type(m) for m in model[:4]] == [Float32Compute] * 4 and type(model[4].conv) is Float32ComputeUpsample
    assert [type(m.inner) for m in model[:3]] == [FLOAT32_LINEAR, WinogradConv2d, FLOAT32_GEGLU]
    assert all(next(m.parameters()).dtype == m.weight.dtype == dtype for m in model[:4])  # (model.dtype)
    assert adds_residual(model[0], model[1]) and not adds_residual(model[2])
    tokens, image = torch.randn(2, 5, 40).to(dtype), torch.randn(2, 32, 9, 11).to(dtype)
    residual = torch.randn(2, 48, 9, 11).to(dtype)
    cases = [(0, (tokens,), lambda m, x: m(x)), (1, (image,), lambda m, x: m(x)), (2, (tokens,), lambda m, x: m(x)),
             (3, (image,), lambda m, x: m(x)), (4, (image,), lambda m, x: m(x)),
             (1, (image, residual), lambda m, x, r: m(x) + r)]
    for i, args, reference in cases:
        got = model[i](*args)
        assert got.dtype == dtype, i
        want = reference(exact[i], *(a.double() for a in args))
        theirs = reference(plain[i], *args) if len(args) == 1 else plain[i](args[0]) + args[1]
        error, their_error = ((y.double() - want).abs().max().item() for y in (got, theirs))
        assert error <= their_error + 1e-6 and error <= 2 ** -8 * want.abs().max().item(), (i, error, their_error)
    model.to(dtype)  # (nothing to do)
    with pytest.raises(RuntimeError, match="cannot be moved to cpu torch.float32"):
        model.float()
    with pytest.raises(RuntimeError, match="no longer match the checkpoint"):
        model.state_dict()
    with torch.enable_grad(), pytest.raises(RuntimeError, match="cannot compute gradients"):
        model[0](tokens.requires_grad_())
    with pytest.raises(ValueError, match="bfloat16 only where oneDNN runs it"):
        PackedConv2d(torch.nn.Conv2d(4, 4, 3, padding=1).to(dtype))
    with pytest.raises(ValueError, match="oneDNN cannot run on this CPU"):
        Float32Compute(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))


@torch.no_grad()
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), pytest.param(torch.bfloat16, 1e-2,
                                                                                   marks=needs_bf16)])
def test_packed_geglu_computes_the_gated_unit(dtype, tolerance, monkeypatch):
    """PackedGEGLU (value * gelu(gate) from two packed products with fused epilogues) against the plain GEGLU in
    float64; pack_for_inference puts it in the feed-forward, which then runs its tokens whole (no slices). (Our AVX2
    kernel, FmaGEGLU, kept out of it: tests/test_fma.py.)"""
    monkeypatch.setattr(fma, "library", lambda: None)
    torch.manual_seed(0)
    ff = attention.FeedForward(16).to(dtype)
    x = torch.randn(2, 37, 16).to(dtype)
    plain = attention.FeedForward(16).double()
    plain.load_state_dict(ff.state_dict())
    expected = plain(x.double())
    monkeypatch.setattr(attention, "FF_CHUNK_BYTES", 10 * 128 * 4)  # slices of 10 tokens for a plain GEGLU
    pack_for_inference(ff)
    on_amx = dtype == torch.float32 and amx.available()  # (then AmxGEGLU and AmxLinear)
    assert type(ff.net[0]) is (AmxGEGLU if on_amx else PackedGEGLU)
    assert type(ff.net[2]) is (AmxLinear if on_amx else PackedLinear)
    calls = []
    ff.net[2].register_forward_hook(lambda m, a, out: calls.append(out.shape[:-1]))
    got = ff(x)
    assert calls == [(2, 37)] and got.dtype == dtype
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < tolerance
    with torch.enable_grad(), pytest.raises(RuntimeError, match="torch.no_grad"):
        ff.net[0](x.requires_grad_(True))


@needs_bf16
@pytest.mark.parametrize("has_amx", [True, False])
def test_winograd_is_left_to_float32_where_amx_runs_bfloat16(has_amx, monkeypatch):
    """On a CPU with AMX, bfloat16 3x3 convs stay direct (packed); float32 ones, and bfloat16 ones without AMX,
    take Winograd."""
    monkeypatch.setattr(packed, "amx_supported", lambda: has_amx)
    kinds = [type(packed.packed(torch.nn.Conv2d(32, 32, 3, padding=1).to(dtype), winograd=True))
             for dtype in (torch.float32, torch.bfloat16)]
    assert kinds == [WinogradConv2d, PackedConv2d if has_amx else WinogradConv2d]


def test_refusals_say_what_to_do(tmp_path):
    fast = optimized_copy(make())
    sample, t, ctx = inputs(8, 8)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        fast(sample.requires_grad_(), t, ctx)
    with pytest.raises(RuntimeError, match=r"before optimize_for_inference"):
        fast.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="load them first"):
        fast.load_state_dict(make().state_dict())
    with pytest.raises(RuntimeError, match="save the model before"):
        fast.save_pretrained(tmp_path)
    # moves that change nothing are fine; gradients are off, so forgetting no_grad is fine too
    assert fast.to("cpu", torch.float32) is fast and fast.dtype == torch.float32
    assert not any(p.requires_grad for p in fast.parameters())
    assert not fast(sample.detach(), t, ctx).requires_grad


@torch.no_grad()
def test_packed_conv_is_repacked_for_each_new_input_shape():
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    fast = PackedConv2d(conv)
    assert fast.packed_for is None
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 8, 16, 16), (1, 8, 9, 7), (2, 8, 16, 16)]:
        x = torch.randn(*shape, generator=g)
        assert (fast(x) - conv(x)).abs().max() <= 1e-5
        assert fast.packed_for == x.shape


def test_pack_leaves_what_it_cannot_pack():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4).double(), torch.nn.Conv2d(4, 4, 3, padding=1),
                                torch.nn.Conv2d(4, 4, 3, padding="same"), torch.nn.Conv2d(32, 32, 3, padding=1))
    pack_for_inference(model)
    assert [type(m) for m in model] == [torch.nn.Linear, PackedConv2d, torch.nn.Conv2d, WinogradConv2d]
    assert isinstance(pack_for_inference(torch.nn.Sequential(torch.nn.Linear(3, 5)))[0], FLOAT32_LINEAR)


def test_feedforward_in_chunks_is_exact(monkeypatch):
    torch.manual_seed(0)
    ff = attention.FeedForward(16)
    x = torch.randn(2, 37, 16, requires_grad=True)
    whole = ff(x)
    (grad_whole,) = torch.autograd.grad(whole.square().sum(), x)
    monkeypatch.setattr(attention, "FF_CHUNK_BYTES", 10 * 128 * 4)  # 10 tokens of the 128-wide hidden layer
    calls = []
    ff.net[2].register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    chunked = ff(x)
    assert calls == [10] * 7 + [4]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    (grad_chunked,) = torch.autograd.grad(chunked.square().sum(), x)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("algorithm", [winograd.F2x2, winograd.F4x4])
@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_transforms), False])
@pytest.mark.parametrize("height, width", [(8, 8), (5, 3)])
def test_winograd_conv_of_the_upsampled_map(algorithm, fused, height, width, monkeypatch):
    """upsample=True: the conv of x's nearest 2x upsampling, which the compiled input transform reads from x (PyTorch's
    path makes the upsampled map first), over several slices of tile rows."""
    monkeypatch.setattr(winograd, "MIN_TILES", 4)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 24, height, width, generator=g)
    weight, bias = torch.randn(16, 24, 3, 3, generator=g) / 15, torch.randn(16, generator=g)
    filters = winograd.transform_filters(weight, algorithm)
    exact = F.conv2d(F.interpolate(x.double(), scale_factor=2.0), weight.double(), bias.double(), padding=1)
    got = winograd.winograd_conv3x3(x, filters, bias, fused_transforms=fused, upsample=True)
    assert got.shape == exact.shape and got.is_contiguous(memory_format=torch.channels_last)
    plain = winograd.winograd_conv3x3(F.interpolate(x, scale_factor=2.0), filters, bias, fused_transforms=False)
    assert (got.double() - exact).abs().max() <= 1.25 * (plain.double() - exact).abs().max() + 1e-6


@needs_transforms
@pytest.mark.parametrize("algorithm", [winograd.F2x2, winograd.F4x4])
@pytest.mark.parametrize("upsample", [False, True])
@torch.no_grad()
def test_fused_output_transform_adds_the_residual_as_it_writes(algorithm, upsample, monkeypatch):
    """residual=: the compiled output transform adds it (NCHW or channels-last) to exactly the outputs it covers, over
    several slices of tile rows and ragged tiles, the same bits as adding it afterwards; the residual is left be."""
    monkeypatch.setattr(winograd, "MIN_TILES", 4)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 24, 7, 5, generator=g)
    filters = winograd.transform_filters(torch.randn(12, 24, 3, 3, generator=g) / 15, algorithm)
    bias = torch.randn(12, generator=g)
    plain = winograd.winograd_conv3x3(x, filters, bias, upsample=upsample)
    for layout in (torch.contiguous_format, torch.channels_last):
        residual = torch.randn(plain.shape, generator=g).contiguous(memory_format=layout)
        kept = residual.clone()
        got = winograd.winograd_conv3x3(x, filters, bias, upsample=upsample, residual=residual)
        assert torch.equal(got, plain + residual) and torch.equal(residual, kept)
    broadcast = torch.randn(1, 12, 1, 1, generator=g)  # (not the result's shape: added afterwards, as PyTorch would)
    assert torch.equal(winograd.winograd_conv3x3(x, filters, bias, upsample=upsample, residual=broadcast),
                       plain + broadcast)


@needs_transforms
@torch.no_grad()
def test_winograd_upsample_conv_runs_winograd_or_the_phases(monkeypatch):
    """WinogradUpsampleConv.upsampled: Winograd on the upsampled map where it pays, else the phases of the recovered
    filters (built at the first such call); what pack_for_inference() gives an upsampler with the channels for it."""
    monkeypatch.setattr(packed, "WINOGRAD_UPSAMPLE_MIN_CHANNELS", 32)
    torch.manual_seed(12)
    conv = torch.nn.Conv2d(32, 40, 3, padding=1).eval()
    layer = WinogradUpsampleConv(conv)
    x = torch.randn(2, 32, 6, 5)
    exact = F.conv2d(F.interpolate(x.double(), scale_factor=2.0), conv.weight.double(), conv.bias.double(), padding=1)
    for pays in (True, False):
        monkeypatch.setattr(packed, "winograd_pays", lambda shape, out_channels, path="torch", pays=pays: pays)
        got = layer.upsampled(x)
        assert got.shape == exact.shape and (got.double() - exact).abs().max() <= 1e-4
        assert (layer.phases is None) == pays
    assert isinstance(layer.phases, FLOAT32_UPSAMPLE_CONV)
    model = pack_for_inference(torch.nn.Sequential(Upsample2D(32), Upsample2D(16)))  # (16 channels: too few)
    assert type(model[0].conv) is WinogradUpsampleConv and type(model[1].conv) is PackedUpsampleConv
    monkeypatch.setattr(packed, "WINOGRAD_UPSAMPLE_MIN_CHANNELS", 64)
    with pytest.raises(ValueError, match="use PackedUpsampleConv"):
        WinogradUpsampleConv(conv)


@pytest.mark.parametrize("winograd_upsampling", [False, pytest.param(True, marks=needs_transforms)])
@pytest.mark.usefixtures("always_winograd")
@torch.no_grad()
def test_packed_vae_decodes_as_the_plain_one(winograd_upsampling, monkeypatch):
    from latentdiff.models.vae import AutoencoderKL, VAEConfig

    if winograd_upsampling:  # (the tiny VAE's upsampler has 64 channels)
        monkeypatch.setattr(packed, "WINOGRAD_UPSAMPLE_MIN_CHANNELS", 64)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    for p in vae.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    fast = AutoencoderKL(vae.config)
    fast.load_state_dict(vae.state_dict())
    pack_for_inference(fast)
    assert any(isinstance(m, WinogradConv2d) for m in fast.modules())
    upsampling = WinogradUpsampleConv if winograd_upsampling else FLOAT32_UPSAMPLE_CONV
    assert any(type(m) is upsampling for m in fast.modules())  # (tiled decoding runs them too)
    latents = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(2))
    expected = vae.decode(latents)
    assert (fast.decode(latents) - expected).abs().max() <= 1e-4
    assert (fast.decode(latents, tiled=True) - vae.decode(latents, tiled=True)).abs().max() <= 1e-4
    images = torch.randn(1, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    assert (fast.encode(images).mean - vae.encode(images).mean).abs().max() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 2e-2,
                                                                                   marks=needs_bf16)])
def test_packed_layers_add_a_residual_in_their_epilogue(dtype, tolerance, always_winograd):
    """layer(x, residual) is residual + layer(x) for every packed kind (a linear, a 1x1 conv run as one, a direct
    3x3 conv, a Winograd one), in the residual's shape, leaving the residual as it was; plain layers do not claim
    it (fused.adds_residual)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    linear, pointwise, conv = torch.nn.Linear(5, 7), torch.nn.Conv2d(8, 6, 1), torch.nn.Conv2d(8, 4, 3, padding=1)
    wide = torch.nn.Conv2d(32, 32, 3, padding=1)  # (Winograd needs 32 channels)
    cases = [(PackedLinear(linear.to(dtype)), linear, x), (PackedConv2d(pointwise.to(dtype)), pointwise, x),
             (PackedConv2d(conv.to(dtype)), conv, x), (WinogradConv2d(wide.to(dtype)), wide, x.repeat(1, 4, 1, 1))]
    assert not adds_residual(linear)
    for fast, plain, inp in cases:
        assert adds_residual(fast)
        expected = plain.double()(inp.double())
        residual = torch.randn(expected.shape).to(dtype)
        before = residual.clone()
        got = fast(inp, residual)
        assert got.shape == expected.shape and torch.equal(residual, before)
        error = (got.double() - (expected + residual.double())).abs().max() / expected.abs().max()
        assert error.item() < tolerance, type(fast).__name__


@torch.no_grad()
def test_small_linear_products_run_on_the_layers_own_weight(monkeypatch):
    """A small float32 PackedLinear or pointwise PackedConv2d keeps its weight as it was and makes small products
    with F.linear (bit for bit nn.Linear's; oneDNN's per-call cost is the whole of such a product), larger ones with
    oneDNN's packed weight (also tested here: the other tests' layers are small); large, bfloat16 and 3x3 layers keep
    no copy."""
    torch.manual_seed(0)
    linear, pointwise = torch.nn.Linear(24, 40), torch.nn.Conv2d(24, 40, 1)
    calls = []
    dense_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *args: calls.append(args) or dense_linear(*args))
    tokens, residual = torch.randn(2, 7, 24), torch.randn(2, 7, 40)
    as_map = lambda t: t.unsqueeze(1).permute(0, 3, 1, 2)  # [B, L, C] tokens -> a channels-last [B, C, 1, L] map
    for layer, fast, x, r, out in ((linear, PackedLinear(linear), tokens, residual, lambda t: t),
                                   (pointwise, PackedConv2d(pointwise), as_map(tokens), as_map(residual), as_map)):
        w, b = layer.weight.flatten(1), layer.bias
        calls.clear()
        assert torch.equal(fast(x), out(dense_linear(tokens, w, b))) and len(calls) == 1
        assert torch.equal(fast(x, r), out(dense_linear(tokens, w, b) + residual))
        big = torch.randn(2, _Packed.DENSE_PRODUCT // (24 * 40) // 2 + 1, 24)  # (a product just past the limit)
        want = big.double() @ w.double().T + b.double()
        calls.clear()
        assert (fast(big if x is tokens else as_map(big)).double() - out(want)).abs().max() < 1e-5 and not calls
        with monkeypatch.context() as patch:
            patch.setattr(_Packed, "DENSE_PRODUCT", 0)  # every product by oneDNN
            want = tokens.double() @ w.double().T + b.double()
            assert (fast(x).double() - out(want)).abs().max() < 1e-5 and not calls
            assert (fast(x, r).double() - out(want + residual)).abs().max() < 1e-5 and not calls
    assert PackedLinear(torch.nn.Linear(512, 512)).dense is None
    assert PackedConv2d(torch.nn.Conv2d(24, 40, 3)).dense is None
    if packed.bfloat16_supported():
        assert PackedLinear(torch.nn.Linear(24, 40).to(torch.bfloat16)).dense is None


@torch.no_grad()
def test_optimized_model_adds_its_residuals_inside_the_layers(monkeypatch):
    """After optimize_for_inference, no separate residual add runs in the transformer blocks (3 each), after the
    spatial transformers' output projections or after the residual blocks' second convs: the packed layers add
    them. Counted as aten.add calls against the plain model's. (With every product by oneDNN: a product as small as
    this model's runs with F.linear and adds apart, see test_small_linear_products_run_on_the_layers_own_weight.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(packed._Packed, "DENSE_PRODUCT", 0)

    class CountAdds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.adds = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.adds += func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
            return func(*args, **(kwargs or {}))

    model = make()
    fast = optimized_copy(model, winograd=False)
    counts = []
    for m in (model, fast):
        with CountAdds() as mode:
            m(*inputs(8, 8))
        counts.append(mode.adds)
    blocks = sum(isinstance(m, attention.BasicTransformerBlock) for m in model.modules())
    transformers = sum(isinstance(m, attention.Transformer2DModel) for m in model.modules())
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in model.modules())
    assert blocks and transformers and resnets
    assert counts[0] - counts[1] == 3 * blocks + transformers + resnets


@torch.no_grad()
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 2e-2,
                                                                                   marks=needs_bf16)])
@pytest.mark.parametrize("batch, height, width", [(2, 6, 6), (1, 5, 9), (1, 1, 1)])
def test_upsample_conv_runs_on_the_upsampling_without_making_it(dtype, tolerance, batch, height, width):
    """PackedUpsampleConv.upsampled(x) (four 2x2 phase filters) is the 3x3 conv of the nearest 2x upsampling of x,
    borders included, against float64; Upsample2D takes it for a 2x size and the plain conv for any other."""
    torch.manual_seed(0)
    up = Upsample2D(12).to(dtype)
    plain = Upsample2D(12).double()
    plain.load_state_dict(up.state_dict())
    x = torch.randn(batch, 12, height, width).to(dtype)
    expected = plain(x.double())
    pack_for_inference(up, winograd=False)
    assert type(up.conv) is PackedUpsampleConv
    calls = []
    up.conv.register_forward_hook(lambda m, a, out: calls.append(a[0].shape))  # the plain conv's calls
    got = up(x)
    assert calls == [] and got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < tolerance
    odd = (2 * height - 1, 2 * width + 1)
    got = up(x, size=odd)
    assert calls == [torch.Size((batch, 12, *odd))]
    error = (got.double() - plain(x.double(), size=odd)).abs().max() / expected.abs().max()
    assert error.item() < tolerance


@pytest.mark.skipif(allocator._libc("mallopt") is None, reason="not glibc")
def test_kept_freed_buffers_are_reused_without_page_faults():
    """After allocator.keep_freed_buffers(), a large tensor allocated again after being freed reuses malloc's heap:
    no page faults, where glibc's default hands it fresh pages every time (one fault per 4 KiB). In a fresh
    process: the setting is process-wide."""
    script = """
import resource, torch
from latentdiff.models.allocator import keep_freed_buffers

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB, above glibc's adaptive mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults() for _ in range(4)][-1]
assert keep_freed_buffers()
kept = [faults() for _ in range(4)][-1]  # (the heap takes a few rounds to grow to its working size)
print(default, kept)
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    assert default > 3 * (64 << 20) // 4096 * 0.9 and kept < 100
