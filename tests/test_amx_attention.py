"""The AMX attention kernel (models/amx.py, amx.cpp): in bfloat16 and in float32 as exact as
PyTorch's attention in that dtype against a float64 reference on every shape it takes (ragged query and key counts, head
dims 16-160, strided views), PyTorch's result exactly where it does not take the inputs, used by
optimize_for_inference() on bf16 and fp32 models, and a build failure that warns and falls back; the same for its
AVX-512 build (bfloat16 only), which runs where the CPU has AVX512-BF16 but no AMX. The kernels' own tests run only
where this CPU has what they need and g++ is installed (the `kernel` fixture); the rest run everywhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from latentdiff.models import amx, attention, fma
from latentdiff.models.packed import pack_for_inference

from test_packed import inputs, make

# why each kernel cannot run here (None where it can)
NO_AMX = None if amx.available() else f"no AMX kernels here: {amx.unavailable() or 'build failed'}"
NO_AVX512 = None if amx.avx512_library() else (
    f"no AVX-512 BF16 kernel here: {amx.unavailable(amx.AVX512_CPU_FLAGS) or 'build failed'}")
needs_amx = pytest.mark.skipif(NO_AMX is not None, reason=str(NO_AMX))
needs_avx512 = pytest.mark.skipif(NO_AVX512 is not None, reason=str(NO_AVX512))


@pytest.fixture(params=["amx", "avx512"])
def kernel(request, monkeypatch) -> str:
    """Which kernel amx.attention runs in the test: the AMX one, or the AVX-512 BF16 build (with amx.library()
    reporting none, as on a CPU without AMX, so that attention and optimize_for_inference take it)."""
    why = NO_AMX if request.param == "amx" else NO_AVX512
    if why:
        pytest.skip(why)
    if request.param == "avx512":
        monkeypatch.setattr(amx, "library", lambda: None)
    monkeypatch.setattr(amx, "F", NoFallback())  # (a test of a kernel that quietly left it all to PyTorch would pass)
    return request.param


class NoFallback:
    """torch.nn.functional for amx.py, but with no scaled_dot_product_attention to fall back on."""

    def __getattr__(self, name: str):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(*args, **kwargs):
        raise AssertionError("amx.attention left this attention to PyTorch's kernel")


def runs(kernel: str, dtype: torch.dtype) -> None:
    if kernel == "avx512" and dtype == torch.float32:
        pytest.skip("float32 attention stays with PyTorch's kernel without AMX (test_avx512_build_leaves_float32_"
                    "and_few_queries_to_pytorch)")


def heads(batch: int, tokens: int, n_heads: int, d: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """[B, heads, tokens, d] view of [B, tokens, heads * d], as the U-Net's attention makes them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, n_heads * d, generator=g) * 1.5
    return x.to(dtype).unflatten(-1, (n_heads, d)).transpose(1, 2)


# what an error may exceed 1.25 x PyTorch's by (bf16 results are rounded to 8 bits: an error of one rounding step more)
SLACK = {torch.bfloat16: 1e-4, torch.float32: 1e-7}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,n_heads,queries,keys,d", [
    (2, 8, 1024, 77, 40),     # cross-attention to the text, 77 keys: a ragged last chunk of 32
    (1, 2, 1030, 1030, 16),   # queries not a multiple of 32 (a partial last block), keys ragged too
    (2, 3, 1024, 1500, 64),   # two key chunks, the second partial: the online softmax rescales
    (1, 2, 1024, 33, 80),     # head dim not a multiple of 32 (padded depth), 16-wide tail of the width
    (1, 1, 1056, 256, 160),   # the largest head dim it takes
])
def test_amx_attention_is_as_exact_as_pytorchs(kernel, batch, n_heads, queries, keys, d, dtype):
    runs(kernel, dtype)
    q, k, v = (heads(batch, tokens, n_heads, d, seed, dtype) for tokens, seed in ((queries, 0), (keys, 1), (keys, 2)))
    assert amx.suits(q, k, v)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = amx.attention(q, k, v)
    theirs = F.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == dtype and ours.shape == theirs.shape
    error, their_error = ((o.double() - exact).abs().max().item() for o in (ours, theirs))
    assert error <= 1.25 * their_error + SLACK[dtype], (error, their_error)
    # the heads merge back into [B, N, heads * d] without a copy
    merged = ours.transpose(1, 2).reshape(batch, queries, -1)
    assert merged.data_ptr() == ours.data_ptr() and merged.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [40, 64])  # the numerators summed by the value products (40) or apart (64)
def test_amx_attention_follows_a_maximum_that_rises_in_later_key_chunks(kernel, d, dtype):
    """Scores that rise chunk by chunk (1024 keys each): a little (the numerators are taken against the old
    maximum, up to 2^8), a lot (the chunk is redone against its own maximum and the sums so far rescaled), and from
    far below (the first chunk's numerators all but vanish)."""
    runs(kernel, dtype)
    q, k, v = heads(1, 1024, 2, d, 0, dtype), heads(1, 3000, 2, d, 1, dtype), heads(1, 3000, 2, d, 2, dtype)
    for row, (key, gain) in enumerate([(1100, 0.4), (2500, 3.0), (2100, 6.0), (1030, 1.5)]):
        k[:, :, key] = (gain * q[:, :, row].float() * d ** 0.5 / q[:, :, row].float().norm(dim=-1, keepdim=True)
                        * 4).to(dtype)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    error, their_error = ((o.double() - exact).abs().max().item()
                          for o in (amx.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)))
    assert error <= 1.25 * their_error + SLACK[dtype], (error, their_error)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_amx_attention_of_peaked_scores_is_exact_and_leaves_subnormals_to_pytorch(kernel, dtype):
    """Scores hundreds apart (a sharply peaked softmax): most exponentials fall below float32's normal range, which
    the kernel flushes to zero (a microcode assist each otherwise: 8-16x slower); after it, PyTorch's own threads
    keep subnormal numbers again."""
    runs(kernel, dtype)
    q, k, v = (heads(2, 1024, 2, 40, seed, dtype) * 8 for seed in range(3))  # scores spread over hundreds
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    error, their_error = ((o.double() - exact).abs().max().item()
                          for o in (amx.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)))
    assert error <= 1.25 * their_error + SLACK[dtype], (error, their_error)
    assert keeps_subnormals()


def keeps_subnormals() -> bool:
    """Whether PyTorch's threads compute with subnormal numbers (as by default) rather than flush them to zero:
    2^-140 (512 x 2^-149) times 2 on every thread (a product this large is split among them), the bits compared as
    integers (a mode that flushes subnormals compares them equal to zero too)."""
    tiny = torch.full((1 << 20,), 512, dtype=torch.int32).view(torch.float32)
    return torch.equal((tiny * 2).view(torch.int32), torch.full_like(tiny, 1024, dtype=torch.int32))


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 4e-3), (torch.float32, 1e-6)])
def test_amx_attention_sees_every_key_once(kernel, dtype, rtol):
    """Identical keys and values except one: a kernel that dropped, repeated or mis-padded keys would miss it."""
    runs(kernel, dtype)
    q = heads(1, 1024, 1, 40, 0, dtype)
    k = torch.zeros(1, 1, 100, 40, dtype=dtype)
    v = torch.zeros_like(k)
    v[..., 99, :] = 1.0  # the last key (in the ragged tail) holds the only non-zero value
    out = amx.attention(q, k, v).float()
    torch.testing.assert_close(out, torch.full_like(out, 1 / 100), rtol=rtol, atol=0)


@needs_amx
def test_float32_inputs_are_split_into_enough_bfloat16_parts():
    """Values that bfloat16 alone cannot tell apart (1 + 2^-12 and 1 + 2^-20 differ from 1 below its 8 bits):
    the float32 kernel keeps them, as three parts per number and six products of parts per product do."""
    q = torch.zeros(1, 1, 1024, 16)
    k = torch.zeros(1, 1, 3, 16)
    v = torch.zeros(1, 1, 3, 16)
    q[..., 0] = 1 + 2 ** -12
    k[..., 0] = torch.tensor([1 + 2 ** -20, 1 - 2 ** -14, 3.0])  # scores differ by ~1e-4 and more
    v[..., 0, :], v[..., 1, :], v[..., 2, :] = 1 + 2 ** -13, -(1 + 2 ** -17), 0.5 + 2 ** -21
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    error = (amx.attention(q, k, v).double() - exact).abs().max()
    assert error <= 1.25 * (F.scaled_dot_product_attention(q, k, v).double() - exact).abs().max() + SLACK[q.dtype]
    # (the inputs rounded to bfloat16 alone would err 1000x more: 5e-5 against 4e-8)
    rounded = F.scaled_dot_product_attention(*(t.bfloat16().double() for t in (q, k, v)))
    assert (rounded - exact).abs().max() > 100 * error


def test_what_the_kernel_does_not_take_goes_to_pytorch(monkeypatch):
    calls = []
    monkeypatch.setattr(amx, "library", lambda: calls.append(1))  # would fail if called with inputs
    monkeypatch.setattr(amx, "avx512_library", lambda: calls.append(2))
    cases = {
        "float16": [heads(1, 1024, 2, 16, s, torch.float16) for s in range(3)],
        "float64": [heads(1, 1024, 2, 16, s, torch.float64) for s in range(3)],
        "too few queries": [heads(1, min(amx.MIN_QUERIES, amx.AVX512_MIN_QUERIES) - 1, 2, 16, s) for s in range(3)],
        "odd head dim": [heads(1, 1024, 2, 15, s) for s in range(3)],
        "head dim too large": [heads(1, 1024, 1, max(amx.MAX_HEAD_DIM, amx.AVX512_MAX_HEAD_DIM) + 2, s)
                               for s in range(3)],
        "not unit stride": [heads(1, 1024, 2, 32, s)[..., ::2] for s in range(3)],
        "fewer key heads": [heads(1, 1024, 2, 16, 0), heads(1, 64, 1, 16, 1), heads(1, 64, 1, 16, 2)],
    }
    for name, (q, k, v) in cases.items():
        assert not amx.suits(q, k, v), name
        assert torch.equal(amx.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)), name
    q, k, v = (heads(1, 1024, 2, 16, s).requires_grad_() for s in range(3))
    assert not amx.suits(q, k, v)
    with torch.no_grad():
        assert amx.suits(q, k, v)
    assert not calls


def test_amx_cpus_leave_to_pytorch_what_the_amx_kernel_does_not_take(monkeypatch):
    """Where the AMX kernels run, the AVX-512 build does not take the smaller problems they leave to PyTorch."""
    monkeypatch.setattr(amx, "library", lambda: object())  # (as if they ran here)
    monkeypatch.setattr(amx, "avx512_library", lambda: pytest.fail("the AVX-512 build was asked for"))
    q, k, v = (heads(1, 256, 2, 16, s) for s in range(3))
    assert torch.equal(amx.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.05), (torch.float32, 1e-5)])
def test_optimized_unet_runs_its_attention_on_amx(monkeypatch, kernel, dtype, tolerance):
    runs(kernel, dtype)
    monkeypatch.setattr(amx, "F", F)  # (the U-Net's few-query attention may go to PyTorch: the calls are counted)
    model = make(dtype=dtype)
    args = inputs(32, 32, dtype)  # 32x32 latents: 1024 tokens at the first level, 256 and 64 below
    with torch.no_grad():
        plain = model(*args).float()
    pack_for_inference(model)
    layers = [m for m in model.modules() if isinstance(m, attention.Attention)]
    assert layers and all(layer.attend is amx.attention for layer in layers)
    name = "library" if kernel == "amx" else "avx512_library"
    lib, calls = getattr(amx, name)(), []

    class Counting:
        def amx_attention(self, *a):
            calls.append(a[4:9])  # batch, heads, queries, keys, head dim
            return lib.amx_attention(*a)

        def amx_attention_fp32(self, *a):
            calls.append(a[4:9])
            return lib.amx_attention_fp32(*a)

        def __getattr__(self, name):  # the library's other kernels (float32 linear layers), as they are
            return getattr(lib, name)

    monkeypatch.setattr(amx, name, lambda: Counting())
    with torch.no_grad():
        fast = model(*args).float()
    # the self- and cross-attention of the 1024-token level's 5 transformers (2 down, 3 up; 2 heads of 16); the
    # AVX-512 build takes those of the 256-token level too (2 heads of 32: 2 down, 3 up), and of the middle block's
    # 64 tokens
    expected = [(2, 2, 1024, 7, 16)] * 5 + [(2, 2, 1024, 1024, 16)] * 5
    if kernel == "avx512":
        expected += [(2, 2, 256, 7, 32)] * 5 + [(2, 2, 256, 256, 32)] * 5 + [(2, 2, 64, 7, 32), (2, 2, 64, 64, 32)]
    assert sorted(calls) == sorted(expected)
    assert (fast - plain).abs().max() <= tolerance * plain.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpus_without_amx_keep_pytorchs_attention(monkeypatch, dtype):
    monkeypatch.setattr(amx, "available", lambda: False)
    monkeypatch.setattr(amx, "avx512_library", lambda: None)  # (nor AVX512-BF16)
    monkeypatch.setattr(fma, "library", lambda: None)  # (nor our AVX2 kernels: tests/test_fma.py)
    model = pack_for_inference(make(dtype=dtype))
    assert all("attend" not in m.__dict__ for m in model.modules())


@needs_avx512
def test_avx512_build_leaves_float32_and_few_queries_to_pytorch(monkeypatch):
    monkeypatch.setattr(amx, "library", lambda: None)
    calls = []
    real = amx.kernel
    monkeypatch.setattr(amx, "kernel", lambda *a: calls.append(a[0]) or real(*a))
    for q, k, v in ([heads(1, 1024, 2, 16, s, torch.float32) for s in range(3)],
                    [heads(1, amx.AVX512_MIN_QUERIES - 1, 2, 16, s) for s in range(3)]):
        assert torch.equal(amx.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert not calls
    q, k, v = (heads(1, amx.AVX512_MIN_QUERIES, 2, 16, s) for s in range(3))
    amx.attention(q, k, v)
    assert calls == [amx.avx512_library()]
    model = pack_for_inference(make(dtype=torch.float32))  # a float32 model keeps PyTorch's attention
    assert all("attend" not in m.__dict__ for m in model.modules())


def test_avx512_build_takes_the_vaes_512_wide_head(kernel):
    """The VAE's attention, one head of 512 over its 64x64 latents' pixels (here 1100 of them, and 1030 keys): the
    AVX-512 build takes it (the AMX kernel leaves it to PyTorch: see MAX_HEAD_DIM)."""
    if kernel == "amx":
        pytest.skip("the AMX kernel takes heads of at most MAX_HEAD_DIM")
    q, k, v = heads(1, 1100, 1, 512, 0), heads(1, 1030, 1, 512, 1), heads(1, 1030, 1, 512, 2)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    error, their_error = ((o.double() - exact).abs().max().item()
                          for o in (amx.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)))
    assert error <= 1.25 * their_error + SLACK[torch.bfloat16], (error, their_error)


@pytest.mark.parametrize("build", ["amx", "avx512"])
def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path, build):
    flags, library, cpu = {"amx": ("FLAGS", amx.library, amx.CPU_FLAGS),
                           "avx512": ("AVX512_FLAGS", amx.avx512_library, amx.AVX512_CPU_FLAGS)}[build]
    if amx.unavailable(cpu):
        pytest.skip(f"nothing to build here: {amx.unavailable(cpu)}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(amx, flags, [*getattr(amx, flags), "-fno-such-flag"])
    library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="(?s)could not be built.*no-such-flag.*Fix: a g\\+\\+"):
            assert library() is None
        assert not list(tmp_path.rglob("*.so"))  # nothing half-written left in the cache
        if build == "avx512":  # bfloat16 attention stays with PyTorch
            monkeypatch.setattr(amx, "library", lambda: None)
            q, k, v = (heads(1, 1024, 2, 16, s) for s in range(3))
            assert torch.equal(amx.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    finally:
        library.cache_clear()


def test_amx_attention_from_two_threads_at_once(kernel):
    """ctypes lets go of the GIL: two calls can run together, and only one of them may use the kept buffer of
    packed keys and values (the other makes its own)."""
    inputs_ = [[heads(1, 2048, 4, 40, 3 * i + s) for s in range(3)] for i in range(2)]
    calls = [lambda qkv=qkv: amx.attention(*qkv) for qkv in inputs_]
    alone = [call() for call in calls]
    results = together(calls, 6)
    assert all(torch.equal(result, alone[i]) for i in range(2) for result in results[i])


def together(calls, repeats: int) -> list[list]:
    """Each of `calls` made `repeats` times on a thread of its own, the threads started at once: their results."""
    import threading

    results = [[None] * repeats for _ in calls]
    start = threading.Barrier(len(calls))

    def run(i):
        start.wait()
        for r in range(repeats):
            results[i][r] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
