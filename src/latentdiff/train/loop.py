"""The training loop both scripts share: data order, gradient accumulation, clipping, the NaN stop, logging,
checkpoints and resuming. What is trained and how its loss is computed is a `task` (text_to_image.py, vae.py):

    task.models                 the prepared trainable modules      task.loss(batch) -> (loss, extras)
    task.optimizer              prepared AdamW                      task.after_optimizer_step()   (EMA)
    task.lr_scheduler           prepared LambdaLR                   task.validate(step), task.export()
    task.view                   the TrainingView to draw from       task.checkpoint_objects  (saved with the state)
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpointing import (CheckpointContents, identity_defaults, identity_differences, list_checkpoints,
                            load_checkpoint, resolve_resume, run_identity, save_checkpoint)
from .config import POLYNOMIAL_END_LR
from .data import BatchPlan, make_loader


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite; nothing was saved after the last good checkpoint."""


def make_accelerator(config):
    """An Accelerator for `config`. Mixed precision comes from the config if set there, otherwise from
    `accelerate launch`. Without a GPU the run uses the CPU, and several processes talk over gloo."""
    from accelerate import Accelerator

    has_gpu = torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    kwargs = {"mixed_precision": config.mixed_precision} if config.mixed_precision is not None else {}
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                              cpu=config.cpu or not has_gpu, step_scheduler_with_optimizer=False, **kwargs)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    warn_if_mixed_precision_is_slow(accelerator)
    return accelerator


def warn_if_mixed_precision_is_slow(accelerator) -> None:
    """Warn where bf16 or fp16 mixed precision would run on a CPU without oneDNN kernels for it (AVX2-only CPUs):
    there autocast's half-precision convolutions and matrix products are PyTorch's fallbacks, 10-200x slower than
    float32 (a 2-core AVX2 AMD EPYC: 0.6-14 GFLOP/s against ~120), so training in fp32 is the faster choice."""
    from ..models.packed import half_supported

    precision = getattr(accelerator, "mixed_precision", "no")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None or torch.device(accelerator.device).type != "cpu":
        return
    if not half_supported(dtype):
        warnings.warn(f"mixed_precision {precision} on a CPU without oneDNN {precision} kernels (they need AVX-512): "
                      f"PyTorch's fallback convolutions and matrix products run 10-200x slower than in fp32 here; "
                      f"set mixed_precision: no in the config (or `accelerate launch --mixed_precision no`)",
                      stacklevel=3)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str, num_cycles: int = 1,
                  power: float = 1.0, base_lr: float = 1e-4) -> float:
    """The learning rate's factor after `step` optimizer steps: linear warmup over `warmup_steps`, then diffusers'
    schedules of the same names: "constant" (= "constant_with_warmup"), "linear" (to 0 at `total_steps`),
    "cosine" (a half cosine to 0; Loshchilov & Hutter 2017), "cosine_with_restarts" (`num_cycles` half cosines,
    each restarting at 1), "polynomial" (from 1 to POLYNOMIAL_END_LR / base_lr as (1 - progress) ** `power`).
    The warmup's first step already takes 1/warmup_steps of the rate (diffusers' takes 0: a step that changes
    nothing), so during warmup this is diffusers' factor one step later; after it, the same."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if kind == "cosine_with_restarts":
        return 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    if kind == "polynomial":
        end = POLYNOMIAL_END_LR / base_lr
        return end + (1.0 - end) * (1.0 - min(1.0, progress)) ** power
    raise ValueError(f"lr_scheduler={kind!r} is not a schedule latentdiff knows")


# the devices where torch has a fused AdamW: one kernel updates every parameter, where the default runs ~10 operations
# per parameter tensor (on the CPU one tensor at a time, on a GPU as foreach kernels): on a 2-core Xeon, 6.9 vs 34.6
# ms a step for tiny-shapes' U-Net (5.5M parameters), 0.86 vs 4.94 s for SD 1.5's (860M; benchmarks/optimizer.py);
# the same update to float rounding
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(param_groups: list[dict], config):
    """AdamW (Loshchilov & Hutter 2019), torch's fused kernel where every parameter can take it (FUSED_ADAMW_DEVICES,
    floating point), and its learning-rate schedule, a pure function of the step."""
    param_groups = [{**group, "params": list(group["params"])} for group in param_groups]  # (iterators read once)
    params = [p for group in param_groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(param_groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, fused=fused or None)
    schedule = partial(lr_multiplier, warmup_steps=config.lr_warmup_steps, total_steps=config.max_train_steps,
                       kind=config.lr_scheduler, num_cycles=config.lr_num_cycles, power=config.lr_power,
                       base_lr=config.learning_rate)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass
class TrainState:
    """Where the run is: optimizer steps taken and micro-batches consumed (which fixes the data position)."""

    step: int = 0
    micro_batches: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_batches": self.micro_batches}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro_batches = int(state["step"]), int(state["micro_batches"])


@dataclass
class FitResult:
    state: TrainState
    losses: list[float] = field(default_factory=list)  # per optimizer step of this run (after any resume)
    seen: list[list[int]] = field(default_factory=list)  # per step, the sample indices this process trained on
    resumed_from: Path | None = None
    task: object = None  # the task, holding the trained models (for tests and notebooks)


class Trainer:
    def __init__(self, config, accelerator, task):
        self.config, self.accelerator, self.task = config, accelerator, task
        self.output_dir = Path(config.output_dir)
        self.state = TrainState()
        self.log_path = self.output_dir / "log.jsonl"
        self.contents = CheckpointContents(task.models, task.optimizer, task.lr_scheduler,
                                           [self.state, *task.checkpoint_objects])
        self.identity = run_identity(config)

    def fit(self) -> FitResult:
        config, acc, task, state = self.config, self.accelerator, self.task, self.state
        result = FitResult(state, resumed_from=self._resume(), task=task)
        plan = BatchPlan(len(task.view), config.train_batch_size, config.seed, acc.process_index, acc.num_processes,
                         start=state.micro_batches)
        bar = tqdm(total=config.max_train_steps, initial=state.step, desc="training",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        try:
            self._train(result, plan, bar)
        finally:
            bar.close()
        if not any(step == state.step for step, _ in list_checkpoints(self.output_dir)):
            self.save()  # the end state, so that a longer run can resume from it
        task.export()
        acc.wait_for_everyone()
        return result

    def _train(self, result: FitResult, plan: BatchPlan, bar) -> None:
        """Optimizer steps until max_train_steps, each over gradient_accumulation_steps micro-batches."""
        config, acc, task, state = self.config, self.accelerator, self.task, self.state
        batches = iter(make_loader(task.view, plan, config.dataloader_num_workers))
        for model in task.models:
            model.train()
        grad_norm = float("nan")
        while state.step < config.max_train_steps:
            started = time.perf_counter()
            lr = task.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it after)
            losses, indices, extras = [], [], []
            for _ in range(config.gradient_accumulation_steps):
                batch = next(batches)
                indices += batch["index"].tolist()
                with acc.accumulate(*task.models):
                    loss, extra = task.loss(batch)
                    if config.debug_nan_at_step == state.step + 1:
                        loss = loss * float("nan")
                    losses.append(self._checked(loss))
                    extras.append(extra)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        grad_norm = self._clip_gradients()
                        task.optimizer.step()
                        task.lr_scheduler.step()
                        task.optimizer.zero_grad(set_to_none=True)
                state.micro_batches += 1
            state.step += 1
            task.after_optimizer_step()
            loss = sum(losses) / len(losses)
            result.losses.append(loss)
            result.seen.append(indices)
            self._log(loss, lr, grad_norm, time.perf_counter() - started, plan, extras, bar)
            if config.checkpointing_steps and state.step % config.checkpointing_steps == 0:
                self.save()
            if config.validation_steps and state.step % config.validation_steps == 0:
                task.validate(state.step)

    # ---- pieces of the loop --------------------------------------------------------------------------------------
    def _resume(self) -> Path | None:
        acc, state = self.accelerator, self.state
        with warnings.catch_warnings():
            if not acc.is_main_process:  # one copy of each warning
                warnings.simplefilter("ignore")
            folder = resolve_resume(self.config.resume, self.output_dir)
        if folder is None:
            if self.config.resume is None and list_checkpoints(self.output_dir):
                raise FileExistsError(f"{self.output_dir} already holds checkpoints of an earlier run: continue it "
                                      "with --resume latest, or choose a new output_dir")
            acc.wait_for_everyone()
            if acc.is_main_process and self.log_path.exists():
                self.log_path.unlink()  # a run starting at step 0 starts a fresh log
            return None
        differences = identity_differences(folder, self.identity, identity_defaults(self.config))
        if differences:
            what = (f"{folder} was written by a different run ({'; '.join(differences)})")
            if self.config.resume == "latest":
                raise ValueError(f"resume: latest: {what}. Resuming would continue that run with this one's "
                                 "settings and inputs. Start this run afresh in a new output_dir (or delete the "
                                 f"checkpoint-* folders in {self.output_dir}), or go back to that run's settings.")
            if acc.is_main_process:
                warnings.warn(f"resume: {what}; continuing from it as asked", stacklevel=2)
        load_checkpoint(acc, folder, self.contents)
        if acc.is_main_process:
            print(f"resumed from {folder} at step {state.step}", flush=True)
            if self.log_path.exists():  # forget steps logged after the checkpoint: they are about to be redone
                lines = self.log_path.read_text().splitlines()
                kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= state.step]
                self.log_path.write_text("".join(line + "\n" for line in kept))
        return folder

    def _checked(self, loss: torch.Tensor) -> float:
        """The loss averaged over processes; a NaN or infinite value on any process stops the run on all of them."""
        values = self.accelerator.gather(loss.detach().float().reshape(1))
        if not bool(torch.isfinite(values).all()):
            bad = values[~torch.isfinite(values)][0].item()
            self._diverged(f"the loss is {bad}")
        return values.mean().item()

    def _clip_gradients(self) -> float:
        params = [p for model in self.task.models for p in model.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        norm = float(norm) if norm is not None else float("nan")
        # with fp16 the gradient scaler skips steps with inf gradients by itself (and lowers its scale)
        if not math.isfinite(norm) and self.accelerator.scaler is None:
            self._diverged(f"the gradient norm is {norm}")
        return norm

    def _diverged(self, what: str) -> None:
        done = [step for step, _ in list_checkpoints(self.output_dir)]
        last = f"checkpoint-{max(done)}" if done else "none yet"
        lr = self.task.optimizer.param_groups[0]["lr"]
        raise TrainingDiverged(
            f"training diverged: {what} at step {self.state.step + 1}. Nothing after the last checkpoint "
            f"({last}) was saved. Try a lower learning_rate (now {lr:.3g}), training in fp32 (mixed_precision: no) "
            "or a smaller max_grad_norm, then --resume latest."
        )

    def _log(self, loss: float, lr: float, grad_norm: float, seconds: float, plan: BatchPlan, extras: list[dict],
             bar) -> None:
        step = self.state.step
        config = self.config
        samples = config.train_batch_size * self.accelerator.num_processes * config.gradient_accumulation_steps
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "steps_per_s": 1.0 / seconds, "samples_per_s": samples / seconds,
                  "epoch": plan.epoch_of(self.state.micro_batches - 1)}
        for key in extras[0] if extras else ():
            record[key] = sum(float(e[key]) for e in extras) / len(extras)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", it_s=f"{1.0 / seconds:.2f}")
        if self.accelerator.is_main_process:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self) -> Path:
        return save_checkpoint(self.accelerator, self.output_dir, self.state.step,
                               self.config.checkpoints_total_limit, self.contents,
                               extra={"micro_batches": self.state.micro_batches, "run": self.identity})
