"""A folder of captioned images: image files plus metadata.jsonl, one `{"file_name": ..., "text": ...}` per line
(the Hugging Face imagefolder convention, which `write_image_folder` of the shapes dataset also writes).

Problems are found when the dataset is built, not hours into training: a metadata line without a caption, a file
that is missing or does not decode is reported with its file name, and then skipped or fatal (`on_bad_sample`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class BadSampleError(ValueError):
    """A dataset entry that cannot be used; the message names the file."""


def prepare_image(image: Image.Image, size: int, rng: np.random.Generator | None = None, random_crop: bool = False,
                  random_flip: bool = False) -> torch.Tensor:
    """Resize the shorter side to `size`, crop `size` x `size` (centred, or at an offset drawn from `rng`), flip
    left-right with probability 1/2 if asked, and map to a float [3, size, size] tensor in [-1, 1]."""
    if (random_crop or random_flip) and rng is None:
        raise ValueError("random crops and flips need an rng (so that they are reproducible)")
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if random_crop:
        left, top = int(rng.integers(new_w - size + 1)), int(rng.integers(new_h - size + 1))
    else:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (by suffix, any case; hidden ones left out), sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _report(message: str, on_bad_sample: str) -> None:
    if on_bad_sample == "fail":
        raise BadSampleError(message + " (set on_bad_sample: skip to leave such entries out)")
    warnings.warn(message + "; skipped", stacklevel=3)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Items {"pixel_values": [3, size, size] in [-1, 1], "text": caption} from `folder`/metadata.jsonl.

    `load(i)` gives the decoded PIL image and caption, for callers that draw their own crops and flips.
    `verify=True` decodes every image once at construction, so a corrupt file is reported before training.
    With `caption` (DreamBooth's instance or class prompt), every image file of the folder, by name, has that
    caption and no metadata.jsonl is read.
    """

    def __init__(self, folder: str | Path, size: int = 64, caption_column: str = "text", on_bad_sample: str = "fail",
                 verify: bool = True, conditioning_column: str | None = None, caption: str | None = None):
        if on_bad_sample not in ("fail", "skip"):
            raise ValueError(f"on_bad_sample={on_bad_sample!r}: choose 'fail' or 'skip'")
        self.folder, self.size, self.on_bad_sample = Path(folder), size, on_bad_sample
        metadata = self.folder / "metadata.jsonl"
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.folder}")
        self.entries: list[tuple[Path, str]] = []
        self.conditioning: list[Path] = []  # with conditioning_column: each entry's control image (ControlNets)
        self.conditioning_column = conditioning_column
        if caption is not None:
            if conditioning_column:
                raise ValueError("a folder read with one caption for all its images has no control images")
            files = image_files(self.folder)
            self.entries = [(path, caption) for path in files if not verify or self._verify(path)]
            if not self.entries:
                raise ValueError(f"{self.folder}: no usable images (image files: {', '.join(IMAGE_SUFFIXES)})")
            return
        if not metadata.is_file():
            raise FileNotFoundError(f"{metadata} not found: an image folder needs one JSON line per image, "
                                    '{"file_name": "0001.png", "text": "a caption"} (or, for DreamBooth, set '
                                    "instance_prompt: one caption for every image in the folder)")
        for number, line in enumerate(metadata.read_text().splitlines(), start=1):
            if line.strip():
                entry = self._parse(line, number, metadata, caption_column)
                files = [] if entry is None else [path for path in (entry[0], entry[2]) if path is not None]
                if entry is not None and (not verify or all(self._verify(path) for path in files)):
                    self.entries.append(entry[:2])
                    if conditioning_column:
                        self.conditioning.append(entry[2])
        if not self.entries:
            raise ValueError(f"{metadata}: no usable images")

    def _parse(self, line: str, number: int, metadata: Path, caption_column: str) -> tuple | None:
        """(image path, caption, control image path or None), or None for a bad line (reported)."""
        where = f"{metadata}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            _report(f"{where}: not a JSON object ({err})", self.on_bad_sample)
            return None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            _report(f"{where}: no 'file_name'", self.on_bad_sample)
            return None
        name = record["file_name"]
        caption = record.get(caption_column)
        if not isinstance(caption, str):
            _report(f"{where}: image {name!r} has no caption (no string {caption_column!r} key)", self.on_bad_sample)
            return None
        path = self.folder / name
        if not path.is_file():
            _report(f"{where}: image file {path} not found", self.on_bad_sample)
            return None
        if not self.conditioning_column:
            return path, caption, None
        control = record.get(self.conditioning_column)
        if not isinstance(control, str) or not (self.folder / control).is_file():
            what = "file not found" if isinstance(control, str) else f"no string {self.conditioning_column!r} key"
            _report(f"{where}: image {name!r} has no control image ({what}: ControlNet training reads the file "
                    f"named by conditioning_column {self.conditioning_column!r})", self.on_bad_sample)
            return None
        return path, caption, self.folder / control

    def _verify(self, path: Path) -> bool:
        try:
            with Image.open(path) as image:
                image.load()
            return True
        except BAD_IMAGE_ERRORS as err:
            _report(f"image {path} cannot be decoded ({type(err).__name__}: {err})", self.on_bad_sample)
            return False

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int) -> tuple[Image.Image, str]:
        path, caption = self.entries[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB"), caption
        except BAD_IMAGE_ERRORS as err:  # a file changed or broke after verification
            raise BadSampleError(f"image {path} cannot be decoded ({type(err).__name__}: {err})") from None

    def load_conditioning(self, index: int) -> Image.Image:
        """The control image of entry `index` (with conditioning_column)."""
        path = self.conditioning[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except BAD_IMAGE_ERRORS as err:
            raise BadSampleError(f"control image {path} cannot be decoded ({type(err).__name__}: {err})") from None

    def file_name(self, index: int) -> str:
        return self.entries[index][0].name

    def __getitem__(self, index: int) -> dict:
        image, caption = self.load(index)
        return {"pixel_values": prepare_image(image, self.size), "text": caption}
