"""DreamBooth's prior preservation (Ruiz et al. 2023, sec. 3.3): a subject's few images, all captioned with the
instance prompt ("a photo of sks dog"), train together with as many images of its class ("a photo of a dog") that
the pretrained model made itself. Their loss keeps the model's idea of the class, which fine-tuning on the subject
alone overwrites (every dog becomes the subject; the paper's "language drift"):

    loss = mean of the instance samples' losses + prior_loss_weight * mean of the class samples' losses

Each batch holds train_batch_size instance samples followed by as many class samples. An epoch runs over
max(instance images, class images) pairs; pair i shows instance image i mod n and class image i mod m, each with
random draws of its own.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..data.folder import ImageFolderDataset, image_files
from .data import TrainingView, collate, sample_seed

CLASS_IMAGE_NAME = "class-{:05d}.png"
GENERATION_STREAM = 5  # (data.py's streams of per-sample randomness are 1 to 4)


def class_image_seed(seed: int, number: int) -> int:
    """The seed of the generator that makes class image `number` (its file is CLASS_IMAGE_NAME.format(number))."""
    return sample_seed(seed, 0, number, GENERATION_STREAM)


def missing_class_images(config) -> list[int]:
    """The numbers of the class images to generate: as many as class_data_dir lacks of num_class_images, the
    lowest numbers whose file names are free."""
    folder = Path(config.class_data_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"class_data_dir {folder} is a file: give a folder (new or holding class images)")
    lacking = config.num_class_images - (len(image_files(folder)) if folder.is_dir() else 0)
    numbers, number = [], 0
    while len(numbers) < lacking:
        if not (folder / CLASS_IMAGE_NAME.format(number)).exists():
            numbers.append(number)
        number += 1
    return numbers


def generation_dtype(config, device: torch.device) -> torch.dtype:
    """prior_generation_precision as a dtype; by default fp16 on a GPU (as diffusers), fp32 elsewhere."""
    choice = config.prior_generation_precision
    if choice is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


@torch.no_grad()
def ensure_class_images(config, components, accelerator) -> None:
    """Fill class_data_dir up to num_class_images with images of class_prompt from the pretrained pipeline (before
    any training): class_generation_steps steps of the export_scheduler's sampler at class_guidance_scale, each
    image from a generator seeded by (seed, its number), so that a folder made again, in any batches or on any
    number of processes, holds the same images. Processes share the work; each file appears whole (renamed).
    In a precision other than fp32 (prior_generation_precision) the pipeline runs on copies of the models."""
    from ..pipeline import LatentDiffusionPipeline
    from ..schedulers import scheduler_from_name

    numbers = missing_class_images(config)
    accelerator.wait_for_everyone()  # (every process has counted before any writes)
    if not numbers:
        return
    folder = Path(config.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        print(f"generating {len(numbers)} class images of {config.class_prompt!r} in {folder}", flush=True)
    c = components
    dtype = generation_dtype(config, accelerator.device)
    models = {"text_encoder": c.text_encoder, "unet": c.unet, "vae": c.vae}
    if dtype != torch.float32:  # (the models to train keep their fp32 weights)
        models = {name: copy.deepcopy(model) for name, model in models.items()}
    pipe = LatentDiffusionPipeline(tokenizer=c.tokenizer, scheduler=scheduler_from_name(config.export_scheduler,
                                                                                        c.scheduler.config), **models)
    pipe.to(accelerator.device, dtype)
    mine = numbers[accelerator.process_index::accelerator.num_processes]
    for start in range(0, len(mine), config.sample_batch_size):
        chunk = mine[start:start + config.sample_batch_size]
        images = pipe([config.class_prompt] * len(chunk), num_inference_steps=config.class_generation_steps,
                      guidance_scale=config.class_guidance_scale, progress=False,
                      generator=[torch.Generator().manual_seed(class_image_seed(config.seed, n)) for n in chunk]).images
        for number, image in zip(chunk, images):
            path = folder / CLASS_IMAGE_NAME.format(number)
            partial = path.with_name(path.name + ".part")  # (not an image file by its suffix, should it remain)
            image.save(partial, format="PNG")
            partial.replace(path)
    accelerator.wait_for_everyone()


def class_source(config) -> ImageFolderDataset:
    """The first num_class_images images of class_data_dir (by name), each captioned class_prompt."""
    source = ImageFolderDataset(config.class_data_dir, size=config.resolution, on_bad_sample=config.on_bad_sample,
                                verify=config.verify_images, caption=config.class_prompt)
    source.entries = source.entries[:config.num_class_images]
    return source


class PriorPreservationView(torch.utils.data.Dataset):
    """Pairs (instance sample, class sample) of two TrainingViews of the same length; batches of them hold the
    instance samples first, then the class samples, with `prior` marking the latter."""

    def __init__(self, instances: TrainingView, classes: TrainingView):
        if len(instances) != len(classes):
            raise ValueError(f"the instance and class views differ in length ({len(instances)} vs {len(classes)})")
        self.instances, self.classes = instances, classes

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict, dict]:
        return self.instances[key], self.classes[key]

    @staticmethod
    def collate(pairs: list[tuple[dict, dict]]) -> dict:
        n = len(pairs)
        batch = collate([instance for instance, _ in pairs] + [cls for _, cls in pairs])
        batch["index"] = batch["index"][:n]  # (the pairs' indices, once)
        batch["prior"] = torch.arange(2 * n) >= n
        return batch
