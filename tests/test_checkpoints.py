"""Weights I/O: safetensors only, strict loading, and errors that name the file and the fix."""
import os
import stat

import pytest
import torch
from torch import nn

from latentdiff.checkpoints import CheckpointError, load_into, load_safetensors, save_safetensors


def test_round_trip(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_safetensors(sd, tmp_path / "w.safetensors")
    back = load_safetensors(tmp_path / "w.safetensors")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    old = os.umask(0o027)
    try:  # with the permissions any new file gets (safetensors alone makes them private)
        save_safetensors(sd, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "w.safetensors").st_mode) == 0o640


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_refused_without_unpickling(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04this would be a pickle")  # never opened
    with pytest.raises(CheckpointError, match="refusing to open a pickle file.*safetensors"):
        load_safetensors(path)


def test_missing_path_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        load_safetensors(tmp_path / "nothere.safetensors")


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*truncated or corrupted"):
        load_safetensors(path)


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"g\.safetensors"):
        load_safetensors(path)


def test_strict_loading_lists_every_problem():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4))
    sd = dict(model.state_dict())
    del sd["0.bias"]
    sd["2.weight"] = torch.zeros(1)
    sd["1.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as err:
        load_into(model, sd, "test.safetensors")
    message = str(err.value)
    assert "missing keys (1): 0.bias" in message
    assert "unexpected keys (1): 2.weight" in message
    assert "1.weight: checkpoint (5, 5) vs model (4, 3)" in message


def test_load_onto_meta_assigns_without_copy():
    src = nn.Linear(4, 4)
    with torch.device("meta"):
        dst = nn.Linear(4, 4)
    sd = src.state_dict()
    load_into(dst, sd, "x")
    assert dst.weight.data_ptr() == sd["weight"].data_ptr()
    assert torch.equal(dst(torch.ones(1, 4)), src(torch.ones(1, 4)))


def _resident_kib(path) -> int:
    """KiB of `path`'s memory mappings resident in this process (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) == 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_converting_load_gives_back_the_file_pages(tmp_path):
    """Loading a file's tensors in another dtype does not keep the file's pages resident beside the copies (SD 1.5's
    fp16 file as fp32: 2 GiB less at the peak); the copies, tensors from elsewhere and the file stay intact."""
    path = (tmp_path / "w.safetensors").resolve()
    weights = {"0.weight": torch.randn(2048, 2048).half(), "0.bias": torch.randn(2048).half(),
               "1.steps": torch.arange(7)}
    save_safetensors(weights, path)
    loaded = load_safetensors(path)
    assert torch.equal(loaded["0.weight"], weights["0.weight"])  # (reads every page)
    assert _resident_kib(path) >= 8 * 1024 - 64
    other = torch.randn(8, 2048).half()  # not from a file: its pages must be left alone
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2048, 2048), nn.Module(), nn.Linear(2048, 8, bias=False))
        model[1].register_buffer("steps", torch.empty(7, dtype=torch.long))
    load_into(model, {**loaded, "2.weight": other}, str(path), dtype=torch.float32)
    assert _resident_kib(path) < 64
    assert model[0].weight.dtype == torch.float32 and torch.equal(model[0].weight, weights["0.weight"].float())
    assert torch.equal(model[1].steps, weights["1.steps"]) and torch.equal(model[2].weight, other.float())
    assert torch.equal(loaded["0.weight"], weights["0.weight"])  # (read again from the file)
