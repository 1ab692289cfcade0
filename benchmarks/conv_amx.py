"""Our float32 convolutions on AMX tiles (latentdiff/models/amx_layers.py's AmxConv2d and AmxUpsampleConv, which
optimize_for_inference() uses on float32 models where the CPU has AMX) against oneDNN's packed direct convs
(PackedConv2d, PackedUpsampleConv: what it uses elsewhere) on the convs that Winograd leaves to a direct conv: the
stride-2 downsamplers, small maps, the upsamplers' phase convs, the narrow conv_in and conv_out (which stay with
oneDNN: see amx_layers.suits_amx_conv). Prints, per layer: the largest error of both against a float64 reference, the
median times (calls interleaved) and the ratio.

    python benchmarks/conv_amx.py [--threads 2] [--repeats 7]

Why: oneDNN's float32 convs run at the AVX-512 FMA peak at best; AMX tiles multiply bfloat16 several times faster,
and amx_linear's three parts per number keep float32's precision. Each output pixel is a row of its products, the
patch under the filter gathered as the row's depth while the inputs are split into parts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common import amx_unavailable, start_kernel_benchmark, time_interleaved
from latentdiff.models import amx
from latentdiff.models.amx_layers import AmxConv2d, AmxUpsampleConv
from latentdiff.models.packed import PackedConv2d, PackedUpsampleConv

# (name, batch, in, out, side, kernel, stride): SD 1.5 at 512 px (U-Net batch 2, VAE batch 1) and
# pipelines/tiny-shapes' U-Net (batch 2, 16x16 latents)
CONVS = [("SD 1.5 downsampler 64 -> 32", 2, 320, 320, 64, 3, 2), ("SD 1.5 downsampler 32 -> 16", 2, 640, 640, 32, 3, 2),
         ("SD 1.5 downsampler 16 -> 8", 2, 1280, 1280, 16, 3, 2), ("SD 1.5 4x4 (batch 2)", 2, 1280, 1280, 4, 3, 1),
         ("SD 1.5 conv_in", 2, 4, 320, 64, 3, 1), ("SD 1.5 conv_out", 2, 320, 4, 64, 3, 1),
         ("tiny 16x16", 2, 64, 64, 16, 3, 1), ("tiny 8x8", 2, 96, 96, 8, 3, 1), ("tiny 4x4", 2, 128, 128, 4, 3, 1),
         ("tiny downsampler", 2, 64, 64, 16, 3, 2)]
# (name, batch, channels, side of the input): the 3x3 conv after a nearest 2x upsampling
UPSAMPLERS = [("SD 1.5 U-Net 8 -> 16", 2, 1280, 8), ("SD 1.5 U-Net 16 -> 32", 2, 1280, 16),
              ("SD 1.5 U-Net 32 -> 64", 2, 640, 32), ("SD VAE 64 -> 128", 1, 512, 64),
              ("SD VAE 128 -> 256", 1, 512, 128), ("SD VAE 256 -> 512", 1, 256, 256),
              ("tiny 4 -> 8", 2, 128, 4), ("tiny 8 -> 16", 2, 96, 8)]


def compare(name: str, flops: int, exact: torch.Tensor, calls: dict, repeats: int) -> None:
    errors = [(call().double() - exact).abs().max().item() for call in calls.values()]
    timings = time_interleaved(calls, repeats, progress=False, memory=False)
    t_onednn, t_amx = (timings[key].median * 1e3 for key in calls)
    print(f"{name:28} {flops / 1e9:6.2f}  {errors[0]:.2e}    {errors[1]:.2e}  {t_onednn:9.3f}  {t_amx:7.3f}  "
          f"{t_onednn / t_amx:.2f}x", flush=True)


@torch.no_grad()
def main() -> None:
    args = start_kernel_benchmark(__doc__, 7, amx_unavailable)
    if args is None:
        return
    header = "GFLOP  err oneDNN  err AMX   oneDNN ms  AMX ms   AMX vs oneDNN"
    print(f"{'conv':28} {header}")
    for name, batch, c, n, side, kernel, stride in CONVS:
        conv = torch.nn.Conv2d(c, n, kernel, stride, kernel // 2).eval()
        x = torch.randn(batch, c, side, side).contiguous(memory_format=torch.channels_last)
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, kernel // 2)
        flops = 2 * exact.numel() * c * kernel * kernel
        onednn = PackedConv2d(conv)
        if min(c, n) < 32:  # what suits_amx_conv refuses: measured anyway, the rule's evidence
            def ours(x, packed=amx.pack_conv(conv.weight), conv=conv, n=n, kernel=kernel, stride=stride):
                return amx.conv2d(x, packed, n, (kernel, kernel), stride, (kernel // 2, kernel // 2), conv.bias)
        else:
            ours = AmxConv2d(conv)
        compare(name, flops, exact, {"onednn": lambda: onednn(x), "amx": lambda: ours(x)}, args.repeats)
    print(f"\n{'3x3 conv after 2x upsampling':28} {header}")
    for name, batch, c, side in UPSAMPLERS:
        conv = torch.nn.Conv2d(c, c, 3, padding=1).eval()
        x = torch.randn(batch, c, side, side).contiguous(memory_format=torch.channels_last)
        exact = F.conv2d(F.interpolate(x.double(), scale_factor=2.0), conv.weight.double(), conv.bias.double(),
                         padding=1)
        flops = 2 * exact.numel() * c * 9  # (the conv of the upsampled map: the phases make 16/36 of it)
        onednn, ours = PackedUpsampleConv(conv), AmxUpsampleConv(conv)
        compare(name, flops, exact, {"onednn": lambda: onednn.upsampled(x), "amx": lambda: ours.upsampled(x)},
                args.repeats)


if __name__ == "__main__":
    main()
