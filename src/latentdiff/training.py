"""Training with Accelerate: the library side of training/train_text_to_image.py and training/train_vae.py.

    from latentdiff.training import TextToImageConfig, load_config, train_text_to_image
    config = load_config(TextToImageConfig, "training/configs/smoke.yaml", {"output_dir": "out/smoke"})
    result = train_text_to_image(config)        # one process here; several under `accelerate launch`

The pieces live in latentdiff/train/: the objectives (loss.py), EMA (ema.py), atomic checkpoints and resuming
(checkpointing.py), the data order and per-sample randomness that make a resumed run continue exactly (data.py),
the loop (loop.py) and the two tasks (text_to_image.py, vae.py).
"""
from .train.checkpointing import checkpoint_problem, find_resumable, list_checkpoints, save_checkpoint
from .train.config import (TextToImageConfig, TrainConfig, VAETrainConfig, build_config, load_config,
                           parse_command_line, parse_overrides)
from .train.data import BatchPlan, TrainingView, build_source, sample_seed
from .train.ema import EMA
from .train.loop import FitResult, Trainer, TrainingDiverged, TrainState, lr_multiplier, make_accelerator
from .train.loss import (Draws, VAEObjective, consistency_distillation_loss, diffusion_loss, draw, high_noise_weights,
                         min_snr_weights)
from .train.text_to_image import Components, TextToImageTask, load_components, train_text_to_image
from .train.vae import VAETask, latent_std, train_vae

__all__ = [
    "BatchPlan", "Components", "Draws", "EMA", "FitResult", "TextToImageConfig", "TextToImageTask", "TrainConfig",
    "TrainState", "Trainer", "TrainingDiverged", "TrainingView", "VAEObjective", "VAETask", "VAETrainConfig",
    "build_config", "build_source", "checkpoint_problem", "consistency_distillation_loss", "diffusion_loss", "draw",
    "find_resumable", "high_noise_weights", "latent_std", "list_checkpoints", "load_components", "load_config",
    "lr_multiplier", "make_accelerator", "min_snr_weights", "parse_command_line", "parse_overrides", "run_script",
    "sample_seed", "save_checkpoint", "train_text_to_image", "train_vae",
]


def run_script(config_cls, train, argv: list[str]) -> int:
    """What the training/ scripts run: parse `--config FILE` and `--key value` overrides, train, and report a bad
    config or a diverged run in one line (exit status 2 and 1) instead of a traceback."""
    import sys

    try:
        config = parse_command_line(config_cls, argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        train(config)
    except (TrainingDiverged, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
