"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the U-Net's down path and middle block that reads a
control image (edges, depth, pose, ...) besides the latents, the timestep and the text, and returns one residual
per skip connection of the U-Net and one for its middle block, which the frozen U-Net adds (UNet2DConditionModel's
down_block_additional_residuals / mid_block_additional_residual).

The control image enters through a small conv stack that brings it to the latents' resolution and is added to
conv_in's output; every residual leaves through a 1x1 conv. Those convs start at zero ("zero convolutions", sec. 3.1),
so a ControlNet fresh from `from_unet` leaves the U-Net's output unchanged until it is trained.

Reads diffusers' ControlNetModel config.json (SD 1.x / 2.x architectures) and uses its state-dict keys.
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import conv1x1
from .unet import DownPath, DownPathConfig, UNet2DConditionModel, UNetConfig, _positive_int


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(DownPathConfig):
    """diffusers' ControlNetModel config: the U-Net's down-path keys (DownPathConfig) and the control image's."""

    diffusers_class = "ControlNetModel"
    # diffusers options outside SD 1.x/2.x: only their default is accepted
    fixed = {
        "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
        "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None,
        "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
        "resnet_time_scale_shift": "default", "projection_class_embeddings_input_dim": None,
        "addition_embed_type_num_heads": 64,
    }

    conditioning_channels: int = 3  # channels of the control image
    # heads per stage where given (diffusers' ControlNet takes this key, unlike its U-Net); else attention_head_dim
    num_attention_heads: int | tuple[int, ...] | None = None
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": the image's channels are reversed first
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)  # widths of the control image's convs
    global_pool_conditions: bool = False  # residuals averaged over the image (e.g. ControlNet 1.1 shuffle)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **changes) -> "ControlNetConfig":
        """The ControlNet config for a U-Net's architecture (the down-path keys copied), with `changes`."""
        shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(DownPathConfig)}
        return cls(**{**shared, **changes})

    def heads(self) -> tuple[int, ...]:
        return self.per_block("num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim")

    @property
    def downscale(self) -> int:
        """How many times smaller than the control image the latents are (the conditioning convs' stride)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def validate(self) -> None:
        if not _positive_int(self.layers_per_block):  # (diffusers' ControlNet takes no per-stage list)
            self.fail("layers_per_block", "expected a positive int")
        if self.num_attention_heads is not None:
            self._check_per_block("num_attention_heads")
        super().validate()
        if not _positive_int(self.conditioning_channels):
            self.fail("conditioning_channels", "expected a positive int")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            self.fail("controlnet_conditioning_channel_order", "expected 'rgb' or 'bgr'")
        widths = self.conditioning_embedding_out_channels
        if not (isinstance(widths, tuple) and widths and all(_positive_int(w) for w in widths)):
            self.fail("conditioning_embedding_out_channels", "expected a non-empty list of positive channel counts")


class ControlNetConditioningEmbedding(nn.Module):
    """The control image to conv_in's width at the latents' resolution: a 3x3 conv, then per width step a 3x3 conv
    and a stride-2 3x3 conv to the next width, SiLU after each; a zero-initialised 3x3 conv out."""

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width, wider in zip(widths, widths[1:]):
            self.blocks.append(nn.Conv2d(width, width, 3, padding=1))
            self.blocks.append(nn.Conv2d(width, wider, 3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(image))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNetOutput(NamedTuple):
    """A ControlNet's residuals: one per U-Net skip connection (down order) and one for the middle block. A tuple,
    so `down, mid = controlnet(...)` works as diffusers' return_dict=False does."""

    down_block_res_samples: list[torch.Tensor]
    mid_block_res_sample: torch.Tensor


class ControlNetModel(DownPath):
    """residuals = ControlNet(x_t, t, context, control image); the U-Net adds them (see the module's doc)."""

    config_class = ControlNetConfig
    accepts_shared_samples = True  # forward() takes k contexts per sample, as the U-Net's

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        skip_channels = self._build_down_path(config)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            config.conditioning_channels, config.conditioning_embedding_out_channels, config.block_out_channels[0])
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in skip_channels)
        mid = config.block_out_channels[-1]
        self.controlnet_mid_block = _zero(nn.Conv2d(mid, mid, 1))

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, controlnet_conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  load_weights_from_unet: bool = True, conditioning_channels: int = 3) -> "ControlNetModel":
        """A ControlNet for `unet`'s architecture, as diffusers' method of this name: its down path and middle block
        start as copies of the U-Net's (load_weights_from_unet), the control image's convs at random and the output
        convs at zero; where the ControlNet is to be trained from."""
        config = ControlNetConfig.from_unet(
            unet.config, conditioning_channels=conditioning_channels,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
        config.validate()
        model = cls(config).to(device=unet.device, dtype=unet.dtype)
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
                state = getattr(unet, name).state_dict()  # (an LCM U-Net's cond_proj: a ControlNet has none)
                getattr(model, name).load_state_dict({k: v for k, v in state.items() if not k.startswith("cond_proj")})
        return model

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: str | os.PathLike | dict | None = None,
                         torch_dtype: torch.dtype | None = None,
                         unet: UNet2DConditionModel | None = None) -> "ControlNetModel":
        """A ControlNet in one .safetensors file of lllyasviel's layout (`input_hint_block.*`, `zero_convs.*`, the
        U-Net's LDM names; with or without `control_model.`: ControlNet 1.0's files hold a whole SD model beside
        it), as diffusers' ControlNetModel.from_single_file. `config`: a ControlNet folder (its config.json) or a
        config dict; by default the architecture of `unet` (the U-Net it is to run with) where given, else Stable
        Diffusion 1.x's (2.x's where the file's cross-attention reads 1024-wide text), with the control image's
        channels and conv widths read from the file."""
        from ..checkpoints import load_into, load_safetensors, read_json, require_path
        from ..convert import CONTROL, controlnet_to_diffusers

        state_dict = load_safetensors(path)
        prefix = CONTROL if any(k.startswith(CONTROL) for k in state_dict) else ""
        if prefix + "input_hint_block.0.weight" not in state_dict:
            raise ValueError(f"{path} is not a ControlNet single file (it has no {prefix}input_hint_block.*): for a "
                             "diffusers ControlNet folder use ControlNetModel.from_pretrained(folder), for a Stable "
                             "Diffusion checkpoint LatentDiffusionPipeline.from_single_file")
        if config is None:
            config = _infer_config(state_dict, prefix, None if unet is None else unet.config)
        elif not isinstance(config, dict):
            config = read_json(require_path(config, "ControlNet config folder") / "config.json")
        config = ControlNetConfig.from_dict(config)
        weights = controlnet_to_diffusers(state_dict, config)
        with torch.device("meta"):
            model = cls(config)
        return load_into(model, weights, str(path), dtype=torch_dtype).eval()

    def forward(self, sample: torch.Tensor, timestep: float | int | torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float | torch.Tensor = 1.0,
                class_labels: None = None, timestep_cond: None = None, attention_mask: None = None,
                added_cond_kwargs: dict | None = None, cross_attention_kwargs: dict | None = None,
                guess_mode: bool = False, return_dict: bool | None = None) -> ControlNetOutput:
        """sample [B, C, h, w], timestep a number or [B], encoder_hidden_states [B, tokens, D] (or k contexts per
        sample, [k*B, ...], as the U-Net takes them: the residuals are then for the k*B batch), controlnet_cond the
        control image [B, conditioning_channels, h * 8, w * 8] (values in [0, 1] for diffusers' ControlNets).

        The residuals are scaled by `conditioning_scale`; with `guess_mode` by it times 10^-1 ... 10^0, from the
        first skip connection to the middle block (the deep ones count most: for a ControlNet run on the
        conditional context only, diffusers' guess mode). A ControlNetOutput whatever return_dict is (a tuple
        with diffusers' field names)."""
        self._check_inputs(sample, encoder_hidden_states)
        self._check_control(sample, controlnet_cond)
        unused = {"class_labels": class_labels, "timestep_cond": timestep_cond, "attention_mask": attention_mask,
                  "added_cond_kwargs": added_cond_kwargs, "cross_attention_kwargs": cross_attention_kwargs}
        given = [name for name, value in unused.items() if value is not None and not (isinstance(value, dict)
                                                                                      and not value)]
        if given:
            raise ValueError(f"{given[0]} is not supported by latentdiff's ControlNet (Stable Diffusion 1.x/2.x "
                             "ControlNets use none of them); pass None")
        config = self.config
        if config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)
        ctx = encoder_hidden_states
        emb = self._time(timestep, sample)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        x, emb, skips = self._down_path(x, emb, ctx, ctx.shape[0] // sample.shape[0])
        x = self._run(self.mid_block, x, emb, ctx)
        down = [conv1x1(conv, skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = conv1x1(self.controlnet_mid_block, x)
        if guess_mode and not config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device) * conditioning_scale
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if config.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return ControlNetOutput(down, mid)

    def _check_control(self, sample: torch.Tensor, image: torch.Tensor) -> None:
        config = self.config
        expected = (sample.shape[0], config.conditioning_channels,
                    *(d * config.downscale for d in sample.shape[-2:]))
        if not isinstance(image, torch.Tensor) or tuple(image.shape) != expected:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"controlnet_cond must be the control image [B, {config.conditioning_channels}, "
                             f"{config.downscale} x the latents' height, {config.downscale} x their width] = "
                             f"{expected} for latents {tuple(sample.shape)}; got {got}")


def _infer_config(state_dict: dict[str, torch.Tensor], prefix: str, unet: UNetConfig | None = None) -> dict:
    """The config of a ControlNet single file: `unet`'s down path, or else SD 1.x's or 2.x's (by the text width its
    cross-attention reads), the latent and control-image channels and the control image's conv widths."""
    hint = prefix + "input_hint_block."
    convs = sorted(int(k[len(hint):].split(".")[0]) for k in state_dict if k.startswith(hint) and k.endswith("weight"))
    outs = [state_dict[f"{hint}{i}.weight"].shape[0] for i in convs]
    widths = [outs[0], *outs[2:-1:2]]  # conv_in's, then each stride-2 conv's
    key = prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    text_width = state_dict[key].shape[1] if key in state_dict else 768
    if unet is None:
        unet = UNetConfig.sd2() if text_width == 1024 else UNetConfig.sd15()
    return ControlNetConfig.from_unet(
        unet, in_channels=state_dict[prefix + "input_blocks.0.0.weight"].shape[1],
        conditioning_channels=state_dict[hint + "0.weight"].shape[1],
        conditioning_embedding_out_channels=tuple(widths)).to_dict()


class MultiControlNetModel(nn.Module):
    """Several ControlNets over one U-Net, each with its own control image and scale; their residuals add up
    (diffusers' MultiControlNetModel). A pipeline given a list of ControlNets makes one."""

    def __init__(self, controlnets: Sequence[ControlNetModel]):
        super().__init__()
        if not controlnets or not all(isinstance(c, ControlNetModel) for c in controlnets):
            raise TypeError("MultiControlNetModel takes a non-empty list of ControlNetModel")
        self.nets = nn.ModuleList(controlnets)

    accepts_shared_samples = True

    @property
    def config(self) -> ControlNetConfig:
        return self.nets[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.nets[0].dtype

    @property
    def device(self) -> torch.device:
        return self.nets[0].device

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: Sequence[torch.Tensor], conditioning_scale: Sequence[float],
                guess_mode: bool = False, return_dict: bool | None = None, **unused) -> ControlNetOutput:
        if len(controlnet_cond) != len(self.nets) or len(conditioning_scale) != len(self.nets):
            raise ValueError(f"{len(self.nets)} ControlNets need one control image and one scale each; got "
                             f"{len(controlnet_cond)} images and {len(conditioning_scale)} scales")
        total = None
        for net, image, scale in zip(self.nets, controlnet_cond, conditioning_scale):
            down, mid = net(sample, timestep, encoder_hidden_states, image, scale, guess_mode=guess_mode, **unused)
            total = (down, mid) if total is None else ([a + b for a, b in zip(total[0], down)], total[1] + mid)
        return ControlNetOutput(*total)
