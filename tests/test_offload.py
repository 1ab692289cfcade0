"""Model CPU offload (latentdiff.offload, `pipe.enable_model_cpu_offload()`): each stage of a call (text encoder; U-Net
with its ControlNets; VAE) moves to the execution device while it runs and back after, the images unchanged.
On the CPU the moves are recorded with "cpu" as the execution device; where CUDA is present the GPU test moves
them for real."""
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiff import ControlNetModel, LatentDiffusionControlNetPipeline, LatentDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPES = ROOT / "pipelines" / "tiny-shapes"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KWARGS = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", progress=False)


def record_moves(monkeypatch, pipe) -> list[tuple[str, str]]:
    """A list that collects (component name, device) for every `.to(device)` of one of the pipeline's models."""
    names = {id(getattr(pipe, n)): n for n in ("text_encoder", "image_encoder", "unet", "vae", "controlnet") if hasattr(pipe, n)}
    moves = []
    original = torch.nn.Module.to

    def to(module, *args, **kwargs):
        if id(module) in names:
            device = kwargs.get("device", args[0] if args else None)
            moves.append((names[id(module)], str(device)))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    return moves


def test_each_stage_is_loaded_while_it_runs_and_the_images_stay_the_same(monkeypatch):
    pipe = LatentDiffusionPipeline.from_pretrained(TINY_SHAPES)
    expected = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KWARGS).images
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe.device == torch.device("cpu") and pipe._execution_device == pipe.device
    moves = record_moves(monkeypatch, pipe)
    images = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KWARGS).images
    np.testing.assert_array_equal(images, expected)
    assert moves == [("text_encoder", "cpu"),  # loaded (device "cpu" here), then each unloaded as the next loads
                     ("text_encoder", "cpu"), ("unet", "cpu"),
                     ("unet", "cpu"), ("vae", "cpu"),
                     ("vae", "cpu")]  # the call ends with every model unloaded
    assert pipe._offload.loaded is None
    moves.clear()
    pipe("a red circle", output_type="latent", num_inference_steps=2, progress=False)
    assert [name for name, _ in moves] == ["unet", "unet"]  # (the prompt's embedding was kept; no VAE for latents)
    moves.clear()
    pipe("a blue star", output_type="latent", num_inference_steps=2, progress=False)
    assert [name for name, _ in moves] == ["text_encoder", "text_encoder", "unet", "unet"]

    moves.clear()  # a custom loop's decode, then diffusers' last call in such loops
    pipe.vae.decode(torch.zeros(1, 4, 16, 16))
    assert moves == [("vae", "cpu")] and pipe._offload.loaded is not None
    pipe.maybe_free_model_hooks()
    assert moves == [("vae", "cpu")] * 2 and pipe._offload.loaded is None

    pipe.remove_all_hooks()
    pipe.maybe_free_model_hooks()  # (nothing to do)
    assert pipe._offload is None and not {"forward", "encode", "decode"} & set(pipe.vae.__dict__)
    assert "forward" not in pipe.unet.__dict__
    moves.clear()
    np.testing.assert_array_equal(pipe("a red circle", generator=torch.Generator().manual_seed(0), **KWARGS).images,
                                  expected)
    assert moves == []


def test_controlnets_stay_loaded_with_the_unet_through_the_denoising_loop(monkeypatch):
    pipe = LatentDiffusionControlNetPipeline.from_pipe(
        LatentDiffusionPipeline.from_pretrained(TINY_SHAPES),
        controlnet=ControlNetModel.from_pretrained(ROOT / "pipelines" / "tiny-shapes-controlnet"))
    control = np.zeros((128, 128, 3), np.uint8)
    control[32:96, 32:96] = 255
    from PIL import Image

    control = Image.fromarray(control)
    expected = pipe("a red square", image=control, generator=torch.Generator().manual_seed(0), **KWARGS).images
    pipe.enable_model_cpu_offload(device="cpu")
    assert [len(stage) for stage in pipe._offload.stages] == [1, 2, 1]
    moves = record_moves(monkeypatch, pipe)
    images = pipe("a red square", image=control, generator=torch.Generator().manual_seed(0), **KWARGS).images
    np.testing.assert_array_equal(images, expected)
    loads = [name for name, _ in moves]
    assert loads.count("unet") == 2 and loads.count("controlnet") == 2  # once on and once off, not per step


def test_offload_refuses_what_would_undo_it():
    pipe = LatentDiffusionPipeline.from_pretrained(TINY_SHAPES)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is usable here"):
            pipe.enable_model_cpu_offload()
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match=r"model CPU offload is on.*pipe.remove_all_hooks\(\)"):
        pipe.to("cpu")
    pipe.to(torch.float32)  # (a cast is fine)
    with pytest.raises(ValueError, match=r"compile\(\).*remove_all_hooks"):
        pipe.compile()
    with pytest.raises(ValueError, match=r"CUDA graphs.*remove_all_hooks"):
        pipe.enable_cuda_graphs()
    with pytest.raises(ValueError, match=r"from_pipe: .*remove_all_hooks\(\) first"):
        LatentDiffusionControlNetPipeline.from_pipe(pipe, controlnet=ControlNetModel.from_pretrained(
            ROOT / "pipelines" / "tiny-shapes-controlnet"))
    with pytest.raises(NotImplementedError, match=r"enable_model_cpu_offload\(\)"):
        pipe.enable_sequential_cpu_offload()
    pipe.remove_all_hooks()
    pipe.compile()
    with pytest.raises(ValueError, match=r"disable_compile\(\)"):
        pipe.enable_model_cpu_offload(device="cpu")


@cuda
def test_offload_to_the_gpu_gives_the_gpu_images_and_keeps_idle_stages_in_cpu_memory():
    pipe = LatentDiffusionPipeline.from_pretrained(TINY_SHAPES).to("cuda")
    expected = pipe("a red circle", generator=torch.Generator().manual_seed(0), **KWARGS).images
    pipe.to("cpu")
    pipe.enable_model_cpu_offload()
    assert pipe.device.type == "cuda"
    seen = []

    def during_denoising(p, i, t, tensors):
        seen.append((p.text_encoder.device.type, p.unet.device.type, p.vae.device.type, tensors["latents"].device.type))
        return tensors

    images = pipe("a red circle", generator=torch.Generator().manual_seed(0), callback_on_step_end=during_denoising,
                  **KWARGS).images
    assert np.abs(images - expected).max() < 1e-4
    assert set(seen) == {("cpu", "cuda", "cpu", "cuda")}
    assert all(p.device.type == "cpu" for m in (pipe.text_encoder, pipe.unet, pipe.vae) for p in m.parameters())
