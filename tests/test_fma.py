"""Our AVX2 kernels (fma.py), which optimize_for_inference() uses for float32 GEGLUs (amx_layers.FmaGEGLU) and
attention (fma.attention) on CPUs with AVX2 and FMA but no AVX-512. GEGLU: as exact as oneDNN's (PackedGEGLU) against
float64 on ragged shapes (rows not whole tiles or blocks, depths of several blocks, strided and batched inputs), the
same bits on any number of threads, large gates, empty inputs, torch.compile. Attention: as exact as PyTorch's
against float64 on ragged shapes (key counts not whole panels, head dims not whole tiles, strided views), where it
hands over to PyTorch, and an optimized U-Net that runs it. The kernels are forced on here wherever AVX2 and g++ are
(on AVX-512 CPUs, where optimize_for_inference leaves this work to oneDNN and PyTorch, too)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentdiff.models import amx, attention, fma, native
from latentdiff.models.amx_layers import FmaGEGLU
from latentdiff.models.attention import GEGLU
from latentdiff.models.packed import PackedGEGLU, PackedLinear, pack_for_inference

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.fixture
def kernel(monkeypatch):
    """The kernel built and used, on any CPU with AVX2 and FMA where g++ builds it (and the AMX kernels, which
    optimize_for_inference prefers where they run, off)."""
    if native.unavailable() or not {"avx2", "fma"} <= native.cpu_flags():
        pytest.skip(f"the AVX2 kernel cannot run here: {native.unavailable() or 'no AVX2 and FMA'}")
    monkeypatch.setattr(amx, "library", lambda: None)
    monkeypatch.setattr(amx, "avx512_library", lambda: None)
    monkeypatch.setattr(fma, "unavailable", lambda: None)
    fma.library.cache_clear()
    if fma.library() is None:
        pytest.fail("fma.cpp did not build (see the warning)")
    yield fma.library()
    fma.library.cache_clear()


def make_geglu(dim_in: int, dim_out: int, seed: int, scale: float = 1.0) -> GEGLU:
    torch.manual_seed(seed)
    geglu = GEGLU(dim_in, dim_out).eval().requires_grad_(False)
    geglu.proj.weight.mul_(scale)
    return geglu


def exact(geglu: GEGLU, x: torch.Tensor) -> torch.Tensor:
    reference = GEGLU(geglu.proj.in_features, geglu.proj.out_features // 2).double()
    reference.load_state_dict(geglu.state_dict())
    return reference(x.double())


def errors(geglu: GEGLU, x: torch.Tensor, ours: torch.Tensor) -> tuple[float, float]:
    """The largest errors against float64 of ours and of oneDNN's PackedGEGLU."""
    expected = exact(geglu, x)
    theirs = PackedGEGLU(geglu)(x)
    return (ours.double() - expected).abs().max().item(), (theirs.double() - expected).abs().max().item()


@pytest.mark.parametrize("rows,dim_in,dim_out", [
    (70, 320, 1280),   # SD 1.5's 64x64 GEGLU, 70 rows: 11 whole tiles and one of 4 rows in one block
    (301, 600, 64),    # more rows than one block (72), three blocks of depth (256, 256, 88)
    (5, 40, 16),       # fewer rows than a tile, one panel
    (1, 1280, 80),     # one row, five panels
])
@torch.no_grad()
def test_fma_geglu_is_as_exact_as_onednns(kernel, rows, dim_in, dim_out):
    geglu = make_geglu(dim_in, dim_out, 0)
    x = torch.randn(rows, dim_in) * 2
    layer = FmaGEGLU(geglu)
    ours = layer(x)
    assert ours.shape == (rows, dim_out) and ours.dtype == torch.float32
    error, their_error = errors(geglu, x, ours)
    # (for fewer rows than a tile oneDNN sums more exactly, as PyTorch's products of so few rows do: within 2x there)
    assert error <= (1.25 if rows >= 6 else 2) * their_error + 1e-7, (error, their_error)


@torch.no_grad()
def test_fma_geglu_takes_batched_strided_inputs(kernel):
    geglu = make_geglu(96, 32, 1)
    x = torch.randn(2, 50, 200)[..., 7:103]  # rows 200 apart: read in place
    ours = FmaGEGLU(geglu)(x)
    assert ours.shape == (2, 50, 32)
    error, their_error = errors(geglu, x, ours)
    assert error <= 1.25 * their_error + 1e-7, (error, their_error)
    columns = torch.randn(2, 96, 50).transpose(1, 2)  # not unit stride along the rows: copied first
    torch.testing.assert_close(FmaGEGLU(geglu)(columns), geglu(columns), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_fma_geglu_with_large_gates(kernel):
    """Gates far out on both sides (exp(-z^2) underflows: GELU 0 below, the identity above; the kernel flushes
    subnormals while it runs) and near zero."""
    geglu = make_geglu(320, 64, 2, scale=40.0)
    x = torch.randn(40, 320)
    ours = FmaGEGLU(geglu)(x)
    expected = exact(geglu, x)
    assert ((ours.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6


@pytest.mark.parametrize("rows", [20, 150])  # fewer blocks of rows than threads (then the panels are shared out), more
@torch.no_grad()
def test_fma_geglu_gives_the_same_bits_on_any_number_of_threads(kernel, rows):
    geglu = make_geglu(640, 96, 3)
    x = torch.randn(rows, 640)
    layer = FmaGEGLU(geglu)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            results.append(layer(x))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(result, results[0]) for result in results[1:])


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@torch.no_grad()
def test_fma_geglu_without_rows_or_depth(kernel):
    geglu, empty = make_geglu(16, 32, 4), make_geglu(0, 32, 4)
    assert FmaGEGLU(geglu)(torch.randn(0, 16)).shape == (0, 32)
    torch.testing.assert_close(FmaGEGLU(empty)(torch.zeros(3, 0)), empty(torch.zeros(3, 0)))


@torch.no_grad()
def test_fma_geglu_traces_as_one_op_under_torch_compile(kernel):
    layer = FmaGEGLU(make_geglu(40, 32, 5))
    x = torch.randn(50, 40)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


@torch.no_grad()
def test_optimized_feed_forward_runs_the_kernel(kernel):
    """pack_for_inference on a float32 feed-forward: its GEGLU becomes an FmaGEGLU, the output projection stays
    oneDNN's; a GEGLU whose width is not whole tiles, a bfloat16 one or one without a bias stays PackedGEGLU or
    plain; fma.linear makes GEGLUs alone and FmaGEGLU names the fix where it cannot run."""
    torch.manual_seed(6)
    ff = attention.FeedForward(40).eval()
    x = torch.randn(2, 37, 40)
    expected = ff(x)
    pack_for_inference(ff)
    assert type(ff.net[0]) is FmaGEGLU and type(ff.net[2]) is PackedLinear
    torch.testing.assert_close(ff(x), expected, rtol=1e-5, atol=1e-5)
    narrow = pack_for_inference(torch.nn.Sequential(GEGLU(16, 24)))  # a projection of 48: not 32-aligned
    assert type(narrow[0]) is PackedGEGLU
    with pytest.raises(ValueError, match="GEGLUs alone"):
        fma.linear(x, ff.net[0].weight, 320)
    with pytest.raises(ValueError, match="use PackedGEGLU"):
        FmaGEGLU(GEGLU(16, 24))
    with torch.enable_grad(), pytest.raises(RuntimeError, match="torch.no_grad"):
        ff.net[0](x.requires_grad_(True))


def test_where_the_kernel_does_not_run(monkeypatch):
    """Without it (an AVX-512 CPU, LATENTDIFF_NO_FMA=1, no g++) GEGLUs go to oneDNN, and why is said (the AMX
    kernels, which optimize_for_inference would take first on an AMX CPU, off)."""
    monkeypatch.setattr(amx, "library", lambda: None)
    monkeypatch.setenv("LATENTDIFF_NO_FMA", "1")
    fma.library.cache_clear()
    try:
        assert fma.unavailable() == "LATENTDIFF_NO_FMA is set" and not fma.available()
        model = pack_for_inference(torch.nn.Sequential(GEGLU(32, 64)))
        assert type(model[0]) is PackedGEGLU
    finally:
        fma.library.cache_clear()
    monkeypatch.delenv("LATENTDIFF_NO_FMA")
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert "AVX-512" in (fma.unavailable() or native.unavailable())


def heads(batch: int, count: int, tokens: int, dim: int, seed: int) -> torch.Tensor:
    """[batch, heads, tokens, dim] as the attention layers hand them over: a view of [batch, tokens, heads, dim]."""
    torch.manual_seed(seed)
    return torch.randn(batch, tokens, count, dim).transpose(1, 2)


@pytest.mark.parametrize("queries,keys,dim,spread", [
    (300, 300, 40, 1),  # blocks of 32 queries, the last of 12 (8 transposed, 4 one by one); 3 chunks of keys
    (256, 77, 80, 1),   # a cross-attention's 77 text tokens: one chunk
    (260, 50, 20, 1),   # a head dim neither whole 6-row tiles nor whole 8 x 8 transposes
    (40, 600, 160, 1),  # a block of queries and 8 more; 5 chunks of keys; SD 2.x-wide heads
    (300, 700, 40, 6),  # peaked scores (most exponentials below float32's range), maxima growing across chunks
])
@torch.no_grad()
def test_fma_attention_is_as_exact_as_pytorchs(kernel, queries, keys, dim, spread):
    q, k, v = heads(2, 3, queries, dim, 0) * spread, heads(2, 3, keys, dim, 1) * spread, heads(2, 3, keys, dim, 2)
    ours = fma.attention(q, k, v)
    theirs = F.scaled_dot_product_attention(q, k, v)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    error, their_error = ((y.double() - exact).abs().max().item() for y in (ours, theirs))
    assert ours.shape == theirs.shape and ours.transpose(1, 2).is_contiguous()  # heads merge without a copy
    # (the scores' depth summed in one run: up to ~2x PyTorch's error at head dim 160)
    assert error <= 2 * their_error + 2e-7, (error, their_error)


@torch.no_grad()
def test_fma_attention_gives_the_same_bits_on_any_number_of_threads(kernel):
    q, k, v = heads(1, 2, 270, 40, 3), heads(1, 2, 90, 40, 4), heads(1, 2, 90, 40, 5)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(fma.attention(q, k, v))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(result, results[0]) for result in results[1:])


@torch.no_grad()
def test_fma_attention_from_two_threads_at_once(kernel):
    """ctypes lets go of the GIL: two calls can run together, each with its own OpenMP team and buffers (kept per
    thread between calls)."""
    from test_amx_attention import together

    inputs = [[heads(1, 2, 300, 40, seed + i) for i in range(3)] for seed in (20, 30)]
    calls = [lambda qkv=qkv: fma.attention(*qkv) for qkv in inputs]
    alone = [call() for call in calls]
    results = together(calls, 4)
    assert all(torch.equal(result, alone[i]) for i in range(2) for result in results[i])


def test_fma_attention_leaves_to_pytorch_what_it_does_not_take(kernel):
    """Fewer than MIN_QUERIES queries, float64, heads wider than MAX_HEAD_DIM, autograd, keys that do not match:
    PyTorch's SDPA, bit for bit (and mixed dtypes its error)."""
    q, k = heads(1, 2, fma.MIN_QUERIES - 1, 40, 6), heads(1, 2, 64, 40, 7)
    cases = [(q, k, k), (k.double(), k.double(), k.double()), (*[heads(1, 1, 64, 168, s) for s in range(3)],),
             (heads(1, 2, 300, 40, 8).requires_grad_(), heads(1, 2, 30, 40, 9), heads(1, 2, 30, 40, 10))]
    for q_, k_, v_ in cases:
        assert not fma.suits(q_, k_, v_)
        torch.testing.assert_close(fma.attention(q_, k_, v_), F.scaled_dot_product_attention(q_, k_, v_),
                                   rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="same dtype"):
        fma.attention(k.bfloat16(), k, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_fma_attention_computes_half_precision_in_float32(kernel, dtype):
    """bfloat16 and float16 inputs widened to float32 for the kernel, the result rounded to their dtype once: closer to
    float64 than PyTorch's half-precision SDPA, in their layout (heads merge without a copy)."""
    q, k, v = (heads(2, 3, n, 40, seed).to(dtype) for n, seed in ((300, 16), (200, 17), (200, 18)))
    assert fma.suits(q, k, v)
    ours = fma.attention(q, k, v)
    assert ours.dtype == dtype and ours.transpose(1, 2).is_contiguous()
    assert torch.equal(ours, fma.kernel(q.float(), k.float(), v.float()).to(dtype))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    theirs = F.scaled_dot_product_attention(q, k, v)
    error, their_error = ((y.double() - exact).abs().max().item() for y in (ours, theirs))
    assert error <= their_error, (error, their_error)


@torch.no_grad()
def test_fma_attention_keeps_a_nan_to_its_query(kernel):
    """A NaN in one query makes that query's output NaN and no other (the kernel's maxima and exponentials keep it)."""
    q, k, v = heads(1, 2, 100, 40, 12), heads(1, 2, 300, 40, 13), heads(1, 2, 300, 40, 14)
    q[0, 1, 37, 5] = float("nan")
    ours, theirs = fma.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert ours[0, 1, 37].isnan().all() and theirs[0, 1, 37].isnan().all()
    ours[0, 1, 37] = theirs[0, 1, 37] = 0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_fma_kernel_refuses_wider_heads(kernel):
    q = heads(1, 1, 64, fma.MAX_HEAD_DIM + 8, 15)
    with pytest.raises(ValueError, match="head dims up to 160"):
        fma.kernel(q, q, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_optimized_unet_runs_the_attention_kernel(kernel, dtype):
    """pack_for_inference on a float32 or bfloat16 U-Net points its attention layers at fma.attention; in float32
    its output stays within float32 rounding of the eager model's, in bfloat16 as close to the float32 model's as the
    eager bfloat16 model's is."""
    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(11)
    config = UNetConfig(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=32)
    unet = UNet2DConditionModel(config).eval()
    x, ctx = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 24)
    expected = unet(x, 500, ctx)
    unet.to(dtype)
    eager = unet(x.to(dtype), 500, ctx.to(dtype)).float()
    pack_for_inference(unet)
    layers = [m for m in unet.modules() if isinstance(m, attention.Attention)]
    assert layers and all(layer.attend is fma.attention for layer in layers)
    with torch.profiler.profile() as prof:  # (the kernels' calls carry labels while a profiler runs)
        got = unet(x.to(dtype), 500, ctx.to(dtype))
    names = {event.name for event in prof.events()}
    assert "latentdiff::fma_attention" in names  # (the 32x32 map: 1024 queries)
    if dtype == torch.float32:
        assert "latentdiff::fma_geglu" in names
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:
        assert got.dtype == dtype
        # (the mean error, steady across seeds and thread counts; the largest, one element's bf16 rounding, moves
        # 0.8-1.2x eager's between seeds and with the thread count on an AMX CPU, so it is held more loosely)
        mean, eager_mean = ((y.float() - expected).abs().mean().item() for y in (got, eager))
        error, eager_error = ((y.float() - expected).abs().max().item() for y in (got, eager))
        assert mean <= 1.05 * eager_mean and error <= 1.5 * eager_error, (mean, eager_mean, error, eager_error)
