"""The embedded pipeline (pipelines/tiny-shapes): complete, small, loadable by diffusers, and unchanged (golden)."""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff import LatentDiffusionPipeline
from latentdiff.layout import EMBEDDED

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def test_folder_is_complete_and_small():
    files = [p for p in EMBEDDED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    pipe = LatentDiffusionPipeline.from_pretrained(EMBEDDED)
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 128
    assert pipe.tokenizer.model_max_length == 77 and pipe.text_encoder.config.max_position_embeddings == 77
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_golden_image():
    """Regenerate deliberately with tools/make_golden.py after retraining."""
    from make_golden import GOLDEN, golden_image

    got = np.asarray(golden_image(), dtype=np.float32)
    expected = np.asarray(Image.open(GOLDEN).convert("RGB"), dtype=np.float32)
    assert got.shape == expected.shape == (128, 128, 3)
    diff = np.abs(got - expected)
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


def test_loads_in_diffusers_with_the_same_image():
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(EMBEDDED, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(EMBEDDED)
    kwargs = dict(num_inference_steps=5, guidance_scale=5.0, output_type="np")
    prompt = "a small red circle in the center on a white background"
    expected = ref(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images
    got = ours(prompt, generator=torch.Generator().manual_seed(3), progress=False, **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


# what the shipped pipeline must keep doing on these 12 prompts at 12 steps (it scores 12/12 on every attribute);
# the previous one placed objects at random (position 17% on held-out prompts) and fails on position, the one before
# it scored colour 2/12, background 6/12, shape 7/12. Floors leave room for one or two images to change on another
# CPU's float rounding.
ADHERENCE_FLOOR = {"background": 0.8, "colour": 0.8, "shape": 0.75, "size": 0.8, "position": 0.8, "all": 0.6}


def test_quick_prompt_adherence():
    """12 held-out prompts (triples never trained on), 12 DPM-Solver++ steps, guidance 5, read by the analyzer."""
    from latentdiff.data.shapes import heldout_prompts
    from latentdiff.evaluation import evaluate_pipeline

    pipe = LatentDiffusionPipeline.from_pretrained(EMBEDDED)
    prompts = heldout_prompts()[::12][:12]
    ((_, scores),) = evaluate_pipeline(pipe, [5.0], prompts, steps=12, batch_size=12)
    low = {k: round(scores[k], 3) for k, floor in ADHERENCE_FLOOR.items() if scores[k] < floor}
    assert not low, f"prompt adherence fell below {ADHERENCE_FLOOR}: {low} (all scores: {scores})"
