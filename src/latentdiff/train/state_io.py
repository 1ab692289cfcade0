"""The training state on disk without pickle: JSON for structure and numbers, safetensors for tensors.

A resumed run must restore everything the next step depends on (the weights, the optimizer's moments, the schedule's
position, the random generators, the EMA), and none of it may be unpickled: unpickling can run arbitrary code
(DESIGN.md). A state dict is a tree of dicts, lists, tuples, numbers, strings and tensors, so each one is written as
`<stem>.json` (the tree, each tensor replaced by a reference) beside `<stem>.safetensors` (the tensors). Tuples and
non-string dict keys are tagged, so that the tree reads back as it was written: `random.setstate` wants tuples and an
optimizer's state is keyed by parameter number. JSON writes floats with repr, which reads back bit for bit.
"""
from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

TENSOR, TUPLE, ITEMS, NDARRAY = "@tensor", "@tuple", "@items", "@ndarray"


def _join(path: str, key) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode(value, path: str, tensors: dict[str, torch.Tensor]):
    """`value` as JSON, its tensors moved into `tensors` under their path in the tree."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):  # a numpy scalar: its Python value
        return value.item()
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"cannot save the state: two tensors would both be stored as {path!r}")
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(value, np.ndarray):  # small ones only (numpy's generator state)
        return {NDARRAY: {"dtype": str(value.dtype), "data": value.tolist()}}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, _join(path, i), tensors) for i, v in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("@") for k in value):
            return {k: _encode(v, _join(path, k), tensors) for k, v in value.items()}
        return {ITEMS: [[_encode_key(k, path), _encode(v, _join(path, k), tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot save {path or 'the state'}: a {type(value).__name__} is neither a tensor nor a JSON "
                    "value (give its object a state_dict() of tensors and plain values)")


def _encode_key(key, path: str):
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    if isinstance(key, tuple):
        return {TUPLE: [_encode_key(k, path) for k in key]}
    raise TypeError(f"cannot save {path or 'the state'}: a dict key of type {type(key).__name__} (keys must be "
                    "strings, numbers or tuples of them)")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        return tensors[value[TENSOR]]
    if TUPLE in value:
        return tuple(_decode(v, tensors) for v in value[TUPLE])
    if ITEMS in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value[ITEMS]}
    if NDARRAY in value:
        return np.array(value[NDARRAY]["data"], dtype=value[NDARRAY]["dtype"])
    return {k: _decode(v, tensors) for k, v in value.items()}


def write_tree(tree, folder: Path, stem: str) -> None:
    """Write `tree` as `folder/<stem>.json`, plus `folder/<stem>.safetensors` if it holds tensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, "", tensors)
    if tensors:
        save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    (folder / f"{stem}.json").write_text(json.dumps(encoded, indent=1))


def read_tree(folder: Path, stem: str):
    """The tree that write_tree(tree, folder, stem) wrote, its tensors on the CPU."""
    from safetensors.torch import load_file

    encoded = json.loads((folder / f"{stem}.json").read_text())
    tensor_file = folder / f"{stem}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    try:
        return _decode(encoded, tensors)
    except KeyError as err:
        raise ValueError(f"{folder / stem}.json refers to the tensor {err} that {tensor_file.name} lacks (the "
                         "checkpoint was altered after it was written)") from None


def rng_state() -> dict:
    """This process's global generators: Python's, numpy's, torch's on the CPU and on each visible GPU."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


@dataclass
class CheckpointContents:
    """What a training checkpoint holds, besides the accelerator's own step counter, gradient scaler and the
    random generators."""

    models: list[nn.Module]  # as accelerator.prepare returned them (wrapped for DDP or not)
    optimizer: object  # a torch optimizer or accelerate's wrapper of one
    scheduler: object  # a learning-rate scheduler or accelerate's wrapper of one
    objects: list  # anything else with state_dict() / load_state_dict(): the TrainState, the EMA


def model_file(index: int) -> str:
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


def object_stem(index: int, obj) -> str:
    return f"object_{index}_{type(obj).__name__.lower()}"


def write_state(accelerator, folder: Path, contents: CheckpointContents) -> None:
    """Every process writes its random generators; the main process writes the rest (the same on all of them)."""
    folder.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        from safetensors.torch import save_model

        for i, model in enumerate(contents.models):  # unwrapped: the keys carry no DDP "module." prefix
            save_model(accelerator.unwrap_model(model), str(folder / model_file(i)), metadata={"format": "pt"})
        write_tree(contents.optimizer.state_dict(), folder, "optimizer")
        write_tree(contents.scheduler.state_dict(), folder, "scheduler")
        for i, obj in enumerate(contents.objects):
            write_tree(obj.state_dict(), folder, object_stem(i, obj))
        scaler = accelerator.scaler  # fp16 only: the loss scale and its growth counter
        write_tree({"step": accelerator.step, "scaler": scaler.state_dict() if scaler is not None else None},
                   folder, "accelerator")
    write_tree(rng_state(), folder, f"random_states_{accelerator.process_index}")


def read_state(accelerator, folder: Path, contents: CheckpointContents) -> None:
    """Restore what write_state wrote into `contents`, the accelerator and this process's generators."""
    from safetensors.torch import load_model

    expected = [model_file(i) for i in range(len(contents.models))]
    found = sorted(p.name for p in folder.glob("model*.safetensors"))
    if found != sorted(expected):
        raise ValueError(f"{folder} holds the weights of {len(found)} model(s) ({', '.join(found)}), this run trains "
                         f"{len(expected)}: resume with the config that wrote it (e.g. the same train_text_encoder)")
    for name, model in zip(expected, contents.models):
        model = accelerator.unwrap_model(model)
        try:
            load_model(model, str(folder / name), strict=True)
        except RuntimeError as err:
            raise ValueError(f"{folder / name} does not fit the {type(model).__name__} of this run (was the "
                             f"checkpoint written with another model config?): {err}") from None
    contents.optimizer.load_state_dict(read_tree(folder, "optimizer"))
    contents.scheduler.load_state_dict(read_tree(folder, "scheduler"))

    stems = [object_stem(i, obj) for i, obj in enumerate(contents.objects)]
    found = sorted(p.stem for p in folder.glob("object_*.json"))
    if found != sorted(stems):
        raise ValueError(f"{folder} holds the state of {found}, this run keeps {stems}: resume with the config that "
                         "wrote it (e.g. the same use_ema)")
    for stem, obj in zip(stems, contents.objects):
        obj.load_state_dict(read_tree(folder, stem))

    saved = read_tree(folder, "accelerator")
    accelerator.step = int(saved["step"])
    if accelerator.scaler is not None:
        if saved["scaler"]:
            accelerator.scaler.load_state_dict(saved["scaler"])
        else:
            warnings.warn(f"{folder} was written without fp16 loss scaling; the gradient scaler starts afresh",
                          stacklevel=2)

    rng = f"random_states_{accelerator.process_index}"
    if (folder / f"{rng}.json").exists():
        set_rng_state(read_tree(folder, rng))
    else:  # the run has more processes than the one that wrote the checkpoint
        warnings.warn(f"{folder} has no {rng}.json: process {accelerator.process_index}'s random generators are not "
                      "restored (the checkpoint was written by fewer processes)", stacklevel=2)
