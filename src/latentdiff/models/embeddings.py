"""How the U-Net learns which noise level it is denoising: the diffusion timestep t becomes a sinusoidal
feature vector (a pure function, no buffers, so the model can be built on the meta device), then an MLP."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal features of the timesteps [B] -> [B, dim], always in float32.

    The Transformer's positional encoding (Vaswani et al. 2017, sec. 3.5) applied to t, as in DDPM (Ho et al. 2020,
    appendix B): frequencies w_i = max_period^(-i / (dim/2 - freq_shift)), i = 0..dim/2-1, features
    [sin(t w), cos(t w)] (or [cos, sin] with `flip_sin_to_cos`, as Stable Diffusion's checkpoints expect). float32
    throughout because t * w reaches ~1000 rad, where half-precision rounding would scramble the phase; an odd
    `dim` is zero-padded by one.
    """
    # (torch.compile traces the plain function: it warns about, and ignores, an lru_cache)
    frequencies = _frequencies if torch.compiler.is_compiling() else _cached_frequencies
    angles = timesteps.float()[:, None] * frequencies(dim // 2, freq_shift, max_period, timesteps.device)[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _frequencies(half: int, freq_shift: float, max_period: float, device: torch.device) -> torch.Tensor:
    """w_i of timestep_embedding."""
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(exponent / (half - freq_shift))


# made once per device and settings: the U-Net asks at every denoising step (4 kernel launches on a GPU)
_cached_frequencies = functools.lru_cache(maxsize=64)(_frequencies)


def timesteps_for_batch(timestep: float | int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Accept t as a Python number, a 0-d tensor, or one value per sample ([B], or [1] for all); return [B]."""
    if isinstance(timestep, bool) or not isinstance(timestep, (int, float, torch.Tensor)):
        raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
    t = torch.as_tensor(timestep, device=device)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(
            f"timestep has shape {tuple(t.shape)} for a batch of {batch}: pass one number, a 0-d tensor, "
            f"or a 1-d tensor of {batch} timesteps (one per sample)"
        )
    return t.reshape(-1).expand(batch)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features [B, dim] (float32) of guidance weights w [B]: what an LCM-distilled U-Net takes as
    `timestep_cond` for w = guidance_scale - 1 (Luo et al. 2023, sec. 4.2, after Meng et al. 2023), computed as
    diffusers' get_guidance_scale_embedding does: [sin, cos] of 1000 w times frequencies 10000^(-i / (dim/2 - 1)),
    the step between frequencies rounded to float32 first; an odd dim is zero-padded by one."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    angles = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """The MLP that maps the sinusoidal features to the embedding every ResNet block adds (Linear, SiLU, Linear).
    `cond_dim`: a further condition (an LCM's guidance embedding) projected without bias and added to the
    features first."""

    def __init__(self, in_features: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, in_features, bias=False)
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            x = x + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(x)))
