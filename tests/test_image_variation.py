"""The image variation pipeline against diffusers' StableDiffusionImageVariationPipeline: a tiny random one (the
tiny U-Net and VAE, a tiny CLIP image encoder whose projection is the U-Net's context width), saved by diffusers and
loaded by us and the other way round; the same images from PIL images and from prepared pixel values, with and
without guidance; the legacy callback; and the errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import LatentDiffusionImageVariationPipeline, LatentDiffusionPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

rng = np.random.default_rng(5)
IMAGES = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(2)]


def run(pipe, image, images: int, **kwargs):
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "np",
              "generator": [torch.Generator().manual_seed(i) for i in range(images)], **kwargs}
    if isinstance(pipe, LatentDiffusionPipeline):
        kwargs["progress"] = False
    return pipe(image, **kwargs).images


def reference(folder):
    import diffusers

    ref = diffusers.StableDiffusionImageVariationPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_matches_diffusers(variation_folder):
    ours, ref = LatentDiffusionImageVariationPipeline.from_pretrained(variation_folder), reference(variation_folder)
    assert ours.text_encoder is None and ours.tokenizer is None
    got = run(ours, IMAGES[0], 1)
    np.testing.assert_allclose(got, run(ref, IMAGES[0], 1), atol=1e-4, rtol=0)
    # two images, two variations each (order: image 0 twice, then image 1), unguided too
    for scale in (3.0, 1.0):
        two = dict(num_images_per_prompt=2, guidance_scale=scale)
        expected = run(ref, IMAGES, 4, **two)
        np.testing.assert_allclose(run(ours, IMAGES, 4, **two), expected, atol=1e-4, rtol=0)
    assert np.abs(expected[0] - expected[2]).max() > 1e-2  # the image changes the output
    # pixel values prepared by the feature extractor, as diffusers takes a tensor
    pixels = ours.feature_extractor(images=IMAGES[0], return_tensors="pt").pixel_values
    np.testing.assert_allclose(run(ours, pixels, 1), got, atol=1e-6, rtol=0)
    # the contexts: [zeros; embeddings] with guidance
    context = ours.encode_image(IMAGES, num_images_per_prompt=2, do_classifier_free_guidance=True)
    expected = ref._encode_image(IMAGES, "cpu", 2, True)
    torch.testing.assert_close(context, expected, atol=1e-6, rtol=0)


def test_folder_round_trip_and_legacy_callback(variation_folder, tmp_path):
    ours = LatentDiffusionImageVariationPipeline.from_pretrained(variation_folder)
    ours.save_pretrained(tmp_path / "ours")
    ref = reference(tmp_path / "ours")  # diffusers loads the folder we write
    assert type(ref.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    got = run(ref, IMAGES[1], 1)
    np.testing.assert_allclose(got, run(ours, IMAGES[1], 1), atol=1e-4, rtol=0)
    again = LatentDiffusionImageVariationPipeline.from_pretrained(tmp_path / "ours")
    np.testing.assert_allclose(run(again, IMAGES[1], 1), got, atol=1e-4, rtol=0)
    # diffusers' legacy callback(step, timestep, latents) every callback_steps steps
    seen, expected = [], []
    run(ours, IMAGES[1], 1, callback=lambda i, t, x: seen.append((i, int(t), x.clone())), callback_steps=2)
    run(ref, IMAGES[1], 1, callback=lambda i, t, x: expected.append((i, int(t), x.clone())), callback_steps=2)
    assert [s[:2] for s in seen] == [e[:2] for e in expected] and len(seen) == 2
    for (_, _, x), (_, _, y) in zip(seen, expected):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    # half precision by component, as from_pretrained takes it
    half = LatentDiffusionImageVariationPipeline.from_pretrained(variation_folder, torch_dtype={
        "image_encoder": torch.bfloat16, "default": torch.float32})
    assert half.image_encoder.dtype == torch.bfloat16 and half.unet.dtype == torch.float32


def test_model_cpu_offload(variation_folder, monkeypatch):
    from test_offload import record_moves

    pipe = LatentDiffusionImageVariationPipeline.from_pretrained(variation_folder)
    expected = run(pipe, IMAGES[0], 1)
    pipe.enable_model_cpu_offload(device="cpu")  # (the execution device "cpu": the moves are recorded)
    moves = record_moves(monkeypatch, pipe)
    np.testing.assert_array_equal(run(pipe, IMAGES[0], 1), expected)
    assert [name for name, _ in moves] == ["image_encoder", "image_encoder", "unet", "unet", "vae", "vae"]


def test_errors(variation_folder, tiny_folders):
    with pytest.raises(ValueError, match="LatentDiffusionImageVariationPipeline"):
        LatentDiffusionPipeline.from_pretrained(variation_folder)
    with pytest.raises(ValueError, match="not an image variation pipeline"):
        LatentDiffusionImageVariationPipeline.from_pretrained(tiny_folders[1])
    with pytest.raises(ValueError, match="from_pretrained"):
        LatentDiffusionImageVariationPipeline.from_single_file(tiny_folders[1] / "model_index.json")
    pipe = LatentDiffusionImageVariationPipeline.from_pretrained(variation_folder)
    with pytest.raises(ValueError, match="needs image="):
        pipe(num_inference_steps=2)
    with pytest.raises(TypeError, match="PIL image"):
        pipe(np.zeros((32, 32, 3), np.uint8), num_inference_steps=2)
    with pytest.raises(TypeError, match="empty"):
        pipe([], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"\[B, 3, S, S\]"):
        pipe(torch.zeros(3, 32, 32), num_inference_steps=2)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe(IMAGES[0], height=60, num_inference_steps=2)
    with pytest.raises(ValueError, match="callback_steps"):
        pipe(IMAGES[0], callback=print, callback_steps=0, num_inference_steps=2)
    for method in ("load_lora_weights", "load_textual_inversion", "load_ip_adapter"):
        with pytest.raises(ValueError, match="no text encoder"):
            getattr(pipe, method)("anything")
    # an image encoder whose embeddings are not the U-Net's context width
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    pipe.image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=1, num_attention_heads=4,
        image_size=32, patch_size=8)).eval()
    with pytest.raises(ValueError, match="24-wide embeddings but the U-Net attends to 32-wide"):
        pipe(IMAGES[0], num_inference_steps=2)


def test_without_transformers_the_error_names_the_extra(monkeypatch):
    import sys

    from latentdiff.ip_adapter import clip_vision

    monkeypatch.setitem(sys.modules, "transformers", None)  # (importing it then fails)
    with pytest.raises(ImportError, match=r"transformers' CLIPImageProcessor.*pip install 'latentdiff\[vision\]'"):
        clip_vision("CLIPImageProcessor")
