"""LoRA adapters (Hu et al. 2021) for the U-Net and the text encoder, read from the files people share: diffusers'
(peft's lora_A / lora_B, and the older lora.down / lora.up and attention-processor names) and kohya-ss / A1111's
(lora_unet_..., lora_te_..., with .alpha), conv layers (LoCon) included; DoRA (Liu et al. 2024) in peft's form
(lora_magnitude_vector).

An adapter of layer W is the pair (down [r, in, ...], up [out, r, ...]) and a scale alpha / r; with adapters
a, b, ... at coefficients c_a, c_b, ... the layer computes with W0 + sum_a c_a scale_a (up_a @ down_a). Rather
than running the low-rank path beside W at every call (diffusers' peft layers), the weights are recomputed from
the kept original W0 whenever a coefficient changes (loading, set_adapters, fuse_lora, a call's LoRA scale): the
U-Net then runs at its usual speed, its optimized paths (fused projections, CUDA graphs) intact, and unloading
restores W0 bit for bit. Each adapted model holds its adapters in `model._lora` (a ModelAdapters)."""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoints import CheckpointError, load_safetensors, require_path, weights_file
from .models.attention import tensors_key

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name in a LoRA folder
COMPONENTS = ("unet", "text_encoder")
_KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_ROLES = (  # key ending -> role, most specific first
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"), (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"), (".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude"),
)
# diffusers' attention-processor spellings of the layers they adapt (its format before peft)
_PROCESSOR = {"unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
              "text_encoder": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj",
                               "to_out_lora": "out_proj"}}


class LoRAError(ValueError):
    pass


@dataclass
class LoRALayer:
    """One adapted layer: W += coefficient * scale * (up @ down), reshaped to W's shape. A DoRA layer (Liu et al.
    2024) also has a `magnitude` per output channel: with D = coefficient * scale * (up @ down) it gives the weight
    m / ||W + D|| (W + D), each output channel's row normalised (see _set_weight)."""
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1] (or [out, r, kh, kw] over a 1x1 down)
    scale: float  # alpha / r
    magnitude: torch.Tensor | None = None  # [out] (DoRA)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """scale * (up @ down) in float32 on the weight's device, shaped like it."""
        up = self.up.to(weight.device, torch.float32)
        down = self.down.to(weight.device, torch.float32)
        up, down = up.reshape(up.shape[0], up.shape[1], -1), down.reshape(down.shape[0], down.shape[1], -1)
        if up.shape[2] == 1:
            product = up[:, :, 0] @ down.flatten(1)
        else:  # a kernel in `up` over a pointwise `down`
            product = torch.einsum("ork,ri->oik", up, down[:, :, 0])
        return product.mul_(self.scale).reshape(weight.shape)


@dataclass
class ModelAdapters:
    """The adapters of one model and the coefficients they have in its weights."""
    layers: dict[str, dict[str, LoRALayer]] = field(default_factory=dict)  # adapter -> module path -> layer
    weights: dict[str, float] = field(default_factory=dict)  # adapter -> its weight while active (set_adapters)
    active: list[str] = field(default_factory=list)
    enabled: bool = True
    fused: dict[str, float] = field(default_factory=dict)  # adapter -> coefficient fixed by fuse_lora
    merged: dict[str, float] = field(default_factory=dict)  # adapter -> coefficient in the weights now
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> its weight without adapters
    written: dict[str, tuple] = field(default_factory=dict)  # module path -> tensors_key of the weight we wrote

    def coefficient(self, name: str, scale: float = 1.0) -> float:
        if name in self.fused:
            return self.fused[name]
        return self.weights[name] * scale if self.enabled and name in self.active else 0.0

    def sync(self, model: nn.Module, scale: float = 1.0) -> bool:
        """Bring the weights to the coefficients the state asks for (`scale`: a call's LoRA scale, multiplying the
        active adapters that are not fused). Returns whether any weight changed."""
        target = {name: self.coefficient(name, scale) for name in self.layers}
        changed = {name for name in target if target[name] != self.merged.get(name, 0.0)}
        if not changed:
            return False
        paths = sorted({p for name in changed for p in self.layers[name]})
        layers = {path: _adaptable(model, path) for path in paths}
        for path, layer in layers.items():  # all checked before any is written
            self._check_unchanged(path, layer.weight)
        for path, layer in layers.items():
            if self.originals[path].device != layer.weight.device:  # (the model was moved since)
                self.originals[path] = self.originals[path].to(layer.weight.device)
            terms = [(target[n], self.layers[n][path]) for n in self.layers if path in self.layers[n] and target[n]]
            _set_weight(layer, self.originals[path], terms)
            self.written[path] = tensors_key([layer.weight])
        self.merged = {name: c for name, c in target.items() if c}
        return True

    def _check_unchanged(self, path: str, weight: torch.Tensor) -> None:
        """Refuse to recompute a weight that something else changed in place since it was written here (an
        optimizer step, load_state_dict): that change would be lost. A weight replaced (cast, moved) is fine."""
        key, written = tensors_key([weight]), self.written.get(path)
        if key is not None and written is not None and key[0][0] == written[0][0] and key != written:
            raise LoRAError(f"{path}'s weight was changed in place since LoRA adapters were merged into it "
                            "(training? load_state_dict?), and recomputing it from the kept original would undo "
                            "that: unload_lora_weights() before changing the weights, or reload the pipeline")


def _set_weight(layer: nn.Module, original: torch.Tensor, terms: list[tuple[float, LoRALayer]]) -> None:
    """W0 plus each adapter's term: c D for LoRA; for DoRA (k - 1) W0 + k c D with k = m / ||W0 + c D|| per output
    channel, what peft's DoRA layers add to the base layer's output, each adapter on its own."""
    weight = layer.weight
    value = original
    if terms:
        value = base = value.float()
        for coefficient, lora in terms:
            if lora.magnitude is None:
                value = value.add(lora.delta(weight), alpha=coefficient)
                continue
            delta = lora.delta(weight).mul_(coefficient)
            norm = (base + delta).flatten(1).norm(dim=1)
            k = (lora.magnitude.to(norm.device, torch.float32) / norm).reshape(-1, *[1] * (base.dim() - 1))
            value = value + (k - 1) * base + k * delta
    with torch.inference_mode() if weight.is_inference() else torch.no_grad():
        weight.copy_(value)


def _adaptable(model: nn.Module, path: str) -> nn.Module:
    layer = model.get_submodule(path)
    if type(layer) in (nn.Linear, nn.Conv2d):
        return layer
    if type(layer).__module__.rsplit(".", 1)[-1] in ("packed", "amx_layers"):
        raise LoRAError(f"{path} was re-laid out by optimize_for_inference() (into {type(layer).__name__}), and LoRA "
                        "weights merge into plain layers: load the pipeline again, then load and set LoRAs before "
                        "optimize_for_inference()")
    raise LoRAError(f"{path} is a {type(layer).__name__}: LoRA adapts linear and convolution layers only")


def adapters_of(model: nn.Module) -> ModelAdapters | None:
    return getattr(model, "_lora", None)


def lora_call_scale(cross_attention_kwargs: dict | None) -> float | None:
    """The LoRA scale a call's cross_attention_kwargs give (diffusers' {"scale": s}), checked; None if none."""
    if not cross_attention_kwargs:
        return None
    unknown = set(cross_attention_kwargs) - {"scale", "ip_adapter_masks"}
    scale = cross_attention_kwargs.get("scale")
    if unknown or (scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)))):
        raise ValueError(f"cross_attention_kwargs={cross_attention_kwargs!r}: only 'scale' (a number: the LoRA scale) "
                         "and 'ip_adapter_masks' (IP-Adapter masks) are taken; latentdiff has no attention processors "
                         "to pass other arguments to")
    return None if scale is None else float(scale)


@contextlib.contextmanager
def scaled(sync: Callable[[float], object], scale: float | None):
    """A context in which sync(scale) holds, sync(1.0) restoring it after: adapters weakened or strengthened for
    one call. No-op for None or 1."""
    if scale is None or scale == 1.0:
        yield
        return
    sync(float(scale))
    try:
        yield
    finally:
        sync(1.0)


def model_lora_scaled(model: nn.Module, scale: float | None):
    """`model`'s active adapters `scale` times inside (a model called with cross_attention_kwargs={"scale": s})."""
    adapters = adapters_of(model)
    return contextlib.nullcontext() if adapters is None else scaled(lambda s: adapters.sync(model, s), scale)


# ---- reading files ------------------------------------------------------------------------------------------------
def read_lora(source, weight_name: str | None = None, subfolder: str | None = None
              ) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(tensors, diffusers' adapter metadata or None, a name for messages) of a LoRA given as a state dict, a
    .safetensors file, or a folder holding one (`weight_name`, else pytorch_lora_weights.safetensors, else its only
    .safetensors file)."""
    if isinstance(source, dict):
        return dict(source), None, "the given state dict"
    path = require_path(Path(source) / subfolder if subfolder else source, "LoRA file or folder")
    path = weights_file(path, weight_name, WEIGHT_NAME, "LoRA weights file")
    state = load_safetensors(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: its lora_adapter_metadata is not JSON ({err}); the file is damaged") from None
    return state, metadata, str(path)


def save_lora_weights(save_directory, unet_lora_layers: dict | None = None,
                      text_encoder_lora_layers: dict | None = None, weight_name: str = WEIGHT_NAME,
                      unet_lora_adapter_metadata: dict | None = None,
                      text_encoder_lora_adapter_metadata: dict | None = None) -> Path:
    """Write a LoRA as diffusers does: `<save_directory>/pytorch_lora_weights.safetensors` with each component's
    factors (`<layer path>.lora_A.weight`, `.lora_B.weight`) under "unet." / "text_encoder.", and their peft
    settings (r, lora_alpha, target_modules, ...) in the file's lora_adapter_metadata. Returns the file."""
    from .checkpoints import save_safetensors

    state, metadata = {}, {}
    for prefix, layers, settings in (("unet", unet_lora_layers, unet_lora_adapter_metadata),
                                     ("text_encoder", text_encoder_lora_layers, text_encoder_lora_adapter_metadata)):
        state.update({f"{prefix}.{key}": value.detach().contiguous() for key, value in (layers or {}).items()})
        metadata.update({f"{prefix}.{key}": value for key, value in (settings or {}).items()})
    if not state:
        raise ValueError("save_lora_weights: give unet_lora_layers and/or text_encoder_lora_layers")
    path = Path(save_directory) / weight_name
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"lora_adapter_metadata": json.dumps(metadata, indent=2, sort_keys=True)} if metadata else {}
    save_safetensors(state, path, {"format": "pt", **extra})
    return path


# ---- naming ---------------------------------------------------------------------------------------------------------
def _kohya_names(component: str, model: nn.Module) -> dict[str, str]:
    """kohya's flat layer name (dots as underscores) -> module path; for the U-Net also the original LDM names
    (input_blocks_1_1_proj_in), through the single-file conversion table."""
    names = {path.replace(".", "_"): path for path, m in model.named_modules() if path}
    if component == "unet":
        from .convert import unet_table

        # (an LCM U-Net's guidance projection has no LDM name; its other layers have the usual ones)
        for original, ours, _ in unet_table({**model.config.to_dict(), "time_cond_proj_dim": None}):
            if original.endswith(".weight"):
                names.setdefault(original[:-7].replace(".", "_"), ours[:-7])
    return names


def _split(key: str) -> tuple[str, str]:
    for ending, role in _ROLES:
        if key.endswith(ending):
            return key[: -len(ending)], role
    return key, ""


def _refuse_unsupported(keys: list[str], source: str) -> None:
    if any("dora_scale" in k for k in keys):
        raise LoRAError(f"{source} is a DoRA adapter in kohya-ss / LyCORIS form (dora_scale keys), which latentdiff "
                        "does not apply (it applies diffusers' / peft's DoRA files, lora_magnitude_vector keys); use "
                        "a plain LoRA")
    if any(k.startswith("lora_te2_") or k.startswith("text_encoder_2.") for k in keys):
        raise LoRAError(f"{source} adapts a second text encoder (lora_te2_ / text_encoder_2 keys): it is an SDXL "
                        "LoRA; latentdiff runs Stable Diffusion 1.x / 2.x")
    lycoris = sorted({k.split(".")[-2] if k.count(".") else k for k in keys
                      if re.search(r"\.(hada_|lokr_|oft_|b1$|w_norm|diff$)", k)})
    if lycoris:
        raise LoRAError(f"{source} holds LyCORIS tensors ({lycoris[:3]}: LoHa / LoKr / OFT or full differences), "
                        "which latentdiff does not apply; only LoRA (low-rank down/up pairs) is supported")
    if any(k.endswith("lora_B.bias") or k.endswith("lora_up.bias") for k in keys):
        raise LoRAError(f"{source} gives its LoRA layers biases (lora_B.bias), which latentdiff does not apply")


def _locate(key: str, models: dict[str, nn.Module], kohya: dict[str, dict[str, str]]) -> tuple[str, str, str]:
    """(component, module path, role) of a LoRA key, or raises naming it."""
    stem, role = _split(key)
    for prefix, component in _KOHYA.items():
        if stem.startswith(prefix) and component in models:
            path = kohya.setdefault(component, _kohya_names(component, models[component])).get(stem[len(prefix):])
            if path is None:
                break
            return component, path, role
    else:
        component, stem = ("text_encoder", stem[13:]) if stem.startswith("text_encoder.") else (
            "unet", stem[5:] if stem.startswith("unet.") else stem)
        if component in models:
            parts = [_PROCESSOR[component].get(p, p) for p in stem.split(".") if p != "processor"]
            path = ".".join(parts)
            model = models[component]
            if component == "text_encoder" and not path.startswith("text_model."):
                path = "text_model." + path  # saved from transformers 5's CLIPTextModel, without the prefix
            try:
                model.get_submodule(path)
                return component, path, role
            except AttributeError:
                pass
    raise LoRAError(f"LoRA key {key!r} names no layer of this pipeline's U-Net or text encoder: the LoRA was made "
                    "for another architecture (SDXL, SD 3, Flux, ...) or is not a LoRA file")


def parse_lora(state: dict[str, torch.Tensor], metadata: dict | None, models: dict[str, nn.Module],
               source: str) -> dict[str, dict[str, LoRALayer]]:
    """component -> module path -> LoRALayer for the layers `state` adapts, checked against `models`' weights."""
    if not state:
        raise LoRAError(f"{source} holds no tensors")
    keys = list(state)
    _refuse_unsupported(keys, source)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    kohya: dict[str, dict[str, str]] = {}
    for key in keys:
        component, path, role = _locate(key, models, kohya)
        if not role:
            raise LoRAError(f"{source}: {key!r} is not a LoRA tensor (expected lora_A / lora_B, lora_down / "
                            "lora_up or alpha keys)")
        parts.setdefault((component, path), {})[role] = state[key]
    out: dict[str, dict[str, LoRALayer]] = {}
    for (component, path), found in parts.items():
        if "down" not in found or "up" not in found:
            raise LoRAError(f"{source}: {component}.{path} has {sorted(found)} but a LoRA layer needs both its down "
                            "and up matrices: the file is incomplete")
        down, up = found["down"], found["up"]
        weight = _adaptable(models[component], path).weight
        if not _fits(down, up, weight):
            raise LoRAError(f"{source}: {component}.{path} gets down {tuple(down.shape)} and up {tuple(up.shape)}, "
                            f"which do not make its weight {tuple(weight.shape)}: the LoRA was made for another "
                            "model (SD 2.x for SD 1.x, say)")
        rank = down.shape[0]
        alpha = float(found["alpha"]) if "alpha" in found else _metadata_alpha(metadata, component, path, rank)
        rank_stabilized = bool((metadata or {}).get(f"{component}.use_rslora"))  # rsLoRA: alpha / sqrt(r)
        scale = alpha / (math.sqrt(rank) if rank_stabilized else rank)
        magnitude = found.get("magnitude")
        if magnitude is not None and magnitude.numel() != weight.shape[0]:
            raise LoRAError(f"{source}: {component}.{path} gets a DoRA magnitude of {magnitude.numel()} values for "
                            f"its {weight.shape[0]} output channels: the file is not for this model")
        out.setdefault(component, {})[path] = LoRALayer(
            down.detach(), up.detach(), scale, None if magnitude is None else magnitude.detach().flatten())
    return out


def _fits(down: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> bool:
    if down.dim() not in (2, 4) or up.dim() not in (2, 4) or up.shape[1] != down.shape[0]:
        return False
    if up.shape[0] != weight.shape[0] or down.shape[1] != weight.shape[1]:
        return False
    kernel = max(down[0, 0].numel(), up[0, 0].numel())
    pointwise = down[0, 0].numel() == 1 or up[0, 0].numel() == 1
    return pointwise and weight.numel() == up.shape[0] * down.shape[1] * kernel


def _metadata_alpha(metadata: dict | None, component: str, path: str, rank: int) -> float:
    """alpha from diffusers' adapter metadata (peft's LoraConfig of the component: lora_alpha, alpha_pattern), else
    the rank (scale 1, as diffusers reads a file without alphas)."""
    if not metadata:
        return float(rank)
    patterns = metadata.get(f"{component}.alpha_pattern") or {}
    for pattern, alpha in patterns.items():
        if path == pattern or path.endswith("." + pattern) or re.fullmatch(rf"(.*\.)?{pattern}", path):
            return float(alpha)
    return float(metadata.get(f"{component}.lora_alpha", rank))


# ---- the pipeline's methods ---------------------------------------------------------------------------------------
class LoRALoaderMixin:
    """diffusers' LoRA methods for a pipeline with `unet` and `text_encoder`."""

    save_lora_weights = staticmethod(save_lora_weights)

    def _lora_models(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in COMPONENTS}

    def _adapted(self, components=COMPONENTS) -> dict[str, tuple[nn.Module, ModelAdapters]]:
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"components={list(components)}: LoRA adapts only {list(COMPONENTS)}")
        return {name: (model, adapters_of(model)) for name, model in self._lora_models().items()
                if name in components and adapters_of(model) is not None}

    def _lora_changed(self, component: str) -> None:
        """Weights of `component` changed in place: what was made from them is stale (the compiled U-Net, whose
        weights are frozen into its graph, compiles again on the next call; the text embedding cache and the fused
        projections check weight versions themselves; CUDA graphs read the weights where they are)."""
        if component == "unet" and self._compile_options is not None:
            self._forget_compiled()

    def _sync_lora(self, scale: float = 1.0, components=COMPONENTS) -> None:
        for name, (model, adapters) in self._adapted(components).items():
            if adapters.sync(model, scale):
                self._lora_changed(name)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None, subfolder: str | None = None,
                          use_safetensors: bool | None = None, local_files_only: bool | None = None,
                          low_cpu_mem_usage: bool | None = None, hotswap: bool = False) -> None:
        """Load a LoRA (a .safetensors file, a folder holding pytorch_lora_weights.safetensors, or a state dict; in
        diffusers' or kohya-ss's format) as adapter `adapter_name` (default_0, default_1, ...), active with
        weight 1 and the only active one (as in diffusers). Its layers are merged into the weights; load LoRAs
        before optimize_for_inference()."""
        if use_safetensors is False:
            raise CheckpointError("use_safetensors=False: latentdiff reads LoRA weights only from .safetensors "
                                  "files (pickle formats are never loaded); convert the file to safetensors")
        if hotswap:
            raise ValueError("hotswap=True: not needed here (adapters are merged into the weights, which compiled "
                             "and CUDA-graph runs pick up): delete_adapters() the old one and load the new one")
        from .models.packed import is_packed

        state, metadata, source = read_lora(pretrained_model_name_or_path_or_dict, weight_name, subfolder)
        models = self._lora_models()
        per_component = parse_lora(state, metadata, models, source)
        taken = {n for _, adapters in self._adapted().values() for n in adapters.layers}
        if adapter_name is None:
            adapter_name = f"default_{len(taken)}"
        elif adapter_name in taken:
            raise ValueError(f"adapter_name={adapter_name!r} is already loaded ({sorted(taken)}): choose another "
                             "name, or delete_adapters() it first")
        for component, layers in per_component.items():
            model = models[component]
            if is_packed(model):
                raise LoRAError(f"the {component} was optimized for inference (its layers re-laid out), so LoRA "
                                "weights cannot be merged: load the pipeline again and load LoRAs before "
                                "optimize_for_inference()")
            adapters = adapters_of(model)
            if adapters is None:
                adapters = model._lora = ModelAdapters()
            for path in layers:
                if path not in adapters.originals:
                    adapters.originals[path] = _adaptable(model, path).weight.detach().clone()
            adapters.layers[adapter_name] = layers
            adapters.weights[adapter_name] = 1.0
            adapters.active = [adapter_name]
        self._sync_lora()

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        """Make `adapter_names` the active adapters, with `adapter_weights` (a number for all, one per adapter, or
        per adapter a dict {"unet": w, "text_encoder": w}; default 1)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float, dict)):
            adapter_weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
        adapter_weights = list(adapter_weights)
        if len(adapter_weights) != len(names):
            raise ValueError(f"{len(adapter_weights)} adapter_weights for {len(names)} adapter_names")
        self._check_names(names)
        for component, (_, adapters) in self._adapted().items():
            adapters.active = [n for n in names if n in adapters.layers]
            for name, weight in zip(names, adapter_weights):
                if name in adapters.layers:
                    weight = weight.get(component, 1.0) if isinstance(weight, dict) else weight
                    adapters.weights[name] = float(weight)
        self._sync_lora()

    def _check_names(self, names: list[str]) -> None:
        loaded = self.get_list_adapters()
        unknown = [n for n in names if not any(n in listed for listed in loaded.values())]
        if unknown:
            raise ValueError(f"adapters {unknown} are not loaded; loaded: "
                             f"{sorted({n for listed in loaded.values() for n in listed})}")

    def get_active_adapters(self) -> list[str]:
        active: list[str] = []
        for _, adapters in self._adapted().values():
            active += [n for n in adapters.active if n not in active]
        return active

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {name: list(adapters.layers) for name, (_, adapters) in self._adapted().items()}

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for component, (model, adapters) in self._adapted().items():
            if any(n in adapters.fused for n in names):
                raise ValueError(f"adapters {[n for n in names if n in adapters.fused]} are fused into the "
                                 f"{component}: unfuse_lora() first")
            adapters.active = [n for n in adapters.active if n not in names]
            if adapters.sync(model):  # their share of the weights goes
                self._lora_changed(component)
            for name in names:
                adapters.layers.pop(name, None)
                adapters.weights.pop(name, None)
            if not adapters.layers:
                del model._lora

    def disable_lora(self) -> None:
        self._enable(False)

    def enable_lora(self) -> None:
        self._enable(True)

    def _enable(self, on: bool) -> None:
        for _, adapters in self._adapted().values():
            adapters.enabled = on
        self._sync_lora()

    def fuse_lora(self, components=COMPONENTS, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """Fix the active adapters (or `adapter_names`), times `lora_scale`, in the weights: later set_adapters,
        disable_lora and call-time scales leave them, unload_lora_weights() keeps them, unfuse_lora() frees them.
        safe_fusing: refuse (and undo) a fusion that puts NaN or infinite values in the weights."""
        for component, (model, adapters) in self._adapted(components).items():
            names = adapters.active if adapter_names is None else [n for n in adapter_names if n in adapters.layers]
            before = dict(adapters.fused)
            for name in names:
                adapters.fused[name] = adapters.coefficient(name) * lora_scale
            if adapters.sync(model):
                self._lora_changed(component)
            if safe_fusing and any(not torch.isfinite(_adaptable(model, p).weight).all() for p in adapters.originals):
                adapters.fused = before
                adapters.sync(model)
                raise ValueError(f"fusing the LoRA into the {component} gives NaN or infinite weights; not fused")

    def unfuse_lora(self, components=COMPONENTS) -> None:
        """Undo fuse_lora(): the adapters return to their state before it (active ones at their weights)."""
        for _, (_, adapters) in self._adapted(components).items():
            adapters.fused.clear()
        self._sync_lora(components=components)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the weights return to the model's own, except what fuse_lora() fixed in them."""
        for component, (model, adapters) in self._adapted().items():
            adapters.weights = {n: 0.0 for n in adapters.layers}
            if adapters.sync(model):
                self._lora_changed(component)
            del model._lora

    def _lora_scaled(self, scale: float | None):
        """A context in which the active adapters of both models count `scale` times (a call's
        cross_attention_kwargs={"scale": s}: diffusers' way to weaken or strengthen a LoRA for one call)."""
        return scaled(self._sync_lora, scale) if self._adapted() else contextlib.nullcontext()
