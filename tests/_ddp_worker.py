"""Run by tests/test_training.py as `accelerate launch --config_file training/accelerate/multi_cpu.yaml
tests/_ddp_worker.py OUTPUT_DIR [PIPELINE [MODE[,MODE...]]]`: two processes train a tiny model with DDP over gloo on the
CPU; each writes rank<i>.json with a digest of its weights after training and the sample indices it trained on, step by
step. With PIPELINE, they fine-tune its U-Net through LoRA adapters (MODE lora), train a ControlNet for it
(controlnet), learn a new word's embedding (inversion), distil it into LoRA adapters for few-step sampling (lcm) or
fine-tune it with DreamBooth's prior preservation (dreambooth: the processes first generate the class images
together); MODE scratch trains a new model as without PIPELINE. Several modes run one after another in the same
processes, each into OUTPUT_DIR/MODE (a launch costs ~12 s of start-up and shutdown on a 2-core CPU)."""
import hashlib
import json
import sys
from pathlib import Path

from latentdiff.training import TextToImageConfig, load_config, train_text_to_image

SMOKE = Path(__file__).resolve().parents[1] / "training" / "configs" / "smoke.yaml"


def digest(module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def main(output_dir: str, pipeline: str | None = None, modes: str = "lora") -> None:
    for mode in modes.split(","):
        train(output_dir if "," not in modes else str(Path(output_dir) / mode), pipeline, mode)


def train(output_dir: str, pipeline: str | None, mode: str) -> None:
    """pipeline: a pipeline folder to fine-tune instead (the text encoder frozen), through LoRA adapters (mode
    "lora"), by training a ControlNet for its U-Net ("controlnet"), by textual inversion ("inversion") or by latent
    consistency distillation into LoRA adapters ("lcm"), or by DreamBooth with prior preservation ("dreambooth");
    mode "scratch" trains a new model (U-Net and text encoder) whatever pipeline is."""
    tuned = {"lora": {"lora_rank": 2, "resolution": 64}, "controlnet": {"controlnet": True, "resolution": 16},
             "inversion": {"placeholder_token": "<shape>", "initializer_token": "star", "use_ema": False,
                           "resolution": 16},
             "lcm": {"lora_rank": 2, "resolution": 64, "lcm_distill": True, "caption_dropout": 0.0},
             "dreambooth": {"resolution": 16, "instance_prompt": "a sks shape", "with_prior_preservation": True,
                            "class_prompt": "a shape", "class_data_dir": str(Path(output_dir) / "class"),
                            "num_class_images": 5, "class_generation_steps": 2, "sample_batch_size": 2,
                            "caption_dropout": 0.0, "cache_latents": False}}
    settings = {"train_text_encoder": True} if pipeline is None or mode == "scratch" else {
        "pretrained": pipeline, "unet": None, "text_encoder": None, "vae": None, "scheduler": None,
        "shapes": {"num_samples": 16, "seed": 0}, **tuned[mode]}
    config = load_config(TextToImageConfig, SMOKE, {
        "output_dir": output_dir, "max_train_steps": 3, "train_batch_size": 4, "gradient_accumulation_steps": 2,
        "checkpointing_steps": 2, "validation_steps": 0, "cpu": True, "cache_latents": True, **settings,
    })
    result = train_text_to_image(config)
    task = result.task
    acc = task.accelerator
    record = {
        "rank": acc.process_index, "world": acc.num_processes, "distributed_type": str(acc.distributed_type),
        "unet": digest(acc.unwrap_model(task.unet)), "text_encoder": digest(acc.unwrap_model(task.text_encoder)),
        "trained": digest(task._trained()),
        "ema": task.ema and hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(task.ema.shadow.items()))
                                           ).hexdigest(),
        "seen": result.seen, "losses": result.losses,
    }
    (Path(output_dir) / f"rank{acc.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
