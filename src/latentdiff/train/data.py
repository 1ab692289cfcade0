"""Training data: which samples each process sees, in which order, with which random augmentations.

Every random draw about a sample (its crop, flip, caption dropout, and the timestep, noise and posterior sample of
its loss) comes from seeds derived from (run seed, epoch, sample index). The data order is a permutation seeded by
(run seed, epoch). So the whole run is a function of the number of micro-batches consumed: resuming from a
checkpoint that stores that number continues exactly, with any number of DataLoader workers.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import torch

from ..data.folder import ImageFolderDataset, image_files, prepare_image

# streams of per-sample randomness, kept apart so that adding a draw to one cannot shift another (a second view of
# the same run, DreamBooth's class images, draws from its own pair: CLASS_STREAMS)
AUGMENT, DIFFUSION = 1, 2
CLASS_STREAMS = (3, 4)


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, stream])


def sample_seed(seed: int, epoch: int, index: int, stream: int = DIFFUSION) -> int:
    """A 63-bit torch seed for the loss's random draws about one sample."""
    state = np.random.SeedSequence([seed, epoch, index, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class ShapesSource:
    """The synthetic shapes dataset with the `load(i) -> (image, caption)` interface of ImageFolderDataset."""

    def __init__(self, size: int, options: dict, caption: str | None = None):
        from ..data.shapes import ShapesDataset

        options = dict(options)
        if "num_samples" not in options:
            raise ValueError("dataset: shapes needs shapes.num_samples (e.g. --shapes.num_samples 1000)")
        if "size" in options:
            raise ValueError("shapes.size is set by the training config's 'resolution'; remove shapes.size")
        valid = set(inspect.signature(ShapesDataset).parameters) - {"size"}
        if set(options) - valid:
            raise ValueError(f"unknown shapes option(s) {sorted(set(options) - valid)}; valid: {sorted(valid)}")
        self.dataset = ShapesDataset(size=size, **options)
        self.caption = caption  # (DreamBooth's instance_prompt: this caption instead of each image's own)

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int):
        _, image, text = self.dataset.item(index)
        return image, text if self.caption is None else self.caption

    def load_conditioning(self, index: int):
        """The control image of a sample: its shape's silhouette, white on black (for ControlNet training)."""
        from PIL import Image

        from ..data.shapes import coverage

        spec, size = self.dataset.spec(index), self.dataset.size
        mask = np.rint(coverage(spec.shape, spec.box(size), size) * 255).astype(np.uint8)
        return Image.fromarray(mask).convert("RGB")


def build_source(config):
    """The dataset named by the config, as an object with __len__ and load(i) -> (PIL image, caption), every
    caption `instance_prompt` where that is set (DreamBooth). (`shapes` options are ignored with dataset: folder, so
    that a shapes config can be pointed at a folder.)"""
    caption = getattr(config, "instance_prompt", None)
    if config.dataset == "shapes":
        return ShapesSource(config.resolution, config.shapes, caption)
    return ImageFolderDataset(config.data_dir, size=config.resolution, caption_column=config.caption_column,
                              on_bad_sample=config.on_bad_sample, verify=config.verify_images,
                              conditioning_column=config.conditioning_column if _controlnet(config) else None,
                              caption=caption)


def _controlnet(config) -> bool:
    return bool(getattr(config, "controlnet", False))


class TrainingView(torch.utils.data.Dataset):
    """Indexed by (epoch, index): the sample with this epoch's crop, flip and caption dropout.

    With a latent cache, items carry the VAE posterior's mean and std instead of pixels. With `length` longer than
    the source, index i shows source sample i % len(source), with draws of its own (those of index i); `streams`
    (augmentations, diffusion draws) keep two views of one run apart."""

    def __init__(self, source, resolution: int, seed: int, random_crop: bool = False, random_flip: bool = False,
                 caption_dropout: float = 0.0, cache: dict | None = None, draw_spec=None, tokenizer=None,
                 patch_size: int | None = None, conditioning: bool = False, caption_templates: list | None = None,
                 placeholder: str | None = None, length: int | None = None,
                 streams: tuple[int, int] = (AUGMENT, DIFFUSION)):
        self.source, self.resolution, self.seed, self.patch_size = source, resolution, seed, patch_size
        self.length, self.streams = length or len(source), streams
        self.conditioning = conditioning  # items also carry the control image, cropped and flipped as the image
        # textual inversion: the caption is one of the templates with the placeholder word for {}, not the source's
        self.caption_templates, self.placeholder = caption_templates, placeholder
        self.random_crop, self.random_flip, self.caption_dropout = random_crop, random_flip, caption_dropout
        self.cache = cache
        # with these, the DataLoader's workers also make each sample's diffusion draws and token ids, work that
        # otherwise holds up the training process between steps
        self.draw_spec, self.tokenizer = draw_spec, tokenizer

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = sample_rng(self.seed, epoch, index, self.streams[0])
        sample = index % len(self.source)
        if self.cache is not None:
            item = {"mean": self.cache["mean"][sample], "std": self.cache["std"][sample]}
            text = self.cache["text"][sample]
            if self.conditioning:  # (cached latents are of the centred crop)
                item["conditioning_pixel_values"] = self._control(sample, None, None)
        else:
            image, text = self.source.load(sample)
            # the control image with the image's crop and flip: drawn from a copy of the same generator
            control = self._control(sample, image.size, copy.deepcopy(rng)) if self.conditioning else None
            pixels = prepare_image(image, self.resolution, rng, self.random_crop, self.random_flip)
            if self.patch_size is not None:  # a random patch of the prepared image
                top, left = (int(rng.integers(self.resolution - self.patch_size + 1)) for _ in range(2))
                pixels = pixels[:, top:top + self.patch_size, left:left + self.patch_size]
            item = {"pixel_values": pixels}
            if control is not None:
                item["conditioning_pixel_values"] = control
        if self.caption_templates:
            text = self.caption_templates[int(rng.integers(len(self.caption_templates)))].format(self.placeholder)
        if self.caption_dropout and rng.random() < self.caption_dropout:
            text = ""
        seed = sample_seed(self.seed, epoch, index, self.streams[1])
        if self.draw_spec is not None:
            from .loss import draw_sample

            item.update(draw_sample(seed, self.draw_spec))
        if self.tokenizer is not None:
            item["input_ids"] = self.tokenizer([text])[0]
        return {**item, "text": text, "index": index, "seed": seed}


    def _control(self, index: int, size: tuple[int, int] | None, rng: np.random.Generator | None) -> torch.Tensor:
        """The control image in [0, 1], at the image's size (`size`) and cropped and flipped with `rng` as the image
        is (centred and unflipped without)."""
        from PIL import Image

        control = self.source.load_conditioning(index)
        if size is not None and control.size != size:
            control = control.resize(size, Image.Resampling.BICUBIC)
        random = rng is not None
        pixels = prepare_image(control, self.resolution, rng, self.random_crop and random, self.random_flip and random)
        return (pixels + 1.0) / 2.0


def collate(items: list[dict]) -> dict:
    keys = ("pixel_values", "mean", "std", "noise", "posterior_noise", "input_noise", "input_ids",
            "conditioning_pixel_values")
    out = {key: torch.stack([item[key] for item in items]) for key in keys if key in items[0]}
    for key in ("timesteps", "uniform"):
        if key in items[0]:
            out[key] = torch.cat([item[key] for item in items])
    out["text"] = [item["text"] for item in items]
    out["index"] = torch.tensor([item["index"] for item in items])
    out["seed"] = torch.tensor([item["seed"] for item in items], dtype=torch.int64)
    return out


class BatchPlan:
    """The keys (epoch, index) of each micro-batch of one process, from micro-batch `start` on, forever.

    Each epoch is a permutation seeded by (seed, epoch), cut into global batches of batch_size * world_size samples
    (an incomplete last one is dropped); process `rank` takes its slice of each, so ranks never share a sample
    within a step."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        self.global_batch = batch_size * world_size
        if num_samples < self.global_batch:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch "
                             f"({batch_size} per process x {world_size} processes): lower train_batch_size")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.start = rank, start
        self.batches_per_epoch = num_samples // self.global_batch

    def epoch_of(self, micro_batch: int) -> int:
        return micro_batch // self.batches_per_epoch

    def keys(self, micro_batch: int) -> list[tuple[int, int]]:
        epoch, k = divmod(micro_batch, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        first = k * self.global_batch + self.rank * self.batch_size
        return [(epoch, int(i)) for i in order[first:first + self.batch_size]]

    def __iter__(self):
        micro_batch = self.start
        while True:
            yield self.keys(micro_batch)
            micro_batch += 1


def make_loader(view: TrainingView, plan: BatchPlan, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of `view` in the order of `plan`, put together by the view's own `collate` where it has one."""
    return torch.utils.data.DataLoader(view, batch_sampler=plan, num_workers=num_workers,
                                       collate_fn=getattr(view, "collate", collate), persistent_workers=num_workers > 0)


# --- the latent cache ----------------------------------------------------------------------------------------------
def fingerprint(config, vae) -> str:
    """What the cached latents depend on: the data, the resolution and the VAE's weights."""
    digest = hashlib.sha256()
    caption = getattr(config, "instance_prompt", None)
    described = {"dataset": config.dataset, "resolution": config.resolution, "shapes": config.shapes,
                 "caption_column": config.caption_column} | ({} if caption is None else {"instance_prompt": caption})
    if config.dataset == "folder" and caption is None:
        digest.update((Path(config.data_dir) / "metadata.jsonl").read_bytes())
    elif config.dataset == "folder":  # (a plain folder of images: their names and bytes)
        for path in image_files(Path(config.data_dir)):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    digest.update(json.dumps(described, sort_keys=True).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def inference_encoder(vae: torch.nn.Module) -> torch.nn.Module:
    """What encodes a frozen VAE's images during training: on the CPU, a copy of its encoding half packed for
    inference (models/packed.py: oneDNN weight layouts, our AMX and Winograd kernels where they pay; the decoder is
    not copied), the same posteriors up to float rounding: tiny-shapes' VAE encodes 64 images of 128 px in 1.05
    instead of 1.48 s (2-core Xeon with AMX); elsewhere the VAE itself."""
    if vae.device.type != "cpu":
        return vae
    from ..models.packed import pack_for_inference

    decoder = getattr(vae, "decoder", None)
    return pack_for_inference(copy.deepcopy(vae, {} if decoder is None else {id(decoder): None}))


@torch.no_grad()
def build_latent_cache(source, vae, config, accelerator, batch_size: int = 64) -> dict:
    """Encode every (centre-cropped) image once (by inference_encoder(vae)); keep the posterior's mean and std, not
    a sample, so that each epoch still draws a fresh latent. Processes encode interleaved shares, the main one
    merges them into one file, `<output_dir>/latent_cache.safetensors`, reused while the data and VAE are
    unchanged."""
    from ..checkpoints import load_safetensors, save_safetensors

    path = Path(config.output_dir) / "latent_cache.safetensors"
    key = fingerprint(config, vae)
    meta_path = path.with_suffix(".json")
    if not (path.exists() and meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == key):
        rank, world = accelerator.process_index, accelerator.num_processes
        encoder = inference_encoder(vae)
        mine = _Prepared(source, list(range(rank, len(source), world)), config.resolution)
        means, stds, texts = [], [], []
        # images are loaded and prepared by the DataLoader's workers while the VAE encodes the previous batch
        loader = torch.utils.data.DataLoader(mine, batch_size=batch_size, num_workers=config.dataloader_num_workers,
                                             collate_fn=_stack_prepared)
        for pixels, batch_texts in loader:
            posterior = encoder.encode(pixels.to(vae.device, vae.dtype))
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
            texts += batch_texts
        part = path.with_name(f"latent_cache.part{rank}.safetensors")
        save_safetensors({"mean": torch.cat(means), "std": torch.cat(stds)}, part,
                         metadata={"text": json.dumps(texts)})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _merge_parts(path, world, len(source))
            meta_path.write_text(json.dumps({"fingerprint": key}))
        accelerator.wait_for_everyone()
    tensors = load_safetensors(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        texts = json.loads(f.metadata()["text"])
    return {"mean": tensors["mean"], "std": tensors["std"], "text": texts}


class _Prepared(torch.utils.data.Dataset):
    """The centre-cropped tensors and captions of some of a source's images, for encoding into the cache."""

    def __init__(self, source, indices: list[int], resolution: int):
        self.source, self.indices, self.resolution = source, indices, resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        image, text = self.source.load(self.indices[k])
        return prepare_image(image, self.resolution), text


def _stack_prepared(items):
    return torch.stack([pixels for pixels, _ in items]), [text for _, text in items]


def _merge_parts(path: Path, world: int, n: int) -> None:
    from safetensors import safe_open

    from ..checkpoints import load_safetensors, save_safetensors

    mean = std = None
    texts: list = [None] * n
    for rank in range(world):
        part = path.with_name(f"latent_cache.part{rank}.safetensors")
        tensors = load_safetensors(part)
        with safe_open(str(part), "pt") as f:
            part_texts = json.loads(f.metadata()["text"])
        if mean is None:
            mean = torch.empty((n, *tensors["mean"].shape[1:]))
            std = torch.empty_like(mean)
        mean[rank::world], std[rank::world] = tensors["mean"], tensors["std"]
        texts[rank::world] = part_texts
        part.unlink()
    save_safetensors({"mean": mean, "std": std}, path, metadata={"text": json.dumps(texts)})
