"""DreamBooth on the embedded pipeline (training/configs/tiny_shapes_dreambooth.yaml): what the subject's word
learns, and what prior preservation keeps.

The subject is a cyan star (SUBJECT_COLOUR), in five images of different sizes, places and backgrounds
(`--write-subject DIR` writes them); its prompt is "a sks star", its class "a star". (A colour outside the palette
would be a better subject, but the embedded VAE, trained on palette colours only, cannot reconstruct one: brown comes
back red or green.) Each pipeline given is scored on

- the subject: "a sks star" in each of the 15 position x background contexts, 3 seeds each: the share read as a
  star, the share in the subject's colour (before training, "sks" mostly comes out pink or red), and the position
  and background accuracies (does the word carry over to contexts the five images did not show?);
- the class: "a COLOUR star" for the 7 other palette colours, 10 seeds each: colour accuracy, and the share that came
  out in the subject's colour (fine-tuning on the subject alone turns every star into it: language drift);
- everything else: the analyzer's accuracies on 150 prompts of trained combinations (SHAPES.md's control set).

    python benchmarks/dreambooth_shapes.py --write-subject out/sks-star
    python benchmarks/dreambooth_shapes.py --pipelines base=pipelines/tiny-shapes,prior=out/.../pipeline [--threads 2]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from common import parse_shapes_benchmark_args

SUBJECT_COLOUR = "cyan"
SUBJECT_VIEWS = (("large", "center", "white"), ("small", "top left", "black"), ("large", "bottom right", "gray"),
                 ("small", "top right", "white"), ("large", "bottom left", "black"))


def write_subject(folder: Path, size: int = 128) -> None:
    """The subject's five images, PNG files in `folder` (a plain folder: instance_prompt captions them)."""
    from latentdiff.data.shapes import ShapeSpec, render

    folder.mkdir(parents=True, exist_ok=True)
    for i, (scale, position, background) in enumerate(SUBJECT_VIEWS):
        render(ShapeSpec(SUBJECT_COLOUR, "star", scale, position, background), size).save(folder / f"sks-star-{i}.png")
    print(f"wrote {len(SUBJECT_VIEWS)} images of the subject to {folder}")


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser) -> None:
        parser.add_argument("--write-subject", default=None, help="write the subject's images here, then stop")
        parser.add_argument("--pipelines", default=None, help="name=folder,... (default: base=--model)")
        parser.add_argument("--guidance", type=float, default=5.0)
        parser.add_argument("--steps", type=int, default=25)

    args = parse_shapes_benchmark_args(__doc__, argv, add_arguments)
    if args.write_subject:
        write_subject(Path(args.write_subject))
        return 0
    from latentdiff import LatentDiffusionPipeline
    from latentdiff.data.analyze import measure, score
    from latentdiff.data.shapes import BACKGROUNDS, COLOURS, POSITION_PHRASES, trained_prompts

    contexts = [(f"a sks star {POSITION_PHRASES[p]} on a {b} background", p, b)
                for p in POSITION_PHRASES for b in BACKGROUNDS]
    pipelines = dict(item.split("=", 1) for item in (args.pipelines or f"base={args.model}").split(","))
    lines = ["| pipeline | subject: star | subject: its colour | subject: position | subject: background | "
             "\"a COLOUR star\": colour | \"a COLOUR star\": subject's colour | 150 trained prompts: all | colour "
             "| shape |", "|---|" + "---:|" * 9]
    for name, folder in pipelines.items():
        pipe = LatentDiffusionPipeline.from_pretrained(folder)

        def draw(prompts: list[str], seeds: list[int]) -> list:
            images = []
            for i in range(0, len(prompts), 25):
                images += pipe(prompts[i:i + 25], num_inference_steps=args.steps, guidance_scale=args.guidance,
                               progress=False, generator=[torch.Generator().manual_seed(s) for s in seeds[i:i + 25]]
                               ).images
            return [measure(image) for image in images]

        subject = draw([c[0] for c in contexts for _ in range(3)], [s for _ in contexts for s in range(3)])
        truth = [c for c in contexts for _ in range(3)]
        others = [c for c in COLOURS if c != SUBJECT_COLOUR]
        stars = draw([f"a {c} star" for c in others for _ in range(10)], [s for _ in others for s in range(10)])
        star_truth = [c for c in others for _ in range(10)]
        control = trained_prompts()
        general = score(zip([spec for _, spec in control],
                            [r.labels() for r in draw([p for p, _ in control], list(range(len(control))))]))
        share = lambda flags: f"{100 * np.mean(list(flags)):.1f}%"  # noqa: E731
        lines.append(" | ".join([
            f"| {name}", share(r.shape == "star" for r in subject),
            share(r.colour == SUBJECT_COLOUR for r in subject),
            share(r.position == p for r, (_, p, _) in zip(subject, truth)),
            share(r.background == b for r, (_, _, b) in zip(subject, truth)),
            share(r.colour == c for r, c in zip(stars, star_truth)),
            share(r.colour == SUBJECT_COLOUR for r in stars),
            f"{100 * general['all']:.1f}%", f"{100 * general['colour']:.1f}%", f"{100 * general['shape']:.1f}% |"]))
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
