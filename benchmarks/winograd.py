"""Winograd 3x3 convolutions (latentdiff/models/packed.py's WinogradConv2d, float32) by each of its paths against
the packed direct conv it falls back to, per layer shape: the transforms by PyTorch's elementwise ops ("torch") or
by our compiled kernels (winograd.cpp, "compiled"), the products by torch.bmm, or on AMX tiles where this CPU has
them ("amx", whose direct conv is AMX's too: amx_layers.AmxConv2d). Prints median times (calls interleaved), direct /
Winograd, and what packed.winograd_pays chooses. Then the upsamplers' convs: the four upsampling phases (what
packed.py picks without Winograd: AmxUpsampleConv on AMX, else PackedUpsampleConv) against Winograd on the upsampled
map, read by the compiled input transform without being made (WinogradUpsampleConv).

    python benchmarks/winograd.py [--threads 2] [--repeats 20] [--march haswell] [--upsamplers]

`--march` builds the compiled transforms for another x86-64 level than this CPU's (-march=native); with
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 in the environment (and --march haswell) an AVX-512 host
stands in for an AVX2 one.
"""
from __future__ import annotations

import argparse

import torch

from common import machine, median_times, setup
from latentdiff.models import amx, amx_layers, native, packed, winograd

# (batch, channels, side): SD 1.5 at 512 px (U-Net 64..8, VAE decoder 64..512, batch 2 / 1), smaller images' and
# tiny-shapes' sizes, and the corners of winograd_pays' rules
SHAPES = [(2, 320, 64), (2, 640, 32), (2, 1280, 16), (2, 1280, 8), (1, 512, 64), (1, 256, 256), (1, 128, 512),
          (2, 320, 32), (2, 640, 16), (2, 128, 16), (2, 64, 32), (2, 64, 16), (2, 96, 8), (2, 640, 4),
          (2, 1280, 4), (1, 32, 128)]
# (batch, channels, side of the input) of upsamplers: SD 1.5's U-Net (8, 16, 32 -> 2x) and VAE decoder (64, 128, 256),
# and narrower ones
UPSAMPLERS = [(2, 1280, 8), (2, 1280, 16), (2, 640, 32), (1, 512, 64), (1, 512, 128), (1, 256, 256), (2, 320, 16),
              (2, 256, 16), (2, 128, 32), (2, 64, 16)]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--upsamplers", action="store_true", help="only the upsamplers' convs")
    parser.add_argument("--march", default=None, help="build the compiled transforms with -march=MARCH")
    args = parser.parse_args()
    setup(args.threads)
    print(machine())
    if args.march:
        build = native.build
        native.build = lambda source, flags: build(source, [f"-march={args.march}" if f == "-march=native" else f
                                                            for f in flags])
    paths = ["torch"] + (["compiled"] if winograd.transforms() is not None else [])
    print(f"paths: {', '.join(paths)}" + ("" if amx.available() else f" (no AMX: {amx.unavailable() or 'no build'})")
          + ("" if "compiled" in paths else f" (no compiled transforms: {native.unavailable() or 'no build'})"))
    print("batch  ch    side  GFLOP  direct us  " + "  ".join(f"{p:>8} us  direct/{p:<8}" for p in paths)
          + ("  amx direct us       amx us  amx direct/amx  " if amx.available() else "  ") + "pays")
    for n, c, side in [] if args.upsamplers else SHAPES:
        conv = torch.nn.Conv2d(c, c, 3, padding=1).eval()
        x = torch.randn(n, c, side, side).contiguous(memory_format=torch.channels_last)
        direct = packed.PackedConv2d(conv)
        filters = winograd.transform_filters(conv.weight, winograd.F2x2 if c * c * 9 > packed.F4X4_MAX_FILTER
                                             else winograd.F4x4)
        calls = {"direct": lambda: direct(x)}
        for path in paths:
            calls[path] = lambda path=path: winograd.winograd_conv3x3(x, filters, conv.bias,
                                                                     fused_transforms=path == "compiled")
        if amx.available():
            layer, amx_direct = packed.WinogradConv2d(conv), amx_layers.AmxConv2d(conv)
            calls["amx"] = lambda: winograd.winograd_conv3x3(x, layer.weight, layer.bias, layer._points, c)
            calls["amx direct"] = lambda: amx_direct(x)
        t = {k: v * 1e6 for k, v in median_times(calls, args.repeats).items()}
        pays = ", ".join(p for p in ("torch", "compiled", "amx") if packed.winograd_pays(x.shape, c, p))
        row = f"{n:5d}  {c:4d}  {side:4d}  {18 * n * side * side * c * c / 1e9:5.2f}  {t['direct']:9.0f}  "
        row += "  ".join(f"{t[p]:11.0f}  {t['direct'] / t[p]:15.2f}" for p in paths)
        if amx.available():
            row += f"  {t['amx direct']:13.0f}  {t['amx']:11.0f}  {t['amx direct'] / t['amx']:14.2f}"
        print(f"{row}  {pays or '-'}", flush=True)
    if winograd.transforms() is not None:
        upsamplers(args.repeats)


def upsamplers(repeats: int) -> None:
    print("\nupsampler convs: batch  ch    side in  phases us  Winograd us  phases/Winograd  "
          "WinogradUpsampleConv takes it")
    for n, c, side in UPSAMPLERS:
        conv = torch.nn.Conv2d(c, c, 3, padding=1).eval()
        x = torch.randn(n, c, side, side).contiguous(memory_format=torch.channels_last)
        phases = (amx_layers.AmxUpsampleConv if amx_layers.suits_amx_conv(conv) else packed.PackedUpsampleConv)(conv)
        layer = packed.WinogradConv2d(conv)
        calls = {"phases": lambda: phases.upsampled(x),
                 "winograd": lambda: winograd.winograd_conv3x3(x, layer.weight, layer.bias,
                                                               layer._points if layer.on_amx else None, c,
                                                               upsample=True)}
        t = {k: v * 1e6 for k, v in median_times(calls, repeats).items()}
        takes = packed.suits_winograd_upsampling(conv) and packed.winograd_pays((n, c, 2 * side, 2 * side), c,
                                                                                layer.path(x))
        print(f"{'':17}{n:5d}  {c:4d}  {side:7d}  {t['phases']:9.0f}  {t['winograd']:11.0f}  "
              f"{t['phases'] / t['winograd']:15.2f}  {'yes' if takes else 'no'}", flush=True)


if __name__ == "__main__":
    main()
