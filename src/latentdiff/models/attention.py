"""Attention blocks: multi-head (self or cross) attention, the GEGLU transformer block and the spatial transformer
of the U-Net, and the single-head spatial self-attention of the VAE. One attention path:
torch.nn.functional.scaled_dot_product_attention (written out for small problems under torch.compile on a CPU:
small_attention). Module names match diffusers' state-dict keys."""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .fused import add_layer_norm, adds_residual, geglu
from .group_norm import group_norm
from .resnet import conv1x1


def tensors_key(tensors) -> tuple | None:
    """(address, in-place version) of each tensor: what a cache derived from them stays valid for (replacing a
    tensor's data moves the address, changing it in place bumps the version); None where one is an inference tensor,
    which keeps no version counter, so nothing derived from it can be checked and cached."""
    try:
        return tuple((t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:
        return None


def downsample_mask(mask: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """An image's mask [1 or B, H, W] at a layer of `tokens` queries: resized (bicubic) to the token grid of the
    mask's aspect ratio, padded or cut to the token count as diffusers' IPAdapterMaskProcessor.downsample does ->
    [batch, tokens]."""
    height, width = mask.shape[-2:]
    rows = int(math.sqrt(tokens / (width / height)))
    rows += int(tokens % rows != 0)
    resized = F.interpolate(mask[:, None].float(), size=(rows, tokens // rows), mode="bicubic")[:, 0]
    if resized.shape[0] < batch:
        resized = resized.repeat(batch, 1, 1)
    flat = resized.reshape(resized.shape[0], -1)
    if flat.shape[1] != tokens:
        warnings.warn("the aspect ratio of the IP-Adapter mask differs from the image's: its resized grid is padded "
                      "or cut to fit; give masks of the image's aspect ratio", UserWarning, stacklevel=2)
        flat = F.pad(flat, (0, tokens - flat.shape[1])) if flat.shape[1] < tokens else flat[:, :tokens]
    return flat


# Under torch.compile on a CPU, attention over at most this many query-key pairs per head runs as its matrix
# products and softmax (small_attention), which inductor fuses and tunes, rather than as the flash-attention
# kernel, whose fixed cost dominates such small problems: pipelines/tiny-shapes' U-Net (64 x 77 and 16 x 77 pairs)
# ran 4% faster so (compiled, 2-core AMD EPYC, in-process A/B). The kernel wins by 256 x 256 (compiled, 4x at
# 8 heads of 24), and the products' [B, heads, N, M] scores would be large there.
SMALL_ATTENTION = 8192


def small_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out, for small problems under torch.compile (see SMALL_ATTENTION)."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(dim=-1) @ v



class Attention(nn.Module):
    """Scaled dot-product attention (Vaswani et al. 2017) over [B, N, C] tokens; keys and values come from
    `context` when given (cross-attention to the text), else from `x` (self-attention)."""

    # softmax(q k^T / sqrt(d)) v of [B, heads, N, d] tensors; optimize_for_inference() sets amx.attention
    # on a layer where the CPU has AMX (it falls back to this one for what it does not take)
    attend = staticmethod(F.scaled_dot_product_attention)
    # what eager calls computed and kept (never read under torch.compile or export): not settings, which
    # compile_cache.Settings leaves out of its key
    _caches = ("context_cache", "fused")

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 bias: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = upcast  # compute q.k^T and softmax in fp32 (SD 2.x's upcast_attention, for fp16 stability)
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])
        self.inner = inner
        self.context_cache: list | None = None  # see cache_text_keys()
        self.fused: list | None = None  # see fuse_qkv_projections()
        self.ip: tuple | None = None  # the loaded IP-Adapters and this layer's index: (IPAdapters, i) (ip_adapter.py)
        self.text_kv: tuple | None = None  # (keys, values) of the text, under torch.compile: see TextProjections
        self.perturbed = 0  # see forward()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual: a tensor like x for the output projection to add (only where it can: fused.adds_residual).
        `perturbed` = m > 0 (set by perturbed-attention guidance, guidance.PerturbedAttentionGuidance): in a
        self-attention, the last m samples of the batch attend each token to itself alone (an identity attention
        map), so their output is to_out(to_v(x))."""
        m = self.perturbed if context is None else 0
        if not m:
            return self._forward(x, context, residual)
        tail = self.to_v(x[-m:])
        tail = self.to_out[0](tail) if residual is None else self.to_out[0](tail, residual[-m:])
        if x.shape[0] == m:
            return tail
        head = self._forward(x[:-m], None, None if residual is None else residual[:-m])
        return torch.cat([head, tail])

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, residual: torch.Tensor | None
                 ) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self._fused_qkv(x) if context is None else None
        image = None
        if qkv is not None:
            q, k, v = (self._heads(t) for t in qkv.chunk(3, dim=-1))
        else:
            q = self._heads(self.to_q(x))
            k, v, image = self._keys_values(x if context is None else context, cross=context is not None)
        out = self._attend(q, k, v)
        for scale, keys, values, mask in image or ():  # IP-Adapters' image tokens: their attention, scaled, added
            extra = self._attend(q, keys, values)
            if mask is not None:  # (a masked adapter's image: where its mask says, [B, tokens] -> [B, 1, N, 1])
                extra = extra * downsample_mask(mask, b, n).to(extra.dtype)[:, None, :, None]
            out = out + scale * extra
        out = out.transpose(1, 2).reshape(b, n, -1)
        if residual is not None:
            return self.to_out[0](out, residual)  # (a packed layer: inference only, so no dropout)
        out = self.to_out[0](out)
        return self.to_out[1](out) if self.training else out  # (dropout: the identity in eval mode)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        if (q.is_cpu and q.shape[-2] * k.shape[-2] <= SMALL_ATTENTION and self.attend is F.scaled_dot_product_attention
                and torch.compiler.is_compiling()):
            return small_attention(q, k, v)
        return self.attend(q, k, v)

    def _fused_qkv(self, x: torch.Tensor) -> torch.Tensor | None:
        """[q | k | v] of x from one matrix product, within fuse_qkv_projections() and without autograd (outside
        torch.compile); the concatenated weights are rebuilt whenever a projection's weight tensor was replaced or
        changed in place since (its address and in-place version are checked)."""
        if self.fused is None or torch.compiler.is_compiling() or torch.is_grad_enabled():
            return None
        layers = (self.to_q, self.to_k, self.to_v)
        if any(type(layer) is not nn.Linear for layer in layers):  # e.g. packed for the CPU since: re-laid out
            return None
        key = tensors_key(layer.weight for layer in layers)
        if key is None:
            return None
        if not self.fused or self.fused[0] != key:
            weight = torch.cat([layer.weight for layer in layers])
            bias = None if self.to_q.bias is None else torch.cat([layer.bias for layer in layers])
            self.fused[:] = [key, weight, bias]
        return F.linear(x, self.fused[1], self.fused[2])

    def _apply(self, fn, *args, **kwargs):
        if self.fused:  # .to(), .half(), ...: the concatenated copies are of the old tensors; made anew when used
            self.fused = []
        return super()._apply(fn, *args, **kwargs)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, heads * d] -> [B, heads, N, d] (a view)."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def _keys_values(self, context: torch.Tensor, cross: bool) -> tuple:
        """(to_k(context), to_v(context), None), split into heads; with an IP-Adapter, the context's last tokens are
        the image's: (keys and values of the text, of the image by the adapter's projections). Inside
        cache_text_keys(), a cross-attention computes them once per context tensor (and weights) and reuses them at
        every later denoising step; under torch.compile, where TextProjections has put them in `text_kv`, it
        reads them from there (projected outside the graph)."""
        if cross and torch.compiler.is_compiling() and self.text_kv is not None:
            keys, values = self.text_kv
            return self._heads(keys), self._heads(values), None
        key = self._cache_key(context) if cross else None
        if key is None:
            return self._project(context, cross)
        # the cache holds the context object itself, so that its address cannot be reused by another meanwhile
        cache = self.context_cache
        if not cache or cache[0] is not context or cache[1] != key:
            cache[:] = [context, key, self._project(context, cross)]
        return cache[2]

    def _project(self, context: torch.Tensor, cross: bool) -> tuple:
        if not cross or self.ip is None:
            return self._heads(self.to_k(context)), self._heads(self.to_v(context)), None
        loaded, i = self.ip
        text = context[:, :context.shape[1] - sum(loaded.counts)]
        masks = loaded.masks or [None] * len(loaded.adapters)
        images = []  # (scale, keys, values, mask) of each adapter (each image of a masked one) whose scale is not 0
        for state, tokens, mask in zip(loaded.adapters, context[:, text.shape[1]:].split(loaded.counts, dim=1), masks):
            to_k_ip, to_v_ip = state.layers[i]
            if state.scales[i] == 0:  # (as diffusers skips those)
                continue
            if mask is None:
                images.append((state.scales[i], self._heads(to_k_ip(tokens)), self._heads(to_v_ip(tokens)), None))
                continue
            if tokens.shape[1] != mask.shape[1] * state.tokens:
                raise ValueError(f"ip_adapter_masks: {mask.shape[1]} masks for an adapter given "
                                 f"{tokens.shape[1] // state.tokens} images: give one mask per image")
            for j, piece in enumerate(tokens.split(state.tokens, dim=1)):
                images.append((state.scales[i], self._heads(to_k_ip(piece)), self._heads(to_v_ip(piece)),
                               mask[:, j]))
        return self._heads(self.to_k(text)), self._heads(self.to_v(text)), images

    def _cache_key(self, context: torch.Tensor) -> tuple | None:
        """What cached keys and values of `context` stay valid for (tensors_key of the context and the projection
        weights), or None where nothing may be cached: outside cache_text_keys(), under torch.compile (tested first,
        so that a compiled graph never reads or guards on the cache), with autograd, during CUDA-graph capture, and
        for inference tensors."""
        if (torch.compiler.is_compiling() or self.context_cache is None or torch.is_grad_enabled()
                or (context.is_cuda and torch.cuda.is_current_stream_capturing())):
            return None
        adapters, i = ((), 0) if self.ip is None else (self.ip[0].adapters, self.ip[1])
        ip = [p for state in adapters for layer in state.layers[i] for p in layer.parameters()]
        scales = tuple(state.scales[i] for state in adapters)
        if self.ip is not None and self.ip[0].masks:  # (the masks themselves: the cache holds them per image)
            scales += tuple(map(id, self.ip[0].masks))
        key = tensors_key((context, self.to_k.weight, self.to_v.weight, *ip))
        return None if key is None else (key, scales)


@contextlib.contextmanager
def cache_text_keys(model: nn.Module):
    """Within this block, every cross-attention of `model` projects a context to keys and values once and reuses
    them while the same context tensor comes back (unchanged: its in-place version, and the projection weights',
    are checked): the text does not change during denoising, so 2 of its matrix products per layer and step are
    redundant (32 per step of SD 1.5). Only without autograd, outside torch.compile and CUDA-graph capture (those
    run the projections as usual). The caches are dropped on exit."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.context_cache = []
    try:
        yield model
    finally:
        for layer in layers:
            layer.context_cache = None


def fuse_qkv_projections(model: nn.Module, fuse: bool = True) -> None:
    """Let every self-attention of `model` whose projections are plain nn.Linear layers (not the CPU's packed ones)
    compute queries, keys and values with one matrix product over the concatenated weights (fuse=False: three
    again, the copies freed). One launch instead of three per layer on a GPU, where small batches are bound by the
    host's launches (SD 1.5: 32 fewer per step); the price is a copy of those weights (SD 1.5's U-Net: 37M
    parameters, 74 MB in fp16), made on the first call and dropped when the model is moved or cast. Used without
    autograd only; the state dict and saved files are unchanged."""
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.fused = [] if fuse else None  # (_fused_qkv skips layers that are not plain nn.Linear when called)


class GEGLU(nn.Module):
    """A GELU-gated linear unit (Shazeer 2020): one projection to twice the width, split into value and gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return geglu(self.proj(x))


# Largest hidden activation the feed-forward makes at once on the CPU. Its hidden layer is 8x as wide as its input,
# so over all 2x4096 tokens of SD 1.5's 64x64 level it is 84 MB: above glibc's largest mmap threshold (32 MB), so
# each call gets fresh pages from the kernel and page-faults through them. In slices of <= 8 MB the memory is reused
# and stays in cache: 1.35x faster there (profile: copy_/gelu/mul on [8192, 2560] took 40% of the feed-forward),
# same results. Not on a GPU: there the caching allocator reuses memory anyway and slices only add kernel launches
# (at batch 4 with guidance, 440 matrix products per SD 1.5 step instead of 88: 0.82x diffusers on an H200). Nor for
# a packed GEGLU (packed.PackedGEGLU, optimize_for_inference), which writes no 2x-wide projection and runs no
# separate GELU and product passes: whole, SD 1.5's U-Net forward took 1.58-1.61 s against 1.65 in slices (bf16, 2
# threads, AMX host, 2026-12-04); in fp32 no difference beyond that host's noise (5.75-6.33 s either way).
FF_CHUNK_BYTES = 8 << 20


class FeedForward(nn.Module):
    """GEGLU, then back to `dim`; on the CPU (unless packed) applied to slices of the tokens (each token is
    independent) to bound memory."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual: a tensor like x for the output layer to add (only where it can: fused.adds_residual)."""
        geglu = self.net[0]
        if residual is not None:
            return self.net[2](geglu(x), residual)
        if not x.is_cpu or type(geglu) is not GEGLU:
            return self._net(x)
        tokens = x.reshape(-1, x.shape[-1])
        rows = max(1, FF_CHUNK_BYTES // (geglu.proj.out_features * x.element_size()))
        if tokens.shape[0] <= rows:
            return self._net(x)
        return torch.cat([self._net(chunk) for chunk in tokens.split(rows)]).view(x.shape)

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        geglu, dropout, out = self.net
        h = geglu(x)
        return out(dropout(h) if self.training else h)  # (eval: skip the identity's call; launches are host time)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, GEGLU feed-forward. `only_cross`:
    the first attention attends to the text as well (diffusers' only_cross_attention: the SD 2.x x4 upscaler)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False,
                 only_cross: bool = False):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, context_dim=context_dim if only_cross else None, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        first = context if self.only_cross else None
        if adds_residual(self.attn1.to_out[0], self.attn2.to_out[0], self.ff.net[2]):  # packed for the CPU
            x = self.attn1(self.norm1(x), first, residual=x)
            x = self.attn2(self.norm2(x), context, residual=x)
            return self.ff(self.norm3(x), residual=x)
        x, h = add_layer_norm(x, self.attn1(self.norm1(x), first), self.norm2)  # x + attn1(...), norm2 of that
        x, h = add_layer_norm(x, self.attn2(h, context), self.norm3)
        return x + self.ff(h)


class TextProjections:
    """The keys and values of the text of every cross-attention of a model that runs compiled, projected outside
    its graph: the text does not change during denoising, yet a compiled graph (which caches nothing between calls)
    would project it again at every step (pipelines/tiny-shapes' U-Net: 14 of its 75 matrix products; 6% of a call
    on a 2-core CPU). pipeline.CompiledCall calls the compiled model inside `given(context)`, which puts the
    projections of `context` in each layer's `text_kv` for the call (the graph reads them as inputs) and takes them
    away after it. They are made anew unless the buffers' last projections are still those of this context: the
    same tensor, unchanged in place, through the same projection weights, unchanged (held, with their versions, so
    that no other tensor can take their place; a LoRA change rewrites them) - so they also outlive a step's
    callback, which may change anything. The buffers are kept per shape, dtype and device of the context and
    reused: dynamo's guards check that the graph gets the same tensor objects."""

    def __init__(self, model: nn.Module):
        self.layers = [layer for block in model.modules() if isinstance(block, BasicTransformerBlock)
                       for layer in ((block.attn1, block.attn2) if block.only_cross else (block.attn2,))]
        self._buffers: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # shape key -> (the context and the weights its buffers were projected from, tensors_key of them)
        self._holds: dict[tuple, tuple[list[torch.Tensor], tuple]] = {}

    @classmethod
    def of(cls, model: nn.Module) -> TextProjections | None:
        """The model's (made on first use, kept on it), or None where there is nothing to project or it cannot be
        done outside the graph: with autograd, or an IP-Adapter loaded (whose image tokens join the context)."""
        projections = model.__dict__.get("_text_projections")
        if projections is None:
            projections = model.__dict__["_text_projections"] = cls(model)
        if not projections.layers or torch.is_grad_enabled() or any(l.ip is not None for l in projections.layers):
            return None
        return projections

    @staticmethod
    def forget(model: nn.Module) -> None:
        """Drop the projections kept for `model` and its submodules (compile() again: a weight written through
        `.data` shows no version, so they could look fresh)."""
        for module in model.modules():
            vars(module).pop("_text_projections", None)

    @classmethod
    def for_call(cls, model: nn.Module, args: tuple, kwargs: dict) -> tuple:
        """(context, the model's TextProjections) for a call `model(x, t, context, ...)` whose text can be projected
        outside a compiled graph: a U-Net's or ControlNet's encoder_hidden_states, with no cross_attention_kwargs
        or added_cond_kwargs (which change what the cross-attentions attend to); else (None, None)."""
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if (not isinstance(context, torch.Tensor) or kwargs.get("cross_attention_kwargs")
                or kwargs.get("added_cond_kwargs") is not None):
            return None, None
        return context, cls.of(model)

    def projected(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) of `context`, in buffers kept per shape: projected anew unless the buffers
        hold those of this context and these weights already."""
        shape = (context.shape, context.dtype, context.device)
        buffers = self._buffers.get(shape)
        # (read from the modules' own tables: nn.Module's attribute lookup would cost more than the rest of this)
        sources = [context] + [p for layer in self.layers for name in ("to_k", "to_v")
                               for p in layer._modules[name]._parameters.values() if p is not None]
        key = tensors_key(sources)  # (None for inference tensors: then projected every call)
        held = self._holds.get(shape)
        if (buffers is None or key is None or held is None or held[1] != key
                or any(a is not b for a, b in zip(held[0], sources))):
            self._holds.pop(shape, None)  # (until they are all made: an error midway leaves them unclaimed)
            made = [(layer.to_k(context), layer.to_v(context)) for layer in self.layers]
            if buffers is None:
                buffers = self._buffers[shape] = made
            else:
                for (keys, values), (new_keys, new_values) in zip(buffers, made):
                    keys.copy_(new_keys)
                    values.copy_(new_values)
            if key is not None:
                self._holds[shape] = (sources, key)
        return buffers

    @contextlib.contextmanager
    def given(self, context: torch.Tensor):
        with self.put(self.layers, self.projected(context)):
            yield

    @staticmethod
    @contextlib.contextmanager
    def put(layers: list, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        """Each layer's `text_kv` set to its pair for the block (the layers read them when compiled or exported)."""
        # (straight into the layers' __dict__: nn.Module.__setattr__, which looks for parameters, buffers and
        # submodules first, costs microseconds a call, 28 per U-Net call here)
        for layer, pair in zip(layers, pairs):
            vars(layer)["text_kv"] = pair
        try:
            yield
        finally:
            for layer in layers:
                vars(layer)["text_kv"] = None


class Transformer2DModel(nn.Module):
    """The spatial transformer of latent diffusion: GroupNorm, project in, transformer blocks over the H*W tokens,
    project out, residual. SD 1.x projects with 1x1 convs, SD 2.x with linear layers (`linear_projection`)."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int = 1,
                 groups: int = 32, linear_projection: bool = False, upcast: bool = False, only_cross: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear_projection else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, upcast, only_cross) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear_projection else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = group_norm(self.norm, x, channels_last=True)
        # [B, C, H, W] -> [B, H*W, C] tokens, made contiguous once so that the blocks' norms, attention and residual
        # adds read them in order: a copy for NCHW activations, free (a view) for channels-last ones (the GroupNorm
        # kernels write channels-last, so on a GPU it is free whatever the U-Net's layout)
        if self.linear_projection:
            x = self.proj_in(x.flatten(2).transpose(1, 2).contiguous())
        else:  # (conv1x1: as a matrix product where that pays, the map's memory format kept)
            x = conv1x1(self.proj_in, x).flatten(2).transpose(1, 2).contiguous()
        for block in self.transformer_blocks:
            x = block(x, context)
        fold = adds_residual(self.proj_out)  # (packed for the CPU: the projection adds the residual itself)
        if self.linear_projection:  # on the tokens
            x = self.proj_out(x, residual.flatten(2).transpose(1, 2)) if fold else self.proj_out(x)
            x = x.transpose(1, 2).unflatten(2, (h, w))
        else:  # a 1x1 conv on the map (channels-last: a view of the tokens)
            x = x.transpose(1, 2).unflatten(2, (h, w))
            x = self.proj_out(x, residual) if fold else conv1x1(self.proj_out, x)
        return x if fold else residual + x  # (residual first: the sum keeps the input's memory layout)


class SpatialSelfAttention(Attention):
    """The VAE's single-head self-attention over the pixels of a [B, C, H, W] map, with its own GroupNorm and a
    residual connection (diffusers keeps the same key names: group_norm, to_q, to_k, to_v, to_out.0)."""

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = group_norm(self.group_norm, x).flatten(2).transpose(1, 2)
        out = super().forward(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out
