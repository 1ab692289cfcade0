"""Time one guided ControlNet step, ours against diffusers, in one process: Stable Diffusion 1.5's U-Net and a
ControlNet for it (random weights, the same tensors in both), latents 4xSxS (S = 64: 512 px), a control image of
8S x 8S, the unconditional and conditional prompt. diffusers runs as its StableDiffusionControlNetPipeline does
(ControlNet on the doubled batch, then the U-Net with its residuals); ours as LatentDiffusionControlNetPipeline's
denoising loop calls it (pipeline_controlnet.ControlledUNet: the latents and the control image once for both
prompts).

    python benchmarks/controlnet.py [--quick] [--size 64] [--dtypes fp32,bf16] [--repeats 3] [--threads N]

Variants: diffusers, ours (eager), ours-opt (U-Net and ControlNet after `optimize_for_inference()`). Prints seconds
per step (median, best), speed relative to diffusers, and the largest difference of the guided outputs from
diffusers'.
"""
from __future__ import annotations

import argparse

import torch

from common import parse_model_benchmark_args, print_table, time_interleaved, twins

VARIANTS = ("diffusers", "ours", "ours-opt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32x32 latents, 2 repeats")
    parser.add_argument("--size", type=int, default=64, help="latent side (64: 512 px images)")
    parser.add_argument("--dtypes", default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parse_model_benchmark_args(parser, VARIANTS, DTYPES)
    import diffusers

    from latentdiff.models.controlnet import ControlNetConfig, ControlNetModel
    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig
    from latentdiff.pipeline_controlnet import ControlledUNet

    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        ref_unet, our_unet = twins(diffusers.UNet2DConditionModel, UNet2DConditionModel, UNetConfig.sd15(), dtype,
                                   "diffusers U-Net")
        ref_net, our_net = twins(diffusers.ControlNetModel, ControlNetModel,
                                 ControlNetConfig.from_unet(UNetConfig.sd15()), dtype, "diffusers ControlNet")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, args.size, args.size, generator=g).to(dtype)
        context = torch.randn(2, 77, 768, generator=g).to(dtype)
        image = torch.rand(1, 3, 8 * args.size, 8 * args.size, generator=g).to(dtype)
        t = torch.tensor(500)

        def diffusers_step():
            doubled = torch.cat([x, x])
            down, mid = ref_net(doubled, t, context, torch.cat([image, image]), return_dict=False)
            return ref_unet(doubled, t, context, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample

        calls = {"diffusers": diffusers_step}
        for name in args.variants:
            if name.startswith("ours"):
                unet, net = our_unet(), our_net()
                if name == "ours-opt":
                    unet.optimize_for_inference()
                    net.optimize_for_inference()
                calls[name] = ControlledUNet(unet, [net], [image], [[1.0]], guess_mode=False)
        steps = {name: (lambda call=call: call(x, t, context)) if name != "diffusers" else call
                 for name, call in calls.items()}
        with torch.no_grad():  # (ControlledUNet keeps its last step's scales for any later call: 1 throughout)
            expected = diffusers_step()
            errors = {name: (step() - expected).abs().max().item() for name, step in steps.items()}
            timings = time_interleaved(steps, args.repeats)
        base = timings["diffusers"].median
        for name, timing in timings.items():
            rows.append({"dtype": dtype_name, "variant": name, "median s": f"{timing.median:.3f}",
                         "best s": f"{timing.best:.3f}", "vs diffusers": f"{base / timing.median:.2f}x",
                         "max |diff|": f"{errors.get(name, 0.0):.1e}"})
    print_table(rows, ["dtype", "variant", "median s", "best s", "vs diffusers", "max |diff|"])


if __name__ == "__main__":
    main()
