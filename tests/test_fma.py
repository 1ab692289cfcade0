"""Our AVX2 GEGLU kernel (fma.py, amx_layers.FmaGEGLU), which optimize_for_inference() uses for float32 GEGLUs on CPUs
with AVX2 and FMA but no AVX-512: as exact as oneDNN's (PackedGEGLU) against float64 on ragged shapes (rows not
whole tiles or blocks, depths of several blocks, strided and batched inputs), the same bits on any number of
threads, large gates, empty inputs, torch.compile, and what pack_for_inference() makes of GEGLUs with and without it.
The kernel is forced on here wherever AVX2 and g++ are (on AVX-512 CPUs, where optimize_for_inference leaves GEGLUs
to oneDNN, too)."""
from __future__ import annotations

import pytest
import torch

from latentdiff.models import attention, fma, native
from latentdiff.models.amx_layers import FmaGEGLU
from latentdiff.models.attention import GEGLU
from latentdiff.models.packed import PackedGEGLU, PackedLinear, pack_for_inference

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.fixture
def kernel(monkeypatch):
    """The kernel built and used, on any CPU with AVX2 and FMA where g++ builds it."""
    if native.unavailable() or not {"avx2", "fma"} <= native.cpu_flags():
        pytest.skip(f"the AVX2 kernel cannot run here: {native.unavailable() or 'no AVX2 and FMA'}")
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
    """Without it (an AVX-512 CPU, LATENTDIFF_NO_FMA=1, no g++) GEGLUs go to oneDNN, and why is said."""
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
