"""GroupNorm + SiLU on a GPU: torch's modules against our fused Triton kernels (latentdiff.models.group_norm), on
the activation shapes of SD 1.5's U-Net (512x512, batch 4 with guidance: 8 samples) and VAE decoder, fp16.

    python benchmarks/gpu_group_norm.py [--batch 8] [--dtype float16] [--iters 50] [--gpu-time] [--sweep]
                                        [--one-program ELEMENTS] [--host-time]

Per shape and memory layout (NCHW, channels_last): microseconds per call of silu(norm(x + shift)) (the ResNet
block's second norm, the shift being its timestep bias; the U-Net rows) or silu(norm(x)) (the VAE rows), and the
bandwidth that is (one read of x, one write of the output) in GB/s, and which form the kernels take (one program per
group or slices: `_one_program`); for the U-Net rows also the spatial transformer's norm of an NCHW activation
turned into [N, H*W, C] tokens: torch's GroupNorm and a copy, ours and a copy, ours writing channels-last (no copy,
`group_norm(..., channels_last=True)`). torch's GroupNorm on a channels_last input copies it to NCHW and back (cuDNN's
convolutions want channels_last for fp16, so that is the layout a channels_last model hands it). CUDA events, median
of --iters calls after warm-up; the host's time to launch the kernels counts where the GPU would wait for it (small
shapes). --gpu-time times 10 calls captured in a CUDA graph instead: the kernels alone. --sweep then times the
kernels under other launch settings (group_norm.LaunchSettings: elements per load, programs per multiprocessor,
warps), GPU time, and prints the best per shape beside the defaults', for choosing the defaults. --host-time instead
measures what each path costs the host per call (on a tiny input, where the GPU waits for the launches), with the
kernels launched through their compiled forms (models/triton_launch.py) and through Triton's own launch: the launch
overhead that decides small batches.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from common import print_table

UNET = [(320, 64), (960, 64), (640, 32), (1920, 32), (1280, 16), (2560, 16), (1280, 8), (2560, 8)]
VAE = [(512, 64), (512, 128), (512, 256), (256, 256), (256, 512), (128, 512)]


def time_us(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def time_graph_us(fn, iters: int, calls: int = 10) -> float:
    """GPU time of one call: `calls` calls captured in a CUDA graph, replayed (no host launches in the timing)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_us(graph.replay, iters) / calls


def sweep(cases, iters: int) -> None:
    """Kernel time of every case under each combination of launch settings; the best beside the defaults'."""
    import itertools

    from latentdiff.models import group_norm as gn

    default = gn.SETTINGS
    grid = [dataclasses.replace(default, block=b, programs_per_sm=p, num_warps=w)
            for b, p, w in itertools.product((1024, 2048, 4096), (4, 16), (4, 8))]
    rows = []
    for name, x, norm, shift in cases:
        timings = {}
        for settings in grid:
            gn.SETTINGS = settings
            try:
                timings[settings] = time_graph_us(lambda: gn._triton_group_norm(x, norm, True, shift), iters)
            finally:
                gn.SETTINGS = default
        best = min(timings, key=timings.get)
        base = timings.get(default) or time_graph_us(lambda: gn._triton_group_norm(x, norm, True, shift), iters)
        rows.append({"case": name, "default us": f"{base:.1f}", "best us": f"{timings[best]:.1f}",
                     "best block/programs per SM/warps": f"{best.block}/{best.programs_per_sm}/{best.num_warps}",
                     "gain": f"{base / timings[best]:.2f}x"})
        print("  " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    print_table(rows, list(rows[0]))


def host_time(dtype: torch.dtype, calls: int = 500) -> None:
    """Microseconds of host time per call of each path on a [2, 320, 8, 8] input (SD 1.5's U-Net at 64x64 latents
    and batch 1 with guidance has 2 samples; 8x8 keeps the GPU's part to a few microseconds): the time to issue
    `calls` calls back to back, the GPU running behind."""
    from latentdiff.models import group_norm as gn
    from latentdiff.models import triton_launch

    norm = torch.nn.GroupNorm(32, 320, eps=1e-5).cuda().to(dtype)
    x = torch.randn(2, 320, 8, 8, device="cuda", dtype=dtype)
    shift = torch.randn(2, 320, device="cuda", dtype=dtype)
    one_program = gn._one_program

    def kernels(single: bool, direct: bool = True):
        def call():
            gn._one_program, triton_launch.DIRECT = (lambda x, groups: single), direct
            try:
                return gn._triton_group_norm(x, norm, True, shift)
            finally:
                gn._one_program, triton_launch.DIRECT = one_program, True
        return call

    paths = {
        "torch: add, GroupNorm, SiLU (3 launches)": lambda: F.silu(norm(x + shift[:, :, None, None])),
        "torch: GroupNorm, SiLU (2)": lambda: F.silu(norm(x)),
        "torch: GroupNorm (1)": lambda: norm(x),
        "ours, one program (1)": kernels(True),
        "ours, slices (2)": kernels(False),
        "ours, one program, Triton's own launch (1)": kernels(True, direct=False),
        "ours, slices, Triton's own launches (2)": kernels(False, direct=False),
        "group_norm() as the U-Net calls it": lambda: gn.group_norm(norm, x, silu=True, shift=shift),
    }
    rows = []
    for name, fn in paths.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, time.perf_counter() - start)
            torch.cuda.synchronize()
        rows.append({"path": name, "host us per call": f"{best / calls * 1e6:.1f}"})
        print("  " + ", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    print_table(rows, list(rows[0]))


@torch.no_grad()
def main() -> None:
    from latentdiff.models import group_norm as gn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="samples in the U-Net rows (8: batch 4 with guidance)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--gpu-time", action="store_true", help="time the kernels alone (CUDA graph replays)")
    parser.add_argument("--sweep", action="store_true", help="then sweep the kernels' launch settings")
    parser.add_argument("--one-program", type=int, default=None, metavar="ELEMENTS",
                        help="LaunchSettings.one_program (0: every group split over two launches)")
    parser.add_argument("--host-time", action="store_true", help="only the host's time per call of each path")
    args = parser.parse_args()
    if args.host_time:
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.dtype}", flush=True)
        return host_time(getattr(torch, args.dtype))
    if args.one_program is not None:
        gn.SETTINGS = dataclasses.replace(gn.SETTINGS, one_program=args.one_program)
    timer = time_graph_us if args.gpu_time else time_us
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.dtype}; {gn.SETTINGS}",
          flush=True)
    rows, cases = [], []
    for model, shapes, batch in (("U-Net", UNET, args.batch), ("VAE", VAE, 1)):
        for channels, side in shapes:
            norm = torch.nn.GroupNorm(32, channels, eps=1e-5).cuda().to(dtype)
            x = torch.randn(batch, channels, side, side, device="cuda", dtype=dtype)
            shift = torch.randn(batch, channels, device="cuda", dtype=dtype) if model == "U-Net" else None
            gbytes = 2 * x.numel() * x.element_size() / 1e9
            row = {"model": model, "shape": f"{batch}x{channels}x{side}x{side}"}
            for layout in ("NCHW", "channels_last"):
                xl = x.contiguous(memory_format=torch.channels_last) if layout != "NCHW" else x

                def plain():
                    y = xl + shift[:, :, None, None] if shift is not None else xl
                    return F.silu(norm(y))

                fused = lambda: gn._triton_group_norm(xl, norm, True, shift)  # noqa: E731
                err = (plain().float() - fused().float()).abs().max().item()
                t_plain, t_fused = timer(plain, args.iters), timer(fused, args.iters)
                tag = "NCHW" if layout == "NCHW" else "CL"
                if (model == "U-Net") == (layout != "NCHW"):  # the layouts the kernels run on by default
                    cases.append((f"{model} {row['shape']} {tag}", xl, norm, shift))
                row[f"torch {tag} us"] = f"{t_plain:.0f}"
                row[f"fused {tag} us"] = f"{t_fused:.0f} ({gbytes / t_fused * 1e6:.0f} GB/s)"
                row[f"{tag} speed-up"] = f"{t_plain / t_fused:.2f}x"
                row[f"{tag} max|diff|"] = f"{err:.1e}"
                row[f"{tag} form"] = "one program" if gn._one_program(xl, 32) else "slices"
            if model == "U-Net":  # the spatial transformer's norm of an NCHW activation, then [N, H*W, C] tokens
                tokens = lambda y: y.flatten(2).transpose(1, 2).contiguous()  # noqa: E731
                t_copy = timer(lambda: tokens(gn._triton_group_norm(x, norm, False, None)), args.iters)
                t_direct = timer(lambda: tokens(gn._triton_group_norm(x, norm, False, None, True)), args.iters)
                row["tokens: torch + copy us"] = f"{timer(lambda: tokens(norm(x)), args.iters):.0f}"
                row["ours NCHW + copy us"] = f"{t_copy:.0f}"
                row["ours written as tokens us"] = f"{t_direct:.0f} ({t_copy / t_direct:.2f}x)"
            rows.append(row)
            print("  " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print_table(rows, list(rows[0]))
    if args.sweep:
        sweep(cases, args.iters)


if __name__ == "__main__":
    main()
