"""Winograd's minimal filtering algorithms F(2x2, 3x3) and F(4x4, 3x3) for 3x3, stride-1, padding-1 convolutions,
which hold 61% of the U-Net's weights (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks").

An (m+2)x(m+2) input tile d gives an m x m output tile Y = A^T [ (G g G^T) * (B^T d B) ] A (their eq. 8). With the
filter transform U = G g G^T done once and the input transform V = B^T d B made of additions, the products are
(m+2)^2 matrix products over channels, [tiles, C] @ [C, K]: per output, 4 multiplies with F(2x2) and 2.25 with
F(4x4), instead of 9. Measured against oneDNN's direct conv with a packed weight (1 thread, batch 2, fp32):
F(2x2) 1.2-1.8x faster, relative error 4e-7 (direct: 1e-6); F(4x4) 2.0-2.5x at 16x16 and above (none at 8x8),
error 3e-6. In bfloat16 F(4x4) errs by 4e-2 (direct 3e-3, F(2x2) 7e-3): it is for float32 only. The price is memory:
U holds (m+2)^2/9 as many numbers as the filter, 1.8x (F(2x2)) or 4x (F(4x4)).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import native


@dataclasses.dataclass(frozen=True)
class Winograd:
    """F(m x m, 3 x 3): the matrices B^T ((m+2) x (m+2)), G ((m+2) x 3) and A^T (m x (m+2))."""

    m: int
    BT: tuple
    G: tuple
    AT: tuple


# Lavin & Gray 2016, sec. 4.1 and 4.2
F2x2 = Winograd(2, BT=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
                G=((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
                AT=((1, 1, 1, 0), (0, 1, -1, -1)))
F4x4 = Winograd(4, BT=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
                       (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
                G=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
                   (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
                AT=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)))
ALGORITHMS = {len(a.BT) ** 2: a for a in (F2x2, F4x4)}  # told apart by the number of transformed filters

# Tiles are processed in slices of about CHUNK_BYTES of transformed input (so V and the products stay in cache and
# off fresh pages), but of at least MIN_TILES tiles, so that the products remain efficient matrix products.
CHUNK_BYTES = 8 << 20
MIN_TILES = 256


# filter transforms and their inverse run over slices of the output channels of about this many float64 numbers,
# which stay in cache (whole, SD 1.5's 1280-channel filters took 0.8-1.6 s each in float64 einsums)
_SLICE_NUMBERS = 1 << 17


def _both_sides(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m X m^T for each column of x, [r, r, cols] -> [m rows, m rows, cols] (float64): two matrix products."""
    rows = (m @ x.reshape(x.shape[0], -1)).view(m.shape[0], x.shape[1], -1)  # [p, j, cols]: m X
    return torch.matmul(m, rows)  # [p, q, cols]: (m X) m^T


def _output_channel_step(points: int, in_channels: int) -> int:
    return max(1, _SLICE_NUMBERS // (points * in_channels))


def transform_filters(weight: torch.Tensor, algorithm: Winograd = F2x2) -> torch.Tensor:
    """U = G g G^T for every filter: [K, C, 3, 3] -> [(m+2)^2, C, K] (in float64, stored in weight's dtype)."""
    if weight.dim() != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"Winograd F(m x m, 3 x 3) needs [K, C, 3, 3] filters; got shape {tuple(weight.shape)}")
    g = torch.tensor(algorithm.G, dtype=torch.float64, device=weight.device)  # [a, 3]
    (k, c), a = weight.shape[:2], g.shape[0]
    out = torch.empty(a * a, c, k, dtype=weight.dtype, device=weight.device)
    step = _output_channel_step(a * a, c)
    for k0 in range(0, k, step):
        w = weight[k0:k0 + step].permute(2, 3, 1, 0).double()  # [i, j, c, k]
        out[:, :, k0:k0 + step] = _both_sides(g, w).view(a * a, c, -1)
    return out


def recover_filters(filters: torch.Tensor) -> torch.Tensor:
    """The inverse of transform_filters: [(m+2)^2, C, K] -> [K, C, 3, 3], g = G+ U G+^T with G+ = (G^T G)^-1 G^T
    (G has full column rank), in float64, returned in filters' dtype."""
    alg = ALGORITHMS[filters.shape[0]]
    a = len(alg.BT)
    left_inverse = torch.linalg.pinv(torch.tensor(alg.G, dtype=torch.float64, device=filters.device))  # [3, a]
    _, c, k = filters.shape
    out = torch.empty(k, c, 3, 3, dtype=filters.dtype, device=filters.device)
    step = _output_channel_step(a * a, c)
    for k0 in range(0, k, step):
        u = filters[:, :, k0:k0 + step].double().reshape(a, a, -1)  # [p, q, (c, k)]
        out[k0:k0 + step] = _both_sides(left_inverse, u).view(3, 3, c, -1).permute(3, 2, 0, 1)
    return out


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None = None,
                     multiply: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     out_channels: int | None = None, fused_transforms: bool | None = None,
                     upsample: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Same as F.conv2d(x, weight, bias, padding=1) when filters = transform_filters(weight, algorithm). x: [N, C, H, W]
    (any H, W; channels-last is read without a copy); returns [N, K, H, W] in channels-last memory. `multiply(v)`,
    where given, makes the products of the transformed tiles v [(m+2)^2, tiles, C] with the filters, [(m+2)^2, tiles,
    K] (torch.bmm(v, filters) otherwise), from filters held in a form of its own: only their first size (which tells
    the algorithm) is read then, and K is `out_channels`. `fused_transforms`: the input and output transforms by our
    compiled kernels (winograd.cpp), one pass over memory each, not one elementwise PyTorch op per term; None (the
    default): for float32 CPU tensors where they build (`transforms()`), True: required. `upsample`: the conv of x's
    nearest 2x upsampling, [N, K, 2H, 2W], which the compiled input transform reads from x without making it
    (PyTorch's path makes it). `residual` (the result's shape, float32): added to the result, by the compiled output
    transform as it writes (no pass of its own), else afterwards."""
    alg = ALGORITHMS[filters.shape[0]]
    m, a = alg.m, len(alg.BT)
    lib = _fused_library(x, fused_transforms)
    if upsample and lib is None:
        x, upsample = F.interpolate(x, scale_factor=2.0, mode="nearest"), False
    n, c, h, w = x.shape
    h, w = (2 * h, 2 * w) if upsample else (h, w)
    th, tw = -(-h // m), -(-w // m)  # output tiles down and across
    out = x.new_empty(n, th, m, tw, m, filters.shape[-1] if out_channels is None else out_channels)
    rows = max(-(-MIN_TILES // (n * tw)), CHUNK_BYTES // (a * a * n * tw * c * x.element_size()))
    # torch.bmm takes the transformed tiles laid out tile by tile (each tile's points side by side), which the compiled
    # input transform writes as one stream, not one per point, with the same bits (not its products: laid out so,
    # torch.bmm's bits would depend on the thread count); a multiply of the caller's gets them point by point
    tile_major = multiply is None
    multiply = multiply or (lambda v: torch.bmm(v, filters))
    if lib is not None:  # the compiled input transform reads x itself, its padding as zeros
        pixels = _unit_channels(x.permute(0, 2, 3, 1))  # [N, H, W, C]
        fuse = (residual is not None and residual.dtype == torch.float32
                and residual.shape == (n, out.shape[-1], h, w))  # (else added afterwards, as PyTorch would)
        extra = _unit_channels(residual.permute(0, 2, 3, 1)) if fuse else None
        for t0 in range(0, th, rows):
            t1 = min(th, t0 + rows)
            products = multiply(_input_transform(lib, pixels, m, t0, t1, tw, upsample, tile_major))
            _fused_output_transform(lib, products, bias, out[:, t0:t1], extra, t0)
        y = _crop(out, h, w)
        return y if residual is None or fuse else y.add_(residual)
    # [N, H, W, C] padded by the conv's 1 on top/left, and on bottom/right up to whole tiles
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, m * tw + 1 - w, 1, m * th + 1 - h))
    for t0 in range(0, th, rows):
        t1 = min(th, t0 + rows)
        products = _tile_products(alg, padded[:, m * t0: m * t1 + 2], multiply)
        if bias is not None:
            products[1][1] += bias  # column 1 of A^T is all ones: (1, 1) reaches every output once, with sign +
        _output_transform(alg, products, out[:, t0:t1])
    y = _crop(out, h, w)
    return y if residual is None else y.add_(residual)  # (y is new: adding into it leaves residual be)


def _unit_channels(pixels: torch.Tensor) -> torch.Tensor:
    """[N, H, W, C] with unit stride along C (a copy where it has not)."""
    return pixels if pixels.stride(-1) == 1 else pixels.contiguous()


def _crop(out: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The [N, K, h, w] conv (channels-last) from the tiles' outputs out [N, th, m, tw, m, K]."""
    n, th, m, tw, _, k = out.shape
    y = out.view(n, m * th, m * tw, k)
    if (m * th, m * tw) != (h, w):
        y = y[:, :h, :w].contiguous()
    return y.permute(0, 3, 1, 2)


@functools.cache
def transforms() -> ctypes.CDLL | None:
    """The compiled input and output transforms (winograd.cpp, built for this CPU on first use: native.py), or None
    where they cannot be built (then PyTorch's elementwise ops make them; a failed build warns)."""
    lib = native.load(Path(__file__).with_suffix(".cpp"), native.PORTABLE_FLAGS, "Winograd transforms")
    if lib is None:
        return None
    lib.winograd_input.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 7 + [ctypes.c_int] + [ctypes.c_int64] * 3
                                   + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_int])
    lib.winograd_output.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_int] + [ctypes.c_void_p] * 2
                                    + [ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_int])
    return lib


def _fused_library(x: torch.Tensor, fused: bool | None) -> ctypes.CDLL | None:
    """The compiled transforms if winograd_conv3x3 is to use them on x."""
    if fused is False:
        return None
    suits = x.dtype == torch.float32 and x.is_cpu
    lib = transforms() if suits else None
    if fused and lib is None:
        why = ("they take float32 CPU tensors" if not suits
               else native.unavailable() or "they did not build (see the warning)")
        raise ValueError(f"fused_transforms=True, but the compiled Winograd transforms cannot run here: {why}; "
                         f"pass fused_transforms=None to fall back to PyTorch's ops")
    return lib


def _input_transform(lib: ctypes.CDLL, pixels: torch.Tensor, m: int, t0: int, t1: int, tw: int,
                     upsample: bool = False, tile_major: bool = False) -> torch.Tensor:
    """B^T d B of every tile in tile rows t0 .. t1 of the float32 map `pixels` [N, H, W, C] (unit stride along C;
    `upsample`: of its nearest 2x upsampling, without making it), padded by 1 and up to whole tiles, in one pass:
    [(m+2)^2, N (t1 - t0) tw, C], contiguous or (`tile_major`) stored tile by tile."""
    n, h, w, c = pixels.shape
    points, tiles = (m + 2) ** 2, n * (t1 - t0) * tw
    v = pixels.new_empty(tiles, points, c).transpose(0, 1) if tile_major else pixels.new_empty(points, tiles, c)
    with native.labelled("latentdiff::winograd_input"):
        lib.winograd_input(pixels.data_ptr(), *pixels.stride()[:3], n, h, w, c, int(upsample), t0, t1 - t0, tw, m,
                           v.data_ptr(), *v.stride()[:2], torch.get_num_threads())
    return v


def _fused_output_transform(lib: ctypes.CDLL, products: torch.Tensor, bias: torch.Tensor | None,
                            out: torch.Tensor, residual: torch.Tensor | None = None, t0: int = 0) -> None:
    """A^T M A (+ bias) of the float32 products [(m+2)^2, N t tw, K] of every tile into `out` [N, t, m, tw, m, K]
    (a slice along t of a contiguous tensor, from tile row t0), in one pass, adding `residual` [N, H, W, K] (unit
    stride along K) to the outputs it covers."""
    n, t, m, tw, _, k = out.shape
    products = products if products.stride(-1) == 1 else products.contiguous()  # (a caller's `multiply`: any view)
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    rn, rh, rw = (0, 0, 0) if residual is None else residual.stride()[:3]
    h, w = (0, 0) if residual is None else residual.shape[1:3]
    with native.labelled("latentdiff::winograd_output"):
        lib.winograd_output(products.data_ptr(), *products.stride()[:2], n, t, tw, k, m,
                            None if bias is None else bias.data_ptr(),
                            out.data_ptr(), out.stride(0), None if residual is None else residual.data_ptr(),
                            rn, rh, rw, h, w, m * t0, torch.get_num_threads())


def _combine(coefficients, terms, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i coefficients[i] * terms[i] (skipping zeros), into `out` if given, in as few passes as possible."""
    pairs = sorted(((c, t) for c, t in zip(coefficients, terms) if c), key=lambda p: p[0] != 1)
    (c0, t0), rest = pairs[0], pairs[1:]
    if c0 != 1:
        out = torch.mul(t0, c0, out=out)
    elif rest:
        (c1, t1), rest = rest[0], rest[1:]
        out = torch.add(t0, t1, alpha=c1, out=out)
    else:
        out = t0.clone() if out is None else out.copy_(t0)
    for c, t in rest:
        out.add_(t, alpha=c)
    return out


def _tile_products(alg: Winograd, rows: torch.Tensor, multiply) -> list[list[torch.Tensor]]:
    """rows [N, m*t+2, m*tw+2, C] (t tile rows with their overlap) -> U * (B^T d B) summed over input channels, for
    every tile: an (m+2) x (m+2) grid of [N, t, tw, K] tensors."""
    m, a = alg.m, len(alg.BT)
    n, height, width, c = rows.shape
    t, tw = (height - 2) // m, (width - 2) // m
    d = [rows[:, i: i + m * t: m] for i in range(a)]  # row i of every tile
    across = [_combine(coefficients, d) for coefficients in alg.BT]  # B^T d
    v = rows.new_empty(a, a, n, t, tw, c)
    for i, part in enumerate(across):  # (B^T d) B
        columns = [part[:, :, j: j + m * tw: m] for j in range(a)]
        for j, coefficients in enumerate(alg.BT):
            _combine(coefficients, columns, out=v[i, j])
    products = multiply(v.view(a * a, -1, c)).view(a, a, n, t, tw, -1)
    return [list(row) for row in products]


def _output_transform(alg: Winograd, products: list[list[torch.Tensor]], out: torch.Tensor) -> None:
    """Y = A^T M A for every tile, written into out [N, t, m, tw, m, K] (the m x m outputs of each tile)."""
    down = [[_combine(coefficients, [row[j] for row in products]) for j in range(len(alg.BT))]
            for coefficients in alg.AT]  # A^T M
    for i, part in enumerate(down):  # (A^T M) A
        for j, coefficients in enumerate(alg.AT):
            _combine(coefficients, part, out=out[:, :, i, :, j])
