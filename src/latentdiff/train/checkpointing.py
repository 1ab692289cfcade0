"""Checkpoints that are either complete or ignored, and hold nothing that must be unpickled.

The state (state_io.py: safetensors and JSON, no pickle) is written into `<output_dir>/.tmp-checkpoint-<step>`;
once every process has finished, the main process writes a completion marker listing each file and its size, then
renames the folder to `checkpoint-<step>` (a rename within one file system is atomic). A run killed mid-save
therefore leaves at most a `.tmp-` folder, and `--resume latest` takes the newest `checkpoint-<step>` whose marker
and files check out, warning about any it passes over.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from ..checkpoints import PICKLE_SUFFIXES, files_sha256
from .state_io import CheckpointContents, read_state, write_state

MARKER = "checkpoint_complete.json"
NAME = re.compile(r"checkpoint-(\d+)")
FORMAT = "latentdiff-train-state/1"  # written into the marker; earlier checkpoints (accelerate's pickles) lack it


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None if it is complete and readable."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"]
    except FileNotFoundError:
        return "no completion marker (it was being written when the run stopped)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable completion marker ({type(err).__name__}: {err})"
    pickled = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickled or "format" not in marker:
        return (f"written in accelerate's pickle format ({', '.join(pickled[:3]) or 'no format in its marker'}), "
                "which latentdiff no longer unpickles: resume from a newer checkpoint or start a new output_dir")
    if marker["format"] != FORMAT:
        return f"written in the format {marker['format']!r}; this version of latentdiff reads {FORMAT!r}"
    for name, size in files.items():
        path = folder / name
        try:
            with open(path, "rb") as f:
                f.read(1)
            actual = path.stat().st_size
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
        if actual != size:
            return f"{name} has {actual} bytes, the marker says {size} (truncated or overwritten)"
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(str(path), "pt") as st:
                    st.keys()
            except Exception as err:  # safetensors raises its own error types for bad headers
                return f"{name} is not a readable safetensors file ({err})"
        if name.endswith(".json"):
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as err:
                return f"{name} is not readable JSON ({err})"
    return None


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named checkpoint-<step>, newest first (complete or not)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := NAME.fullmatch(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def find_resumable(output_dir: str | Path) -> Path | None:
    """The newest complete, readable checkpoint in `output_dir`, or None; warns about each one skipped."""
    for _, folder in list_checkpoints(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        warnings.warn(f"not resuming from {folder}: {problem}; trying an older checkpoint", stacklevel=2)
    return None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder that `resume` ("latest", a folder, or None) designates."""
    if resume is None:
        return None
    if resume == "latest":
        folder = find_resumable(output_dir)
        if folder is None:
            warnings.warn(f"resume: latest found no complete checkpoint in {output_dir}; starting from step 0",
                          stacklevel=2)
        return folder
    folder = Path(resume)
    if not folder.is_dir():
        raise FileNotFoundError(f"resume: checkpoint folder {folder} not found (or use --resume latest)")
    problem = checkpoint_problem(folder)
    if problem:
        raise ValueError(f"resume: {folder} cannot be used: {problem}. Use --resume latest to pick the newest "
                         "complete checkpoint instead.")
    return folder


def save_checkpoint(accelerator, output_dir: str | Path, step: int, total_limit: int | None,
                    contents: CheckpointContents, extra: dict | None = None) -> Path:
    """Save `contents` and the accelerator's state as `<output_dir>/checkpoint-<step>`, atomically; keep the newest
    `total_limit`. Every process must call this (each writes its own random generators' state)."""
    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    write_state(accelerator, tmp, contents)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        marker = tmp / MARKER
        with open(marker, "w") as f:
            json.dump({"format": FORMAT, "step": step, "files": files, **(extra or {})}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # an older, abandoned checkpoint of the same step (e.g. one skipped at resume)
            stale = output_dir / f".stale-checkpoint-{step}"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def run_identity(config) -> dict:
    """What a run computes, as its checkpoints record it: the config's keys apart from its `bookkeeping` ones, with
    each of its `input_paths` replaced by a SHA-256 of the files there (a VAE retrained in place is another input)."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in config.bookkeeping}
    for key in config.input_paths:
        if values.get(key):
            values[key] = "sha256:" + files_sha256(Path(values[key]))
    return json.loads(json.dumps(values))  # tuples as lists, as the marker's JSON holds them


def identity_defaults(config) -> dict:
    """The default value of each config key, as run_identity writes values (see identity_differences)."""
    values = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(config)
              if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return json.loads(json.dumps(values))


def identity_differences(folder: Path, identity: dict, defaults: dict | None = None) -> list[str]:
    """How the run that wrote checkpoint `folder` differs from `identity` (empty: the same run, or a checkpoint
    from before identities were recorded). A key the checkpoint does not record was added to latentdiff after it
    was written, so that run had the key's behaviour before it existed: its default (in `defaults`); only another
    value is a difference."""
    recorded = json.loads((Path(folder) / MARKER).read_text()).get("run")
    if recorded is None:
        return []
    differences = []
    for key in sorted(set(recorded) | set(identity)):
        then, now = recorded.get(key), identity.get(key)
        if key not in recorded and defaults is not None and key in defaults and now == defaults[key]:
            continue
        if then != now:
            if key not in recorded:
                differences.append(f"{key}: not recorded there (a key added since), {json.dumps(now)} now")
            elif isinstance(then, str) and isinstance(now, str) and then.startswith("sha256:"):
                differences.append(f"{key}: the files there have changed since")
            else:
                differences.append(f"{key}: {json.dumps(then)} there, {json.dumps(now)} now")
    return differences


def load_checkpoint(accelerator, folder: str | Path, contents: CheckpointContents) -> None:
    """Restore `contents`, the accelerator's state and this process's random generators from a checkpoint folder
    (one that resolve_resume chose). Every process must call this; nothing is unpickled."""
    read_state(accelerator, Path(folder), contents)


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> None:
    """Delete complete checkpoints beyond the newest `total_limit`, and temporary folders of interrupted saves."""
    output_dir = Path(output_dir)
    for leftover in output_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if total_limit is None:
        return
    complete = [folder for _, folder in list_checkpoints(output_dir) if (folder / MARKER).exists()]
    for folder in complete[total_limit:]:
        shutil.rmtree(folder, ignore_errors=True)
