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
from latentdiff.models import triton_launch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (batch, channels, height, width, groups): one group of several slices, channels that do not fill a power of two,
# a 1x1 map, sizes no block divides
SHAPES = [(2, 64, 8, 8, 32), (3, 40, 5, 7, 8), (2, 32, 1, 1, 8), (2, 128, 33, 9, 32)]
CPU_SHAPES = SHAPES + [(2, 6, 5, 3, 3)]  # (6 channels: the CPU kernel's partial vectors)
# the same cases with fewer groups, for Triton's interpreter, whose time goes by programs (one or more per group and
# sample): 8 programs a call instead of 64 for the two larger shapes keep its test at ~30 s, not ~90, on a 2-core host
INTERPRETER_SHAPES = [(2, 64, 8, 8, 4), (3, 40, 5, 7, 8), (2, 32, 1, 1, 8), (2, 64, 33, 9, 4)]


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
    from test_group_norm import INTERPRETER_SHAPES, random_case, reference
    from latentdiff.models import group_norm as gn
    try:
        norm, x, t = random_case(INTERPRETER_SHAPES[0], torch.float32, "cpu", False)
        gn._triton_group_norm(x, norm, True, t)
    except Exception as error:  # Triton 3.6's interpreter under NumPy 2.5 cannot take a loop bound from an argument
        if "only 0-dimensional arrays" in str(error):
            print("SKIP: this Triton's interpreter cannot run loops over argument bounds:", error)
            sys.exit(0)
        raise
    default = gn.SETTINGS
    for settings in {settings}:
        gn.SETTINGS = settings
        for i, shape in enumerate(INTERPRETER_SHAPES):
            # each shape in both layouts, each case in both layouts over the shapes (every combination: 2x the time)
            for j, (dtype, silu, shift, tol) in enumerate(((torch.float32, True, True, 2e-5),
                                                           (torch.float32, False, False, 2e-5),
                                                           (torch.float16, True, True, 1e-2))):
                channels_last = (i + j) % 2 == 1
                norm, x, t = random_case(shape, dtype, "cpu", channels_last)
                t = t if shift else None
                out = gn._triton_group_norm(x, norm, silu, t)
                assert out.dtype == dtype and out.stride() == x.stride(), (shape, out.stride(), x.stride())
                err = (out.float() - reference(x, norm, silu, t)).abs().max().item()
                assert err < tol, (settings, shape, channels_last, dtype, silu, shift, err)
            norm, x, t = random_case(shape, torch.float32, "cpu", False)
            if i % 2 == 0:  # one shift row for every sample
                err = (gn._triton_group_norm(x, norm, True, t[:1]) - reference(x, norm, True, t[:1])).abs().max()
                assert err.item() < 2e-5, (settings, shape, "broadcast shift", err)
            else:  # NCHW in, channels-last out
                out = gn._triton_group_norm(x, norm, False, None, channels_last=True)
                assert out.stride() == torch.empty_like(x, memory_format=torch.channels_last).stride(), shape
                err = (out - reference(x, norm, False, None)).abs().max().item()
                assert err < 2e-5, (settings, shape, "channels-last output", err)
    print("all match")
""")


def test_triton_kernels_match_torch_group_norm_in_the_interpreter():
    """The kernels' arithmetic, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before
    Triton is imported, hence a subprocess): NCHW and channels-last, fp32 and fp16, with and without the shift and
    the SiLU."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # one process per launch setting, side by side: the interpreter runs each program in Python on one core (~15 s
    # in all on a 2-core AVX2 host), and the rest of the suite waits for it
    runs = [subprocess.Popen([sys.executable, "-c", INTERPRETED.format(tests=os.path.dirname(__file__),
                                                                        settings=settings)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for settings in ("(default,)",  # one program a group
                             "(dataclasses.replace(default, one_program=0),)")]  # split in slices
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs):
        if run.returncode == 0 and "SKIP:" in stdout:
            pytest.skip(stdout.strip())
        assert run.returncode == 0 and "all match" in stdout, stderr[-3000:]


needs_cpu_kernel = pytest.mark.skipif(gn._cpu_kernel() is None, reason="no compiled CPU GroupNorm here (no g++?)")


@needs_cpu_kernel
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", CPU_SHAPES)
@torch.no_grad()
def test_cpu_kernel_is_as_exact_as_torch(shape, channels_last, monkeypatch):
    """Float32 on the CPU without autograd: group_norm.cpp (one pass for the statistics, one for the output), in x's
    layout, no further from float64 than torch's GroupNorm + SiLU, with the shift per sample, one for all, or none."""
    calls = []
    kernel = gn._compiled_group_norm
    monkeypatch.setattr(gn, "_compiled_group_norm", lambda *args: calls.append(1) or kernel(*args))
    norm, x, shift = random_case(shape, torch.float32, "cpu", channels_last)
    for silu, t in ((True, shift), (False, None), (True, shift[:1])):
        out = gn.group_norm(norm, x, silu=silu, shift=t)
        assert out.stride() == x.stride() and out.dtype == torch.float32
        v = x.double() + (0 if t is None else t.double()[:, :, None, None])
        exact = F.group_norm(v, norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
        exact = F.silu(exact) if silu else exact
        theirs = reference(x, norm, silu, t)
        error, their_error = ((y.double() - exact).abs().max().item() for y in (out, theirs))
        assert error <= 1.25 * their_error + 1e-6, (silu, t is None, error, their_error)
    assert len(calls) == 3


@needs_cpu_kernel
@torch.no_grad()
def test_cpu_kernel_silu_of_extreme_values():
    """The SiLU's exponential is clamped to finite values: huge, tiny and zero activations come out as torch's."""
    norm = torch.nn.GroupNorm(1, 16, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1e4, 1e3, 100, 50, 20, 1, 1e-3, 0] * 2))
        norm.bias.copy_(torch.tensor([0, 1, -1, 0.5, -90, 88, 0, -3] * 2))
    x = torch.randn(2, 16, 4, 4)
    out = gn.group_norm(norm, x, silu=True)
    expected = F.silu(norm(x))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


@needs_cpu_kernel
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_kernel_writes_over_x_where_told_and_without_autograd(channels_last):
    """reuse=True (the caller has no further use for x): the CPU kernel writes the output over x, the same numbers
    as into a new tensor; with autograd, or without reuse, x stays as it was."""
    norm, x, shift = random_case((2, 64, 8, 8, 32), torch.float32, "cpu", channels_last)
    with torch.no_grad():
        expected = gn.group_norm(norm, x, silu=True, shift=shift)
        assert expected.data_ptr() != x.data_ptr()
        given = x.clone()
        out = gn.group_norm(norm, given, silu=True, shift=shift, reuse=True)
    assert out.data_ptr() == given.data_ptr() and out.stride() == x.stride()
    assert torch.equal(out, expected)
    given = x.clone().requires_grad_()
    out = gn.group_norm(norm, given, silu=True, shift=shift, reuse=True)
    assert out.data_ptr() != given.data_ptr() and torch.equal(given.detach(), x)
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-6)


@needs_cpu_kernel
@torch.no_grad()
def test_resnet_blocks_write_over_the_first_conv_output_unless_a_hook_saw_it(monkeypatch):
    """A ResNet block's second norm writes over its first conv's output (no one else holds it), but not where a
    forward hook on that conv may have kept it."""
    from latentdiff.models.resnet import ResnetBlock2D

    block = ResnetBlock2D(32, 32, 16, groups=8).eval()
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    kernel, over_input = gn._compiled_group_norm, []
    monkeypatch.setattr(gn, "_compiled_group_norm",
                        lambda *args: over_input.append(args[-1] is args[0]) or kernel(*args))
    expected = block(x, temb)
    assert over_input == [False, True]  # norm1 (x is the residual too), norm2
    kept = []
    handle = block.conv1.register_forward_hook(lambda module, inputs, out: kept.append((out, out.clone())))
    try:
        assert torch.equal(block(x, temb), expected)
    finally:
        handle.remove()
    assert over_input[2:] == [False, False]
    (seen, copy), = kept
    assert torch.equal(seen, copy)


def gradients(fn, tensors, grad):
    """d(sum(fn(*tensors) * grad)) / d tensors, from copies of them."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out, [t.grad for t in leaves]


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_cpu_kernels_train_as_exactly_as_torch(shape, channels_last, threads):
    """Float32 on the CPU with autograd: group_norm.cpp's forward and backward (_CompiledGroupNorm) give the output and
    the gradients of x, the shift (per sample, one for all, none), gamma and beta no further from float64 than torch's
    shift add + GroupNorm + SiLU in float32, in x's layout, on any number of threads."""
    norm, x, shift = random_case(shape, torch.float32, "cpu", channels_last)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    grad = grad.contiguous(memory_format=torch.channels_last) if not channels_last else grad  # the other layout

    def ours(x, shift, weight, bias):
        plain = torch.nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps)
        del plain.weight, plain.bias
        plain.weight, plain.bias = weight, bias  # (the leaves whose gradients are compared)
        out = gn.group_norm(plain, x, silu=silu, shift=shift)
        assert type(out.grad_fn).__name__ == "_CompiledGroupNormBackward"
        return out

    def theirs(x, shift, weight, bias):
        v = x if shift is None else x + shift[:, :, None, None]
        y = F.group_norm(v, norm.num_groups, weight, bias, norm.eps)
        return F.silu(y) if silu else y

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for silu, t in ((True, shift), (False, None), (True, shift[:1]), (False, shift)):
            tensors = [x, t, norm.weight, norm.bias]
            present = [i for i, v in enumerate(tensors) if v is not None]

            def call(fn, *given):
                args = list(tensors)
                for i, v in zip(present, given):
                    args[i] = v
                return fn(*args)

            out, got = gradients(lambda *a: call(ours, *a), [tensors[i] for i in present], grad)
            assert out.stride() == x.stride() and got[0].stride() == x.stride()
            exact, expected = gradients(lambda *a: call(theirs, *a), [tensors[i].double() for i in present], grad)
            _, torch_got = gradients(lambda *a: call(theirs, *a), [tensors[i] for i in present], grad)
            for name, a, b, e in zip(("out", "x", "shift", "gamma", "beta"), [out] + got, [exact] + torch_got,
                                     [exact] + expected):
                error, their_error = ((y.double() - e).abs().max().item() for y in (a, b))
                assert a.shape == e.shape, (name, a.shape, e.shape)
                assert error <= 1.25 * their_error + 1e-6 * e.abs().max().item(), (name, silu, error, their_error)
    finally:
        torch.set_num_threads(previous)


@needs_cpu_kernel
def test_cpu_training_keeps_x_not_the_normalised_map():
    """What autograd keeps for the backward: x and the groups' statistics (torch's ops keep x + shift and the norm's
    output, twice the activations)."""
    norm, x, shift = random_case(SHAPES[0], torch.float32, "cpu", channels_last=False)
    x.requires_grad_(True)
    kept = []

    def keep(t):
        kept.append(t.numel() if t.numel() >= x.numel() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = gn.group_norm(norm, x, silu=True, shift=shift)
    assert sum(kept) == x.numel()
    kept.clear()
    gn.ENABLED = False
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            gn.group_norm(norm, x, silu=True, shift=shift)
    finally:
        gn.ENABLED = True
    assert sum(kept) >= 2 * x.numel()
    out.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


def test_under_torch_func_transforms_the_plain_modules_run():
    """vmap and torch.func.grad wrap their tensors, which no kernel can read: the plain modules run there."""
    norm, x, shift = random_case(SHAPES[0], torch.float32, "cpu", channels_last=False)

    def plain(x):
        return F.silu(norm(x + shift[:, :, None, None]))

    def ours(x):
        return gn.group_norm(norm, x, silu=True, shift=shift)

    torch.testing.assert_close(torch.func.grad(lambda x: ours(x).square().sum())(x),
                               torch.func.grad(lambda x: plain(x).square().sum())(x), rtol=0, atol=0)
    with torch.no_grad():  # each sample alone, as a batch of one
        torch.testing.assert_close(torch.func.vmap(lambda t: gn.group_norm(norm, t[None], silu=True)[0])(x),
                                   F.silu(norm(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("silu", [False, True])
def test_turned_off_or_bfloat16_the_plain_modules_run(silu):
    norm, x, shift = random_case(SHAPES[0], torch.float32, "cpu", channels_last=False)
    x.requires_grad_(True)
    expected = norm(x + shift[:, :, None, None])
    expected = F.silu(expected) if silu else expected
    gn.ENABLED = False
    try:
        out = gn.group_norm(norm, x, silu=silu, shift=shift)
    finally:
        gn.ENABLED = True
    assert torch.equal(out, expected)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for grad in (True, False):
        norm, x, shift = random_case(SHAPES[0], torch.bfloat16, "cpu", channels_last=False)
        with torch.set_grad_enabled(grad):
            x.requires_grad_(grad)
            expected = norm(x + shift[:, :, None, None])
            expected = F.silu(expected) if silu else expected
            assert torch.equal(gn.group_norm(norm, x, silu=silu, shift=shift), expected)


def test_one_program_or_slices_by_shape():
    """Which form the kernels take, as measured on an H200, checked on shapes alone (meta tensors): SD 1.5 at 512 px;
    U-Net batch 1 / 4 with guidance = 2 / 8 samples; VAE decoder batch 1."""
    def case(n, c, side, channels_last=False):
        x = torch.empty(n, c, side, side, device="meta")
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    # NCHW U-Net: one program per group at both batches (its largest groups: 30 channels of 64x64)
    for n in (2, 8):
        for c, side in ((320, 64), (960, 64), (640, 32), (1280, 8)):
            assert gn._one_program(case(n, c, side), 32), (n, c, side)
    # NCHW VAE decoder: groups of over 128K elements in slices
    assert gn._one_program(case(1, 512, 64), 32)
    for c, side in ((512, 128), (512, 256), (256, 512), (128, 512)):
        assert not gn._one_program(case(1, c, side), 32), (c, side)
    # channels-last: one program per group only up to 32x32 pixels
    assert not gn._one_program(case(8, 320, 64, True), 32) and gn._one_program(case(8, 640, 32, True), 32)


def test_launch_plans_split_groups_to_fill_the_gpu():
    """The slices: enough programs for LaunchSettings.programs_per_sm per multiprocessor, at most _MAX_SPLIT per
    group, none shorter than a block of pixels; the statistics' buffer and the strides of each layout."""
    settings = gn.LaunchSettings()
    plan = gn._plan(1, 512, 256 * 256, 32, True, True, 512 * 256 * 256, 512, True, True, False, settings, 132)
    (first, grid), (second, grid2) = plan.launches
    assert (first, second) == (1, 2) and grid == grid2 == (32, 64, 1) and plan.stats == (3, 32, 64)  # 66 wanted
    pixels, cg, groups, s_n, s_c, s_p, s_t, o_c, o_p, per_slice, split = plan.scalars[:11]
    assert (pixels, cg, groups, s_c, s_p, s_t, o_c, o_p, per_slice, split) == \
        (65536, 16, 32, 65536, 1, 512, 65536, 1, 1024, 64)
    plan = gn._plan(2, 320, 64 * 64, 32, False, False, 320 * 64 * 64, 0, False, True, True, settings, 132)
    assert plan.launches == ((0, (64, 1, 1)),) and plan.stats is None
    assert plan.scalars[4:11] == (1, 320, 0, 1, 320, 4096, 1)  # channels-last strides; a group in one program
    plan = gn._plan(2, 320, 64 * 64, 32, True, False, 320 * 64 * 64, 0, False, True, True, settings, 132)
    assert plan.scalars[4:9] == (4096, 1, 0, 1, 320)  # read NCHW, write channels-last


def test_launches_reuse_the_compiled_kernel_while_the_specialisation_holds(monkeypatch):
    """triton_launch.launch with a stand-in for a Triton kernel: the first launch of a key goes through the kernel
    (Triton's own launch), later ones through the compiled kernel it returned; another grid, another argument
    value, dtype or 16-byte alignment is another key; DIRECT = False always takes Triton's launch."""
    log = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: log.append(("compiled", grid, args))

    class Kernel:
        def __getitem__(self, grid):
            def launch(*args, num_warps):
                log.append(("jit", grid, args))
                return Compiled()
            return launch

    monkeypatch.setattr(triton_launch, "_RUNNERS", {})
    kernel, grid = Kernel(), (4, 1, 1)
    base = torch.zeros(64)
    aligned, shifted = base[:8], base[1:9]  # 4 bytes past the aligned address

    def launch(x, grid=grid, scalars=(7, 16), dtype=None):
        x = x if dtype is None else x.to(dtype)
        triton_launch.launch(kernel, grid, (x,) * 6, (1e-6,) + scalars, num_warps=8)
        return log[-1][0]

    assert [launch(aligned), launch(aligned), launch(aligned)] == ["jit", "compiled", "compiled"]
    assert log[-1][2][0] is aligned and log[-1][2][6:] == (1e-6, 7, 16)  # every argument, in order
    assert [launch(shifted), launch(shifted)] == ["jit", "compiled"]
    assert [launch(aligned, grid=(8, 1, 1)), launch(aligned, scalars=(7, 32)), launch(aligned, dtype=torch.half)] \
        == ["jit"] * 3
    monkeypatch.setattr(triton_launch, "DIRECT", False)
    assert [launch(aligned), launch(aligned)] == ["jit", "jit"]


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
        for silu, with_shift in ((True, True), (True, "row"), (True, False), (False, False)):
            norm, x, shift = random_case(shape, dtype, "cuda", channels_last)
            shift = {True: shift, "row": shift[:1], False: None}[with_shift]  # "row": one for every sample
            out = gn._triton_group_norm(x, norm, silu, shift)
            assert out.stride() == x.stride()
            err = (out.float() - reference(x, norm, silu, shift)).abs().max().item()
            assert err < tol, (shape, silu, with_shift, err)
        out = gn._triton_group_norm(x, norm, silu, shift, channels_last=True)
        assert out.is_contiguous(memory_format=torch.channels_last)
        err = (out.float() - reference(x, norm, silu, shift)).abs().max().item()
        assert err < tol, (shape, "channels-last output", err)


@cuda
def test_on_the_gpu_the_kernels_run_without_autograd():
    for shape in ((1, 256, 128, 128, 32), (8, 320, 64, 64, 32), (2, 320, 64, 64, 32), (1, 64, 8, 8, 32)):
        norm, x, shift = random_case(shape, torch.float16, "cuda", channels_last=False)
        with torch.no_grad():
            assert gn._fused_applies(norm, x, shift), shape
    norm, x, shift = random_case(SHAPES[0], torch.float16, "cuda", channels_last=True)
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


@cuda
@pytest.mark.parametrize("one_program", [True, False])
@torch.no_grad()
def test_launches_through_the_compiled_kernels_match_torch(one_program, monkeypatch):
    """The second call of a shape launches the compiled kernels that the first one's launch returned
    (triton_launch.launch): new data, and tensors whose 16-byte alignment differs from the first call's (Triton
    compiles a kernel per alignment), must give torch's results too."""
    monkeypatch.setattr(gn, "_one_program", lambda x, groups: one_program)
    monkeypatch.setattr(triton_launch, "_RUNNERS", {})
    shape = (2, 320, 16, 16, 32)
    for seed in range(3):
        norm, x, shift = random_case(shape, torch.float16, "cuda", channels_last=False, seed=seed)
        if seed == 2:  # x and its shift 2 bytes past an aligned address
            x, shift = (torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)[1:].view(t.shape).copy_(t)
                        for t in (x, shift))
            assert x.data_ptr() % 16 and shift.data_ptr() % 16
        out = gn._triton_group_norm(x, norm, True, shift)
        err = (out.float() - reference(x, norm, True, shift)).abs().max().item()
        assert err < 1e-2, (seed, err)
    kept = len(triton_launch._RUNNERS)
    assert kept == (2 if one_program else 4), f"{kept} compiled kernels kept: Triton's API differs?"
