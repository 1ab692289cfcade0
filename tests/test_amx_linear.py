"""Float32 linear layers on AMX tiles (amx.linear, amx_layers.AmxLinear and AmxGEGLU): as exact as PyTorch's
float32 linear against a float64 reference on ragged shapes (rows, columns and depth not multiples of the tiles,
depths that take several passes, strided inputs), the residual and GEGLU epilogues, and what pack_for_inference()
makes of float32 layers with and without AMX. The kernel's own tests run only where this CPU has AMX and g++."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentdiff.models import amx, fma, winograd
from latentdiff.models import packed as packed_module
from latentdiff.models.attention import GEGLU
from latentdiff.models.amx_layers import AmxConv2d, AmxGEGLU, AmxLinear, AmxPointwiseConv
from latentdiff.models.packed import PackedConv2d, PackedGEGLU, PackedLinear, WinogradConv2d, pack_for_inference

from test_amx_attention import keeps_subnormals, needs_amx, together


def linear_layer(k: int, n: int, seed: int, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias).eval().requires_grad_(False)


@needs_amx
@pytest.mark.parametrize("rows,k,n", [
    (70, 320, 1280),    # one pass over the depth, rows not a multiple of 32
    (300, 1000, 96),    # three passes (depth > 384), a ragged depth
    (33, 40, 50),       # columns not a multiple of 32 (a half-empty last tile pair)
    (257, 2560, 640),   # SD 1.5's feed-forward output at 32x32, more rows than one thread's block
    (2, 320, 1280),     # the time embedding's two rows
])
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_amx_linear_is_as_exact_as_pytorchs(rows, k, n, bias):
    layer = linear_layer(k, n, 0, bias)
    x = torch.randn(rows, k) * 2
    exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    ours = AmxLinear(layer)(x)
    error, their_error = ((y.double() - exact).abs().max().item() for y in (ours, layer(x)))
    assert ours.shape == (rows, n) and ours.dtype == torch.float32
    assert error <= 1.25 * their_error + 1e-7, (error, their_error)


@needs_amx
@torch.no_grad()
def test_amx_linear_takes_batched_strided_inputs_and_adds_a_residual():
    layer = linear_layer(96, 64, 1)
    x = torch.randn(2, 50, 200)[..., 7:103]  # rows 200 apart: a view, not copied
    residual = torch.randn(2, 64, 50).transpose(1, 2)  # not contiguous along the rows either
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double()) + residual.double()
    ours = AmxLinear(layer)(x, residual)
    theirs = layer(x) + residual
    assert ours.shape == (2, 50, 64)
    assert (ours.double() - exact).abs().max() <= 1.25 * (theirs.double() - exact).abs().max() + 1e-7


@needs_amx
@pytest.mark.parametrize("tokens,dim,scale", [
    (100, 320, 1),   # one pass
    (40, 640, 1),    # two passes (running sums kept apart)
    (100, 320, 30),  # gates of |x| >> 13, whose exp(-x^2 / 2) inside the GELU is below float32's normal range
])
@torch.no_grad()
def test_amx_geglu_is_as_exact_as_pytorchs(tokens, dim, scale):
    torch.manual_seed(0)
    geglu = GEGLU(dim, dim * 4).eval().requires_grad_(False)
    geglu.proj.weight *= scale
    exact_geglu = GEGLU(dim, dim * 4).double()
    exact_geglu.load_state_dict(geglu.state_dict())
    x = torch.randn(2, tokens, dim)
    exact = exact_geglu(x.double())
    ours = AmxGEGLU(geglu)(x)
    assert ours.shape == (2, tokens, dim * 4)
    error, their_error, onednns_error = ((y.double() - exact).abs().max().item()
                                         for y in (ours, geglu(x), PackedGEGLU(geglu)(x)))
    assert error <= 1.25 * min(their_error, onednns_error) + 1e-7, (error, their_error, onednns_error)
    assert keeps_subnormals()  # (the kernel flushes them while it runs: see test_amx_attention)


@needs_amx
@torch.no_grad()
def test_float32_models_pack_their_linear_layers_for_amx_and_refuse_other_dtypes():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), GEGLU(32, 64), torch.nn.Linear(64, 4))
    x = torch.randn(3, 8)
    expected = model(x)
    pack_for_inference(model)
    assert [type(m) for m in model] == [AmxLinear, AmxGEGLU, AmxLinear]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="float32 CPU inputs"):
        model[0](x.double())
    with pytest.raises(ValueError, match="residual must be a float32 CPU tensor of shape \\(3, 32\\)"):
        model[0](x, torch.zeros(3, 32, dtype=torch.float64))
    assert model[0](x[:0]).shape == (0, 32) and model(x[:0]).shape == (0, 4)  # no rows
    with pytest.raises(ValueError, match="no residual to a GEGLU"):  # (the kernel's GEGLU epilogue has none)
        amx.linear(model[0](x), model[1].weight, 128, model[1].bias, torch.zeros(3, 64), geglu=True)
    with pytest.raises(RuntimeError, match="before optimize_for_inference"):
        model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="torch.no_grad"), torch.enable_grad():
        model[0](x.requires_grad_())


def test_without_amx_float32_layers_go_to_onednn(monkeypatch):
    monkeypatch.setattr(amx, "available", lambda: False)
    monkeypatch.setattr(fma, "library", lambda: None)  # (nor our AVX2 GEGLU kernel: tests/test_fma.py)
    model = pack_for_inference(torch.nn.Sequential(torch.nn.Linear(8, 32), GEGLU(32, 64)))
    assert [type(m) for m in model] == [PackedLinear, PackedGEGLU]
    with pytest.raises(ValueError, match="use PackedLinear"):
        AmxLinear(torch.nn.Linear(8, 32))


@needs_amx
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@torch.no_grad()
def test_amx_layers_without_depth_give_their_bias():
    layer, geglu = linear_layer(0, 5, 2), GEGLU(0, 32).eval()
    x = torch.zeros(3, 0)
    torch.testing.assert_close(AmxLinear(layer)(x), layer(x))
    torch.testing.assert_close(AmxGEGLU(geglu)(x), geglu(x))


@needs_amx
@torch.no_grad()
def test_amx_linear_from_two_threads_at_once():
    """ctypes lets go of the GIL: two calls can run together, each with its own OpenMP team (whose threads keep
    their own buffers of x's parts)."""
    layers = [AmxLinear(linear_layer(640, 96, seed)) for seed in (3, 4)]
    inputs = [torch.randn(300, 640) for _ in layers]
    calls = [lambda layer=layer, x=x: layer(x) for layer, x in zip(layers, inputs)]
    alone = [call() for call in calls]
    results = together(calls, 5)
    assert all(torch.equal(result, alone[i]) for i in range(2) for result in results[i])



@needs_amx
@pytest.mark.parametrize("rows", [20, 70])  # one block of 32 rows, three
@torch.no_grad()
def test_amx_linear_gives_the_same_bits_on_any_number_of_threads(rows):
    """Where there are fewer blocks of rows than threads, the threads share out the columns too (each splitting its
    rows into parts itself): every output still comes from the same products in the same order."""
    layer = linear_layer(1000, 200, 6)  # three passes over the depth; 7 pairs of column tiles, the last half empty
    geglu = GEGLU(640, 64).eval().requires_grad_(False)  # two passes, the running sums kept apart
    x, residual, h = torch.randn(rows, 1000), torch.randn(rows, 200), torch.randn(rows, 640)
    packed_layer, packed_geglu = AmxLinear(layer), AmxGEGLU(geglu)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 5, 8):
            torch.set_num_threads(n)
            results.append((packed_layer(x, residual), packed_geglu(h)))
    finally:
        torch.set_num_threads(threads)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double()) + residual.double()
    assert (results[0][0].double() - exact).abs().max() <= 1.25 * (layer(x) + residual - exact).abs().max() + 1e-7
    torch.testing.assert_close(results[0][1], geglu(h), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for result in results[1:] for a, b in zip(result, results[0]))

@needs_amx
@torch.no_grad()
def test_amx_pointwise_conv_is_as_exact_as_pytorchs_and_stays_channels_last():
    torch.manual_seed(5)
    conv = torch.nn.Conv2d(64, 48, 1).eval().requires_grad_(False)
    x = torch.randn(2, 64, 9, 7).to(memory_format=torch.channels_last)
    residual = torch.randn(2, 48, 9, 7).to(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double()) + residual.double()
    ours = AmxPointwiseConv(conv)(x, residual)
    theirs = conv(x) + residual
    assert ours.shape == (2, 48, 9, 7) and ours.is_contiguous(memory_format=torch.channels_last)
    assert (ours.double() - exact).abs().max() <= 1.25 * (theirs.double() - exact).abs().max() + 1e-7
    # narrow 1x1 convs (the VAE's 4 -> 4) stay with oneDNN
    model = pack_for_inference(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 64, 1), conv))
    assert [type(m) for m in model] == [PackedConv2d, PackedConv2d, AmxPointwiseConv]


@needs_amx
@torch.no_grad()
def test_amx_layers_trace_as_one_op_under_torch_compile():
    """torch.compile cannot trace the ctypes call: amx.linear hands it a custom op (latentdiff::amx_linear) instead,
    so that a compiled graph keeps the AMX layers whole (fullgraph: no graph break)."""
    model = torch.nn.Sequential(AmxLinear(linear_layer(40, 64, 6)), AmxGEGLU(GEGLU(64, 64).eval()))
    x = torch.randn(50, 40)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), model(x))


@needs_amx
@torch.no_grad()
def test_amx_kernels_are_named_in_the_profilers_tables():
    """The kernels' calls carry a label while torch.profiler runs (and only then: a label costs host time)."""
    from torch.profiler import profile

    layer = AmxLinear(linear_layer(64, 32, 7))
    q = torch.randn(1, 2, amx.MIN_QUERIES, 16)
    with profile() as prof:
        layer(torch.randn(40, 64))
        amx.attention(q, q, q)
    names = {event.name for event in prof.events()}
    assert {"latentdiff::amx_linear", "latentdiff::amx_attention"} <= names


@needs_amx
@pytest.mark.parametrize("points,rows,k,n", [
    (16, 128, 320, 96),  # more points than threads: each thread takes whole points
    (1, 70, 1000, 50),   # fewer: rows and columns shared out; three passes over the depth, ragged columns
    (36, 5, 40, 33),     # few rows per point
])
@torch.no_grad()
def test_amx_points_are_batched_products_as_exact_as_pytorchs(points, rows, k, n):
    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(points, rows, k, generator=g), torch.randn(points, n, k, generator=g) / k ** 0.5
    packed = amx.pack_points(w)
    assert torch.equal(amx.unpack_points(packed, n, k), w)  # the parts sum to the weights exactly
    exact = torch.bmm(x.double(), w.double().transpose(1, 2))
    ours = amx.points(x, packed, n)
    assert ours.shape == (points, rows, n)
    error, their_error = ((y.double() - exact).abs().max().item() for y in (ours, torch.bmm(x, w.transpose(1, 2))))
    assert error <= 1.25 * their_error + 1e-7, (error, their_error)
    with pytest.raises(TypeError, match=r"float32 CPU inputs \[P, M, K\]"):
        amx.points(x.double(), packed, n)


@needs_amx
@pytest.mark.parametrize("channels,side", [(64, 40), (96, 16)])  # F(4x4), and F(2x2) for a larger filter
@torch.no_grad()
def test_amx_winograd_conv_is_as_exact_as_pytorchs(channels, side, monkeypatch):
    """A float32 WinogradConv2d keeps its transformed filters as AMX parts and takes its products from amx.points;
    its direct conv (for inputs where Winograd does not pay) comes from the same filters, unpacked."""
    monkeypatch.setattr(packed_module, "F4X4_MAX_FILTER", 64 * 64 * 9)
    torch.manual_seed(9)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
    layer = WinogradConv2d(conv)
    assert layer.on_amx and layer.weight.dtype == torch.int16
    algorithm = winograd.F4x4 if channels == 64 else winograd.F2x2
    assert torch.equal(layer.filters(), winograd.transform_filters(conv.weight.detach(), algorithm))
    x = torch.randn(2, channels, side, side)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    plain = winograd.winograd_conv3x3(x, layer.filters(), conv.bias.detach())  # the same algorithm by torch.bmm
    monkeypatch.setattr(packed_module, "winograd_pays", lambda shape, out_channels, path="torch": True)
    error, their_error = ((y.double() - exact).abs().max().item() for y in (layer(x), plain))
    assert error <= 1.25 * their_error + 1e-7, (error, their_error)
    monkeypatch.setattr(packed_module, "winograd_pays", lambda shape, out_channels, path="torch": False)
    direct = layer(x)  # (filters recovered from the transformed ones: exact up to their float32 rounding)
    assert isinstance(layer.direct, AmxConv2d)
    assert ((direct.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5
    with pytest.raises(RuntimeError, match="before optimize_for_inference"):
        layer.double()
