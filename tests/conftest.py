import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py


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
