"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and appendix G): images
[B, 3, H, W] in [-1, 1] <-> latents [B, 4, H/8, W/8]. Module names equal diffusers' AutoencoderKL state-dict keys.

Large images can be encoded and decoded a tile at a time with the same result up to float rounding: see
`run_tiled` for how (whole-image GroupNorm statistics, halos covering the receptive field) and what it costs.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from torch import nn

from ..config import ConfigMixin, ModelMixin, returned
from ..schedules import randn
from .allocator import malloc_trim
from .attention import SpatialSelfAttention, fuse_qkv_projections
from .group_norm import group_norm
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D, kept_phases

DEFAULT_TILE_SIZE = 64  # SD 1.x at 512x512: peak working memory 0.28x the untiled decode's (see enable_tiling)
_HALO = 3  # context per side, in coarse pixels: covers 2 (two 3x3 convs) + 1 (a resampling conv or an extra conv)


@dataclasses.dataclass(frozen=True)
class VAEConfig(ConfigMixin):
    """diffusers' AutoencoderKL config (defaults are diffusers' defaults, so a config.json that omits a key means
    the same thing to both). `scaling_factor` is the latent standard deviation the pipeline divides by;
    `force_upcast` asks the pipeline to decode fp16 latents in fp32."""

    diffusers_class: ClassVar[str] = "AutoencoderKL"
    fixed: ClassVar[dict[str, Any]] = {
        "act_fn": "silu",
        "shift_factor": None,  # SD3 / Flux latent normalisation
        "latents_mean": None,  # SDXL-style per-channel latent statistics
        "latents_std": None,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    # False: the mid blocks are two ResNets with no self-attention, so the autoencoder is local apart from
    # GroupNorm's statistics (a model trained on small images then behaves the same on larger ones)
    mid_block_add_attention: bool = True

    @classmethod
    def sd15(cls) -> "VAEConfig":
        """The Stable Diffusion 1.x VAE (83.65M parameters, 8x downsampling)."""
        return cls(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """A two-level VAE for tests and toy pipelines (2x downsampling, 0.66M parameters)."""
        return cls(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=64)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        levels = len(self.block_out_channels)
        if levels == 0 or any(c <= 0 or c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"VAEConfig: block_out_channels = {self.block_out_channels} must be a non-empty list of "
                             f"positive multiples of norm_num_groups = {self.norm_num_groups} (GroupNorm needs it)")
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, key)
            if len(types) != levels or any(t != kind for t in types):
                raise ValueError(f"VAEConfig: {key} = {types} is not supported: use {levels} x {kind!r} "
                                 f"(one per entry of block_out_channels)")
        for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
            if getattr(self, key) < 1:
                raise ValueError(f"VAEConfig: {key} = {getattr(self, key)} must be at least 1")


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))); `moments` is [mean, logvar] along channels.
    logvar is clamped to [-30, 20], as in the LDM code, so exp() stays finite in fp16 as well as fp32."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    @property
    def latent_dist(self) -> DiagonalGaussian:
        """The posterior itself, so that diffusers' `vae.encode(x).latent_dist.sample()` reads the same here."""
        return self

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """mean + std * eps (the reparameterisation of Kingma & Welling 2014). A list of generators, one per
        image, makes each image's sample independent of the batch it is in."""
        return self.mean + self.std * randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over C, H, W (Kingma & Welling 2014, appendix B)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class EncoderOutput(NamedTuple):
    latent_dist: DiagonalGaussian


class DecoderOutput(NamedTuple):
    sample: torch.Tensor


def _resnets(in_channels: int, out_channels: int, layers: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups)
                         for i in range(layers))


class DownEncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, layers, groups)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, asymmetric=True)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, layers, groups)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, phases=True)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """ResNet, self-attention over all positions (the only non-local layer of the autoencoder), ResNet; without
    attention (mid_block_add_attention: false), the two ResNets."""

    def __init__(self, channels: int, groups: int, attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(widths[max(i - 1, 0)], w, c.layers_per_block, groups, downsample=i < len(widths) - 1)
            for i, w in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units():
            for layer in unit.layers:  # (see Decoder.forward)
                x = layer(x)
        return self.to_moments(x)

    def units(self) -> list["Unit"]:
        """conv_in and the down blocks, local layers apart from GroupNorm, as the units tiled encoding streams:
        conv_in joins the first ResNet and each downsampler the ResNet before it, so that neither the
        full-resolution 3 -> C expansion nor a tensor about to be downsampled is ever held whole."""
        units = [Unit([self.conv_in])]
        for block in self.down_blocks:
            units += [Unit([resnet]) for resnet in block.resnets]
            if block.downsamplers:
                units[-1] = Unit(units[-1].layers + list(block.downsamplers), scale=(2, 1))
        return [Unit(units[0].layers + units[1].layers, units[1].scale)] + units[2:]

    def to_moments(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(group_norm(self.conv_norm_out, self.mid_block(h), silu=True))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, groups = c.block_out_channels[::-1], c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(widths[max(i - 1, 0)], w, c.layers_per_block + 1, groups, upsample=i < len(widths) - 1)
            for i, w in enumerate(widths)
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for unit in self.units():
            # layer by layer, not unit(h): this frame's h would keep each unit's input alive until the unit ends,
            # e.g. the tensor before an upsampler while the ResNet after it runs (SD VAE, batch 4 at 512 px in fp16:
            # 128 MiB more at the peak than diffusers)
            for layer in unit.layers:
                h = layer(h)
        return h

    def units(self) -> list["Unit"]:
        """The up blocks and the output head (norm, SiLU, conv), local layers apart from GroupNorm, as the units
        tiled decoding streams: each upsampler joins the ResNet after it and the head the last ResNet, so that no
        upsampled tensor is ever held whole."""
        units, pending = [], []
        for block in self.up_blocks:
            for resnet in block.resnets:
                units.append(Unit(pending + [resnet], scale=(1, 2) if pending else (1, 1)))
                pending = []
            pending = list(block.upsamplers)
        units[-1].layers += [NormSiLU(self.conv_norm_out), self.conv_out]
        return units


class NormSiLU(nn.Module):
    """silu(norm(x)) as one group_norm() call (one compiled kernel where it applies, not three passes); the norm
    stays the model's own module, which tiled passes find and measure."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(self.norm, x, silu=True)


class AutoencoderKL(ModelMixin):
    """encode(images) -> DiagonalGaussian over latents; decode(latents) -> images in about [-1, 1]. No scaling
    by `scaling_factor` happens here: the pipeline applies it.

    Memory (the savings need `torch.no_grad()`): `enable_slicing()` runs the images of a batch one at a time (as
    if each were passed alone; equal to the batched pass up to float rounding). `enable_tiling(tile_size)` streams
    the convolutional layers tile by tile with exact whole-image GroupNorm statistics, so the result equals the
    untiled one up to float rounding (see `run_tiled`). Either can also be chosen per call:
    `encode/decode(..., tiled=True, sliced=True)`; None (the default) means the enabled setting."""

    config_class = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.use_tiling, self.use_slicing, self.tile_size = False, False, DEFAULT_TILE_SIZE

    @property
    def vae_scale_factor(self) -> int:
        return self.config.vae_scale_factor

    def enable_tiling(self, tile_size: int = DEFAULT_TILE_SIZE) -> None:
        """Run each unit of layers (see `run_tiled`) on tiles of at most `tile_size`^2 pixels at its higher
        resolution. Measured (benchmarks/vae_tiled.py --threads 1 --encode, 2026-12-03), SD 1.x VAE, fp32, 512x512,
        working memory of the call (peak RSS above the weights and input), tiled / untiled, and time:
        - tile_size 64 (the default): decode 280-290 MiB of 1021-1029 (0.28x) in 2.3x the time; encode 208 MiB of
          663 (0.31x) in 1.6x the time; on an Intel AMX host (2026-12-07) decode 284-297 MiB of 955-960 (0.31x)
          in 2.4x the time, ~70 MiB of it the first call's one-off set-up (a second call in the process: 233);
        - tile_size 128: decode 345-392 MiB (0.34-0.38x) in 2.0x the time; encode 240 MiB (0.36x) in 1.3x.
        Smaller tiles need less memory and more time (their halos overlap more): a larger tile_size trades one for
        the other. Freed tile memory is handed back to the OS after every tile (see `_return_freed_memory`)."""
        if tile_size < 8:
            raise ValueError(f"tile_size = {tile_size} is too small: use at least 8 (default {DEFAULT_TILE_SIZE})")
        self.use_tiling, self.tile_size = True, tile_size

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def fuse_qkv_projections(self) -> None:
        """The mid-block attentions' queries, keys and values from one matrix product (see the U-Net's)."""
        fuse_qkv_projections(self)

    def unfuse_qkv_projections(self) -> None:
        fuse_qkv_projections(self, fuse=False)

    def encode(self, images: torch.Tensor, return_dict: bool | None = None, *, tiled: bool | None = None,
               sliced: bool | None = None) -> DiagonalGaussian | EncoderOutput | tuple[DiagonalGaussian]:
        """The posterior q(z | images); with return_dict as in diffusers, an output with `.latent_dist` (True) or
        the 1-tuple (False). `tiled` / `sliced` override enable_tiling() / enable_slicing() for this call."""
        self._check_input(images, self.config.in_channels, "images", self.vae_scale_factor)
        if self.use_slicing if sliced is None else sliced:
            posterior = DiagonalGaussian(torch.cat([self._moments(x, tiled) for x in images.split(1)]))
        else:
            posterior = DiagonalGaussian(self._moments(images, tiled))
        return returned(posterior, return_dict, EncoderOutput)

    def decode(self, latents: torch.Tensor, return_dict: bool | None = None, generator=None, *,
               tiled: bool | None = None, sliced: bool | None = None) -> torch.Tensor | DecoderOutput | tuple:
        """Images in [-1, 1] from (unscaled) latents; with return_dict as in diffusers, an output with `.sample`
        (True) or the 1-tuple (False). `generator` is accepted as diffusers' is, and unused: decoding is
        deterministic."""
        self._check_input(latents, self.config.latent_channels, "latents", 1)
        if self.use_slicing if sliced is None else sliced:
            images = torch.cat([self._image(z, tiled) for z in latents.split(1)])
        else:
            images = self._image(latents, tiled)
        return returned(images, return_dict, DecoderOutput)

    def forward(self, images: torch.Tensor, sample_posterior: bool = False, return_dict: bool | None = None,
                generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor | DecoderOutput:
        """Reconstruct `images` through the posterior's mode (or a sample of it)."""
        posterior = self.encode(images)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode(), return_dict)

    def _moments(self, images: torch.Tensor, tiled: bool | None) -> torch.Tensor:
        if not (self.use_tiling if tiled is None else tiled):
            return self.quant_conv(self.encoder(images))
        h = images
        for i, unit in enumerate(self.encoder.units()):  # (the caller's images are never overwritten)
            h = run_tiled(unit, h, self.tile_size, overwrite=i > 0)
        return self.quant_conv(self.encoder.to_moments(h))

    def _image(self, latents: torch.Tensor, tiled: bool | None) -> torch.Tensor:
        if not (self.use_tiling if tiled is None else tiled):
            return self.decoder(self.post_quant_conv(latents))
        h = self.decoder.mid_block(self.decoder.conv_in(self.post_quant_conv(latents)))  # whole: attention is global
        for unit in self.decoder.units():
            h = run_tiled(unit, h, self.tile_size, overwrite=True)
        return h

    def _check_input(self, x: torch.Tensor, channels: int, name: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            other = "images to decode" if name == "latents" else "latents to encode"
            raise ValueError(f"{name} must be [batch, {channels}, height, width]; got {tuple(x.shape)} "
                             f"(passing {other}?)")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"{name} height and width must be multiples of {multiple} (the VAE downsamples by "
                             f"{multiple}); got {tuple(x.shape[-2:])}: crop or resize them")
        weight = self.post_quant_conv.weight
        autocast = torch.is_autocast_enabled(x.device.type)  # mixed-precision training: its casts are expected
        if x.device != weight.device or (x.dtype != weight.dtype and not autocast):
            raise ValueError(f"{name} are {x.dtype} on {x.device} but the VAE is {weight.dtype} on {weight.device}: "
                             f"call {name}.to(vae.device, vae.dtype) (or vae.to(...)) first")


# --- tiling: exact, by streaming units of layers with whole-image GroupNorm statistics ----------------------------

@dataclasses.dataclass
class Unit:
    """Consecutive local layers run together tile by tile, so that only their input and output exist whole.
    Tiles are cut on the coarser of the input and output grids; `scale` = (input, output) pixels per coarse pixel:
    (1, 1), (1, 2) for an upsampling unit or (2, 1) for a downsampling one."""

    layers: list[Callable[[torch.Tensor], torch.Tensor]]
    scale: tuple[int, int] = (1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def group_norms(self) -> list[nn.GroupNorm]:
        """In the order they run (module registration order: norm1 before norm2)."""
        return [m for layer in self.layers if isinstance(layer, nn.Module)
                for m in layer.modules() if isinstance(m, nn.GroupNorm)]


def _spans(size: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Cut [0, size) into near-equal cores of at most `tile`; return (core_start, core_end, window_start,
    window_end), the window being the core widened by _HALO on each side and clipped to the image."""
    n = -(-size // tile)
    cuts = [round(i * size / n) for i in range(n + 1)]
    return [(a, b, max(a - _HALO, 0), min(b + _HALO, size)) for a, b in zip(cuts, cuts[1:])]


def run_tiled(unit: Unit, x: torch.Tensor, tile_size: int, overwrite: bool = False) -> torch.Tensor:
    """unit(x), computed a tile of at most tile_size^2 output-side pixels at a time, equal to it up to float rounding.
    With `overwrite`, an output shaped like `x` is written into `x` (row by row, once no tile still reads it).

    Why it is exact: a tile's window extends _HALO coarse pixels past its core, at least the receptive field of the
    unit's convolutions, so the core sees the same neighbourhood as in the whole-image pass (zero padding at image
    borders included). GroupNorm alone looks at the whole image: each GroupNorm of the unit gets one pass over the
    tiles, in order, that runs each tile up to it, with the earlier ones already normalising by whole-image
    statistics, and accumulates its input's per-(sample, group) moments over the cores (merged with Chan, Golub &
    LeVeque's 1979 pairwise update). A final pass computes the output. Measured on random-weight VAEs, fp32: max abs
    difference to the untiled pass ~1e-5 (tested <= 1e-4). Cost: the unit's layers before each GroupNorm run once
    more per GroupNorm (~1.5x per ResNet, ~2x with a fused upsampler); a unit that fits in one tile runs whole."""
    s_in, s_out = unit.scale
    step = max(tile_size // max(unit.scale), 1)
    tiles = [[(r, c) for c in _spans(x.shape[-1] // s_in, step)] for r in _spans(x.shape[-2] // s_in, step)]
    if len(tiles) == len(tiles[0]) == 1:
        return unit(x)
    norms = _WholeImageNorms(unit.group_norms())

    def run(r, c):  # the output over the tile's core
        norms.core = (r[0] - r[2], r[1] - r[2], r[3] - r[2]), (c[0] - c[2], c[1] - c[2], c[3] - c[2])
        y = unit(x[..., r[2] * s_in:r[3] * s_in, c[2] * s_in:c[3] * s_in])
        return y[..., (r[0] - r[2]) * s_out:(r[1] - r[2]) * s_out, (c[0] - c[2]) * s_out:(c[1] - c[2]) * s_out]

    with norms, kept_phases():
        for norm in norms.norms:
            norms.target = norm
            for r, c in (tile for row in tiles for tile in row):
                try:
                    run(r, c)
                except _Collected:
                    pass
                _return_freed_memory(x)
            norms.finish(norm)
        norms.target, out, held = None, None, []

        def put(r, c, y):
            out[..., r[0] * s_out:r[1] * s_out, c[0] * s_out:c[1] * s_out] = y

        for row in tiles:
            done = []
            for r, c in row:
                y = run(r, c)
                if out is None:
                    in_place = (overwrite and unit.scale == (1, 1) and y.shape[1] == x.shape[1]
                                and y.dtype == x.dtype and not torch.is_grad_enabled())
                    out = x if in_place else y.new_empty(*y.shape[:2], x.shape[-2] // s_in * s_out,
                                                         x.shape[-1] // s_in * s_out)
                if in_place:
                    done.append((r, c, y))
                else:  # into a new tensor: at once (a row of tiles held: 16 MiB at the SD decode's peak)
                    put(r, c, y)
                del y
                _return_freed_memory(x)
            for tile in held:  # into x: a row late, once the last tiles that read its rows (halos) have run
                put(*tile)
            held = done
        for tile in held:
            put(*tile)
    return out


def _return_freed_memory(x: torch.Tensor) -> None:
    """Hand the memory freed by a tile's temporaries back to the OS (glibc's malloc_trim; CPU only). Without it
    glibc keeps tile-sized blocks (below its mmap threshold, which grows to 32 MiB) resident in its heap for reuse,
    fragmented among tiles of different sizes: the SD decode at 512 px then peaked at 0.37-0.47x the untiled
    working memory instead of 0.27-0.28x (benchmarks/vae_tiled.py)."""
    if x.device.type == "cpu" and (trim := malloc_trim()) is not None:
        trim(0)


class _Collected(Exception):
    """Ends a tile's forward once the GroupNorm being measured has seen its input."""


class _WholeImageNorms:
    """While active (`with`), makes `norms` normalise with whole-image statistics. The norm being measured
    (`target`) accumulates count, mean and M2 per (sample, group) over the tile's core, then stops the tile."""

    def __init__(self, norms: list[nn.GroupNorm]):
        self.norms, self.stats, self.totals = norms, {}, None
        self.target, self.core = None, None

    def __enter__(self):
        for norm in self.norms:
            norm.forward = partial(self._forward, norm)  # an instance attribute shadows GroupNorm.forward
        return self

    def __exit__(self, *exc):
        for norm in self.norms:
            del norm.forward

    def finish(self, norm: nn.GroupNorm) -> None:
        n, mean, m2 = self.totals
        self.stats[norm], self.totals = (mean, m2 / n), None

    def _forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if norm is self.target:
            self._accumulate(norm, x)
            raise _Collected
        mean, var = self.stats[norm]  # [B, G] float32
        groups = x.shape[1] // norm.num_groups
        scale = (var + norm.eps).rsqrt().repeat_interleave(groups, dim=1) * norm.weight.float()
        shift = norm.bias.float() - mean.repeat_interleave(groups, dim=1) * scale
        return torch.addcmul(shift.to(x.dtype)[..., None, None], x, scale.to(x.dtype)[..., None, None])

    def _accumulate(self, norm: nn.GroupNorm, x: torch.Tensor) -> None:
        (top, bottom, height), (left, right, width) = self.core
        sy, sx = x.shape[-2] // height, x.shape[-1] // width  # this layer's pixels per coarse pixel
        core = x.detach()[..., top * sy:bottom * sy, left * sx:right * sx].float().unflatten(1, (norm.num_groups, -1))
        var, mean = torch.var_mean(core, dim=(2, 3, 4), correction=0)
        n = core[0, 0].numel()
        m2 = var * n
        if self.totals is not None:
            n0, mean0, m20 = self.totals
            delta, total = mean - mean0, n0 + n
            mean, m2, n = mean0 + delta * (n / total), m20 + m2 + delta.pow(2) * (n0 * n / total), total
        self.totals = (n, mean, m2)
