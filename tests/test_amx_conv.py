"""Float32 convolutions on AMX tiles (amx.conv, amx_layers.AmxConv2d and AmxUpsampleConv): each output pixel a row of
amx_linear's products, its patch gathered as the row's depth. As exact as PyTorch's float32 conv against a float64
reference over strides, paddings, ragged channel counts (not multiples of 16) and inputs in any layout; the
upsampler's four phase convs against the conv of the upsampled map; what pack_for_inference() picks; the same bits
on any number of threads; one op each under torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentdiff.models import amx
from latentdiff.models.amx_layers import AmxConv2d, AmxPointwiseConv, AmxUpsampleConv
from latentdiff.models.packed import (PackedConv2d, PackedUpsampleConv, filter_from_phases, pack_for_inference,
                                      upsampling_phases)
from latentdiff.models.resnet import Upsample2D

from test_amx_attention import needs_amx

pytestmark = [needs_amx, pytest.mark.usefixtures("one_thread")]


def conv_layer(c: int, n: int, kernel: int, stride: int = 1, padding: int = 0, seed: int = 0) -> torch.nn.Conv2d:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(c, n, kernel, stride, padding).eval().requires_grad_(False)


def exact_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return (got.double() - exact).abs().max().item()


@pytest.mark.parametrize("c, n, side, kernel, stride, padding", [
    (64, 48, (9, 7), 3, 1, 1),     # one block of rows, a half-empty pair of column tiles
    (40, 33, (13, 11), 3, 2, 1),   # a downsampler's stride; 40 channels: each tap padded to 48 depths
    (128, 64, (20, 21), 3, 1, 1),  # 840 rows (several blocks a thread), depth 1152: three passes
    (96, 64, (8, 8), 3, 2, 0),     # no padding
    (48, 40, (5, 6), 2, 1, 1),     # an even filter: more output pixels than input ones
    (33, 35, (4, 4), 1, 1, 0),     # 1x1
])
@pytest.mark.parametrize("residual", [False, True])
@torch.no_grad()
def test_amx_conv_is_as_exact_as_pytorchs(c, n, side, kernel, stride, padding, residual):
    layer = conv_layer(c, n, kernel, stride, padding)
    x = torch.randn(2, c, *side) * 2
    theirs = layer(x)
    extra = torch.randn_like(theirs) if residual else None
    exact = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), stride, padding)
    if residual:
        exact, theirs = exact + extra.double(), theirs + extra
    ours = AmxConv2d(layer)(x, extra)
    assert ours.shape == exact.shape and ours.is_contiguous(memory_format=torch.channels_last)
    error, their_error = exact_error(ours, exact), exact_error(theirs, exact)
    assert error <= 1.25 * their_error + 1e-7, (error, their_error)


@torch.no_grad()
def test_amx_conv_reads_any_layout_and_writes_into_views():
    """NCHW (copied to channels-last), channels-last, and a view of a wider channels-last map (rows further apart
    than a row's pixels) all give the same bits; amx.conv writes into a strided view of its output and nowhere else."""
    layer = conv_layer(32, 32, 3, padding=1, seed=1)
    x = torch.randn(2, 32, 10, 12)
    wider = torch.randn(2, 32, 10, 15).contiguous(memory_format=torch.channels_last)
    wider[..., 2:14] = x
    conv = AmxConv2d(layer)
    expected = conv(x.contiguous(memory_format=torch.channels_last))
    for view in (x, wider[..., 2:14]):
        assert torch.equal(conv(view), expected)
    out = torch.full((2, 10, 2, 12, 32), 7.0)
    pixels = x.permute(0, 2, 3, 1).contiguous()
    amx.conv(pixels, conv.weight, (3, 3), out[:, :, 1], 1, (-1, -1), conv.bias)
    assert torch.equal(out[:, :, 1], expected.permute(0, 2, 3, 1)) and bool((out[:, :, 0] == 7).all())
    with pytest.raises(TypeError, match="unit-stride channels"):
        amx.conv(x.permute(0, 2, 3, 1).double(), conv.weight, (3, 3), out[:, :, 0], 1, (-1, -1))
    with pytest.raises(ValueError, match="disagree"):
        amx.conv(pixels[:1], conv.weight, (3, 3), out[:, :, 0], 1, (-1, -1))
    with pytest.raises(TypeError, match="cast and move before optimize_for_inference"):
        conv(x.bfloat16())
    with pytest.raises(ValueError, match="add it afterwards"):
        conv(x, torch.zeros(2, 32, 1, 1))


@pytest.mark.parametrize("side", [(8, 8), (5, 3)])
@torch.no_grad()
def test_amx_upsample_conv_is_the_conv_of_the_upsampled_map(side):
    layer = conv_layer(48, 40, 3, padding=1, seed=2)
    x = torch.randn(2, 48, *side)
    exact = F.conv2d(F.interpolate(x.double(), scale_factor=2.0), layer.weight.double(), layer.bias.double(),
                     padding=1)
    ours = AmxUpsampleConv(layer)
    got = ours.upsampled(x)
    assert got.shape == exact.shape and got.is_contiguous(memory_format=torch.channels_last)
    their_error = exact_error(PackedUpsampleConv(layer).upsampled(x), exact)
    assert exact_error(got, exact) <= 1.25 * their_error + 1e-7
    # called as a plain conv (another output size), it is one: of the filter recovered from the phases
    upsampled = F.interpolate(x, scale_factor=2.0)
    assert ours.direct is None
    assert exact_error(ours(upsampled), exact) <= 2 * exact_error(layer(upsampled), exact) + 1e-7
    assert isinstance(ours.direct, AmxConv2d) and ours.direct.bias.data_ptr() == ours.bias.data_ptr()


def test_packed_filters_come_back_exactly():
    """pack_conv's parts sum to the filter (each tap's channels padded apart); the 3x3 filter comes back from its
    four upsampling phases (AmxUpsampleConv keeps those alone)."""
    weight = torch.randn(40, 21, 3, 2)
    assert torch.equal(amx.unpack_conv(amx.pack_conv(weight), 40, 21, (3, 2)), weight)
    exact = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    phases = upsampling_phases(exact)
    assert phases.shape == (4, 6, 5, 2, 2)
    torch.testing.assert_close(filter_from_phases(phases), exact, rtol=0, atol=1e-14)


@torch.no_grad()
def test_pack_for_inference_gives_float32_convs_with_enough_channels_to_amx():
    """Narrow convs (SD 1.5's conv_in and conv_out: 4 channels) and dilated ones stay with oneDNN; an upsampler's
    conv runs its phases on AMX."""
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.Conv2d(64, 64, 3, stride=2, padding=1),
                                torch.nn.Conv2d(64, 4, 3, padding=1), torch.nn.Conv2d(64, 64, 3, dilation=2),
                                torch.nn.Conv2d(64, 64, 1), Upsample2D(64))
    kinds = [type(m) for m in pack_for_inference(model, winograd=False)]
    assert kinds[:5] == [PackedConv2d, AmxConv2d, PackedConv2d, PackedConv2d, AmxPointwiseConv]
    assert type(model[5].conv) is AmxUpsampleConv
    with pytest.raises(ValueError, match="use PackedConv2d"):
        AmxConv2d(torch.nn.Conv2d(4, 64, 3))


@torch.no_grad()
def test_amx_conv_gives_the_same_bits_on_any_number_of_threads():
    layer = conv_layer(64, 96, 3, padding=1, seed=3)
    conv, up = AmxConv2d(layer), AmxUpsampleConv(layer)
    x = torch.randn(2, 64, 7, 9)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            results.append((conv(x), up.upsampled(x)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for result in results[1:] for a, b in zip(result, results[0]))


@torch.no_grad()
def test_amx_convs_trace_as_one_op_each_under_torch_compile():
    layer = conv_layer(32, 32, 3, padding=1, seed=4)
    conv, up = AmxConv2d(layer), AmxUpsampleConv(layer)
    x = torch.randn(1, 32, 6, 6)

    def both(x):
        return up.upsampled(conv(x, x))

    compiled = torch.compile(both, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), both(x))
