"""T2I-Adapter (Mou et al. 2024): a small convolutional network that turns a control image (sketch, depth, pose, ...)
into one feature map per U-Net down stage, added inside the frozen U-Net's down path
(UNet2DConditionModel's down_intrablock_additional_residuals). Unlike a ControlNet it does not see the latents or
the text, so it runs once per image, not once per step.

Reads diffusers' T2IAdapter config.json ("full_adapter" and "light_adapter") and uses its state-dict keys.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ConfigMixin, ModelMixin


@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig(ConfigMixin):
    """diffusers' T2IAdapter config keys, with its defaults (SD 1.x's full adapter)."""

    diffusers_class = "T2IAdapter"

    in_channels: int = 3  # channels of the control image (1 for sketches)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # one feature map per entry: the U-Net's down stages
    num_res_blocks: int = 2
    downscale_factor: int = 8  # the pixel-unshuffle at the input: the latents' scale
    adapter_type: str = "full_adapter"  # or "light_adapter"

    def validate(self) -> None:
        def fail(key: str, why: str):
            raise ValueError(f"T2IAdapterConfig: {key} = {getattr(self, key)!r}: {why}")

        if self.adapter_type not in ("full_adapter", "light_adapter"):
            fail("adapter_type", "latentdiff supports 'full_adapter' and 'light_adapter' (SD 1.x/2.x; "
                                 "'full_adapter_xl' is SDXL's)")
        for key in ("in_channels", "num_res_blocks", "downscale_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(key, "expected a positive int")
        if not self.channels or not all(isinstance(c, int) and c > 0 for c in self.channels):
            fail("channels", "expected a non-empty list of positive channel counts")
        if self.adapter_type == "light_adapter" and any(c % 4 for c in self.channels):
            fail("channels", "a light adapter's channels must be multiples of 4")


class AdapterResnetBlock(nn.Module):
    """x + conv(ReLU(conv3x3(x))): the second conv 1x1 (full adapter) or 3x3 (light adapter)."""

    def __init__(self, channels: int, second_kernel: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, second_kernel, padding=second_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(self.act(self.block1(x)))


class AdapterBlock(nn.Module):
    """One stage: 2x2 average pooling (but the first full-adapter stage), a 1x1 conv where the width changes (light:
    always, to a quarter of the output width, and back after), residual blocks."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, down: bool, light: bool):
        super().__init__()
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if down else None
        width = out_channels // 4 if light else out_channels
        self.in_conv = nn.Conv2d(in_channels, width, 1) if light or in_channels != out_channels else None
        self.resnets = nn.Sequential(*(AdapterResnetBlock(width, 3 if light else 1) for _ in range(blocks)))
        self.out_conv = nn.Conv2d(width, out_channels, 1) if light else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.downsample, self.in_conv, self.resnets, self.out_conv):
            if layer is not None:
                x = layer(x)
        return x


class Adapter(nn.Module):
    """The network under T2IAdapter's `adapter.` keys: pixel-unshuffle, (full: a 3x3 conv in), one AdapterBlock per
    output feature map (full: one per entry of channels; light: one more, at the last width)."""

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        channels, light = config.channels, config.adapter_type == "light_adapter"
        self.unshuffle = nn.PixelUnshuffle(config.downscale_factor)
        unshuffled = config.in_channels * config.downscale_factor ** 2
        if light:  # the unshuffled image to channels[0], one stage per width step, and one more at the last width
            self.conv_in = None
            widths = [unshuffled, *channels, channels[-1]]
            self.body = nn.ModuleList(AdapterBlock(a, b, config.num_res_blocks, i > 0, True)
                                      for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))
        else:
            self.conv_in = nn.Conv2d(unshuffled, channels[0], 3, padding=1)
            self.body = nn.ModuleList(AdapterBlock(channels[max(i - 1, 0)], c, config.num_res_blocks, i > 0, False)
                                      for i, c in enumerate(channels))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.unshuffle(x)
        if self.conv_in is not None:
            x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(ModelMixin):
    """features = adapter(control image [B, in_channels, H, W]): one map per U-Net down stage, for
    `unet(..., down_intrablock_additional_residuals=features)`."""

    config_class = T2IAdapterConfig

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        self.config = config
        self.adapter = Adapter(config)

    @property
    def downscale_factor(self) -> int:
        return self.config.downscale_factor

    @property
    def total_downscale_factor(self) -> int:
        """How many times smaller than the image the last feature map is."""
        light = self.config.adapter_type == "light_adapter"
        return self.config.downscale_factor * 2 ** (len(self.config.channels) - (0 if light else 1))

    @property
    def num_features(self) -> int:
        return len(self.config.channels) + (self.config.adapter_type == "light_adapter")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"the T2I-Adapter takes images [B, {self.config.in_channels}, H, W]; got "
                             f"{tuple(x.shape)}")
        if any(d % self.config.downscale_factor for d in x.shape[-2:]):
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the adapter's "
                             f"downscale_factor {self.config.downscale_factor}")
        return self.adapter(x.to(self.dtype))


class MultiAdapter(nn.Module):
    """Several T2I-Adapters, each with its own control image and weight; their feature maps add up, weighted
    (diffusers' MultiAdapter: equal weights 1/n by default). A pipeline given a list of adapters makes one. Saved as
    diffusers saves it: the first adapter in `folder`, the others in `folder_1`, `folder_2`, ..."""

    def __init__(self, adapters: list[T2IAdapter]):
        super().__init__()
        if not adapters or not all(isinstance(a, T2IAdapter) for a in adapters):
            raise TypeError("MultiAdapter takes a non-empty list of T2IAdapter")
        first = adapters[0]
        for i, adapter in enumerate(adapters[1:], 1):
            if (adapter.total_downscale_factor, adapter.downscale_factor, adapter.num_features) != (
                    first.total_downscale_factor, first.downscale_factor, first.num_features):
                raise ValueError(f"adapters[{i}] makes feature maps of other sizes than adapters[0] (downscale "
                                 f"{adapter.downscale_factor} / {adapter.total_downscale_factor}, "
                                 f"{adapter.num_features} maps, against {first.downscale_factor} / "
                                 f"{first.total_downscale_factor}, {first.num_features}): adapters summed together "
                                 "must be made for the same U-Net")
        self.adapters = nn.ModuleList(adapters)

    @property
    def config(self) -> T2IAdapterConfig:
        return self.adapters[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.adapters[0].dtype

    @property
    def device(self) -> torch.device:
        return self.adapters[0].device

    @property
    def total_downscale_factor(self) -> int:
        return self.adapters[0].total_downscale_factor

    def forward(self, xs: list[torch.Tensor], adapter_weights: list[float] | None = None) -> list[torch.Tensor]:
        """sum_i w_i adapter_i(xs[i]), map by map."""
        n = len(self.adapters)
        weights = [1.0 / n] * n if adapter_weights is None else list(adapter_weights)
        if len(xs) != n or len(weights) != n:
            raise ValueError(f"{n} T2I-Adapters need one control image and one weight each; got {len(xs)} images "
                             f"and {len(weights)} weights")
        total = None
        for x, w, adapter in zip(xs, weights, self.adapters):
            features = adapter(x)
            total = [w * f for f in features] if total is None else [t + w * f for t, f in zip(total, features)]
        return total

    def save_pretrained(self, folder, variant: str | None = None) -> None:
        for i, adapter in enumerate(self.adapters):
            adapter.save_pretrained(f"{folder}_{i}" if i else folder, variant=variant)

    @classmethod
    def from_pretrained(cls, folder, torch_dtype: torch.dtype | None = None, variant: str | None = None
                        ) -> "MultiAdapter":
        """The adapters in `folder`, `folder_1`, ... (as many as exist)."""
        from pathlib import Path

        adapters, path = [], Path(folder)
        while path.is_dir():
            adapters.append(T2IAdapter.from_pretrained(path, torch_dtype=torch_dtype, variant=variant))
            path = Path(f"{folder}_{len(adapters)}")
        if not adapters:
            raise FileNotFoundError(f"{folder}: no T2I-Adapter folder there")
        return cls(adapters)
