"""Compiled models kept on disk between processes: `pipe.compile(cache_dir=folder)`.

On a CPU, inductor's own caches never find a compiled U-Net of an earlier process: freezing packs the weights into
oneDNN's opaque tensors, which its FX graph cache cannot pickle, and the generated C++ names constants by address,
so its code cache misses too; every process compiles again (the tiny-shapes U-Net: 1-2 minutes on 2 cores).
AOTInductor instead compiles an exported graph ahead of time into a package (a .pt2 file: the shared library and
its frozen, packed weights) that a later process loads in seconds. A package is made for one call layout (the
shapes, strides, dtypes and devices of the tensors, the values of everything else) and is found again by a key of
everything its code depends on: that layout; the model's weights and its modules' settings (a LoRA scale, FreeU,
attention options); latentdiff's source; torch's version; the CPU and the vector instructions inductor compiled
for; the compile options. A change to any of them makes a new package; stale ones are never used, and the folder
can be emptied at any time."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils import _pytree

from .models.attention import TextProjections

FORMAT = 1  # what a package holds and how it is keyed: a new value leaves the old packages unused
_SIMPLE = (bool, int, float, str, type(None))
_MISSING = object()
log = logging.getLogger(__name__)


class _Unkeyed(Exception):
    """A value whose effect on the compiled code a key cannot describe."""


def call_key(args: tuple, kwargs: dict) -> str | None:
    """What an exported graph is specialised to in a call's arguments, as text: the nesting of tuples, lists and
    dicts; each tensor's shape, strides, dtype and device; the values of None, bools, numbers and strings (export
    bakes them in). Unlike pipeline.call_layout (dynamo's guards, within one process) it names nothing that differs
    between processes. None for other values, or where two arguments are the same tensor."""
    seen: set[int] = set()

    def key(value):
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                raise _Unkeyed
            seen.add(id(value))
            return ["tensor", list(value.shape), list(value.stride()), str(value.dtype), str(value.device)]
        if isinstance(value, (tuple, list)):
            return [type(value).__name__, [key(v) for v in value]]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return ["dict", [[k, key(v)] for k, v in value.items()]]
        if isinstance(value, _SIMPLE):
            return [type(value).__name__, repr(value)]
        raise _Unkeyed

    try:
        return json.dumps(key((args, kwargs)))
    except _Unkeyed:
        return None


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's values as bytes (a host copy where it lives elsewhere)."""
    return memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer: name, dtype, shape and bytes (SD 1.5's U-Net in float32: ~2 s)."""
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()


# what forward() does not read (the weights are keyed apart; the rest concerns saving, loading and gradients), caches
# of what it computed (a torch.compile'd call's projections of the text, attention.TextProjections), and the LoRA
# adapters' bookkeeping (lora.ModelAdapters: they are merged into the weights, which are keyed; it names weights by
# address and version, which would make every process's key, and every scale set again, a new one)
_MODULE_STATE = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_state_dict_hooks",
                 "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                 "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook", "_text_projections", "_lora"}


_DESCRIBED = (*_SIMPLE, tuple, list, dict, torch.Tensor, torch.nn.Module)  # an object's attributes described by value


class Settings:
    """What a module tree computes beyond its weights: `digest`, a SHA-256 of each module's class and attributes
    (training flag, FreeU's factors, attention options, hooks, an IP-Adapter's scales and masks) described as
    plain data: plain values as they are; tensors by their bytes; lists, tuples and dicts item by item; modules
    outside the tree (an IP-Adapter's layers, held as plain attributes) by their own settings and weights; other
    objects by class, with their plain attributes; callables by class. A class may name attributes that hold what
    its calls computed (`_caches`: the attention layers' concatenated projections, the IP-Adapters' last context),
    which are left out: they differ between processes (they name tensors by address) and from call to call.

    `unchanged()` says whether anything the digest read may have changed since, in a small part of the digest's
    time (tiny-shapes' U-Net: 0.2-1.1 ms against 7 ms; docs/benchmarks.md): the walk kept a copy of every table it
    read (attribute dicts of modules and objects, submodule and hook tables, lists and dicts), compared with the
    live ones in C (entries by identity first, so an unchanged entry costs a pointer compare, then by ==: a value
    rebound to an equal one, 1 to 1.0, counts as unchanged), the classes of those objects, and copies of the
    tensors it hashed. A change it cannot compare (a tensor rebound in a table) counts as one."""

    def __init__(self, model: torch.nn.Module):
        self.tables: list = []  # the live dicts and lists
        self.copies: list = []  # their contents when the walk read them
        self.objects: list = []
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._tree = {id(m) for m in model.modules()}
        self._described: dict[int, object] = {}  # id -> description of an object read before in this walk
        described = self._modules(model)
        del self._tree, self._described  # (the walk's own: kept, they would hold every description till the end)
        self.types = [type(o) for o in self.objects]
        self.digest = hashlib.sha256(json.dumps(described).encode()).hexdigest()

    def unchanged(self) -> bool:
        try:
            return (self.copies == self.tables and [type(o) for o in self.objects] == self.types
                    and all(torch.equal(live, kept) for live, kept in self.tensors))
        except (RuntimeError, ValueError, TypeError, NotImplementedError):  # (a rebound tensor compared by value)
            return False

    def _modules(self, root: torch.nn.Module) -> list:
        modules = []
        for name, module in root.named_modules(remove_duplicate=False):
            self._object(module)
            self._table(module._modules)
            state, caches = [], getattr(type(module), "_caches", ())
            for key, value in vars(module).items():
                if key not in _MODULE_STATE and key not in caches:
                    setting = value if type(value) is bool else self._value(value)
                    if not (type(value) is OrderedDict and not value):  # (an empty hook table: watched only)
                        state.append([key, setting])
            modules.append([name, type(module).__module__, type(module).__qualname__, sorted(state)])
        return modules

    def _table(self, table) -> None:
        self.tables.append(table)
        self.copies.append(table.copy())

    def _object(self, value) -> None:
        self.objects.append(value)
        self._table(value.__dict__)

    def _value(self, value):
        if type(value) in _SIMPLE or isinstance(value, _SIMPLE):  # (the first test is the fast one)
            return repr(value)
        if isinstance(value, torch.dtype | torch.device | torch.memory_format):
            return str(value)
        if isinstance(value, torch.Tensor):
            self.tensors.append((value, value.detach().clone()))
            return ["tensor", list(value.shape), str(value.dtype), hashlib.sha256(_bytes(value)).hexdigest()]
        if isinstance(value, (tuple, list, dict)):
            if not isinstance(value, tuple):
                self._table(value)
            if isinstance(value, dict):
                return [[str(k), self._value(v)] for k, v in value.items()]
            return [self._value(v) for v in value]
        if id(value) in self._described:
            return self._described[id(value)]
        kind = _kind(value)
        if isinstance(value, torch.nn.Module):
            if id(value) in self._tree:
                return kind
            self._tree |= {id(m) for m in value.modules()}
            described = self._described[id(value)] = [kind, self._modules(value), weights_digest(value)]
            return described
        if not isinstance(getattr(value, "__dict__", None), dict):
            return kind
        self._object(value)
        skip = getattr(type(value), "_caches", ())
        attributes = [[k, self._value(v) if isinstance(v, _DESCRIBED) else _kind(v)]
                      for k, v in sorted(vars(value).items()) if k not in skip]
        described = self._described[id(value)] = [kind, attributes] if vars(value) else kind
        return described


def _kind(value) -> str:
    """A value's class, named so that it reads the same in every process: module.qualname."""
    return f"{type(value).__module__}.{type(value).__qualname__}"


def settings_digest(model: torch.nn.Module) -> str:
    """Settings(model).digest."""
    return Settings(model).digest


@lru_cache(maxsize=None)
def source_digest() -> str:
    """SHA-256 of latentdiff's own source files (the code a package was compiled from)."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp", ".h") and p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\n" + path.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=None)
def machine() -> dict:
    """What compiled code depends on besides the model: torch's version and the CPU it was compiled for (its model
    name, its feature flags as Linux lists them, ATen's vector capability). Reads no part of inductor (importing it
    and dynamo takes ~2 s, which a process that only loads packages saves)."""
    name, flags = platform.processor(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key == "model name" and name == platform.processor():
                name = line.split(":", 1)[1].strip()
            elif key in ("flags", "Features") and not flags:
                flags = line.split(":", 1)[1].strip()
    return {"torch": torch.__version__, "arch": platform.machine(), "cpu": name,
            "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "capability": torch.backends.cpu.get_cpu_capability()}


class _Package:
    """A loaded AOTInductor package, called as the model it was exported from. Made from torch's loader directly:
    torch._inductor.aoti_load_package would import inductor and dynamo first (~2 s a process)."""

    def __init__(self, path: Path):
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        inputs, outputs = self.loader.get_call_spec()
        self.inputs, self.outputs = _pytree.treespec_loads(inputs), _pytree.treespec_loads(outputs)
        self.keywords = list(self.inputs.child(1).context)  # (the order export flattened them in)

    def __call__(self, *args, **kwargs):
        flat, _ = _pytree.tree_flatten((args, {k: kwargs[k] for k in self.keywords if k in kwargs}))
        return _pytree.tree_unflatten(self.loader.boxed_run([x for x in flat if isinstance(x, torch.Tensor)]),
                                           self.outputs)


def _load(path: Path) -> Callable:
    if hasattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader"):
        return _Package(path)
    from torch._inductor import aoti_load_package  # (a torch without the loader where we look for it)

    return aoti_load_package(str(path))


class CachedCompiledModel:
    """`model`'s calls run from AOTInductor packages kept in `folder` (see the module's docstring): a call whose
    layout has a package there loads it (once per process); one that has none exports the model, compiles it ahead
    of time under `settings()` (inductor_settings: frozen weights, max-autotune as asked) and writes the package
    (written whole under a temporary name, then renamed: a package is never seen half written). Calls it cannot
    key (arguments other than tensors and plain values, gradients enabled, tensors off the CPU), and layouts whose
    export or compile failed (warned once), run `fallback()` (torch.compile's call) instead.

    The weights are read once, at the first call (they are frozen into the packages: weights changed in place later
    are not seen, as with compile()); the modules' settings are checked at the first call of each denoising loop
    (`pipe`'s _seen_calls, as CompiledCall), after each step callback, and at each call outside a loop (by
    Settings.unchanged(); digested again only where that saw a change)."""

    def __init__(self, model: torch.nn.Module, folder: str | os.PathLike, settings: Callable,
                 fallback: Callable[[], Callable], pipe=None, options: dict | None = None):
        self.model, self.folder, self.settings = model, Path(folder), settings
        self.fallback, self.pipe, self.options = fallback, pipe, dict(options or {})
        self._weights: str | None = None
        self._settings: Settings | None = None
        self._keys: dict[tuple[str, str], str] = {}  # (layout, settings digest) -> key
        self._runs: dict[str, Callable | None] = {}  # key -> the loaded package (None: run the fallback)
        self._fallback: Callable | None = None
        self.compiled_packages: list[Path] = []  # the packages this object compiled
        self.loaded_packages: list[Path] = []  # those it found compiled and loaded

    def __getattr__(self, name: str):  # the model's attributes (its config, dtype, ...), as torch.compile's has
        if name in ("model", "fallback", "pipe"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() or not all(t.device.type == "cpu" for t in _pytree.tree_leaves((args, kwargs))
                                              if isinstance(t, torch.Tensor)):
            return self._run_fallback(args, kwargs)
        context, text = TextProjections.for_call(self.model, args, kwargs)
        if text is None:  # the package runs model(*args, **kwargs)
            inputs, layout = (args, kwargs), call_key(args, kwargs)
        else:  # the package runs _WithText: the text's keys and values projected here (as CompiledCall does)
            inputs = ((args, kwargs, text.projected(context)), {})
            layout = call_key(inputs[0], {"text_projected_outside": True})
        key = None if layout is None else self.key(layout)
        if key is None:
            return self._run_fallback(args, kwargs)
        run = self._runs.get(key, _MISSING)
        if run is _MISSING:
            model = self.model if text is None else _WithText(self.model, text.layers)
            run = self._runs[key] = self._package(key, layout, model, inputs)
        if run is None:
            return self._run_fallback(args, kwargs)
        return run(*inputs[0], **inputs[1])

    def key(self, layout: str) -> str | None:
        """The package's name for a call of this layout: SHA-256 of all that its compiled code depends on (None
        where a weight cannot be read, as oneDNN's opaque packed tensors)."""
        seen = getattr(self.pipe, "_seen_calls", None)
        marker = ("settings", id(self))
        try:
            if self._weights is None:
                self._weights = weights_digest(self.model)
            if self._settings is None or (seen is None or marker not in seen) and not self._settings.unchanged():
                self._settings = Settings(self.model)
        except (NotImplementedError, RuntimeError):
            return None
        if seen is not None:
            seen.add(marker)
        key = self._keys.get((layout, self._settings.digest))
        if key is None:
            described = {"format": FORMAT, "machine": machine(), "source": source_digest(), "options": self.options,
                         "weights": self._weights, "settings": self._settings.digest, "call": layout}
            key = self._keys[(layout, self._settings.digest)] = hashlib.sha256(
                json.dumps(described, sort_keys=True).encode()).hexdigest()[:40]
        return key

    def _run_fallback(self, args, kwargs):
        if self._fallback is None:
            self._fallback = self.fallback()
        with self.settings():  # (its first calls compile)
            return self._fallback(*args, **kwargs)

    def _package(self, key: str, layout: str, model: torch.nn.Module, inputs: tuple) -> Callable | None:
        """The loaded package of `key`; compiled first from `model(*inputs[0], **inputs[1])` where the folder has
        none."""
        _name_outputs()
        path = self.folder / f"{type(self.model).__name__}-{key}.pt2"
        if path.is_file():
            try:
                run = _load(path)
                self.loaded_packages.append(path)
                return run
            except Exception as error:  # (a truncated or foreign file: compile it again over it)
                warnings.warn(f"the compiled model {path} could not be loaded ({type(error).__name__}: "
                              f"{_first_line(error)}); compiling it again", stacklevel=3)
        log.info("compiling %s ahead of time for the call %s into %s", type(self.model).__name__, layout, path)
        try:
            seconds = self._compile(path, model, inputs)
        except Exception as error:
            warnings.warn(f"{type(self.model).__name__} could not be compiled ahead of time for the call {layout} "
                          f"({type(error).__name__}: {_first_line(error)}); these calls run through torch.compile "
                          "instead, compiled again in every process", stacklevel=3)
            return None
        self.compiled_packages.append(path)
        log.info("compiled %s in %.1f s", path.name, seconds)
        _describe(path, self.model, layout, seconds)
        return _load(path)

    def _compile(self, path: Path, model: torch.nn.Module, inputs: tuple) -> float:
        """Export and compile into `path` (written under a temporary name, then renamed)."""
        from torch._inductor import aoti_compile_and_package

        start = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.pt2")
        began = time.time() - 1.0
        try:
            with torch.no_grad():
                exported = torch.export.export(model, *_plain(inputs))
                with self.settings():
                    aoti_compile_and_package(exported, package_path=str(partial))
            _drop_packaged_files(partial, began)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return time.perf_counter() - start


def _drop_packaged_files(package: Path, since: float) -> None:
    """Remove from inductor's cache folder the files AOTInductor built for `package` and left there: its shared
    library holds a copy of the weights (SD 1.5's U-Net: 3.4 GB at every compile). Found by name (they carry hashes
    of their code) among the files written since `since`; inductor's cached kernels stay for later compiles (a
    build folder of its own, removed after, made tiny-shapes' max-autotune compile take twice as long)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    with zipfile.ZipFile(package) as archive:
        names = {Path(name).name for name in archive.namelist() if "/aotinductor/" in name}
    root = Path(cache_dir())
    for folder in (f for f in root.iterdir() if f.is_dir() and f.stat().st_mtime >= since):
        for file in folder.rglob("*"):
            if file.name in names and file.is_file() and file.stat().st_mtime >= since:
                file.unlink(missing_ok=True)


class _WithText(torch.nn.Module):
    """`model(*args, **kwargs)` with its cross-attentions' keys and values of the text given as inputs (`pairs`,
    one per layer of TextProjections), which they read from `text_kv` when traced (attention.Attention)."""

    def __init__(self, model: torch.nn.Module, layers: list):
        super().__init__()
        self.model, self.layers = model, list(layers)

    def forward(self, args: tuple, kwargs: dict, pairs: list):
        with TextProjections.put(self.layers, pairs):
            return self.model(*args, **kwargs)


def _name_outputs() -> None:
    """Our models' NamedTuple outputs named for torch's pytree serialisation: a package stores how to rebuild its
    output (export refuses an unnamed NamedTuple, and loading needs the name registered)."""
    from .models.controlnet import ControlNetOutput
    from .models.unet import UNetOutput

    for kind in (ControlNetOutput, UNetOutput):
        if kind not in _pytree.SUPPORTED_SERIALIZED_TYPES:
            _pytree._register_namedtuple(kind, serialized_type_name=f"{kind.__module__}.{kind.__qualname__}")


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else ""


def _plain(value):
    """`value` with its inference tensors (torch.inference_mode's, which export cannot trace) copied to plain ones of
    the same layout."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        with torch.inference_mode(False):
            copy = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
            return copy.copy_(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _describe(path: Path, model: torch.nn.Module, layout: str, seconds: float) -> None:
    """A readable note beside a package: what it was compiled for, by which code, when, and how long it took."""
    note = {"model": _kind(model), "call": json.loads(layout),
            "machine": machine(), "format": FORMAT, "source": source_digest(), "compile_seconds": round(seconds, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with contextlib.suppress(OSError):
        path.with_suffix(".json").write_text(json.dumps(note, indent=1) + "\n")


def packages(folder: str | os.PathLike) -> list[dict]:
    """The packages in a cache folder, oldest first: each one's note (model, call layout, machine, compile seconds,
    when it was made; {} where it has none) with `path`, `bytes`, and `stale`: why this installation can never
    use it (made by another package format, latentdiff source, torch version or CPU), or None where it can or
    where its note cannot tell."""
    found = []
    stats = [(path, path.stat()) for path in Path(folder).glob("*.pt2") if not path.name.startswith(".")]
    for path, stat in sorted(stats, key=lambda item: item[1].st_mtime):
        try:
            note = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            note = {}
        found.append({**note, "path": path, "bytes": stat.st_size, "stale": _stale(note)})
    return found


def _stale(note: dict) -> str | None:
    if not note:
        return None
    if "format" not in note or "source" not in note:
        return "made by an older latentdiff"
    if note["format"] != FORMAT:
        return f"made in package format {note['format']} (this latentdiff's is {FORMAT})"
    if note["source"] != source_digest():
        return "made by other latentdiff source code"
    made, here = note.get("machine", {}), machine()
    if made.get("torch") != here["torch"]:
        return f"made by torch {made.get('torch')} (this is {here['torch']})"
    if made != here:
        return f"made for another CPU ({made.get('cpu')}, {made.get('capability')})"
    return None


def prune(folder: str | os.PathLike) -> list[Path]:
    """Delete from a cache folder what this installation can never use: stale packages (see packages()) and their
    notes, notes whose package is gone, and the partial files of compiles whose process has ended. Returns what
    was deleted."""
    folder = Path(folder)
    doomed = [path for entry in packages(folder) if entry["stale"]
              for path in (entry["path"], entry["path"].with_suffix(".json"))]
    doomed += [note for note in folder.glob("*.json") if not note.with_suffix(".pt2").exists()]
    for partial in folder.glob(".*.partial.pt2"):
        pid = partial.name.split(".")[-3]
        if pid.isdigit() and not _running(int(pid)):
            doomed.append(partial)
    removed = []
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process)
        return True
    return True
