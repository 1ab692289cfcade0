"""Building our C++ kernels (amx.cpp, fma.cpp, winograd.cpp, group_norm.cpp): compiled with the system's g++ on first
use (a second or two) into latentdiff's cache folder ($XDG_CACHE_HOME or ~/.cache, then latentdiff/), keyed by the
source, the headers beside it, the flags and, for -march=native builds, the CPU, and loaded with ctypes. Libraries no
process has loaded for a month are removed when another one is built."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
UNUSED_DAYS = 30
# for the portable kernels (winograd.cpp, group_norm.cpp): vectorised for this CPU, contracted into FMAs
PORTABLE_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-Wno-psabi", "-shared", "-fPIC", "-std=c++17",
                  "-fopenmp"]


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentdiff"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    return set(_cpuinfo("flags").split())


def unavailable() -> str | None:
    """Why no kernel can be built here, or None when g++ can build them. LATENTDIFF_NO_KERNELS=1 (read when a
    library is first wanted) turns all of them off: PyTorch's ops everywhere, to rule them out or to measure what they
    bring; LATENTDIFF_NO_AMX=1 only the AMX ones (amx.py, and its AVX-512 attention build)."""
    if os.environ.get("LATENTDIFF_NO_KERNELS", "0") not in ("", "0"):
        return "LATENTDIFF_NO_KERNELS is set"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"it needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    if shutil.which("g++") is None:
        return "no g++ on PATH to build it (install g++ 11 or newer)"
    return None


def build(source: Path, flags: list[str]) -> ctypes.CDLL:
    """`source` compiled with `flags` as a shared library (built once, then loaded from the cache). Raises OSError or
    subprocess.CalledProcessError (its stderr: the compiler's message) where it cannot be built or loaded."""
    path = library_path(source, flags)
    if path.exists():
        try:
            library = ctypes.CDLL(str(path))
        except OSError:  # damaged since it was built (builds are renamed into place whole): build it again
            path.unlink(missing_ok=True)
        else:
            with contextlib.suppress(OSError):
                os.utime(path)  # last loaded now (access times are not kept everywhere)
            return library
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as folder:  # then renamed: no half-written library
        built = Path(folder) / path.name
        subprocess.run(["g++", *flags, "-I", str(HERE), "-o", str(built), str(source)], check=True,
                       capture_output=True, text=True)
        os.replace(built, path)
    _remove_unused(source.stem)
    return ctypes.CDLL(str(path))


def load(source: Path, flags: list[str], what: str, fix: str = "a working g++") -> ctypes.CDLL | None:
    """`build(source, flags)`, or None where nothing can be built here or the build fails; a failed build warns with
    the compiler's message (`what` the library holds, PyTorch's ops run instead; `fix`: what would mend it)."""
    if unavailable():
        return None
    try:
        return build(source, flags)
    except (OSError, subprocess.CalledProcessError) as error:
        detail = (getattr(error, "stderr", None) or str(error)).strip()
        warnings.warn(f"latentdiff's {what} could not be built or loaded ({detail}); PyTorch's ops run instead. "
                      f"Fix: {fix}, a writable {cache_folder()}", RuntimeWarning, stacklevel=3)
        return None


def library_path(source: Path, flags: list[str]) -> Path:
    """Where `build` keeps `source` built with `flags`."""
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode())
    for header in sorted(HERE.glob("*.h")):
        key.update(header.read_bytes())
    if "-march=native" in flags:
        key.update((_cpuinfo("model name") + _cpuinfo("flags")).encode())
    return cache_folder() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def labelled(name: str):
    """A kernel call's label in torch.profiler's tables, while a profiler runs: a record_function costs ~5 us of
    host time even when none does, a third of a small layer's call (tiny-shapes' U-Net makes ~80 per call)."""
    return torch.profiler.record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()


def _remove_unused(stem: str) -> None:
    """Remove builds of `stem` (older sources, other CPUs sharing this home folder) that no process has loaded for
    UNUSED_DAYS days."""
    cutoff = time.time() - UNUSED_DAYS * 86400
    for old in cache_folder().glob(f"{stem}-*.so"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ('' where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
