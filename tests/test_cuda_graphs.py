"""CUDA-graph replay of the U-Net (latentdiff.cuda_graphs): same images as eager, one capture per signature, clear
errors off the GPU. The GPU tests run where CUDA is present (a lent GPU machine), the error tests everywhere."""
from pathlib import Path

import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.cuda_graphs import CUDAGraphModel

TINY_SHAPES = Path(__file__).resolve().parents[1] / "pipelines" / "tiny-shapes"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPT = "a large blue star in the top right corner on a black background"


@pytest.fixture(scope="module")
def pipe():
    return LatentDiffusionPipeline.from_pretrained(TINY_SHAPES)


def test_cuda_graphs_refuse_a_cpu_pipeline(pipe):
    with pytest.raises(ValueError, match=r"CUDA device.*pipe.to\('cuda'\)"):
        pipe.enable_cuda_graphs()
    graphed = CUDAGraphModel(pipe.unet)
    with pytest.raises(ValueError, match="CUDA device"):
        graphed(torch.zeros(1, 4, 16, 16), 10, torch.zeros(1, 77, 64))


def test_moving_the_pipeline_off_the_gpu_drops_its_graphs(pipe):
    pipe._graphed = CUDAGraphModel(pipe.unet)  # as enable_cuda_graphs() leaves it on a GPU
    pipe.to("cpu")
    assert pipe._graphed is None
    assert pipe._unet_call() is pipe.unet


@cuda
def test_graphs_give_the_eager_images_and_capture_once_per_signature(pipe):
    pipe.to("cuda")
    try:
        run = lambda n: pipe([PROMPT] * n, num_inference_steps=6, guidance_scale=5.0,  # noqa: E731
                             generator=torch.Generator().manual_seed(3), output_type="pt", progress=False).images
        plain = run(1)
        pipe.unet.to(memory_format=torch.channels_last)  # as enable_cuda_graphs() puts it by default
        eager = run(1), run(2)
        pipe.unet.to(memory_format=torch.contiguous_format)
        pipe.enable_cuda_graphs()
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        graphed = run(1), run(2), run(1)
        assert pipe._graphed.num_captures == 2  # batch 1 and batch 2 (with guidance: U-Net batches 2 and 4)
        for a, b in zip(eager + eager[:1], graphed):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        pipe.disable_cuda_graphs()  # back to the usual memory format, eager
        assert pipe.unet.conv_in.weight.is_contiguous()
        torch.testing.assert_close(run(1), plain, rtol=0, atol=0)
        pipe.enable_cuda_graphs(channels_last=False)
        assert pipe.unet.conv_in.weight.is_contiguous()
        torch.testing.assert_close(run(1), plain, rtol=0, atol=1e-5)
    finally:
        pipe.disable_cuda_graphs()
        pipe.to("cpu")


@cuda
@torch.no_grad()
def test_graphs_follow_weights_changed_in_place(pipe):
    pipe.to("cuda")
    try:
        graphed = CUDAGraphModel(pipe.unet)
        x = torch.randn(2, 4, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        context = torch.randn(2, 77, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        t = torch.tensor(500, device="cuda")
        torch.testing.assert_close(graphed(x, t, context), pipe.unet(x, t, context), rtol=0, atol=1e-5)
        pipe.unet.conv_out.bias.add_(1.0)
        torch.testing.assert_close(graphed(x, t, context), pipe.unet(x, t, context), rtol=0, atol=1e-5)
        pipe.unet.conv_out.bias.sub_(1.0)
        assert graphed.num_captures == 1
    finally:
        pipe.to("cpu")


@cuda
def test_on_the_gpu_the_denoising_loop_does_not_sync_per_step(pipe):
    """No host-GPU synchronisation per denoising step (a sync in every step leaves the GPU idle while the host
    issues the next step's launches): CUDA's sync debug mode reports each one, inside any library call too."""
    import warnings

    pipe.to("cuda")
    pipe(PROMPT, num_inference_steps=2, output_type="latent", progress=False)  # one-time work (kernel compiles)
    denoise, syncs = pipe.denoise, {}

    def counted(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = denoise(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs[len(args[1])] = sum("synchroniz" in str(w.message) for w in caught)
        return out

    pipe.denoise = counted
    try:
        for steps in (3, 8):
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, output_type="latent", progress=False)
    finally:
        del pipe.denoise
        pipe.to("cpu")
    assert syncs[3] == syncs[8] <= 1, syncs
