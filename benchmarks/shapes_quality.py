"""Prompt adherence of a shapes pipeline (SHAPES.md's protocol), plus its generation speed on this machine.

    python benchmarks/shapes_quality.py                       # pipelines/tiny-shapes, both prompt sets
    python benchmarks/shapes_quality.py --model out/tiny-shapes/pipeline --prompts heldout --guidance 5

Prints one markdown table per prompt set (150 held-out prompts: composition; 150 trained ones: the control), a row
per guidance scale, at 25 DPM-Solver++ steps with seeds 0..149; then the seconds one guided 128x128 image takes
after loading. `--json FILE` also writes every number.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def time_one_image(pipe, steps: int, guidance: float, repeats: int = 3) -> float:
    """Best of `repeats` wall-clock seconds for one image (after a warm-up call), prompt encoding and decoding
    included."""
    prompt = "a large blue star in the top right corner on a black background"
    run = lambda: pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,  # noqa: E731
                       generator=torch.Generator().manual_seed(0), progress=False)
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "pipelines" / "tiny-shapes"), help="a pipeline folder")
    parser.add_argument("--prompts", nargs="+", default=["heldout", "trained"], choices=["heldout", "trained"])
    parser.add_argument("--guidance", nargs="+", type=float, default=[1, 3, 5, 7.5])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-speed", action="store_true", help="skip the timing of one image")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from latentdiff import LatentDiffusionPipeline
    from latentdiff.evaluation import evaluate_pipeline, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        print(f"error: {model} is not a pipeline folder (no model_index.json); run `make train-demo` or pass "
              "--model", file=sys.stderr)
        return 2
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    print(f"model {model}, {args.steps} DPM-Solver++ steps, seeds {args.seed}.., {torch.get_num_threads()} threads",
          flush=True)
    results: dict = {"model": str(model), "steps": args.steps, "seed": args.seed, "tables": {}}
    for name in args.prompts:
        started = time.perf_counter()
        rows = evaluate_pipeline(pipe, args.guidance, name, steps=args.steps, seed=args.seed,
                                 batch_size=args.batch_size,
                                 on_row=lambda g, s: print(f"  guidance {g:g}: all {100 * s['all']:.1f}%", flush=True))
        print(f"\n{name} prompts ({time.perf_counter() - started:.0f} s)\n{format_table(rows)}\n", flush=True)
        results["tables"][name] = {f"{g:g}": scores for g, scores in rows}
    if not args.no_speed:
        seconds = time_one_image(pipe, args.steps, guidance=5.0)
        print(f"one 128x128 image, {args.steps} steps, guidance 5: {seconds:.2f} s", flush=True)
        results["seconds_per_image"] = seconds
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
