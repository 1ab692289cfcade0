"""Few-step sampling of the embedded pipeline with the LCMScheduler, with and without an LCM-LoRA distilled from it
(training/configs/tiny_shapes_lcm_lora.yaml). For each of the 150 held-out prompts (SHAPES.md) and its seed, the
reference is the frozen pipeline's own guided image (25 DPM-Solver++ steps, guidance 5) from the same starting
noise; each few-step variant is scored by

- prompt adherence: the analyzer's accuracies (SHAPES.md's protocol, data/analyze.py), `all` = every attribute;
- closeness to the reference from the same noise: mean absolute pixel difference (0-255), which is what consistency
  distillation trains for (land where the guided trajectory ends), and the ratio of the image's high-frequency
  energy (mean squared Laplacian) to the reference's: a blurred image (a 1-step x0 estimate) is well below 1.

    python benchmarks/lcm_shapes.py --lora out/tiny-shapes-lcm-lora/lora [--n 150] [--threads 2]
"""
from __future__ import annotations

import time

import numpy as np
import torch
from common import parse_shapes_benchmark_args


def laplacian_energy(images: np.ndarray) -> np.ndarray:
    """Mean squared 4-neighbour Laplacian of each image [N, H, W, C] in 0-255."""
    x = images.astype(np.float64)
    lap = (4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:])
    return (lap**2).mean(axis=(1, 2, 3))


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser) -> None:
        parser.add_argument("--lora", default=None, help="an LCM-LoRA for --model (a folder or .safetensors file)")
        parser.add_argument("--n", type=int, default=150, help="held-out prompts to draw (of 150)")
        parser.add_argument("--steps", default="1,2,4", help="LCMScheduler step counts to score")

    args = parse_shapes_benchmark_args(__doc__, argv, add_arguments)
    from latentdiff import LatentDiffusionPipeline
    from latentdiff.data.analyze import analyze, score
    from latentdiff.data.shapes import heldout_prompts
    from latentdiff.schedulers import scheduler_from_name

    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    pairs = heldout_prompts()[:args.n]
    prompts, specs = [p for p, _ in pairs], [s for _, s in pairs]
    size = pipe.unet.config.sample_size
    noise = [torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(i))
             for i in range(len(prompts))]

    def draw(steps: int, guidance: float, sampler: str, batch: int = 25) -> tuple[np.ndarray, float]:
        pipe.scheduler = scheduler_from_name(sampler, pipe.scheduler.config)
        started, out = time.perf_counter(), []
        for i in range(0, len(prompts), batch):
            out.append(pipe(prompts[i:i + batch], latents=torch.cat(noise[i:i + batch]), num_inference_steps=steps,
                            guidance_scale=guidance, output_type="np", progress=False,
                            generator=[torch.Generator().manual_seed(j) for j in range(i, i + len(noise[i:i + batch]))]
                            ).images)
        return (np.concatenate(out) * 255).round(), (time.perf_counter() - started) / len(prompts)

    def row(name: str, images: np.ndarray, seconds: float, reference: np.ndarray) -> str:
        from PIL import Image

        scores = score([(spec, analyze(Image.fromarray(im.astype(np.uint8)))) for spec, im in zip(specs, images)])
        distance = np.abs(images - reference).mean()
        sharpness = np.median(laplacian_energy(images) / laplacian_energy(reference))
        return (f"| {name} | {100 * scores['shape']:.1f}% | {100 * scores['colour']:.1f}% | {100 * scores['all']:.1f}% "
                f"| {distance:.1f} | {sharpness:.2f} | {1000 * seconds:.0f} ms |")

    reference, seconds = draw(25, 5.0, "dpm++")
    lines = [f"| {len(prompts)} held-out prompts | shape | colour | all | pixel distance to the reference | "
             "high-frequency energy / reference's | time per image |", "|---|---:|---:|---:|---:|---:|---:|",
             row("reference: 25 DPM-Solver++ steps, guidance 5", reference, seconds, reference)]
    counts = [int(s) for s in args.steps.split(",")]
    variants = [("LCMScheduler", None)] + ([("with the LCM-LoRA", args.lora)] if args.lora else [])
    for name, lora in variants:
        if lora:
            pipe.load_lora_weights(lora)
        for steps in counts:
            label = f"{name}, {steps} step{'s' * (steps > 1)}, guidance 1"
            lines.append(row(label, *draw(steps, 1.0, "lcm"), reference))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
