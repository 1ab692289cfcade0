"""The fused GroupNorm (latentdiff.models.group_norm): the Triton kernels against torch's GroupNorm, run by Triton's
interpreter on the CPU (everywhere) and compiled on a GPU (where CUDA is present); the plain modules elsewhere."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from latentdiff.models import group_norm as gn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (batch, channels, height, width, groups): one group of several slices, channels that do not fill a power of two,
# a 1x1 map, sizes no block divides
SHAPES = [(2, 64, 8, 8, 32), (3, 40, 5, 7, 8), (2, 32, 1, 1, 8), (2, 128, 33, 9, 32)]


def reference(x, norm, silu, shift):
    """torch's GroupNorm in fp32 on (x + shift) as x's dtype would hold it, SiLU after."""
    if shift is not None:
        x = x + shift[:, :, None, None]
    y = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    return F.silu(y) if silu else y


def random_case(shape, dtype, device, channels_last, seed=0):
    n, c, h, w, groups = shape
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
        norm.bias.copy_(0.2 * torch.randn(c, generator=g))
    x = 3 * torch.randn(n, c, h, w, generator=g) + 5  # a large mean: the statistics must not cancel
    shift = torch.randn(n, c, generator=g)
    x = x.to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return norm.to(device, dtype), x, shift.to(device, dtype)


INTERPRETED = textwrap.dedent("""
    import dataclasses, torch, sys
    sys.path.insert(0, {tests!r})
    from test_group_norm import SHAPES, random_case, reference
    from latentdiff.models import group_norm as gn
    try:
        norm, x, t = random_case(SHAPES[0], torch.float32, "cpu", False)
        gn._triton_group_norm(x, norm, True, t)
    except Exception as error:  # Triton 3.6's interpreter under NumPy 2.5 cannot take a loop bound from an argument
        if "only 0-dimensional arrays" in str(error):
            print("SKIP: this Triton's interpreter cannot run loops over argument bounds:", error)
            sys.exit(0)
        raise
    default = gn.SETTINGS
    for settings in (default, dataclasses.replace(default, one_program=0)):  # one program a group; split in slices
        gn.SETTINGS = settings
        for shape in SHAPES:
            for channels_last in (False, True):
                for dtype, silu, shift, tol in ((torch.float32, True, True, 2e-5),
                                                (torch.float32, False, False, 2e-5),
                                                (torch.float16, True, True, 1e-2)):
                    norm, x, t = random_case(shape, dtype, "cpu", channels_last)
                    t = t if shift else None
                    out = gn._triton_group_norm(x, norm, silu, t)
                    assert out.dtype == dtype and out.stride() == x.stride(), (shape, out.stride(), x.stride())
                    err = (out.float() - reference(x, norm, silu, t)).abs().max().item()
                    assert err < tol, (settings, shape, channels_last, dtype, silu, shift, err)
    print("all match")
""")


def test_triton_kernels_match_torch_group_norm_in_the_interpreter():
    """The kernels' arithmetic, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before
    Triton is imported, hence a subprocess): NCHW and channels-last, fp32 and fp16, with and without the shift and
    the SiLU."""
    pytest.importorskip("triton")
    code = INTERPRETED.format(tests=os.path.dirname(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode == 0 and "SKIP:" in run.stdout:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0 and "all match" in run.stdout, run.stderr[-3000:]


@pytest.mark.parametrize("silu", [False, True])
def test_off_the_gpu_the_plain_modules_run(silu):
    norm, x, shift = random_case(SHAPES[0], torch.float32, "cpu", channels_last=False)
    expected = norm(x + shift[:, :, None, None])
    expected = F.silu(expected) if silu else expected
    assert torch.equal(gn.group_norm(norm, x, silu=silu, shift=shift), expected)
    x.requires_grad_(True)
    gn.group_norm(norm, x, silu=silu, shift=shift).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dispatch_rule_for_a_gpu_of_132_multiprocessors(monkeypatch):
    """Where the kernels run and in which form, as measured on an H200 (132 multiprocessors), checked on shapes alone
    (meta tensors): SD 1.5 at 512 px; U-Net batch 1 / 4 with guidance = 2 / 8 samples; VAE decoder batch 1."""
    monkeypatch.setattr(gn, "_multiprocessors", lambda device: 132)

    def case(n, c, side, channels_last=False):
        x = torch.empty(n, c, side, side, device="meta")
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    # NCHW U-Net: torch's at batch 1 (host-bound), one program per group at batch 4
    assert not gn._kernels_pay(case(2, 320, 64), 32)
    assert gn._kernels_pay(case(8, 320, 64), 32) and gn._one_program(case(8, 320, 64), 32)
    assert gn._kernels_pay(case(8, 960, 64), 32) and gn._one_program(case(8, 960, 64), 32)
    # NCHW VAE decoder: large groups, few of them: the kernels, in slices
    for c, side in ((512, 64), (512, 256), (256, 512), (128, 512)):
        assert gn._kernels_pay(case(1, c, side), 32) and not gn._one_program(case(1, c, side), 32), (c, side)
    # channels-last: always the kernels; one program per group only up to 32x32 pixels
    assert gn._kernels_pay(case(2, 320, 64, True), 32)
    assert not gn._one_program(case(8, 320, 64, True), 32) and gn._one_program(case(8, 640, 32, True), 32)


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("one_program", [True, False])
@torch.no_grad()
def test_fused_kernels_on_the_gpu_match_torch(dtype, channels_last, one_program, monkeypatch):
    # SD 1.5's shapes at batch 2 too: 320 channels at 64x64, 1280 at 8x8, and a VAE decoder group of 2M elements
    monkeypatch.setattr(gn, "_one_program", lambda x, groups: one_program)
    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 2e-5}[dtype]
    for shape in SHAPES + [(2, 320, 64, 64, 32), (2, 1280, 8, 8, 32), (1, 256, 512, 512, 32)]:
        for silu, with_shift in ((True, True), (True, False), (False, False)):
            norm, x, shift = random_case(shape, dtype, "cuda", channels_last)
            shift = shift if with_shift else None
            out = gn._triton_group_norm(x, norm, silu, shift)
            assert out.stride() == x.stride()
            err = (out.float() - reference(x, norm, silu, shift)).abs().max().item()
            assert err < tol, (shape, silu, with_shift, err)


@cuda
def test_on_the_gpu_the_kernels_run_where_they_pay_and_without_autograd():
    # NCHW: large groups (the SD VAE decoder's), or many (the U-Net's at batch 4 with guidance: at least half an
    # H100's or H200's 132 multiprocessors); few small ones (batch 1 with guidance), torch's kernels
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for shape, fused in (((1, 256, 128, 128, 32), True), ((8, 320, 64, 64, 32), True),
                         ((2, 320, 64, 64, 32), 128 >= sms), ((1, 64, 8, 8, 32), 64 >= sms)):
        norm, x, shift = random_case(shape, torch.float16, "cuda", channels_last=False)
        with torch.no_grad():
            assert gn._fused_applies(norm, x, shift) == fused, shape
    norm, x, shift = random_case(SHAPES[0], torch.float16, "cuda", channels_last=True)  # channels-last: always
    x.requires_grad_(True)
    assert not gn._fused_applies(norm, x, shift)
    gn.group_norm(norm, x, silu=True, shift=shift).sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        x = x.detach()
        assert gn._fused_applies(norm, x, shift)
        gn.ENABLED = False
        try:
            assert not gn._fused_applies(norm, x, shift)
        finally:
            gn.ENABLED = True


@cuda
@pytest.mark.parametrize("channels_last", [False, True])
@torch.no_grad()
def test_unet_and_vae_on_the_gpu_with_fused_norms_match_diffusers(channels_last):
    """The oracle on the GPU path: a small U-Net and the tiny VAE in fp16 on CUDA (fused kernels on) against
    diffusers' on the same weights, NCHW and channels_last."""
    pytest.importorskip("diffusers")
    from test_unet import SMALL, inputs, make_pair
    from test_vae import config as vae_config
    from test_vae import pair as vae_pair
    from latentdiff.models.unet import UNetConfig

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    config = UNetConfig(**SMALL)
    ref, ours = (m.to("cuda", torch.float16, memory_format=fmt) for m in make_pair(config))
    sample, t, ctx = (v.cuda() for v in inputs(config, 32, 32))
    sample, ctx = sample.half().contiguous(memory_format=fmt), ctx.half()
    expected = ref(sample, t, ctx).sample.float()
    got = ours(sample, t, ctx).float()
    assert (got - expected).norm() / expected.norm() < 5e-3
    ref_vae, vae = (m.to("cuda", torch.float16, memory_format=fmt) for m in vae_pair(vae_config((32, 64), 2)))
    latents = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt)
    expected = ref_vae.decode(latents).sample.float()
    got = vae.decode(latents).float()
    assert (got - expected).norm() / expected.norm() < 5e-3
