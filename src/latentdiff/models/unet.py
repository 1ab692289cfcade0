"""The conditional U-Net of latent diffusion (Rombach et al. 2022, sec. 3.3; the U-Net of Ronneberger et al. 2015
as DDPM (Ho et al. 2020) uses it): it predicts the noise in a latent x_t at timestep t, given the text embeddings
as context for cross-attention.

Reads diffusers' UNet2DConditionModel config.json for the Stable Diffusion 1.x / 2.x architectures and uses its
state-dict keys, so SD weights load without conversion. Options outside that subset are refused by name.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import AnyOf, ConfigMixin, ModelMixin, returned
from ..lora import adapters_of, lora_call_scale, model_lora_scaled
from .attention import Transformer2DModel, fuse_qkv_projections, tensors_key
from .embeddings import TimestepEmbedding, timestep_embedding, timesteps_for_batch
from .group_norm import group_norm
from .packed import pack_for_inference
from .resnet import ResnetBlock2D, TimeInput
from .unet_blocks import DownBlock, MidBlock, TransformerFactory, UpBlock

# diffusers' block type names -> whether the stage has cross-attention
DOWN_BLOCK_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_BLOCK_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)

SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclasses.dataclass(frozen=True)
class DownPathConfig(ConfigMixin):
    """The config keys of what the U-Net and the ControlNet (models/controlnet.py) share: conv_in, the time
    embedding, the down stages and the middle block; diffusers' keys with diffusers' defaults (so a config.json
    that omits a key means what it means to diffusers).

    Beware diffusers' historical naming: `attention_head_dim` is the number of attention *heads* of each stage
    (each head has channels // heads dimensions)."""

    in_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = SD_DOWN
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2  # per stage; the U-Net's up stages have one more
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280  # width of the text embeddings
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # number of heads per stage (see above)
    use_linear_projection: bool = False  # SD 2.x: the transformers project in/out with Linear, not 1x1 conv
    upcast_attention: bool = False  # SD 2.1: attention scores in fp32 when running in half precision

    def per_block(self, key: str) -> tuple[int, ...]:
        """An int-or-per-stage option as one value per stage (down order)."""
        value = getattr(self, key)
        return (value,) * len(self.block_out_channels) if isinstance(value, int) else tuple(value)

    def heads(self) -> tuple[int, ...]:
        """The number of attention heads of each stage."""
        return self.per_block("attention_head_dim")

    def fail(self, key: str, why: str):
        raise ValueError(f"{type(self).__name__}: {key} = {getattr(self, key)!r}: {why}")

    def validate(self) -> None:
        stages = len(self.block_out_channels)
        if stages < 1 or not all(_positive_int(c) for c in self.block_out_channels):
            self.fail("block_out_channels", "expected a non-empty list of positive channel counts")
        self._check_types("down_block_types", DOWN_BLOCK_TYPES)
        if self.mid_block_type not in MID_BLOCK_TYPES:
            self.fail("mid_block_type", f"latentdiff supports only {MID_BLOCK_TYPES[0]!r}")
        for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
            self._check_per_block(key)
        for key in ("in_channels", "cross_attention_dim", "norm_num_groups"):
            if not _positive_int(getattr(self, key)):
                self.fail(key, "expected a positive int")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            self.fail("norm_num_groups", f"must divide every entry of block_out_channels {self.block_out_channels}")
        if any(h > c for h, c in zip(self.heads(), self.block_out_channels)):
            self.fail("attention_head_dim", "a stage cannot have more heads than channels (it is the number of heads)")

    def _check_types(self, key: str, known: dict) -> None:
        types = getattr(self, key)
        if len(types) != len(self.block_out_channels):
            self.fail(key, f"expected one entry per block_out_channels entry ({len(self.block_out_channels)})")
        if any(t not in known for t in types):
            self.fail(key, f"latentdiff supports only {sorted(known)}")

    def _check_per_block(self, key: str) -> None:
        value, stages = getattr(self, key), len(self.block_out_channels)
        if not (_positive_int(value) or (isinstance(value, tuple) and len(value) == stages
                                         and all(_positive_int(v) for v in value))):
            self.fail(key, f"expected a positive int or a list of {stages} positive ints (one per stage)")


@dataclasses.dataclass(frozen=True)
class UNetConfig(DownPathConfig):
    """diffusers' UNet2DConditionModel config (DownPathConfig's keys and the up path's); `sd15()` and `sd2()` are
    the Stable Diffusion presets. diffusers refuses `num_attention_heads` for this model, and so do we."""

    diffusers_class = "UNet2DConditionModel"
    # diffusers options outside SD 1.x/2.x: only their default is accepted
    fixed = {
        "center_input_sample": False, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "reverse_transformer_layers_per_block": None,
        "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_attention_heads": None,
        "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
        "addition_time_embed_dim": None, "resnet_time_scale_shift": "default",
        "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
        "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
        "conv_in_kernel": 3, "conv_out_kernel": 3,
        "projection_class_embeddings_input_dim": None, "attention_type": "default",
        "class_embeddings_concat": False, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
        # only read by the UNetMidBlock2DSimpleCrossAttn mid block, so any value means the same to ours
        "mid_block_only_cross_attention": AnyOf((None, False, True)),
    }

    sample_size: int | tuple[int, int] | None = None  # latent size the model was trained at (informative only)
    out_channels: int = 4
    up_block_types: tuple[str, ...] = SD_UP
    time_cond_proj_dim: int | None = None  # LCM-distilled U-Nets: width of the guidance embedding (timestep_cond)
    # the SD 2.x x4 upscaler: a learned embedding per class label (its noise level) added to the time embedding,
    # and stages whose first attention attends to the text too (one flag, or one per stage in down order)
    num_class_embeds: int | None = None
    only_cross_attention: bool | tuple[bool, ...] = False

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """Stable Diffusion 1.x (859,520,964 parameters; CLIP ViT-L/14 text embeddings of width 768)."""
        return cls(sample_size=64, cross_attention_dim=768)

    @classmethod
    def sd2(cls) -> "UNetConfig":
        """Stable Diffusion 2.1 (768 px, OpenCLIP ViT-H/14 text embeddings of width 1024, 64-channel heads)."""
        return cls(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                   use_linear_projection=True, upcast_attention=True)

    def validate(self) -> None:
        super().validate()
        self._check_types("up_block_types", UP_BLOCK_TYPES)
        if not _positive_int(self.out_channels):
            self.fail("out_channels", "expected a positive int")
        if not (self.time_cond_proj_dim is None or _positive_int(self.time_cond_proj_dim)):
            self.fail("time_cond_proj_dim", "expected null or a positive int (the guidance embedding's width)")
        if not (self.num_class_embeds is None or _positive_int(self.num_class_embeds)):
            self.fail("num_class_embeds", "expected null or a positive int (the number of class labels)")
        flags = self.only_cross_attention
        if not (isinstance(flags, bool) or (isinstance(flags, tuple) and len(flags) == len(self.block_out_channels)
                                            and all(isinstance(f, bool) for f in flags))):
            self.fail("only_cross_attention", f"expected true, false or a list of {len(self.block_out_channels)} "
                                              "of them (one per stage)")
        if not (self.sample_size is None or _positive_int(self.sample_size)
                or (isinstance(self.sample_size, tuple) and len(self.sample_size) == 2)):
            self.fail("sample_size", "expected null, an int or [height, width]")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _repeat_batch(k: int, x: torch.Tensor, emb: TimeInput, skips: list[torch.Tensor]):
    """x, emb and the skips as for torch.cat([sample] * k): k copies of the batch, one after the other (a skip that
    is x itself, conv_in's output before a first stage with attention, shares x's copy; the rows of a TimeTable
    hold one timestep for every sample already)."""
    repeated = torch.cat([x] * k)
    emb = emb if isinstance(emb, dict) else torch.cat([emb] * k)
    return repeated, emb, [repeated if s is x else torch.cat([s] * k) for s in skips]


def _checked_residuals(residuals: Sequence[torch.Tensor], targets: list[torch.Tensor],
                       name: str = "down_block_additional_residuals") -> Sequence[torch.Tensor]:
    """ControlNet residuals, checked against what they are added to: as many, of the same shapes and dtypes."""
    if len(residuals) != len(targets):
        raise ValueError(f"{name}: got {len(residuals)} tensors, but this U-Net has {len(targets)} skip connections: "
                         "give the outputs of a ControlNet made for this U-Net's architecture (ControlNetModel."
                         "from_unet)")
    for i, (r, x) in enumerate(zip(residuals, targets)):
        if r.shape != x.shape or r.dtype != x.dtype:
            where = f"{name}[{i}]" if len(targets) > 1 else name
            raise ValueError(f"{where} is {tuple(r.shape)} {r.dtype} but the U-Net's tensor there is "
                             f"{tuple(x.shape)} {x.dtype}: the ControlNet's sample, batch and dtype must be the "
                             "U-Net's (its batch: one per context)")
    return residuals


def _checked_intrablock(maps: Sequence[torch.Tensor], stages: int) -> list[torch.Tensor]:
    """A T2I-Adapter's feature maps as a list to consume: one per down stage (one more, for the middle block, is
    taken where its shape fits, as diffusers does)."""
    if not isinstance(maps, (list, tuple)) or not all(isinstance(m, torch.Tensor) for m in maps):
        raise TypeError("down_intrablock_additional_residuals must be a list of tensors (a T2I-Adapter's outputs)")
    if not stages <= len(maps) <= stages + 1:
        raise ValueError(f"down_intrablock_additional_residuals: {len(maps)} feature maps for a U-Net of {stages} down "
                         f"stages: give one per stage (a T2I-Adapter made for this architecture)")
    return list(maps)


class TimeTable:
    """What a U-Net's ResNet blocks add for each timestep of a denoising run, made for all of them at once (see
    cache_timesteps): per timestep a dict from each block to its projection of the embedding, [1, C]. Made on the
    first call that needs it and again whenever the dtype, the device or a weight it depends on changed
    (attention.tensors_key: addresses and in-place versions)."""

    def __init__(self, timesteps: torch.Tensor):
        self.timesteps = timesteps  # held: its storage identifies the calls' timesteps and cannot be reused
        self.version = timesteps._version  # (an inference tensor raises RuntimeError: cache_timesteps skips it)
        self.key: tuple | None = None
        self.rows: list[dict] = []
        self.parameters: list[torch.Tensor] = []

    def index(self, t: torch.Tensor) -> int | None:
        """Which element of the timesteps `t` is: a 0-d view into their storage, as iterating over them gives."""
        ts = self.timesteps
        if (t.dim() != 0 or t.dtype != ts.dtype or t._version != self.version
                or t.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr()):
            return None
        i, rest = divmod(t.storage_offset() - ts.storage_offset(), ts.stride(0))
        return i if rest == 0 and 0 <= i < ts.shape[0] else None

    def row(self, unet: "UNet2DConditionModel", i: int, sample: torch.Tensor) -> dict | None:
        """Row i for `sample`'s dtype and device; None where the weights cannot be checked (inference tensors)."""
        key = self._key(sample)
        if key is None:
            return None
        if key != self.key:
            blocks = [m for m in unet.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]
            emb = unet.embed_time(self.timesteps.to(sample.device), sample.dtype)
            shifts = {block: block.time_emb_proj(emb) for block in blocks}
            self.rows = [{block: shift[j:j + 1] for block, shift in shifts.items()} for j in range(len(emb))]
            self.parameters = [*unet.time_embedding.parameters(),
                               *(p for block in blocks for p in block.time_emb_proj.parameters())]
            self.key = self._key(sample)
        return self.rows[i]

    def _key(self, sample: torch.Tensor) -> tuple | None:
        weights = tensors_key(self.parameters)
        return None if weights is None else (sample.dtype, sample.device, weights)


@contextlib.contextmanager
def cache_timesteps(model: nn.Module, timesteps: torch.Tensor):
    """Within this block, a call of our U-Net `model` (or of ours inside it) whose timestep is an element of the 1-d
    tensor `timesteps`, as iterating over it gives, takes every ResNet block's projection of the time embedding from
    a TimeTable computed once for all of `timesteps` (one batched pass on the first such call) instead of the
    embedding, the MLP and 22 matrix products per call (SD 1.5). Those depend on the timestep alone, which a
    denoising loop knows in advance: 33 kernel launches fewer per fp16 step on a GPU, where a small batch is bound
    by the host's launches (on this CPU, 13.9 -> 13.5 ms per call of SD 1.5's structure with tiny widths). Only
    without autograd, outside torch.compile and CUDA-graph capture, for unchanged timesteps (their in-place version
    is checked); other calls compute the embedding as usual. Dropped on exit."""
    unets = [m for m in model.modules() if isinstance(m, DownPath)]  # (a U-Net, ControlNets: a table each)
    for unet in unets:
        try:
            unet.time_table = TimeTable(timesteps) if timesteps.dim() == 1 and timesteps.stride(0) > 0 else None
        except RuntimeError:  # an inference tensor keeps no version counter
            unet.time_table = None
    try:
        yield model
    finally:
        for unet in unets:
            unet.time_table = None


class UNetOutput(NamedTuple):
    sample: torch.Tensor


class DownPath(ModelMixin):
    """What the U-Net and the ControlNet share: conv_in, the time embedding, the down stages (ResNet blocks and text
    cross-attention, stride-2 convs) and the middle block, with their state-dict keys (diffusers' for both)."""

    def _build_down_path(self, config: DownPathConfig, time_cond_dim: int | None = None) -> list[int]:
        """Make the modules; returns the channels of every skip connection the down path leaves (conv_in's output,
        each stage's layers' outputs and its downsampled output). `time_cond_dim`: the width of a condition the
        time embedding adds (an LCM's guidance embedding)."""
        self.config = config
        self.gradient_checkpointing = False
        self.time_table: TimeTable | None = None  # see cache_timesteps()
        channels, layers = config.block_out_channels, config.per_block("layers_per_block")
        temb = channels[0] * 4
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb, time_cond_dim)
        classes = getattr(config, "num_class_embeds", None)
        self.class_embedding = nn.Embedding(classes, temb) if classes else None

        # stage i works at 1/2^i of the input resolution
        self.down_blocks = nn.ModuleList()
        skip_channels, prev = [channels[0]], channels[0]
        for i, (kind, ch) in enumerate(zip(config.down_block_types, channels)):
            downsample = i < len(channels) - 1
            attn = self._transformer(i) if DOWN_BLOCK_TYPES[kind] else None
            self.down_blocks.append(DownBlock(prev, ch, temb, layers[i], attn, downsample, **self._norm()))
            skip_channels += [ch] * (layers[i] + downsample)
            prev = ch
        self.mid_block = MidBlock(channels[-1], temb, self._transformer(len(channels) - 1, mid=True), **self._norm())
        return skip_channels

    def _norm(self) -> dict:
        return dict(groups=self.config.norm_num_groups, eps=self.config.norm_eps)

    def _transformer(self, stage: int, mid: bool = False) -> TransformerFactory:
        """The spatial transformers of `stage` (the middle block's: `mid`, never only cross-attention, as in
        diffusers' UNetMidBlock2DCrossAttn)."""
        config = self.config
        heads = config.heads()[stage]
        depth = config.per_block("transformer_layers_per_block")[stage]
        only_cross = False if mid else bool(config.per_block("only_cross_attention")[stage]) \
            if hasattr(config, "only_cross_attention") else False
        return lambda ch: Transformer2DModel(ch, heads, ch // heads, config.cross_attention_dim, depth,
                                             config.norm_num_groups, config.use_linear_projection,
                                             config.upcast_attention, only_cross)

    def _time(self, timestep, sample: torch.Tensor, cond: torch.Tensor | None = None,
              class_labels: torch.Tensor | None = None) -> TimeInput:
        """The time embedding of this call: from the time table (cache_timesteps) or computed (always with a
        `cond` or class labels, the table being made without them)."""
        emb = self._tabled_time(timestep, sample) if cond is None and class_labels is None else None
        if emb is None:
            emb = self.embed_time(timesteps_for_batch(timestep, sample.shape[0], sample.device), sample.dtype, cond,
                                  class_labels)
        return emb

    def _down_path(self, x: torch.Tensor, emb: TimeInput, ctx: torch.Tensor, shared: int,
                   intrablock: list[torch.Tensor] | None = None):
        """The down stages from conv_in's output x, for `shared` contexts per sample (see UNet2DConditionModel's
        forward): returns (x, emb, skips), all for the contexts' batch. `intrablock`: a T2I-Adapter's feature maps,
        one per stage from the first (DownBlock.forward); those left over go to the caller."""
        skips = [x]
        for kind, block in zip(self.config.down_block_types, self.down_blocks):
            if shared > 1 and DOWN_BLOCK_TYPES[kind]:  # the first stage with cross-attention
                x, emb, skips = _repeat_batch(shared, x, emb, skips)
                shared = 1
            if intrablock:
                x, block_skips = self._run(block, x, emb, ctx, intrablock.pop(0))
            else:
                x, block_skips = self._run(block, x, emb, ctx)
            skips += block_skips
        if shared > 1:
            x, emb, skips = _repeat_batch(shared, x, emb, skips)
        return x, emb, skips

    def embed_time(self, t: torch.Tensor, dtype: torch.dtype, cond: torch.Tensor | None = None,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """SiLU(time MLP(sinusoidal features of t [B])) -> [B, 4 * block_out_channels[0]]: every ResNet block
        projects SiLU of the embedding, so it is applied here once rather than in each of them. `cond` [B or 1,
        time_cond_proj_dim]: an LCM's guidance embedding, added to the features through the MLP's cond_proj;
        `class_labels` [B] (with num_class_embeds): their learned embeddings, added to the MLP's output."""
        features = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                      self.config.freq_shift)
        emb = self.time_embedding(features.to(dtype), None if cond is None else cond.to(dtype))
        if class_labels is not None:
            emb = emb + self.class_embedding(class_labels).to(dtype)
        return F.silu(emb)

    def _tabled_time(self, timestep, sample: torch.Tensor) -> dict | None:
        """The time table's row for this call's timestep, where cache_timesteps() applies (see there)."""
        if torch.compiler.is_compiling():  # (first: a compiled graph neither reads nor guards on the table)
            return None
        table = self.time_table
        if (table is None or not isinstance(timestep, torch.Tensor) or torch.is_grad_enabled()
                or (sample.is_cuda and torch.cuda.is_current_stream_capturing())):
            return None
        i = table.index(timestep)
        return None if i is None else table.row(self, i, sample)

    def _run(self, block: nn.Module, *args):
        """Call a stage; when training with gradient checkpointing on, keep only its inputs and recompute its
        activations during the backward pass (Chen et al. 2016), trading ~30% more compute for memory."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def optimize_for_inference(self, winograd: bool = True) -> "DownPath":
        """Make CPU inference fast: eval mode, channels-last activations, linear and conv weights re-laid out once
        for oneDNN, and 3x3 convs computed with Winograd's algorithm on inputs where it pays (wide layers, enough
        pixels: packed.winograd_pays; see packed.py, winograd.py; `winograd=False` saves its extra weight memory:
        SD 1.5 in float32 on an AMX CPU holds 7.5 GiB of weights with it, 4.0 without, 3.2 plain); the upsamplers'
        convs run on the low-resolution map (packed.PackedUpsampleConv); the residual adds happen in the output
        layers' epilogues; on CPUs with AMX, attention (fp32 and bf16), fp32 linear layers and fp32 Winograd products
        run on our AMX kernels (amx.py). The result runs only without gradients and cannot be saved, cast or moved:
        do that before. Beyond eval and channels-last, a no-op off the CPU. Returns self."""
        return pack_for_inference(self, winograd)

    def fuse_qkv_projections(self) -> None:
        """Self-attention queries, keys and values from one matrix product per layer (models/attention.py's
        fuse_qkv_projections: fewer launches on a GPU, a copy of those weights); undone by unfuse_qkv_projections()."""
        fuse_qkv_projections(self)

    def unfuse_qkv_projections(self) -> None:
        fuse_qkv_projections(self, fuse=False)

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def _check_inputs(self, sample: torch.Tensor, ctx: torch.Tensor) -> None:
        cfg = self.config
        if sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be latents of shape [B, {cfg.in_channels}, H, W]; got "
                             f"{tuple(sample.shape)}")
        if ctx.dim() != 3 or ctx.shape[0] % sample.shape[0] or ctx.shape[2] != cfg.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must have shape [B={sample.shape[0]}, tokens, {cfg.cross_attention_dim}]; "
                f"got {tuple(ctx.shape)}. Give one context per sample (repeat it for several images per prompt; "
                "k per sample shares each sample among k contexts) from a text encoder whose width matches the "
                "config's cross_attention_dim"
            )
        dtype = self.conv_in.weight.dtype
        if not torch.is_autocast_enabled(sample.device.type) and (sample.dtype, ctx.dtype) != (dtype, dtype):
            raise ValueError(
                f"inputs are {sample.dtype} (sample) and {ctx.dtype} (encoder_hidden_states) but the U-Net's "
                f"weights are {dtype}: cast them with .to({dtype}) or run under torch.autocast"
            )


class UNet2DConditionModel(DownPath):
    """eps_theta(x_t, t, context): conv_in; down stages (ResNet blocks and text cross-attention, stride-2 convs);
    middle; up stages fed with every down layer's output as a skip connection; GroupNorm, SiLU, conv_out."""

    config_class = UNetConfig
    accepts_shared_samples = True  # forward() takes k contexts per sample (see there)

    _ip = None  # the loaded IP-Adapters (ip_adapter.IPAdapters): beside the model, not in its state dict
    _labels_read: tuple | None = None  # (class_labels tensor, its in-place version) whose range was read last

    def __init__(self, config: UNetConfig):
        super().__init__()
        skip_channels = self._build_down_path(config, config.time_cond_proj_dim)
        channels, layers = config.block_out_channels, config.per_block("layers_per_block")
        temb, prev = channels[0] * 4, channels[-1]
        # up: mirror image; each stage takes one skip more than its down twin made (the one from the stage below)
        self.up_blocks = nn.ModuleList()
        for j, kind in enumerate(config.up_block_types):
            i = len(channels) - 1 - j
            n = layers[i] + 1
            skips, skip_channels = skip_channels[-n:], skip_channels[:-n]
            attn = self._transformer(i) if UP_BLOCK_TYPES[kind] else None
            self.up_blocks.append(UpBlock(prev, channels[i], skips[::-1], temb, attn, i > 0, **self._norm()))
            prev = channels[i]

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (models/unet_blocks.free_u) in the first two up stages, as diffusers' method of this name: b1, b2
        amplify the backbone's features of stages 1 and 2, s1, s2 scale their skip connections' low frequencies
        (SD 1.x: s1=0.9, s2=0.2, b1=1.5, b2=1.6, the FreeU authors' values). No training, no new weights."""
        for name, value in (("s1", s1), ("s2", s2), ("b1", b1), ("b2", b2)):
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"enable_freeu: {name}={value!r} must be a positive number (disable_freeu() turns "
                                 "FreeU off)")
        for i, block in enumerate(self.up_blocks):
            block.freeu = ((b1, s1), (b2, s2))[i] if i < 2 else None

    def _apply(self, fn, *args, **kwargs):
        """.to(), .half(), ...: an IP-Adapter's modules move and cast with the U-Net."""
        out = super()._apply(fn, *args, **kwargs)
        if self._ip is not None:
            for module in self._ip.modules():
                module._apply(fn, *args, **kwargs)
            self._ip.memo = None
        return out

    def _with_image_tokens(self, context: torch.Tensor, added: dict | None, masks=None) -> torch.Tensor:
        """The context with the IP-Adapters' image tokens appended (added_cond_kwargs={"image_embeds": [embeds]}, as
        diffusers passes them), where they are loaded (ip_adapter.py), and their `masks` (cross_attention_kwargs'
        ip_adapter_masks) set for this call; other added conditions are refused."""
        state = self._ip
        added = dict(added or {})
        embeds = added.pop("image_embeds", None)
        if masks is not None and state is None:
            raise ValueError("ip_adapter_masks given, but no IP-Adapter is loaded: load_ip_adapter(...) first")
        if added or (embeds is not None and state is None):
            name = sorted(added)[0] if added else "image_embeds"
            raise ValueError(f"added_cond_kwargs {name!r} is not supported by this U-Net" + (
                " without an IP-Adapter: load_ip_adapter(...) first" if not added else
                " (Stable Diffusion 1.x has no use for it): pass None"))
        if state is None:
            return context
        if embeds is None:
            raise ValueError("an IP-Adapter is loaded: pass its image embeddings, added_cond_kwargs={'image_embeds': "
                             "[embeds]} (or unload it)")
        state.set_masks(masks)
        return state.context(context, list(embeds) if isinstance(embeds, (list, tuple)) else [embeds])

    def _check_timestep_cond(self, cond: torch.Tensor | None, batch: int) -> None:
        dim = self.config.time_cond_proj_dim
        if cond is None:
            return
        if dim is None:
            raise ValueError("timestep_cond is given but this U-Net takes none (its config's time_cond_proj_dim is "
                             "null: not an LCM-distilled U-Net); pass None")
        if not isinstance(cond, torch.Tensor) or cond.dim() != 2 or cond.shape[0] not in (1, batch) \
                or cond.shape[1] != dim:
            shape = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"timestep_cond must be a tensor [{batch} (or 1), {dim}] (a guidance embedding, "
                             f"embeddings.guidance_embedding(w, {dim})); got {shape}")

    def _class_labels(self, labels, batch: int) -> torch.Tensor | None:
        """The class labels of a call as [batch] (one for all, one per sample, or one per sample before the samples
        were repeated for k contexts each), checked against the config."""
        classes = self.config.num_class_embeds
        if labels is None:
            if classes:
                raise ValueError(f"this U-Net embeds class labels (num_class_embeds={classes}): pass class_labels, "
                                 "e.g. the x4 upscaler's noise level, one integer per sample")
            return None
        if not classes:
            raise ValueError("class_labels given, but this U-Net has no class embedding (its config's "
                             "num_class_embeds is null): pass None")
        given, labels = labels, torch.as_tensor(labels, device=self.conv_in.weight.device).reshape(-1)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers (class indices); got {labels.dtype}")
        if labels.numel() == 0 or batch % labels.numel():
            raise ValueError(f"class_labels has {labels.numel()} entries for a batch of {batch}: give one, or one "
                             "per sample")
        if not torch.compiler.is_compiling() and not self._labels_already_read(given):
            if labels.min() < 0 or labels.max() >= classes:
                raise ValueError(f"class_labels must lie in [0, {classes}) (num_class_embeds); got "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            try:  # (an inference tensor keeps no version: read it every call)
                self._labels_read = (given, given._version) if isinstance(given, torch.Tensor) else None
            except RuntimeError:
                self._labels_read = None
        return labels.repeat(batch // labels.numel())

    def _labels_already_read(self, labels) -> bool:
        """Whether `labels` is the very tensor whose range the last call read, unchanged since: a pipeline passes
        one per call, and reading its values in every step would make the host wait for a GPU every step."""
        read = self._labels_read
        try:
            return read is not None and read[0] is labels and read[1] == labels._version
        except RuntimeError:
            return False

    def disable_freeu(self) -> None:
        for block in self.up_blocks:
            block.freeu = None

    def forward(self, sample: torch.Tensor, timestep: float | int | torch.Tensor,
                encoder_hidden_states: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                return_dict: bool | None = None,
                timestep_cond: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
                added_cond_kwargs: dict | None = None,
                down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None,
                down_intrablock_additional_residuals: Sequence[torch.Tensor] | None = None,
                ) -> torch.Tensor | UNetOutput | tuple[torch.Tensor]:
        """sample [B, C, H, W] (any H, W), timestep a number or [B], encoder_hidden_states [B, tokens, D].
        Returns the prediction [B, out_channels, H, W]; with return_dict as in diffusers, a `UNetOutput` with
        `.sample` (True) or the 1-tuple (False). cross_attention_kwargs={"scale": s} runs loaded LoRA adapters
        s times (latentdiff.lora); down_block_additional_residuals (one per skip connection) and
        mid_block_additional_residual, a ControlNet's outputs (models/controlnet.py), are added to the skip
        connections and to the middle block's output, as in diffusers; down_intrablock_additional_residuals, a
        T2I-Adapter's feature maps (models/t2i_adapter.py), inside the down stages (unet_blocks.DownBlock);
        added_cond_kwargs={"image_embeds": [...]} carries an IP-Adapter's image (ip_adapter.py); timestep_cond, an
        LCM U-Net's guidance embedding [B or 1, time_cond_proj_dim] (embeddings.guidance_embedding), goes into the
        time embedding, as do class_labels [B or 1] (integers below num_class_embeds: the x4 upscaler's noise
        level), which a U-Net with num_class_embeds requires; the other diffusers arguments are taken empty only
        (SD 1.x uses none of them), so that diffusers' denoising line runs unchanged.

        encoder_hidden_states may also hold k contexts per sample, [k*B, tokens, D] (guidance: unconditional and
        conditional): the result is then the one for torch.cat([sample] * k), [k*B, ...], but the layers before the
        first cross-attention (the time embedding, conv_in, attention-free first stages) run once per sample. The
        residuals are for the k*B batch then."""
        self._check_inputs(sample, encoder_hidden_states)
        self._check_timestep_cond(timestep_cond, sample.shape[0])
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("pass down_block_additional_residuals and mid_block_additional_residual together (a "
                             "ControlNet's two outputs) or neither")
        scale = lora_call_scale(cross_attention_kwargs)  # {"scale": s}: the loaded LoRA adapters s times
        if scale is not None and scale != 1.0 and adapters_of(self) is not None:
            with model_lora_scaled(self, scale):
                masks = {k: v for k, v in cross_attention_kwargs.items() if k != "scale"}
                return self.forward(sample, timestep, encoder_hidden_states, class_labels, return_dict=return_dict,
                                    timestep_cond=timestep_cond, added_cond_kwargs=added_cond_kwargs,
                                    cross_attention_kwargs=masks or None,
                                    down_block_additional_residuals=down_block_additional_residuals,
                                    mid_block_additional_residual=mid_block_additional_residual,
                                    down_intrablock_additional_residuals=down_intrablock_additional_residuals)
        ctx = self._with_image_tokens(encoder_hidden_states, added_cond_kwargs,  # (once: after the LoRA re-entry)
                                      (cross_attention_kwargs or {}).get("ip_adapter_masks"))
        shared = ctx.shape[0] // sample.shape[0]
        intrablock = None
        if down_intrablock_additional_residuals is not None:
            intrablock = _checked_intrablock(down_intrablock_additional_residuals, len(self.down_blocks))
            if shared > 1:  # (the adapter's maps are per context: no stage runs once per sample then)
                if timestep_cond is not None and timestep_cond.shape[0] > 1:
                    timestep_cond = torch.cat([timestep_cond] * shared)
                sample, shared = torch.cat([sample] * shared), 1
        emb = self._time(timestep, sample, timestep_cond, self._class_labels(class_labels, sample.shape[0]))
        x, emb, skips = self._down_path(self.conv_in(sample), emb, ctx, shared, intrablock)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, _checked_residuals(down_block_additional_residuals, skips))]
        x = self._run(self.mid_block, x, emb, ctx)
        if intrablock and intrablock[0].shape == x.shape:  # (an adapter with a map for the middle block too)
            x = x + intrablock.pop(0)
        if mid_block_additional_residual is not None:
            x = x + _checked_residuals([mid_block_additional_residual], [x], "mid_block_additional_residual")[0]
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if skips else None  # resolution of the next stage up
            x = self._run(block, x, emb, ctx, block_skips, size)
        x = self.conv_out(group_norm(self.conv_norm_out, x, silu=True))
        return returned(x, return_dict, UNetOutput)
