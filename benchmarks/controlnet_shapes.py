"""Does a ControlNet trained on the shapes silhouettes (training/configs/tiny_shapes_controlnet.yaml) steer the
embedded pipeline? Each of N unseen silhouettes (shapes data of another seed) is drawn with a prompt naming no
position or size ("a red circle", ...), once with the ControlNet following the silhouette and once without it; the
score is the intersection over union of the silhouette and the image's foreground (pixels far from the colour of
the image's corners). Without control the shape lands where the prompt's default puts it; with it, on the mask.

    python benchmarks/controlnet_shapes.py --controlnet pipelines/tiny-shapes-controlnet [--n 48]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from common import parse_shapes_benchmark_args

ROOT = Path(__file__).resolve().parents[1]


def foreground(image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels whose colour lies far from the median colour of the image's four corners (the background)."""
    corners = np.stack([image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]]).astype(np.float32)
    background = np.median(corners, axis=0)
    return np.linalg.norm(image.astype(np.float32) - background, axis=-1) > threshold


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser) -> None:
        parser.add_argument("--controlnet", default=str(ROOT / "pipelines" / "tiny-shapes-controlnet"),
                            help="a ControlNet folder trained for --model")
        parser.add_argument("--n", type=int, default=48, help="silhouettes to draw")
        parser.add_argument("--steps", type=int, default=25)
        parser.add_argument("--guidance", type=float, default=5.0)

    args = parse_shapes_benchmark_args(__doc__, argv, add_arguments)
    from latentdiff import ControlNetModel, LatentDiffusionControlNetPipeline, LatentDiffusionPipeline
    from latentdiff.train.data import ShapesSource

    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    controlled = LatentDiffusionControlNetPipeline.from_pipe(
        pipe, controlnet=ControlNetModel.from_pretrained(args.controlnet))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    source = ShapesSource(size, {"num_samples": args.n, "seed": 1234})  # (the recipe trains on seed 12)
    scores = {"without": [], "with": []}
    for i in range(args.n):
        spec = source.dataset.spec(i)
        control = source.load_conditioning(i)
        mask = np.asarray(control)[..., 0] > 127
        prompt = f"a {spec.colour} {spec.shape}"
        common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, progress=False,
                      output_type="np")
        plain = pipe(prompt, generator=torch.Generator().manual_seed(i), **common).images[0]
        steered = controlled(prompt, image=control, generator=torch.Generator().manual_seed(i), **common).images[0]
        scores["without"].append(iou(foreground((plain * 255).round()), mask))
        scores["with"].append(iou(foreground((steered * 255).round()), mask))
    print(f"| {args.n} unseen silhouettes, prompt 'a COLOUR SHAPE' | mean IoU with the silhouette | IoU > 0.5 |")
    print("|---|---|---|")
    for name, values in scores.items():
        values = np.asarray(values)
        print(f"| {name} the ControlNet | {values.mean():.3f} | {(values > 0.5).mean():.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
