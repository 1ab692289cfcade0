import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist's workers share the cores (make test: one per core, at most 4): the cores divided among them
    # as torch threads, or their OpenMP threads thrash
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and on a shared machine extra OpenMP threads thrash. Modules
    of tiny models use it: pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """A tiny random pipeline saved by diffusers, and the same weights loaded and saved by us:
    (diffusers_folder, ours_folder)."""
    from latentdiff import LatentDiffusionPipeline
    from latentdiff.models.text import CLIPTokenizer
    from tiny import diffusers_pipeline

    root = tmp_path_factory.mktemp("pipes")
    CLIPTokenizer().save_pretrained(root / "tok")
    diffusers_pipeline(root / "tok").save_pretrained(root / "diffusers", safe_serialization=True)
    LatentDiffusionPipeline.from_pretrained(root / "diffusers").save_pretrained(root / "ours")
    return root / "diffusers", root / "ours"


@pytest.fixture(scope="session")
def ip_folder(tmp_path_factory, tiny_folders):
    """A random IP-Adapter for tiny_folders' U-Net, laid out as published: ip.safetensors (image_proj.*,
    ip_adapter.{1,3,5,...}.to_k_ip/to_v_ip, numbered in diffusers' order of attention processors) and a tiny CLIP
    image encoder in image_encoder/."""
    import diffusers
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("ip")
    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8))
    encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_folders[0] / "unet")
    g = torch.Generator().manual_seed(1)
    width = unet.config.cross_attention_dim
    state = {"image_proj.proj.weight": torch.randn(4 * width, 24, generator=g) * 0.2,
             "image_proj.proj.bias": torch.randn(4 * width, generator=g) * 0.2,
             "image_proj.norm.weight": 1 + 0.1 * torch.randn(width, generator=g),
             "image_proj.norm.bias": 0.1 * torch.randn(width, generator=g)}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            inner = unet.get_submodule(name.rsplit(".", 1)[0]).to_q.out_features
            for part in ("to_k_ip", "to_v_ip"):
                state[f"ip_adapter.{key_id}.{part}.weight"] = torch.randn(inner, width, generator=g) * 0.3
            key_id += 2
    save_file(state, folder / "ip.safetensors")
    return folder


@pytest.fixture(scope="session")
def variation_folder(tmp_path_factory):
    """A tiny random image variation pipeline saved by diffusers: the tiny U-Net and VAE, and a tiny CLIP image
    encoder whose projection is the U-Net's context width."""
    import diffusers
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from tiny import SCHEDULER, TINY_UNET, TINY_VAE, perturb

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=TINY_UNET["cross_attention_dim"], num_hidden_layers=2,
        num_attention_heads=4, image_size=32, patch_size=8)).eval()
    pipe = diffusers.StableDiffusionImageVariationPipeline(
        vae=perturb(diffusers.AutoencoderKL(**TINY_VAE), 2).eval(), image_encoder=encoder,
        unet=perturb(diffusers.UNet2DConditionModel(**TINY_UNET), 1).eval(),
        scheduler=diffusers.DDIMScheduler(**SCHEDULER), safety_checker=None,
        feature_extractor=CLIPImageProcessor(size=32, crop_size=32), requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("variation")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
