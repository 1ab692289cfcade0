"""Regenerate the golden image of the embedded pipeline (tests/golden/tiny_shapes.png), deliberately: run it after
retraining pipelines/tiny-shapes, look at the picture, and commit both. python tools/make_golden.py"""
from pathlib import Path

import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.layout import EMBEDDED

PROMPT = "a large blue star in the top right corner on a black background"
SEED, STEPS, GUIDANCE = 0, 10, 5.0
GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "tiny_shapes.png"


def golden_image():
    pipe = LatentDiffusionPipeline.from_pretrained(EMBEDDED)
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(SEED), progress=False).images[0]


if __name__ == "__main__":
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    golden_image().save(GOLDEN)
    print(GOLDEN)
