"""IP-Adapter (Ye et al. 2023): an image as a prompt. A CLIP image encoder's view of the image is projected to a few
extra context tokens, and every cross-attention of the U-Net attends to them through its own key and value
projections, its output adding `scale` times that attention to the text's ("decoupled cross-attention").

As diffusers' `pipe.load_ip_adapter(...)`, `set_ip_adapter_scale`, `unload_ip_adapter` and the pipelines'
`ip_adapter_image=` / `ip_adapter_image_embeds=`, for the original IP-Adapter of SD 1.x (`ip-adapter_sd15`: a
linear projection of the image embedding to 4 tokens) and IP-Adapter Plus (`ip-adapter-plus_sd15`,
`ip-adapter-plus-face_sd15`: a resampler over the image encoder's penultimate hidden states). The weights stay
beside the U-Net, not in its state dict (saving, LoRA and the optimised layers see the U-Net unchanged); the image
encoder is transformers' CLIPVisionModelWithProjection, read from the adapter's folder.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, load_safetensors, require_path, weights_file
from .models.attention import Attention, tensors_key


class ImageProjection(nn.Module):
    """An image embedding [B, D] (or [B, k, D], k images) -> `tokens` context tokens per image, [B, k * tokens, C]:
    a linear map and a LayerNorm (diffusers' ImageProjection, keys image_embeds.*, norm.*)."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, tokens: int = 4):
        super().__init__()
        self.tokens, self.width = tokens, cross_attention_dim
        self.image_embeds = nn.Linear(embed_dim, tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        out = self.image_embeds(embeds.to(self.image_embeds.weight.dtype))
        return self.norm(out.reshape(embeds.shape[0], -1, self.width))


class PerceiverAttention(nn.Module):
    """Learned queries attending to the image features and to themselves (IP-Adapter Plus's resampler, after
    Flamingo's perceiver): keys and values from [features | queries], 64-dimensional heads, no biases. Keys as the
    published files name them (norm1, norm2, to_q, to_kv, to_out)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q = nn.Linear(width, heads * 64, bias=False)
        self.to_kv = nn.Linear(width, 2 * heads * 64, bias=False)
        self.to_out = nn.Linear(heads * 64, width, bias=False)

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        features, queries = self.norm1(features), self.norm2(queries)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        k, v = self.to_kv(torch.cat([features, queries], dim=-2)).chunk(2, dim=-1)
        out = torch.nn.functional.scaled_dot_product_attention(split(self.to_q(queries)), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class PlusProjection(nn.Module):
    """IP-Adapter Plus: the image encoder's penultimate hidden states [B, N, E] -> `tokens` context tokens through
    a resampler (Ye et al. 2023): learned queries, `depth` blocks of PerceiverAttention and a GELU feed-forward,
    each residual, then a linear map to the text's width and a LayerNorm. Keys as the published files name them."""

    def __init__(self, embed_dim: int, hidden: int, cross_attention_dim: int, tokens: int, depth: int):
        super().__init__()
        self.tokens = tokens
        self.latents = nn.Parameter(torch.zeros(1, tokens, hidden))
        self.proj_in = nn.Linear(embed_dim, hidden)
        self.proj_out = nn.Linear(hidden, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(hidden, hidden // 64),
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden, bias=False), nn.GELU(),
                          nn.Linear(4 * hidden, hidden, bias=False)),
        ]) for _ in range(depth))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(hidden_states.to(self.proj_in.weight.dtype))
        queries = self.latents.expand(hidden_states.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            queries = attention(features, queries) + queries
            queries = feed_forward(queries) + queries
        return self.norm_out(self.proj_out(queries))


@dataclasses.dataclass
class IPAdapterState:
    """One loaded IP-Adapter: the projection, the key and value projections of each cross-attention (`layers`,
    diffusers' order) and the scale of each (layer_scales)."""

    projection: ImageProjection | PlusProjection
    layers: nn.ModuleList  # per cross-attention: ModuleList([to_k_ip, to_v_ip])
    scales: list[float] = dataclasses.field(default_factory=list)  # per cross-attention (see layer_scales)

    def __post_init__(self):
        self.scales = self.scales or [1.0] * len(self.layers)

    @property
    def tokens(self) -> int:
        """Tokens per image."""
        return self.projection.tokens

    @property
    def plus(self) -> bool:
        """Whether the adapter reads the image encoder's penultimate hidden states (Plus) or its embedding."""
        return isinstance(self.projection, PlusProjection)

    def modules(self) -> list[nn.Module]:
        return [self.projection, self.layers]

    def image_tokens(self, embeds: torch.Tensor, samples: int, width: int) -> torch.Tensor:
        """The image embeddings of `samples` contexts, [B, D] or [B, images, D] ([B, (images,) N, E] for Plus),
        as [B, images * tokens, width]: several images of one adapter are attended to as one sequence, as in
        diffusers."""
        rank = 3 if self.plus else 2  # ([B, N, E] hidden states, or [B, D] embeddings)
        if embeds.dim() == rank:
            embeds = embeds[:, None]
        if embeds.dim() != rank + 1:
            shape = "[B, N, E] or [B, images, N, E]" if self.plus else "[B, D] or [B, images, D]"
            raise ValueError(f"IP-Adapter image embeddings of shape {tuple(embeds.shape)}: expected {shape}")
        if embeds.shape[0] != samples:
            raise ValueError(f"IP-Adapter image embeddings for {embeds.shape[0]} samples but the context has "
                             f"{samples}: give one per context (with guidance: the unconditional ones first)")
        return self.projection(embeds.flatten(0, 1)).reshape(samples, -1, width)


class IPAdapters:
    """What a U-Net holds of its loaded IP-Adapters (`unet._ip`): one IPAdapterState each, and the last context it
    extended with their image tokens (see context)."""

    _caches = ("counts", "memo")  # what calls computed, not settings (compile_cache.Settings leaves them out)

    def __init__(self, adapters: list[IPAdapterState]):
        self.adapters = adapters
        self.counts: tuple[int, ...] = ()  # tokens each adapter appended to the contexts of the current call
        self.masks: list[torch.Tensor | None] = []  # the current call's masks, per adapter (see set_masks)
        self.memo: tuple | None = None  # (context, embeds, key, extended context, counts)

    def __len__(self) -> int:
        return len(self.adapters)

    def modules(self) -> list[nn.Module]:
        return [m for adapter in self.adapters for m in adapter.modules()]

    def parameters(self) -> list[torch.Tensor]:
        return [p for m in self.modules() for p in m.parameters()]

    def set_masks(self, masks) -> None:
        """diffusers' ip_adapter_masks for the next U-Net calls: per adapter None or a tensor [1 or B, images, H, W]
        (IPAdapterMaskProcessor's masks, reshaped to one per image of that adapter; 1 where the image applies).
        A masked adapter attends to each of its images separately and scales each result by its mask, resized
        to the layer's token grid (models.attention.downsample_mask); None for no masks."""
        if masks is None:
            self.masks = []
            return
        masks = list(masks) if isinstance(masks, (list, tuple)) else list(masks.unsqueeze(1))
        if len(masks) != len(self.adapters):
            raise ValueError(f"ip_adapter_masks: {len(masks)} entries for {len(self.adapters)} loaded IP-Adapters: "
                             "give one per adapter (None for an adapter without masks)")
        for i, mask in enumerate(masks):
            if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 4):
                raise ValueError(f"ip_adapter_masks[{i}] must be a tensor [1, images, height, width] (one mask per "
                                 "image of that adapter, 1 where it applies) or None")
        self.masks = masks

    def context(self, context: torch.Tensor, embeds: list[torch.Tensor]) -> torch.Tensor:
        """[context | image tokens of adapter 1 | adapter 2 | ...], per sample. The same tensor again for the same
        context and embeddings (unchanged in place), so that the cross-attentions' cached keys and values of it
        stay valid over a denoising run."""
        if len(embeds) != len(self.adapters):
            raise ValueError(f"image_embeds: {len(embeds)} tensors for {len(self.adapters)} loaded IP-Adapters: give "
                             "one per adapter")
        compiling = torch.compiler.is_compiling()  # (a compiled graph neither reads nor writes the memo)
        key = None if compiling else tensors_key((context, *embeds, *self.parameters()))
        memo = self.memo
        if (key is not None and memo is not None and memo[0] is context and len(memo[1]) == len(embeds)
                and all(a is b for a, b in zip(memo[1], embeds)) and memo[2] == key):
            self.counts = memo[4]
            return memo[3]
        width = context.shape[2]
        tokens = [a.image_tokens(e, context.shape[0], width).to(context.dtype) for a, e in zip(self.adapters, embeds)]
        self.counts = tuple(t.shape[1] for t in tokens)
        extended = torch.cat([context, *tokens], dim=1)
        if not compiling:
            self.memo = None if key is None else (context, list(embeds), key, extended, self.counts)
        return extended


def cross_attentions(unet: nn.Module, named: bool = False) -> list:
    """The U-Net's cross-attention layers in diffusers' order of attention processors (down stages, up stages, then
    the middle block), which numbers an IP-Adapter file's layers; `named`: (part, stage, transformer, layer) each,
    part "down", "up" or "mid"."""
    order = [("down", i, block) for i, block in enumerate(unet.down_blocks)]
    order += [("up", i, block) for i, block in enumerate(unet.up_blocks)] + [("mid", 0, unet.mid_block)]
    found = []
    for part, i, block in order:
        for name, m in block.named_modules():
            if isinstance(m, Attention) and name.endswith("attn2"):  # attentions.{j}.transformer_blocks.{k}.attn2
                found.append((part, i, int(name.split(".")[1]), m) if named else m)
    return found


def layer_scales(unet: nn.Module, scale) -> list[float]:
    """The scale of each cross-attention from set_ip_adapter_scale's argument: one number for all, or diffusers'
    per-block form (InstantStyle), e.g. {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}: a
    part ("down", "mid", "up") is a number or {"block_i": number or one number per transformer of that stage};
    what it leaves out is 0."""
    layers = cross_attentions(unet, named=True)
    if not isinstance(scale, dict):
        return [_number(scale, "scale")] * len(layers)
    unknown = sorted(set(scale) - {"down", "mid", "up"})
    if unknown:
        raise ValueError(f"set_ip_adapter_scale: unknown parts {unknown}; use 'down', 'mid' and 'up'")
    blocks = {"down": {i for p, i, _, _ in layers if p == "down"}, "up": {i for p, i, _, _ in layers if p == "up"}}
    per_stage = {(p, i): 1 + max(j for q, k, j, _ in layers if (q, k) == (p, i)) for p, i, _, _ in layers}
    for part, value in scale.items():
        if part != "mid" and isinstance(value, dict):
            wrong = sorted(k for k in value if k not in {f"block_{i}" for i in blocks[part]})
            if wrong:
                raise ValueError(f"set_ip_adapter_scale: {part} {wrong} name no stage with attention (those are "
                                 f"{sorted(f'block_{i}' for i in blocks[part])})")
            for key, entry in value.items():
                count = per_stage[(part, int(key.split("_")[1]))]
                if isinstance(entry, list) and len(entry) != count:
                    raise ValueError(f"set_ip_adapter_scale: {part} {key} has {count} transformers; got "
                                     f"{len(entry)} scales")
    out = []
    for part, i, j, _ in layers:
        value = scale.get(part, 0.0)
        if part == "mid":
            value = value[0] if isinstance(value, list) and len(value) == 1 else value
        elif isinstance(value, dict):
            value = value.get(f"block_{i}", 0.0)
        if isinstance(value, list):
            value = value[j]
        out.append(_number(value, f"{part} scale"))
    return out


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"set_ip_adapter_scale: {what} {value!r} must be a number")
    return float(value)


def attach(unet: nn.Module, loaded: IPAdapters) -> None:
    """Give the U-Net and each of its cross-attentions the adapters (plain attributes: not submodules)."""
    layers = cross_attentions(unet)
    for state in loaded.adapters:
        if len(layers) != len(state.layers):
            raise ValueError(f"the IP-Adapter has {len(state.layers)} cross-attention layers but the U-Net "
                             f"{len(layers)}: it was made for another architecture")
    object.__setattr__(unet, "_ip", loaded)
    for i, layer in enumerate(layers):
        layer.ip = (loaded, i)


def detach(unet: nn.Module) -> None:
    for layer in cross_attentions(unet):
        layer.ip = None
    object.__setattr__(unet, "_ip", None)


def read_ip_adapter(source, subfolder: str | None, weight_name: str | None) -> tuple[dict, dict, str]:
    """(image_proj state, ip_adapter state, where) from a .safetensors file, a folder holding one, or a dict with
    diffusers' two parts."""
    if isinstance(source, dict):
        state, where = source, "the given state dict"
        if "image_proj" in state and "ip_adapter" in state:
            return dict(state["image_proj"]), dict(state["ip_adapter"]), where
    else:
        path = require_path(Path(source) / subfolder if subfolder else Path(source), "IP-Adapter file or folder")
        path = weights_file(path, weight_name, "ip-adapter_sd15.safetensors", "IP-Adapter weights")
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: latentdiff reads IP-Adapters from .safetensors files only (pickled .bin "
                                  "files are never loaded); convert it first")
        state, where = load_safetensors(path), str(path)
    parts = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part not in parts or not rest:
            raise ValueError(f"{where}: key {key!r} is not an IP-Adapter's (expected image_proj.* and ip_adapter.*)")
        parts[part][rest] = value
    return parts["image_proj"], parts["ip_adapter"], where


def build_state(projection: dict, attention: dict, unet: nn.Module, where: str) -> IPAdapterState:
    """The adapter's modules from its two state dicts, checked against the U-Net."""
    width = unet.config.cross_attention_dim
    if "latents" in projection and "proj_in.weight" in projection:  # IP-Adapter Plus
        made = projection["proj_out.weight"].shape[0]
        _, tokens, hidden = projection["latents"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in projection if k.startswith("layers."))
        proj = PlusProjection(projection["proj_in.weight"].shape[1], hidden, made, tokens, depth)
    elif "proj.weight" in projection:
        made = projection["proj.weight"].shape[0] // 4
        proj = ImageProjection(projection["proj.weight"].shape[1], made, 4)
        projection = {k.replace("proj.", "image_embeds.", 1): v for k, v in projection.items()}
    else:
        kind = ("IP-Adapter Full Face" if "proj.3.weight" in projection else "IP-Adapter FaceID" if projection
                else "an empty image projection")
        raise ValueError(f"{where}: {kind} is not supported; latentdiff loads the original IP-Adapter (image_proj "
                         "proj.*, norm.*: e.g. ip-adapter_sd15.safetensors) and IP-Adapter Plus (image_proj latents, "
                         "proj_in.*, layers.*: e.g. ip-adapter-plus_sd15.safetensors)")
    if made != width:
        raise ValueError(f"{where}: its image projection makes tokens of width {made} but the U-Net's cross-attention "
                         f"reads {width}: the adapter is for another model")
    try:
        proj.load_state_dict(projection)
    except RuntimeError as err:
        raise ValueError(f"{where}: the image projection's weights do not fit its layout: {err}") from None
    layers = nn.ModuleList()
    for j, layer in enumerate(cross_attentions(unet)):
        inner = layer.to_q.out_features if hasattr(layer.to_q, "out_features") else layer.to_out[0].in_features
        pair = nn.ModuleList([nn.Linear(width, inner, bias=False), nn.Linear(width, inner, bias=False)])
        for linear, name in zip(pair, ("to_k_ip", "to_v_ip")):
            key = f"{2 * j + 1}.{name}.weight"
            if key not in attention:
                raise ValueError(f"{where}: no ip_adapter.{key} (the U-Net has {len(layers) + 1}+ cross-attention "
                                 "layers): the adapter is for another architecture")
            if attention[key].shape != linear.weight.shape:
                raise ValueError(f"{where}: ip_adapter.{key} is {tuple(attention[key].shape)}, the U-Net's layer needs "
                                 f"{tuple(linear.weight.shape)}: the adapter is for another architecture")
            with torch.no_grad():
                linear.weight.copy_(attention[key])
        layers.append(pair)
    expected = {f"{2 * j + 1}.{n}.weight" for j in range(len(layers)) for n in ("to_k_ip", "to_v_ip")}
    extra = sorted(set(attention) - expected)
    if extra:
        raise ValueError(f"{where}: unexpected ip_adapter keys {extra[:4]}: the adapter is for another architecture")
    return IPAdapterState(proj.eval().requires_grad_(False), layers.eval().requires_grad_(False))


class IPAdapterMixin:
    """The pipelines' IP-Adapter methods (diffusers' names)."""

    image_encoder = None
    feature_extractor = None

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict, subfolder: str | list | None = None,
                        weight_name: str | list | None = None,
                        image_encoder_folder: str | os.PathLike | None = "image_encoder", **kwargs) -> None:
        """Load one IP-Adapter, or several at once given lists (as diffusers: `weight_name=[a, b]` with one path
        and subfolder for all, or one each): each a .safetensors file, a folder holding one, or a {"image_proj",
        "ip_adapter"} state dict. The CLIP image encoder, where `image_encoder_folder` names one, is the first
        adapter's: a folder name is looked up beside its weights (`path/subfolder/image_encoder`, as diffusers), a
        path with a separator taken as it is; None skips it (pass ip_adapter_image_embeds= then). Adapters loaded
        before are replaced, as in diffusers."""
        if kwargs.pop("use_safetensors", None) is False:
            raise CheckpointError("use_safetensors=False: latentdiff reads IP-Adapters from .safetensors only")
        for name in ("local_files_only", "low_cpu_mem_usage"):  # (diffusers' options that hold here anyway)
            kwargs.pop(name, None)
        if kwargs:
            raise TypeError(f"load_ip_adapter: unexpected arguments {sorted(kwargs)}")
        sources, subfolders, names = (v if isinstance(v, list) else [v] for v in (
            pretrained_model_name_or_path_or_dict, subfolder, weight_name))
        count = max(len(sources), len(subfolders), len(names))
        for what, values in (("pretrained_model_name_or_path_or_dict", sources), ("subfolder", subfolders),
                             ("weight_name", names)):
            if len(values) not in (1, count):
                raise ValueError(f"load_ip_adapter: {len(values)} {what} for {count} adapters: give one for all, or "
                                 "one per adapter")
        sources, subfolders, names = (v * count if len(v) == 1 else v for v in (sources, subfolders, names))
        states = []
        for entry in zip(sources, subfolders, names):
            projection, attention, where = read_ip_adapter(*entry)
            states.append(build_state(projection, attention, self.unet, where))
        encoder = None
        if image_encoder_folder is not None and not isinstance(sources[0], dict):
            folder = Path(image_encoder_folder)
            if len(folder.parts) == 1:  # (a name: beside the weights)
                base = Path(sources[0])
                base = base.parent if base.is_file() else base / subfolders[0] if subfolders[0] else base
                folder = base / folder
            encoder = load_image_encoder(require_path(folder, "IP-Adapter image encoder folder"))
        if getattr(self.unet, "_ip", None) is not None:  # (the new adapters replace those loaded before)
            detach(self.unet)
        device, dtype = self.unet.device, self.unet.dtype
        loaded = IPAdapters(states)
        for module in loaded.modules():
            module.to(device, dtype)
        attach(self.unet, loaded)
        if encoder is not None:  # (without one, an image encoder given to from_pretrained serves)
            self.image_encoder, self.feature_extractor = encoder.to(device), None
        self._forget_compiled_unet()

    def set_ip_adapter_scale(self, scale: float | dict | list) -> None:
        """How much the image counts: its attention's weight beside the text's (1: as trained; 0: off); one number,
        or per stage and transformer as diffusers takes it (layer_scales; InstantStyle picks the layers that carry
        an image's style or layout this way); with several adapters, a list of those, one per adapter (or one for
        all)."""
        loaded = getattr(self.unet, "_ip", None)
        if loaded is None:
            raise ValueError("no IP-Adapter is loaded: load_ip_adapter(...) first")
        scales = scale if isinstance(scale, list) else [scale]
        if len(scales) not in (1, len(loaded)):
            raise ValueError(f"set_ip_adapter_scale: {len(scales)} scales for {len(loaded)} loaded IP-Adapters: give "
                             "one for all, or one per adapter")
        per_layer = [layer_scales(self.unet, s) for s in scales]
        for i, state in enumerate(loaded.adapters):
            state.scales = per_layer[i if len(per_layer) > 1 else 0]

    def unload_ip_adapter(self) -> None:
        if getattr(self.unet, "_ip", None) is not None:
            detach(self.unet)
            self._forget_compiled_unet()
        self.image_encoder = self.feature_extractor = None

    def _forget_compiled_unet(self) -> None:
        unet_changed = getattr(self, "_unet_changed", None)
        if unet_changed is not None:
            unet_changed()

    @torch.no_grad()
    def encode_image(self, image, device=None, num_images_per_prompt: int = 1,
                     output_hidden_states: bool | None = None):
        """(image embeddings, zeros like them: the unconditional ones), each repeated num_images_per_prompt times,
        as diffusers' method."""
        if self.image_encoder is None:
            raise ValueError("no IP-Adapter image encoder is loaded (load_ip_adapter(..., image_encoder_folder=...)), "
                             "so ip_adapter_image cannot be encoded: pass ip_adapter_image_embeds= instead")
        weight = next(self.image_encoder.parameters())
        if self.feature_extractor is None:  # (as diffusers makes one for a pipeline that has none)
            size = self.image_encoder.config.image_size
            self.feature_extractor = clip_vision("CLIPImageProcessor")(size=size, crop_size=size)
        if not isinstance(image, torch.Tensor):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(weight.device, weight.dtype)
        if output_hidden_states:  # (IP-Adapter Plus: the penultimate layer's states; of a zero image, unconditional)
            states = [self.image_encoder(x, output_hidden_states=True).hidden_states[-2]
                      for x in (image, torch.zeros_like(image))]
        else:
            embeds = self.image_encoder(image).image_embeds
            states = [embeds, torch.zeros_like(embeds)]
        return tuple(s.to(device or self.device).repeat_interleave(num_images_per_prompt, dim=0) for s in states)

    def _ip_embeds(self, image, embeds, n: int, guided: bool) -> list[torch.Tensor] | None:
        """The image embeddings of a call for its n images, one tensor per loaded adapter ([uncond; cond] with
        guidance, as the contexts), or None without an IP-Adapter; refuses an image without an adapter, and an
        adapter without an image. `image`: diffusers' ip_adapter_image, one entry per adapter (an image, or a list
        of images that the adapter sees together); a bare image for one adapter."""
        loaded = getattr(self.unet, "_ip", None)
        if loaded is None:
            if image is not None or embeds is not None:
                raise ValueError("ip_adapter_image / ip_adapter_image_embeds given, but no IP-Adapter is loaded: "
                                 "load_ip_adapter(...) first")
            return None
        if (image is None) == (embeds is None):
            raise ValueError("an IP-Adapter is loaded: pass ip_adapter_image= (or ip_adapter_image_embeds=), or "
                             "unload_ip_adapter() / set_ip_adapter_scale(0) to generate without an image")
        given = embeds if embeds is not None else image
        entries = list(given) if isinstance(given, (list, tuple)) else [given]
        what = "ip_adapter_image_embeds" if embeds is not None else "ip_adapter_image"
        if len(entries) != len(loaded):
            raise ValueError(f"{what}: {len(entries)} entries for {len(loaded)} loaded IP-Adapters: give one per "
                             "adapter (for several images of one adapter, a list inside the list)")
        out = []
        for state, entry in zip(loaded.adapters, entries):
            if embeds is not None:
                negative, positive = entry.chunk(2) if guided else (None, entry)
            else:
                positive, negative = self.encode_image(entry, self.device, 1, output_hidden_states=state.plus)
                positive, negative = positive[None], negative[None]  # ([1, images, ...], as diffusers)
            if positive.shape[0] not in (1, n):
                raise ValueError(f"IP-Adapter image embeddings for {positive.shape[0]} images but the call makes {n}: "
                                 "give one, or one per image")
            positive = positive.expand(n, *positive.shape[1:])
            if guided:
                positive = torch.cat([negative.expand(n, *negative.shape[1:]), positive])
            out.append(positive.to(self.device, self.dtype))
        return out


def clip_vision(name: str):
    """transformers' class `name` (CLIPVisionModelWithProjection, CLIPImageProcessor): the CLIP image encoder of
    IP-Adapters and image variation models is transformers' (an optional dependency: latentdiff[vision])."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"the CLIP image encoder (IP-Adapter, image variation) is transformers' {name}, and "
                          "transformers is not installed: pip install 'latentdiff[vision]' (or transformers)") from None
    return getattr(transformers, name)


def load_image_encoder(folder: Path, variant: str | None = None):
    """transformers' CLIPVisionModelWithProjection from `folder` (safetensors only; `variant`: model.VARIANT.
    safetensors), in eval mode."""
    CLIPVisionModelWithProjection = clip_vision("CLIPVisionModelWithProjection")

    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder}: no .safetensors weights (latentdiff never loads pickled .bin files); "
                              "convert the image encoder first")
    return CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=True, variant=variant).eval()
