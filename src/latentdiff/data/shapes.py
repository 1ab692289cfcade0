"""The synthetic shapes dataset: one coloured shape on a plain background, with a caption.

The specification is ../shared/SHAPES.md: palette, geometry, caption grammar and the held-out rule live here
once, and the analyzer (analyze.py) reuses the same geometry, so what is drawn and what is read back cannot drift.
Indices matter (the held-out rule is arithmetic on them), so every list below keeps the specification's order.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (245, 130, 20),
    "yellow": (240, 220, 20),
    "green": (30, 180, 50),
    "cyan": (20, 200, 220),
    "blue": (30, 60, 230),
    "purple": (140, 40, 200),
    "pink": (245, 110, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
SIZES: dict[str, float] = {"large": 0.50, "small": 0.25}  # the box's side, in units of the image side S
POSITIONS: dict[str, tuple[float, float]] = {  # the box's centre (x right, y down), in units of S
    "center": (0.5, 0.5),
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
POSITION_PHRASES: dict[str, str] = {p: "in the center" if p == "center" else f"in the {p} corner" for p in POSITIONS}
MAX_JITTER = 0.03  # the training renderer moves the centre by at most this fraction of S on each axis
ATTRIBUTES: tuple[str, ...] = ("background", "colour", "shape", "size", "position")

COLOUR_NAMES, POSITION_NAMES = tuple(COLOURS), tuple(POSITIONS)


# --- geometry: each shape in its unit box [-1, 1] x [-1, 1] (y down) --------------------------------------------
def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    """Outer points on the unit circle, the first straight up (-90 degrees); inner points at `inner` radius."""
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    return tuple(((1.0 if k % 2 == 0 else inner) * math.cos(a), (1.0 if k % 2 == 0 else inner) * math.sin(a))
                 for k, a in enumerate(angles))


OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {  # polygons; the circle is the one curved shape
    "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
    "triangle": ((0, -1), (1, 1), (-1, 1)),  # apex at the middle of the top side, base along the bottom side
    "diamond": ((0, -1), (1, 0), (0, 1), (-1, 0)),  # corners at the middles of the box's sides
    "star": _star(),
}


def unit_extent(shape: str) -> tuple[float, float, float, float]:
    """(x_min, x_max, y_min, y_max) of the shape inside its unit box; the star does not reach the box's sides."""
    if shape == "circle":
        return (-1.0, 1.0, -1.0, 1.0)
    xs, ys = zip(*OUTLINES[shape])
    return (min(xs), max(xs), min(ys), max(ys))


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which unit-box points (u [1, W], v [H, 1]) lie inside the shape; polygons by the even-odd crossing rule."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    verts = OUTLINES[shape]
    for (xa, ya), (xb, yb) in zip(verts, verts[1:] + verts[:1]):
        if ya == yb:
            continue  # a horizontal edge is never crossed by a horizontal ray
        crosses = (ya > v) != (yb > v)  # [H, 1]: the edge spans this row
        x_at_row = xa + (v - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (u < x_at_row)
    return inside


def coverage(shape: str, box: tuple[float, float, float, float], size: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel of an S x S image covered by `shape` drawn in `box` = (cx, cy, half_w, half_h), in
    pixels. Averaging supersample^2 point tests per pixel is the anti-aliasing; only the box's window is computed."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    cx, cy, hw, hh = box
    out = np.zeros((size, size), dtype=np.float32)
    x0, x1 = max(math.floor(cx - hw), 0), min(math.ceil(cx + hw), size)
    y0, y1 = max(math.floor(cy - hh), 0), min(math.ceil(cy + hh), size)
    if hw <= 0 or hh <= 0 or x1 <= x0 or y1 <= y0:
        return out
    offsets = (np.arange(supersample) + 0.5) / supersample
    u = ((np.arange(x0, x1)[:, None] + offsets).ravel() - cx) / hw
    v = ((np.arange(y0, y1)[:, None] + offsets).ravel() - cy) / hh
    inside = _inside(shape, u[None, :], v[:, None])
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    return out


def check_image_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0 or size % 8:
        raise ValueError(f"image size must be a positive multiple of 8 (the VAE downsamples by 8), got {size!r}")


# --- the specification of one image ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one image; dx, dy move the box's centre, in pixels of the rendered image."""

    colour: str
    shape: str
    size: str
    position: str
    background: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self):
        for name, choices in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS),
                              ("background", BACKGROUNDS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"ShapeSpec: unknown {name} {getattr(self, name)!r}; choose one of {tuple(choices)}")

    @property
    def triple(self) -> tuple[int, int, int]:
        """(colour, shape, position) indices, the unit of the held-out rule."""
        return COLOUR_NAMES.index(self.colour), SHAPES.index(self.shape), POSITION_NAMES.index(self.position)

    @property
    def held_out(self) -> bool:
        return is_held_out(*self.triple)

    def box(self, size: int) -> tuple[float, float, float, float]:
        """(cx, cy, half_w, half_h) of the shape's square box in pixels of an image of side `size`."""
        fx, fy = POSITIONS[self.position]
        half = SIZES[self.size] * size / 2
        return (fx * size + self.dx, fy * size + self.dy, half, half)


def render(spec: ShapeSpec, size: int = 128) -> Image.Image:
    """Draw `spec` as an RGB image of side `size` (any multiple of 8), with anti-aliased edges."""
    check_image_size(size)
    limit = MAX_JITTER * size + 1e-6
    if abs(spec.dx) > limit or abs(spec.dy) > limit:
        raise ValueError(f"jitter (dx={spec.dx}, dy={spec.dy}) exceeds {MAX_JITTER}*S = {MAX_JITTER * size:.2f} px "
                         f"for size {size}; dx, dy are pixels of the rendered size, so scale them with it")
    alpha = coverage(spec.shape, spec.box(size), size)[..., None]
    background = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    colour = np.array(COLOURS[spec.colour], dtype=np.float32)
    pixels = background * (1.0 - alpha) + colour * alpha
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


# --- captions ----------------------------------------------------------------------------------------------------
def caption(spec: ShapeSpec, rng: np.random.Generator | None = None, p_drop: float = 0.3) -> str:
    """The full caption, or with rng given, one where size, position and background are each left out with
    probability p_drop (colour and shape are always named). "an" before a vowel keeps partial captions natural."""
    if not 0.0 <= p_drop <= 1.0:
        raise ValueError(f"p_drop must be a probability in [0, 1], got {p_drop}")
    keep = [True, True, True] if rng is None else [bool(k) for k in rng.random(3) >= p_drop]
    words = ([spec.size] if keep[0] else []) + [spec.colour, spec.shape]
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if keep[1]:
        text += " " + POSITION_PHRASES[spec.position]
    if keep[2]:
        text += f" on a {spec.background} background"
    return text


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


_CAPTION = re.compile(
    rf"an? (?:(?P<size>{_alternatives(SIZES)}) )?(?P<colour>{_alternatives(COLOURS)})"
    rf" (?P<shape>{_alternatives(SHAPES)})"
    rf"(?: in the (?P<position>center|(?:{_alternatives(p for p in POSITIONS if p != 'center')}) corner))?"
    rf"(?: on a (?P<background>{_alternatives(BACKGROUNDS)}) background)?"
)


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption names (the inverse of `caption`); an attribute it leaves out is absent."""
    match = _CAPTION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"caption {text!r} does not follow the shapes grammar "
                         "'a {size} {colour} {shape} {position phrase} on a {background} background'")
    named = {k: v for k, v in match.groupdict().items() if v is not None}
    if "position" in named:
        named["position"] = named["position"].removesuffix(" corner")
    return named


# --- held-out combinations and evaluation prompts ------------------------------------------------------------------
def is_held_out(colour_idx: int, shape_idx: int, position_idx: int) -> bool:
    """SHAPES.md's held-out rule: 25 of the 200 (colour, shape, position) triples are never trained on."""
    return (colour_idx + 2 * shape_idx + 3 * position_idx) % 8 == 0


ALL_TRIPLES = tuple((c, s, p) for c in range(len(COLOURS)) for s in range(len(SHAPES)) for p in range(len(POSITIONS)))
HELD_OUT_TRIPLES = tuple(t for t in ALL_TRIPLES if is_held_out(*t))
TRAIN_TRIPLES = tuple(t for t in ALL_TRIPLES if not is_held_out(*t))


def _full_specs(triples) -> list[ShapeSpec]:
    return [ShapeSpec(COLOUR_NAMES[c], SHAPES[s], size, POSITION_NAMES[p], background)
            for c, s, p in triples for size in SIZES for background in BACKGROUNDS]


def heldout_prompts() -> list[tuple[str, ShapeSpec]]:
    """The 150 evaluation prompts: each held-out triple x both sizes x three backgrounds, with its ground truth."""
    return [(caption(spec), spec) for spec in _full_specs(HELD_OUT_TRIPLES)]


def trained_prompts(n: int = 150, seed: int = 0) -> list[tuple[str, ShapeSpec]]:
    """`n` distinct full prompts from trained triples: the control that held-out accuracy is compared against."""
    specs = _full_specs(TRAIN_TRIPLES)
    if not 0 < n <= len(specs):
        raise ValueError(f"trained_prompts: n must be in 1..{len(specs)} (the distinct full prompts), got {n}")
    chosen = np.random.default_rng(seed).choice(len(specs), size=n, replace=False)
    return [(caption(specs[i]), specs[i]) for i in sorted(chosen)]


# --- the training dataset ------------------------------------------------------------------------------------------
def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1], the range the VAE is trained on."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class ShapesDataset(torch.utils.data.Dataset):
    """`num_samples` procedural images of trained triples only. Index i always gives the same image and caption
    (its RNG is seeded by (seed, i)), so the dataset needs no storage and works with any DataLoader sharding."""

    def __init__(self, num_samples: int, size: int = 128, seed: int = 0, jitter: float = MAX_JITTER,
                 p_drop_attrs: float = 0.3):
        check_image_size(size)
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0.0 <= jitter <= MAX_JITTER:
            raise ValueError(f"jitter must be in [0, {MAX_JITTER}] (a fraction of the image side; SHAPES.md "
                             f"allows at most {MAX_JITTER}), got {jitter}")
        if not 0.0 <= p_drop_attrs <= 1.0:
            raise ValueError(f"p_drop_attrs must be a probability in [0, 1], got {p_drop_attrs}")
        self.num_samples, self.size, self.seed = num_samples, size, seed
        self.jitter, self.p_drop_attrs = jitter, p_drop_attrs

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a ShapesDataset of {self.num_samples} samples")
        return np.random.default_rng([self.seed, index])

    def _sample(self, rng: np.random.Generator) -> ShapeSpec:
        c, s, p = TRAIN_TRIPLES[rng.integers(len(TRAIN_TRIPLES))]
        size = tuple(SIZES)[rng.integers(len(SIZES))]
        background = tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        dx, dy = rng.uniform(-self.jitter, self.jitter, size=2) * self.size
        return ShapeSpec(COLOUR_NAMES[c], SHAPES[s], size, POSITION_NAMES[p], background, float(dx), float(dy))

    def spec(self, index: int) -> ShapeSpec:
        """The ground truth of item `index`."""
        return self._sample(self._rng(index))

    def item(self, index: int) -> tuple[ShapeSpec, Image.Image, str]:
        rng = self._rng(index)
        spec = self._sample(rng)
        return spec, render(spec, self.size), caption(spec, rng, self.p_drop_attrs)

    def __getitem__(self, index: int) -> dict:
        _, image, text = self.item(index)
        return {"pixel_values": to_tensor(image), "text": text}


def write_image_folder(folder: str | Path, n: int, size: int = 128, seed: int = 0, jitter: float = MAX_JITTER,
                       p_drop_attrs: float = 0.3, overwrite: bool = False) -> Path:
    """Write `n` dataset items as PNGs plus metadata.jsonl ({"file_name", "text"} per line: the Hugging Face
    imagefolder convention), so the training code reads shapes like any other captioned image folder."""
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if metadata.exists() and not overwrite:
        raise FileExistsError(f"{metadata} already exists; pass overwrite=True or choose an empty folder")
    dataset = ShapesDataset(n, size=size, seed=seed, jitter=jitter, p_drop_attrs=p_drop_attrs)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    with open(metadata, "w") as f:
        for i in range(n):
            _, image, text = dataset.item(i)
            name = f"{i:0{width}d}.png"
            image.save(folder / name)
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return folder
