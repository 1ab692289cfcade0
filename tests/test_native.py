"""Building our C++ kernels (models/native.py): built once and loaded from the cache after, rebuilt when the flags
change, stale builds removed, and a failed build of the Winograd transforms falls back to PyTorch's ops with a
warning that says what to fix."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch

from latentdiff.models import native, winograd

pytestmark = pytest.mark.skipif(native.unavailable() is not None, reason=f"cannot build here: {native.unavailable()}")
FLAGS = ["-O1", "-shared", "-fPIC"]


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "answer.cpp"
    path.write_text('#include "kernels.h"\nextern "C" int answer() { FlushSubnormals f; return 42; }\n')
    return path


def test_a_build_is_cached_and_keyed_by_its_flags(source, monkeypatch):
    assert native.build(source, FLAGS).answer() == 42
    built = list(native.cache_folder().glob("answer-*.so"))
    assert len(built) == 1

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.build(source, FLAGS).answer() == 42  # from the cache
    with pytest.raises(AssertionError, match="compiled again"):
        native.build(source, [*FLAGS, "-DOTHER"])


def test_a_damaged_build_is_built_again(source):
    built = native.library_path(source, FLAGS)
    built.parent.mkdir(parents=True)
    built.write_bytes(b"not a library")
    assert native.build(source, FLAGS).answer() == 42
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_builds_unused_for_a_month_are_removed_by_the_next_build(source):
    folder = native.cache_folder()
    folder.mkdir(parents=True)
    stale, recent, other = folder / "answer-0000.so", folder / "answer-1111.so", folder / "other-0000.so"
    for path in (stale, recent, other):
        path.write_bytes(b"")
    old = time.time() - (native.UNUSED_DAYS + 1) * 86400
    for path in (stale, other):
        os.utime(path, (old, old))
    native.build(source, FLAGS)
    assert not stale.exists() and recent.exists() and other.exists()  # only its own source's builds


def test_a_failed_transforms_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build = native.build
    monkeypatch.setattr(native, "build", lambda source, flags: build(source, [*flags, "-fno-such-flag"]))
    winograd.transforms.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="(?s)Winograd transforms could not be built.*no-such-flag.*Fix"):
            assert winograd.transforms() is None
        assert not list(tmp_path.rglob("*.so"))  # nothing half-written left in the cache
        weight = torch.randn(8, 8, 3, 3, dtype=torch.float64)
        x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
        got = winograd.winograd_conv3x3(x.float(), winograd.transform_filters(weight.float()))
        torch.testing.assert_close(got.double(), torch.nn.functional.conv2d(x, weight, padding=1), rtol=0, atol=1e-4)
        with pytest.raises(ValueError, match="did not build"):
            winograd.winograd_conv3x3(x.float(), winograd.transform_filters(weight.float()), fused_transforms=True)
    finally:
        winograd.transforms.cache_clear()


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
@torch.no_grad()
def test_the_transforms_built_for_older_cpus_compute_the_same(march, monkeypatch, tmp_path):
    """winograd.cpp is portable C++: built for the x86-64 baseline (SSE2) or for AVX2 + FMA (x86-64-v3) instead of
    this CPU, it computes the same convolution; with FMA (as -march=native has on any CPU since 2013) the same bits."""
    if march == "x86-64-v3" and not {"avx2", "fma"} <= native.cpu_flags():
        pytest.skip("this CPU cannot run an AVX2 + FMA build")
    if winograd.transforms() is None:
        pytest.skip("no compiled transforms here")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 13, 9, generator=g)
    weight, bias = torch.randn(24, 40, 3, 3, generator=g), torch.randn(24, generator=g)
    results = {}
    for algorithm in (winograd.F2x2, winograd.F4x4):
        filters = winograd.transform_filters(weight, algorithm)
        results[algorithm.m] = winograd.winograd_conv3x3(x, filters, bias, fused_transforms=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    build = native.build
    monkeypatch.setattr(native, "build", lambda source, flags: build(
        source, [f"-march={march}" if flag == "-march=native" else flag for flag in flags]))
    winograd.transforms.cache_clear()
    try:
        for algorithm in (winograd.F2x2, winograd.F4x4):
            filters = winograd.transform_filters(weight, algorithm)
            got = winograd.winograd_conv3x3(x, filters, bias, fused_transforms=True)
            if march == "x86-64-v3":
                assert torch.equal(got, results[algorithm.m])
            else:  # no FMA: products and sums rounded apart
                torch.testing.assert_close(got, results[algorithm.m], rtol=1e-5, atol=1e-4)
        assert len(list(tmp_path.rglob("winograd-*.so"))) == 1
    finally:
        winograd.transforms.cache_clear()


def test_environment_switches_turn_the_kernels_off(monkeypatch):
    from latentdiff.models import amx, group_norm

    monkeypatch.setenv("LATENTDIFF_NO_AMX", "1")
    assert amx.unavailable() == amx.unavailable(amx.AVX512_CPU_FLAGS) == "LATENTDIFF_NO_AMX is set"
    assert native.unavailable() is None
    monkeypatch.setenv("LATENTDIFF_NO_KERNELS", "1")
    assert native.unavailable() == amx.unavailable() == "LATENTDIFF_NO_KERNELS is set"
    for cached in (winograd.transforms, group_norm._cpu_kernel):
        cached.cache_clear()
    try:
        assert winograd.transforms() is None and group_norm._cpu_kernel() is None
    finally:
        for cached in (winograd.transforms, group_norm._cpu_kernel):
            cached.cache_clear()
