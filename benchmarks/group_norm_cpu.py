"""Our compiled CPU GroupNorm (latentdiff/models/group_norm.py's group_norm() on float32 CPU tensors: group_norm.cpp)
against torch's GroupNorm + SiLU (and the bias add before it), NCHW and channels-last: median milliseconds (calls
interleaved) and each one's largest error against float64. Inference (no autograd): per activation shape of SD 1.5's
U-Net (batch 2), its VAE decoder and pipelines/tiny-shapes' VAE decoder (batch 1). Training (--train, or --only-train):
forward and backward with gradients for x, the bias and the norm's weights, at SD 1.5's U-Net shapes at batch 2 and
pipelines/tiny-shapes' U-Net at the training benchmark's batch 32 (benchmarks/train_step.py); the error is the largest
of the output's and the gradients', each relative to its largest float64 value.

    python benchmarks/group_norm_cpu.py [--threads 2] [--repeats 9] [--train | --only-train]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common import median_times, start_kernel_benchmark
from latentdiff.models import group_norm as gn
from latentdiff.models import native

# (batch, channels, height, width): U-Net 64x64 and 32x32 levels, the VAE decoder from 64x64 to 512x512, and
# pipelines/tiny-shapes' VAE decoder (small maps, where per-call costs and the kernel's vector code show)
SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (1, 512, 64, 64), (1, 512, 128, 128),
          (1, 512, 256, 256), (1, 256, 256, 256), (1, 256, 512, 512), (1, 128, 512, 512), (1, 64, 16, 16),
          (1, 64, 32, 32), (1, 32, 64, 64), (1, 32, 128, 128)]
# training: SD 1.5's U-Net at batch 2, 64x64 latents; the tiny-shapes U-Net at batch 32, 16x16 latents
TRAIN_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (32, 64, 16, 16),
                (32, 160, 16, 16), (32, 96, 8, 8), (32, 128, 4, 4)]


def case(shape: tuple, channels_last: bool):
    x = 2 * torch.randn(shape) + 1
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    norm = torch.nn.GroupNorm(32, shape[1], eps=1e-6)
    norm.weight.data.normal_(1, 0.2)
    norm.bias.data.normal_(0, 0.2)
    return x, norm, torch.randn(shape[0], shape[1])


def exact(x, norm, shift):
    return F.silu(F.group_norm(x + shift[:, :, None, None], 32, norm.weight.double(), norm.bias.double(), norm.eps))


@torch.no_grad()
def inference(args) -> None:
    print("inference: shape  layout  torch ms  ours ms  ours vs torch  err torch  err ours")
    for shape in SHAPES:
        for channels_last in (False, True):
            x, norm, shift = case(shape, channels_last)
            calls = {"torch": lambda: F.silu(norm(x + shift[:, :, None, None])),
                     "ours": lambda: gn.group_norm(norm, x, silu=True, shift=shift)}
            reference = exact(x.double(), norm, shift.double())
            errors = {name: (fn().double() - reference).abs().max().item() for name, fn in calls.items()}
            del reference
            t = {k: v * 1e3 for k, v in median_times(calls, args.repeats).items()}
            print(f"{str(shape):20s}  {'NHWC' if channels_last else 'NCHW':6s}  {t['torch']:8.2f}  {t['ours']:7.2f}"
                  f"  {t['torch'] / t['ours']:12.2f}x  {errors['torch']:9.1e}  {errors['ours']:8.1e}", flush=True)


def train(args) -> None:
    print("\ntraining (forward + backward): shape  layout  torch ms  ours ms  ours vs torch  err torch  err ours")
    for shape in TRAIN_SHAPES:
        for channels_last in (False, True):
            x, norm, shift = case(shape, channels_last)
            grad = torch.randn(shape).contiguous(memory_format=torch.channels_last if channels_last
                                                 else torch.contiguous_format)  # (x's layout, as a conv's backward's)
            leaves = [t.requires_grad_(True) for t in (x, shift, norm.weight, norm.bias)]

            def step(forward):
                for t in leaves:
                    t.grad = None
                forward().backward(grad)

            def outputs(forward):
                out = forward()
                out.backward(grad)
                result = [out.detach()] + [t.grad.clone() for t in leaves]
                for t in leaves:
                    t.grad = None
                return result

            calls = {"torch": lambda: F.silu(norm(x + shift[:, :, None, None])),
                     "ours": lambda: gn.group_norm(norm, x, silu=True, shift=shift)}
            assert type(calls["ours"]().grad_fn).__name__ == "_CompiledGroupNormBackward"
            doubles = [t.detach().double().requires_grad_(True) for t in leaves]
            out = F.silu(F.group_norm(doubles[0] + doubles[1][:, :, None, None], 32, doubles[2], doubles[3], norm.eps))
            out.backward(grad.double())
            reference = [out.detach()] + [t.grad for t in doubles]
            errors = {name: max(((a.double() - b).abs().max() / b.abs().max()).item()
                                for a, b in zip(outputs(fn), reference)) for name, fn in calls.items()}
            del reference, doubles, out
            t = {k: v * 1e3 for k, v in median_times({name: (lambda fn: lambda: step(fn))(fn)
                                                     for name, fn in calls.items()}, args.repeats).items()}
            print(f"{str(shape):20s}  {'NHWC' if channels_last else 'NCHW':6s}  {t['torch']:8.2f}  {t['ours']:7.2f}"
                  f"  {t['torch'] / t['ours']:12.2f}x  {errors['torch']:9.1e}  {errors['ours']:8.1e}", flush=True)


def main() -> None:
    def options(parser):
        parser.add_argument("--train", action="store_true", help="also forward + backward at training shapes")
        parser.add_argument("--only-train", action="store_true", help="only the training table")

    args = start_kernel_benchmark(__doc__, 9, lambda: None if gn._cpu_kernel() else native.unavailable()
                                  or "the CPU kernel did not build here (see the warning)", options)
    if args is None:
        return
    if not args.only_train:
        inference(args)
    if args.train or args.only_train:
        train(args)


if __name__ == "__main__":
    main()
