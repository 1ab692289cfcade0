"""The fused transformer-block steps (latentdiff.models.fused): the Triton kernels against torch's operations, run by
Triton's interpreter on the CPU (everywhere) and compiled on a GPU (where CUDA is present); the plain operations
elsewhere."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from latentdiff.models import fused

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# token shapes [..., D]: rows that the 4 rows per program do not divide, widths that are not powers of two, a GEGLU
# half wider than one column block (1024)
SHAPES = [(2, 7, 40), (3, 320), (1, 5, 1280)]


def case(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.LayerNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(shape[-1], generator=g))
        norm.bias.copy_(0.2 * torch.randn(shape[-1], generator=g))
    x = 3 * torch.randn(shape, generator=g) + 2  # a mean away from 0: the statistics must not cancel
    y = torch.randn(shape, generator=g)
    h = 2 * torch.randn(*shape[:-1], 2 * shape[-1], generator=g)
    return norm.to(device, dtype), x.to(device, dtype), y.to(device, dtype), h.to(device, dtype)


def reference(x, y, h, norm):
    """In float32 from x + y (and the gelu) rounded to the inputs' dtype, as the unfused operations round them."""
    s = x + y
    out = F.layer_norm(s.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    value, gate = h.chunk(2, dim=-1)
    return s, out, value.float() * F.gelu(gate.float()).to(h.dtype).float()


INTERPRETED = textwrap.dedent("""
    import torch, sys
    sys.path.insert(0, {tests!r})
    from test_fused import SHAPES, case, reference
    from latentdiff.models import fused
    for shape in SHAPES:
        for dtype, tol in ((torch.float32, 2e-5), (torch.float16, 1e-2)):
            norm, x, y, h = case(shape, dtype, "cpu")
            s, out = fused._add_layer_norm(x, y, norm)
            ref_s, ref_out, ref_geglu = reference(x, y, h, norm)
            assert s.dtype == out.dtype == dtype and torch.equal(s, ref_s), (shape, dtype)
            err = (out.float() - ref_out).abs().max().item()
            assert err < tol, ("layer norm", shape, dtype, err)
            g = fused._geglu(h)
            assert g.shape == ref_geglu.shape and g.dtype == dtype
            err = (g.float() - ref_geglu).abs().max().item()
            assert err < tol * 4, ("geglu", shape, dtype, err)
    print("all match")
""")


def test_triton_kernels_match_torch_in_the_interpreter():
    """The kernels' arithmetic, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before
    Triton is imported, hence a subprocess): fp32 and fp16, rows and widths that no block divides."""
    pytest.importorskip("triton")
    code = INTERPRETED.format(tests=os.path.dirname(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "all match" in run.stdout, run.stderr[-3000:]


def test_off_the_gpu_and_by_default_the_plain_operations_run(monkeypatch):
    norm, x, y, h = case(SHAPES[0], torch.float32, "cpu")
    assert not fused.ENABLED  # opt-in until measured on a GPU
    monkeypatch.setattr(fused, "ENABLED", True)  # still the plain operations: a CPU tensor
    s, out = fused.add_layer_norm(x, y, norm)
    assert torch.equal(s, x + y) and torch.equal(out, norm(x + y))
    value, gate = h.chunk(2, dim=-1)
    assert torch.equal(fused.geglu(h), value * F.gelu(gate))


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@torch.no_grad()
def test_kernels_on_the_gpu_match_torch(dtype, monkeypatch):
    monkeypatch.setattr(fused, "ENABLED", True)
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 2e-5}[dtype]
    for shape in SHAPES + [(8, 4096, 320), (2, 1024, 1280)]:  # SD 1.5's tokens at batch 4 and 1 with guidance
        norm, x, y, h = case(shape, dtype, "cuda")
        assert fused._applies(x, y, norm.weight) and fused._applies(h)
        s, out = fused.add_layer_norm(x, y, norm)
        ref_s, ref_out, ref_geglu = reference(x, y, h, norm)
        assert torch.equal(s, ref_s)
        assert (out.float() - ref_out).abs().max().item() < tol, shape
        assert (fused.geglu(h).float() - ref_geglu).abs().max().item() < tol * 4, shape
    x.requires_grad_(True)
    with torch.enable_grad():
        assert not fused._applies(x, y, norm.weight)


@cuda
@torch.no_grad()
def test_unet_on_the_gpu_with_fused_steps_matches_diffusers(monkeypatch):
    """The oracle on the fused path: a small U-Net in fp16 on CUDA against diffusers' on the same weights."""
    pytest.importorskip("diffusers")
    from test_unet import SMALL, inputs, make_pair
    from latentdiff.models.unet import UNetConfig

    monkeypatch.setattr(fused, "ENABLED", True)
    config = UNetConfig(**SMALL)
    ref, ours = (m.to("cuda", torch.float16) for m in make_pair(config))
    sample, t, ctx = (v.cuda() for v in inputs(config, 32, 32))
    sample, ctx = sample.half(), ctx.half()
    expected = ref(sample, t, ctx).sample.float()
    got = ours(sample, t, ctx).float()
    assert (got - expected).norm() / expected.norm() < 5e-3
