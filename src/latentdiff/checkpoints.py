"""Weights on disk: safetensors only, strict key-by-key loading, clear errors.

Pickle formats (.ckpt, .bin, .pt, .pth) can run arbitrary code when loaded, so they are refused without being
opened; the error says how to convert them. A truncated or corrupted safetensors file is reported with its path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import mmap
import os
from pathlib import Path

import torch
from torch import nn

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A weights file or folder that cannot be used as it is; the message names the file and the fix."""


def require_path(path: str | os.PathLike, what: str = "path") -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (latentdiff loads only local paths; check the spelling)")
    return path


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing to open a pickle file ({path.suffix}); unpickling can run arbitrary code. "
            "Convert it once, in an environment you trust, to safetensors, e.g.\n"
            "  python -c \"import torch, safetensors.torch as s; sd = torch.load('IN', weights_only=True); "
            "sd = sd.get('state_dict', sd); s.save_file({k: v.contiguous() for k, v in sd.items() "
            "if isinstance(v, torch.Tensor)}, 'OUT.safetensors')\""
        )


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a .safetensors file into a dict of tensors (memory-mapped where the device is the CPU)."""
    path = require_path(path, "weights file")
    _refuse_pickle(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a .safetensors file")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({size} bytes): {err}. "
            "The file is probably truncated or corrupted (an interrupted download or copy): obtain it again."
        ) from None


def weights_file(path: Path, weight_name: str | None, default: str, what: str) -> Path:
    """The .safetensors file `path` names: itself, or in a folder `weight_name`, else `default` (the name the
    writing library uses), else the folder's only .safetensors file."""
    if not path.is_dir():
        return path
    if weight_name is None:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        weight_name = default if default in found else found[0] if len(found) == 1 else None
        if weight_name is None:
            raise CheckpointError(f"{path}: no {default} " + (
                f"but several .safetensors files ({found}): pass weight_name=" if found else
                f"nor any .safetensors file (the folder holds {sorted(p.name for p in path.iterdir())})"))
    return require_path(path / weight_name, what)


def with_variant(name: str, variant: str | None) -> str:
    """A weights file's name for a variant as diffusers and transformers write it: the variant before the last
    extension (diffusion_pytorch_model.fp16.safetensors, model.safetensors.index.fp16.json)."""
    if variant is None:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def load_folder_weights(folder: Path, name: str, variant: str | None = None,
                        device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a model folder in the diffusers / transformers layout: the file `name` (with `variant`:
    NAME.VARIANT.safetensors), or, for a model saved in pieces, the shards that NAME.index.json maps its tensors to.
    Returns them and the file they came from (for error messages)."""
    single = folder / with_variant(name, variant)
    if single.exists():
        return load_safetensors(single, device), str(single)
    index = folder / with_variant(f"{name}.index.json", variant)
    if not index.exists():
        raise FileNotFoundError(f"weights not found: {single}{_other_weights(folder, name, variant)}")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map (tensor name -> shard file) in it; save the model again")
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(load_safetensors(require_path(folder / shard, f"shard listed in {index.name}"), device))
    lacking = sorted(set(weight_map) - set(state_dict))
    if lacking:
        raise CheckpointError(f"{index} maps {len(lacking)} tensors to shards that lack them ({lacking[:5]}): the "
                              "shards are from another save; copy the folder again")
    return state_dict, str(index)


def _other_weights(folder: Path, name: str, variant: str | None) -> str:
    """What a folder lacking `name` (for `variant`) holds instead, and what to do about it."""
    stem, extension = name.rsplit(".", 1)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    variants = sorted({n[len(stem) + 1: -len(extension) - 1] for n in files
                       if n.startswith(f"{stem}.") and n.endswith(f".{extension}") and n.count(".") == 2})
    if variant is not None and (name in files or f"{name}.index.json" in files):
        variants.insert(0, None)
    if variants:
        found = [n for n in files if n.startswith(stem)]
        return f" (found {found}: pass variant={variants[0]!r})"
    pickled = [n for n in files if Path(n).suffix.lower() in PICKLE_SUFFIXES]
    if pickled:
        return f" (found {pickled}: pickle weights are refused; convert them to safetensors)"
    return f" (the folder holds {files})" if files else " (the folder is empty)"


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None):
    """Write tensors to `path` atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())  # (safetensors makes its files private, 0600; ours are as any new file)
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)  # (reading it means setting it)
    os.umask(mask)
    return mask


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:

        def listed(title, items):
            more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:10]) + more if items else ""

        raise CheckpointError(
            f"{source} does not match {type(model).__name__}'s architecture (check that its config.json belongs "
            "to these weights):"
            + listed("missing keys", missing)
            + listed("unexpected keys", unexpected)
            + listed("mis-shaped", shapes)
        )


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, dtype=None) -> nn.Module:
    """Strictly load `state_dict` into `model`, which may live on the meta device (then the checkpoint's tensors
    are assigned, not copied, so a large model is never held twice)."""
    check_state_dict(model, state_dict, source)
    if dtype is not None:
        mapped = _safetensors_mappings()
        state_dict = {k: _converted(v, dtype, mapped) for k, v in state_dict.items()}
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    return model


def _converted(tensor: torch.Tensor, dtype: torch.dtype, mapped: list[tuple[int, int]]) -> torch.Tensor:
    """`tensor` in `dtype` (floating point only). A copy of a tensor that lies in a memory-mapped .safetensors file
    (`mapped`: those mappings' address ranges) gives back the pages wholly inside the original's bytes: reading it
    made them resident in this process, and holding them until the load ends would keep the file's weights beside
    their copies (SD 1.5's fp16 file loaded as fp32: 2 GiB more at the peak). The file is untouched; the pages would
    be read from it again if the original were read again."""
    if not tensor.is_floating_point():
        return tensor
    out = tensor.to(dtype)
    if out is tensor or not tensor.is_contiguous() or tensor.device.type != "cpu":
        return out
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if any(lo <= start and end <= hi for lo, hi in mapped):
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)
    return out


MADV_DONTNEED = 4  # (Linux)


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _safetensors_mappings() -> list[tuple[int, int]]:
    """The address ranges at which this process maps .safetensors files (where safetensors' loader puts their
    tensors); [] where /proc/self/maps cannot be read (not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def files_sha256(path: Path, pattern: str = "*") -> str:
    """SHA-256 over one file, or over the files under a folder that match `pattern`, in sorted order; each file's
    name (its path relative to the folder) goes in before its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob(pattern) if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike) -> dict:
    path = require_path(path, "config file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err})") from None


def write_json(data: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
