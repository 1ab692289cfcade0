"""The picture at the top of the README: the shipped pipeline (pipelines/tiny-shapes) on a few prompts, one seed
each, 25 DPM-Solver++ steps, guidance 5, as one small PNG (docs/tiny_shapes_grid.png) with the prompts in its
alt text. Regenerate after retraining: python tools/make_readme_grid.py"""
from pathlib import Path

import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.layout import EMBEDDED

PROMPTS = [
    "a large red circle in the center on a white background",
    "a small blue star in the top left corner on a black background",
    "a large green triangle in the bottom right corner on a gray background",
    "a small yellow square in the top right corner on a white background",
    "a large purple diamond in the bottom left corner on a black background",
    "a small orange star in the center on a gray background",
]
OUT = Path(__file__).resolve().parents[1] / "docs" / "tiny_shapes_grid.png"


def main() -> None:
    from PIL import Image

    pipe = LatentDiffusionPipeline.from_pretrained(EMBEDDED)
    images = pipe(PROMPTS, num_inference_steps=25, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                  progress=False).images
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images) + 4 * (len(images) - 1), h), "white")
    for i, image in enumerate(images):
        grid.paste(image, (i * (w + 4), 0))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    grid.save(OUT, optimize=True)
    print(OUT)
    for i, prompt in enumerate(PROMPTS):
        print(f"{i + 1}. {prompt}")


if __name__ == "__main__":
    main()
