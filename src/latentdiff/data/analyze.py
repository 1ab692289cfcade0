"""Read a shapes image back into its attributes, deterministically (no learned model), and score generations.

SHAPES.md's evaluation: background from the border pixels, the shape's pixels as those far from the background,
colour as the nearest palette entry to their median, size from the bounding box, position from the box centre,
shape by best overlap with rendered masks of the five shapes at that box. Generated images are blurry and noisy,
so every threshold is relative to what the image itself shows, speckles are dropped as small connected
components, and overlap is measured on soft coverage rather than on a hard mask. One refinement of the
specification: each candidate mask is placed at the box that matches the pixels' centroid and spread, not their
extremes, since blur rounds off the tips of stars, diamonds and triangles and so shrinks their bounding box.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from .shapes import (ATTRIBUTES, BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, ShapeSpec, check_image_size,
                     coverage, heldout_prompts, unit_extent)

NONE = "none"  # the value of every shape attribute when no shape is found
MIN_THRESHOLD = 40.0  # RGB distance from the background below which a pixel is background (noise std 8 is ~14)
MAX_THRESHOLD = 96.0  # a border noisier than a third of this is not a plain background
MIN_IOU = 0.3  # below this overlap no shape is recognised at all


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the analyzer measured; `labels()` is the attribute dict that is scored."""

    background: str
    colour: str = NONE
    shape: str = NONE
    size: str = NONE
    position: str = NONE
    colour_rgb: tuple[float, float, float] | None = None
    box: tuple[float, float, float, float] | None = None  # (cx, cy, half_w, half_h) in pixels, of the best shape
    ious: dict[str, float] = dataclasses.field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def _nearest(value: np.ndarray, table: Mapping[str, tuple]) -> str:
    names = list(table)
    distances = np.linalg.norm(np.asarray([table[n] for n in names], dtype=np.float32) - value, axis=-1)
    return names[int(np.argmin(distances))]


def _to_array(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"analyze expects a PIL image or an [H, W, 3] RGB array, got shape {array.shape}")
    if array.shape[0] != array.shape[1]:
        raise ValueError(f"analyze expects a square image (positions and sizes are fractions of its side), got "
                         f"{array.shape[1]}x{array.shape[0]}; resize or crop it to a square first")
    check_image_size(array.shape[0])
    return array


def _shift_min(a: np.ndarray, b: np.ndarray) -> None:
    """a = min(a, b shifted by one pixel towards each of its 8 neighbours), in place."""
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        h, w = a.shape
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        np.minimum(a[yd, xd], b[ys, xs], out=a[yd, xd])


def components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean mask (-1 outside it): each pixel takes the smallest label among
    its neighbours, then jumps to its label's label (pointer jumping), which converges in few numpy passes."""
    outside = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), outside)
    while True:
        new = labels.copy()
        _shift_min(new, labels)
        new = np.where(mask, new, outside)
        new = np.where(mask, np.append(new.ravel(), outside)[new], outside)
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


def _keep_main(mask: np.ndarray, min_pixels: int, min_share: float = 0.25) -> np.ndarray:
    """Drop specks: components smaller than min_pixels or than min_share of the largest one."""
    if not mask.any():
        return mask
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    labels = components(mask[window])
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    wanted = ids[counts >= max(min_pixels, min_share * counts.max())]
    keep = np.zeros_like(mask)
    keep[window] = np.isin(labels, wanted)
    return keep


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    h, w = mask.shape
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    grown = out.copy()
    grown[:, 1:] |= out[:, :-1]
    grown[:, :-1] |= out[:, 1:]
    return grown


def _fit_box(shape: str, bbox: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    """The box (cx, cy, half_w, half_h) in which `shape` has bounding box (x0, x1, y0, y1) (pixel edges)."""
    x0, x1, y0, y1 = bbox
    ux0, ux1, uy0, uy1 = unit_extent(shape)
    hw, hh = (x1 - x0) / (ux1 - ux0), (y1 - y0) / (uy1 - uy0)
    return (float(x0 - ux0 * hw), float(y0 - uy0 * hh), float(hw), float(hh))


@functools.cache
def _unit_moments(shape: str) -> tuple[float, float, float, float]:
    """(mean_u, mean_v, std_u, std_v) of the shape's area in its unit box, measured on a fine rendering."""
    n = 256
    weight = coverage(shape, (n / 2, n / 2, n / 2, n / 2), n).astype(np.float64)
    grid = (np.arange(n) + 0.5) / (n / 2) - 1.0
    total = weight.sum()
    mu, mv = (weight.sum(0) @ grid) / total, (weight.sum(1) @ grid) / total
    su = math.sqrt((weight.sum(0) @ (grid - mu) ** 2) / total)
    sv = math.sqrt((weight.sum(1) @ (grid - mv) ** 2) / total)
    return mu, mv, su, sv


def _moment_box(shape: str, alpha: np.ndarray) -> tuple[float, float, float, float]:
    """The box in which `shape` has the same centroid and spread as alpha. Unlike the extreme pixels, moments
    barely move under blur, which rounds off tips and corners."""
    total = max(float(alpha.sum()), 1e-6)
    grid = np.arange(alpha.shape[0]) + 0.5
    px, py = alpha.sum(0), alpha.sum(1)
    mx, my = (px @ grid) / total, (py @ grid) / total
    sx, sy = math.sqrt((px @ (grid - mx) ** 2) / total), math.sqrt((py @ (grid - my) ** 2) / total)
    mu, mv, su, sv = _unit_moments(shape)
    hw, hh = sx / su, sy / sv
    return (float(mx - mu * hw), float(my - mv * hh), float(hw), float(hh))


def measure(image) -> Reading:
    """Analyze one square RGB image (PIL or uint8 array) of any multiple-of-8 side."""
    pixels = _to_array(image)
    side = pixels.shape[0]
    border_width = max(1, side // 64)
    border = np.concatenate([pixels[:border_width].reshape(-1, 3), pixels[-border_width:].reshape(-1, 3),
                             pixels[:, :border_width].reshape(-1, 3), pixels[:, -border_width:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)  # robust to the corner shapes that touch the border
    background = _nearest(background_rgb, BACKGROUNDS)

    # The shape's pixels: far from the measured background, beyond its own noise; specks removed.
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    noise = float(np.median(np.linalg.norm(border - background_rgb, axis=-1)))
    if 3.0 * noise > MAX_THRESHOLD:  # the border is not a plain colour, so nothing can be told apart from it
        return Reading(background)
    candidate = distance > max(MIN_THRESHOLD, 3.0 * noise)
    shape_pixels = _keep_main(candidate, min_pixels=max(4, side * side // 1024))
    if not shape_pixels.any():
        return Reading(background)

    # Colour: the median of the core (pixels nearly as far from the background as any), not the blended edges.
    far = distance[shape_pixels]
    core = shape_pixels & (distance >= 0.8 * np.percentile(far, 95))
    colour_rgb = np.median(pixels[core], axis=0)
    colour = _nearest(colour_rgb, COLOURS)

    # Coverage alpha in [0, 1]: where each pixel lies between the background and the shape's colour.
    direction = colour_rgb - background_rgb
    alpha = np.clip((pixels - background_rgb) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
    alpha = alpha * _dilate(shape_pixels)  # the one-pixel dilation keeps the faint anti-aliased rim
    solid = alpha > 0.5
    if not solid.any():
        return Reading(background, colour, colour_rgb=tuple(colour_rgb.tolist()))
    rows, cols = np.flatnonzero(solid.any(1)), np.flatnonzero(solid.any(0))
    bbox = (cols[0], cols[-1] + 1, rows[0], rows[-1] + 1)

    # Shape: the best soft IoU between alpha and each shape rendered at its box. The candidates are placed by
    # moments (blur-proof); size and position then come from the winner's box for the bounding box.
    ious = {}
    for name in SHAPES:
        mask = coverage(name, _moment_box(name, alpha), side, supersample=2)
        ious[name] = float(np.minimum(alpha, mask).sum() / max(np.maximum(alpha, mask).sum(), 1e-6))
    shape = max(SHAPES, key=ious.get)
    box = _fit_box(shape, bbox)
    cx, cy, hw, hh = box
    base = dict(background=background, colour=colour, colour_rgb=tuple(colour_rgb.tolist()), box=box,
                ious=ious)
    if ious[shape] < MIN_IOU:
        return Reading(**base)

    # Size: the box side against the two sizes (nearest on a log scale); position: nearest centre.
    box_side = (hw + hh) / side
    size = min(SIZES, key=lambda s: abs(math.log(box_side / SIZES[s])))
    position = _nearest(np.array([cx / side, cy / side]), POSITIONS)
    return Reading(shape=shape, size=size, position=position, **base)


def analyze(image) -> dict[str, str]:
    """{background, colour, shape, size, position} read from the image; "none" where no shape is found."""
    return measure(image).labels()


# --- evaluation ----------------------------------------------------------------------------------------------------
def score(results: Iterable[tuple[ShapeSpec, Mapping[str, str]]]) -> dict[str, float]:
    """Each attribute's accuracy and "all": the share of images with every attribute right."""
    results = list(results)
    if not results:
        raise ValueError("score needs at least one (spec, analyzed) pair")
    right = np.array([[getattr(spec, a) == got[a] for a in ATTRIBUTES] for spec, got in results], dtype=bool)
    scores = {a: float(right[:, i].mean()) for i, a in enumerate(ATTRIBUTES)}
    scores["all"] = float(right.all(axis=1).mean())
    return scores


Generate = Callable[[list[str], list[int]], list[Image.Image]]


def generate_and_analyze(generate: Generate, prompts: Sequence[tuple[str, ShapeSpec]] | None = None,
                         seed: int = 0, batch_size: int = 25) -> list[tuple[ShapeSpec, dict[str, str]]]:
    """Call `generate(prompts, seeds)` in batches (prompt i gets seed `seed + i`, so results do not depend on the
    batching) and analyze each image. Defaults to the 150 held-out prompts."""
    prompts = list(heldout_prompts() if prompts is None else prompts)
    results = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        seeds = list(range(seed + start, seed + start + len(batch)))
        images = generate([text for text, _ in batch], seeds)
        if len(images) != len(batch):
            raise ValueError(f"generate returned {len(images)} images for {len(batch)} prompts; it must return "
                             "one image per prompt, in order")
        results += [(spec, analyze(image)) for (_, spec), image in zip(batch, images)]
    return results


def evaluate(generate: Generate, prompts: Sequence[tuple[str, ShapeSpec]] | None = None, seed: int = 0,
             batch_size: int = 25) -> dict[str, float]:
    """score(generate_and_analyze(...)): the accuracies for one generator (e.g. one guidance scale)."""
    return score(generate_and_analyze(generate, prompts, seed, batch_size))


def format_table(rows: Mapping[float, Mapping[str, float]] | Iterable[tuple[float, Mapping[str, float]]]) -> str:
    """A markdown table, one row per guidance scale, of the accuracies `score` returns."""
    rows = list(rows.items() if isinstance(rows, Mapping) else rows)
    columns = (*ATTRIBUTES, "all")
    lines = ["| guidance | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
    for guidance, scores in rows:
        missing = [c for c in columns if c not in scores]
        if missing:
            raise ValueError(f"format_table: scores for guidance {guidance} lack {missing}; pass score()'s output")
        lines.append(f"| {guidance:g} | " + " | ".join(f"{100 * scores[c]:.1f}%" for c in columns) + " |")
    return "\n".join(lines)
