"""An experiment, not (yet) part of latentdiff: what a hand-written AMX attention kernel (attention_amx.cpp, built
here with g++) buys over PyTorch's scaled_dot_product_attention (its CPU flash kernel) on the attention shapes of
SD 1.5's U-Net in bfloat16, batch 2. Prints, per shape: the largest error of both against a float64 reference,
their largest difference, the median times and the ratio. Needs Linux on x86-64 with AMX and avx512_bf16, and g++.

    python benchmarks/attention_amx.py [--threads 2] [--repeats 5]

Why: SDPA's 64x64 self-attention (2 x 8 heads x 4096 tokens x 40 dims) takes ~41% of our bf16 U-Net forward on a
2-core AMX host, and its time is little more at head dim 40 than at 8 (~102 vs ~87 ms): not its matrix products but
its softmax and overheads. See the kernel's comments for its layout and this file's end for what it measured.
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine, setup, time_interleaved

FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
         "-mamx-tile", "-mamx-bf16", "-mfma"]
# (batch, heads, queries, keys, head dim): SD 1.5 U-Net's self- and cross-attention at 64x64, 32x32, 16x16 latents
SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
          (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (1, 3, 50, 33, 24)]


def missing() -> str | None:
    """Why the kernel cannot run here, or None."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return "no /proc/cpuinfo (not Linux)"
    need = {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw", "avx512vl"} - flags
    if need:
        return f"this CPU lacks {', '.join(sorted(need))}"
    if shutil.which("g++") is None:
        return "no g++ on PATH"
    return None


def build(folder: Path) -> ctypes.CDLL:
    source = Path(__file__).with_name("attention_amx.cpp")
    library = folder / "attention_amx.so"
    subprocess.run(["g++", *FLAGS, "-o", str(library), str(source), "-lpthread"], check=True)
    lib = ctypes.CDLL(str(library))
    if lib.amx_request() != 0:
        raise SystemExit("the kernel refused: Linux did not grant the AMX tile state (arch_prctl)")
    lib.amx_attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_void_p, ctypes.c_float,
                                                                                 ctypes.c_int]
    return lib


def amx_attention(lib, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for bfloat16 [B, H, N, d] views with unit stride along d; the result is a
    [B, H, N, d] view of a [B, N, H, d] tensor (as the U-Net's next reshape wants it)."""
    b, h, n, d = q.shape
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16 and d % 2 == 0
    assert q.stride(3) == k.stride(3) == v.stride(3) == 1
    out = torch.empty(b, n, h, d, dtype=q.dtype).transpose(1, 2)
    strides = torch.tensor([s for t in (q, k, v, out) for s in t.stride()[:3]], dtype=torch.int64)
    lib.amx_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, n, k.shape[2], d,
                      strides.data_ptr(), d ** -0.5, torch.get_num_threads())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup(args.threads)
    print(machine())
    why = missing()
    if why:
        print(f"skipped: {why}")
        return
    with tempfile.TemporaryDirectory() as folder:
        lib = build(Path(folder))
        print("shape (B, H, N, Nk, d)      err sdpa  err amx   sdpa-amx  sdpa ms  amx ms  amx vs sdpa")
        for b, h, n, nk, d in SHAPES:
            def tokens(count):  # [B, H, count, d] views of [B, count, H * d], as the U-Net's attention makes them
                return torch.randn(b, count, h * d).bfloat16().unflatten(-1, (h, d)).transpose(1, 2)
            q, k, v = tokens(n), tokens(nk), tokens(nk)
            exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
            ours, sdpa = amx_attention(lib, q, k, v), F.scaled_dot_product_attention(q, k, v)
            timings = time_interleaved({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                                        "amx": lambda: amx_attention(lib, q, k, v)}, args.repeats, progress=False)
            t_sdpa, t_amx = (timings[name].median * 1e3 for name in ("sdpa", "amx"))
            print(f"{str((b, h, n, nk, d)):27} {(sdpa.double() - exact).abs().max():.2e}  "
                  f"{(ours.double() - exact).abs().max():.2e}  {(sdpa.double() - ours.double()).abs().max():.2e}  "
                  f"{t_sdpa:7.2f}  {t_amx:6.2f}  {t_sdpa / t_amx:.2f}x")


if __name__ == "__main__":
    sys.exit(main())

# Measured 2026-12-04 (session 20) on the 2-core Intel Xeon with AMX, 2 threads, torch 2.14.1, this script:
# (2, 8, 4096, 4096, 40) SDPA 105.2 ms, AMX 93.2 (1.13x; separate runs 82-95 vs 100-106 ms); cross-attention at
# 64x64 12.0 vs 8.3, 32x32 self 12.6 vs 12.3, 16x16 self 5.5 vs 3.8; errors against float64 equal to SDPA's. Run
# alone (not interleaved), SDPA's small shapes are much faster (16x16 self: 0.9-1.0 ms against this kernel's
# 1.8-2.4): the kernel's own threads (std::thread, started per call) compete with PyTorch's OpenMP workers, which
# spin for a while after each parallel region, so it slows the PyTorch ops around it too. A product version needs
# PyTorch's thread pool (a C++ extension with at::parallel_for) rather than its own threads.
# Where one thread's time goes (rdtsc around the phases, 64x64 self-attention): Q K^T 50-63 ms, softmax 64-85 ms,
# P V 29-38 ms, packing 6 ms. The tile products run at ~150 multiply-adds per cycle, far from AMX's peak: with head
# dim 40 each 16x16 score tile takes only two tile products (the depth padded to 64) and is stored at once, so the
# tiles' latency, not their throughput, bounds Q K^T (keeping the queries in tiles or the keys in L1 did not help;
# neither did skipping the stores). Ways on: a depth-8 tail tile instead of padding 40 to 64, interleaving the P V
# products of one chunk with the Q K^T of the next, a cheaper exp2 and one pass less in the softmax.
