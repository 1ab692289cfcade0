"""SHAPES.md's evaluation protocol, run on a pipeline: prompt adherence of a shapes model, measured exactly.

For each guidance scale, the pipeline draws one image per prompt (prompt i with seed `seed + i`, so the numbers do
not depend on the batch size) at `steps` DPM-Solver++ steps, the deterministic analyzer (data/analyze.py) reads each
image back into its attributes, and `score` gives each attribute's accuracy and the share with every one right.
The 150 held-out prompts measure composition (triples never trained on); 150 trained ones are the control.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .data.analyze import evaluate, format_table
from .data.shapes import ShapeSpec, heldout_prompts, trained_prompts

PROMPT_SETS: dict[str, Callable[[], list[tuple[str, ShapeSpec]]]] = {
    "heldout": heldout_prompts,
    "trained": trained_prompts,
}
Row = tuple[float, dict[str, float]]


def prompt_set(prompts: str | Sequence[tuple[str, ShapeSpec]]) -> list[tuple[str, ShapeSpec]]:
    """"heldout" or "trained" (SHAPES.md's two sets of 150 full prompts), or an explicit (prompt, spec) list."""
    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise ValueError(f"prompts={prompts!r}: choose one of {list(PROMPT_SETS)} or pass (prompt, ShapeSpec) "
                             "pairs")
        return PROMPT_SETS[prompts]()
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], ShapeSpec) for p in prompts):
        raise ValueError("prompts must be 'heldout', 'trained' or a non-empty list of (prompt, ShapeSpec) pairs")
    return prompts


def pipeline_generator(pipe, guidance_scale: float, steps: int = 25, guidance_rescale: float = 0.0
                       ) -> Callable[[list[str], list[int]], list]:
    """`generate(prompts, seeds) -> PIL images` for the analyzer: one generator per image, so each image depends
    on its own seed only."""

    def generate(texts: list[str], seeds: list[int]) -> list:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return pipe(texts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                    output_type="pil", progress=False, guidance_rescale=guidance_rescale).images

    return generate


def evaluate_pipeline(pipe, guidance_scales: Sequence[float] = (1, 3, 5, 7.5),
                      prompts: str | Sequence[tuple[str, ShapeSpec]] = "heldout", steps: int = 25, seed: int = 0,
                      batch_size: int = 25, sampler: str | None = "dpm++",
                      on_row: Callable[[float, dict[str, float]], None] | None = None,
                      guidance_rescale: float = 0.0) -> list[Row]:
    """One row (guidance scale, scores) per guidance scale, with the accuracies `score` returns.

    `sampler` ("dpm++" as SHAPES.md prescribes, or None to keep the pipeline's scheduler) is swapped in for the
    run and the pipeline's own scheduler put back afterwards. `on_row` is called as each row is done (a slow
    evaluation can report as it goes). `guidance_rescale` (see guidance.guide) is not part of SHAPES.md's protocol,
    which leaves it at 0."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be at least 1")
    if not guidance_scales:
        raise ValueError("guidance_scales is empty: give at least one scale, e.g. (5,)")
    pairs = prompt_set(prompts)
    original = pipe.scheduler
    if sampler is not None:
        from .schedulers import scheduler_from_name

        pipe.scheduler = scheduler_from_name(sampler, original.config)
    rows: list[Row] = []
    try:
        for scale in guidance_scales:
            generate = pipeline_generator(pipe, float(scale), steps, guidance_rescale)
            scores = evaluate(generate, pairs, seed=seed, batch_size=batch_size)
            rows.append((float(scale), scores))
            if on_row is not None:
                on_row(float(scale), scores)
    finally:
        pipe.scheduler = original
    return rows


@torch.no_grad()
def evaluate_vae(vae, num_images: int = 200, size: int = 128, seed: int = 12345, batch_size: int = 25
                 ) -> dict[str, float]:
    """How well a shapes VAE keeps what the prompts ask for: `num_images` dataset images (seed `seed`, which no
    training config uses) go through encode (posterior mean) and decode, and the analyzer reads each reconstruction.
    The accuracies bound what any diffusion model on these latents can reach."""
    from .data.analyze import analyze, score
    from .data.shapes import ShapesDataset, to_tensor
    from .pipeline import to_images

    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    data = ShapesDataset(num_images, size=size, seed=seed)
    parameter = next(vae.parameters())
    results = []
    for start in range(0, num_images, batch_size):
        items = [data.item(i) for i in range(start, min(start + batch_size, num_images))]
        pixels = torch.stack([to_tensor(image) for _, image, _ in items]).to(parameter.device, parameter.dtype)
        reconstructions = vae.decode(vae.encode(pixels).mean)
        results += [(spec, analyze(image)) for (spec, _, _), image in zip(items, to_images(reconstructions, "pil"))]
    return score(results)


@torch.no_grad()
def palette_latents(vae, size: int = 128):
    """The posterior means [8, C, h, w] of the palette's 8 colours as a circle at the centre, one batch for each
    background and size in turn (what colour_separation and train.vae.colour_discriminant_map measure)."""
    from .data.shapes import BACKGROUNDS, COLOURS, SIZES, ShapeSpec, render, to_tensor

    parameter = next(vae.parameters())
    for background in BACKGROUNDS:
        for shape_size in SIZES:
            images = [render(ShapeSpec(c, "circle", shape_size, "center", background), size) for c in COLOURS]
            yield vae.encode(torch.stack([to_tensor(image) for image in images]).to(parameter.device,
                                                                                     parameter.dtype)).mean


@torch.no_grad()
def colour_separation(vae, size: int = 128, scaling_factor: float | None = None) -> dict[str, float]:
    """How far apart a VAE puts the palette's colours in the latent space a diffusion model denoises: for a circle
    at the centre, on each background and at each size, the posterior means of the 8 colours (times
    `scaling_factor`, by default the VAE's), and the L2 distance of the closest pair. Returns the smallest of
    these ("min") and their average ("mean"). A VAE can reconstruct every colour and still put neighbouring hues so
    close that a diffusion model trained on its latents confuses them (measured on the shapes VAEs: 1.7 against 3.9
    on white, small shapes, and a pipeline's held-out colour accuracy 71% against 95%)."""
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    closest = [torch.pdist(z.float().flatten(1) * scale).min().item() for z in palette_latents(vae, size)]
    return {"min": min(closest), "mean": sum(closest) / len(closest)}


__all__ = ["PROMPT_SETS", "colour_separation", "evaluate_pipeline", "evaluate_vae", "format_table",
           "palette_latents", "pipeline_generator", "prompt_set"]
