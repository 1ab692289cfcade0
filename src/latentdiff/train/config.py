"""Training configs: dataclasses read from YAML, overridden from the command line with the config's own keys.

`--max_train_steps 10 --resume latest` sets two keys; `--shapes.num_samples 64` sets one entry of a dict-valued key.
Values are parsed as YAML scalars (10, 1e-4, true, null, [32, 64]), then checked against the field's type, so a typo
in a key or a wrong type fails at once, with the list of valid keys, rather than hours into a run.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

POLYNOMIAL_END_LR = 1e-7  # where lr_scheduler "polynomial" ends (diffusers' get_scheduler default; its scripts keep it)


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """What every training run needs: data, optimisation, precision, checkpoints."""

    output_dir: str = ""
    seed: int = 0
    max_train_steps: int = 1000
    # data
    dataset: str = "folder"  # "folder" (images + metadata.jsonl) or "shapes" (the synthetic dataset)
    data_dir: str | None = None
    caption_column: str = "text"
    shapes: dict = dataclasses.field(default_factory=dict)  # ShapesDataset options: num_samples, seed, jitter, ...
    resolution: int = 64
    center_crop: bool = True  # False: random crops
    random_flip: bool = False  # off by default: flipping swaps "left" and "right" in captions
    on_bad_sample: str = "fail"  # or "skip" (with a warning naming the file)
    verify_images: bool = True  # decode each image once up front; if false, a broken image met later stops the run
    dataloader_num_workers: int = 0
    # optimisation
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    # after a linear warmup: "constant" (= "constant_with_warmup"), "linear", "cosine", "cosine_with_restarts"
    # (lr_num_cycles of them) or "polynomial" (lr_power), as diffusers' get_scheduler (train/loop.lr_multiplier)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    mixed_precision: str | None = None  # None: whatever `accelerate launch` says; else "no", "fp16", "bf16"
    cpu: bool = False  # force the CPU (gloo for several processes) even where a GPU is present
    allow_tf32: bool = True
    gradient_checkpointing: bool = False
    # checkpoints and logging
    checkpointing_steps: int = 500  # 0: no intermediate checkpoints
    checkpoints_total_limit: int | None = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    validation_steps: int = 0  # 0: never; else sample images (text-to-image) or reconstructions (VAE) every N steps
    debug_nan_at_step: int | None = None  # test hook: make the loss NaN at this optimizer step

    # keys that do not change what a step computes (or only its float rounding, or where it runs): a run may resume
    # from a checkpoint written with other values (e.g. a larger max_train_steps, or on other hardware). Every other
    # key, and the files at the paths in `input_paths`, must match (see train/checkpointing.run_identity).
    bookkeeping: typing.ClassVar[tuple[str, ...]] = (
        "output_dir", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "resume", "validation_steps",
        "debug_nan_at_step", "dataloader_num_workers", "on_bad_sample", "verify_images", "cpu", "allow_tf32",
        "gradient_checkpointing")
    input_paths: typing.ClassVar[tuple[str, ...]] = ()

    choices: typing.ClassVar[dict[str, tuple]] = {
        "dataset": ("folder", "shapes"),
        "on_bad_sample": ("fail", "skip"),
        "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                         "polynomial"),
        "mixed_precision": (None, "no", "fp16", "bf16"),
    }

    def validate(self) -> None:
        for key, allowed in self.choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config key {key!r} = {getattr(self, key)!r}: choose one of {list(allowed)}")
        if not self.output_dir:
            raise ValueError("config key 'output_dir' is required (e.g. --output_dir out/run1)")
        positive = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "resolution")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"config key {key!r} must be positive, got {getattr(self, key)}")
        if self.resolution % 8:
            raise ValueError(f"resolution={self.resolution} must be a multiple of 8 (the VAE downsamples by 8)")
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("dataset: folder needs data_dir (a folder with images and metadata.jsonl)")
        if self.dataset == "shapes" and self.data_dir:
            raise ValueError(f"data_dir={self.data_dir!r} is set but dataset is 'shapes' (the synthetic dataset), "
                             "which would ignore it: set dataset: folder to train on that folder, or drop data_dir")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.checkpointing_steps < 0 or self.lr_warmup_steps < 0:
            raise ValueError("checkpointing_steps and lr_warmup_steps must be >= 0")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("checkpoints_total_limit must be at least 1 (or null to keep every checkpoint)")
        if self.lr_num_cycles < 1 or not 0 < self.lr_power < float("inf"):
            raise ValueError(f"lr_num_cycles must be at least 1 and lr_power positive, got {self.lr_num_cycles} and "
                             f"{self.lr_power}")
        if self.lr_scheduler == "polynomial" and self.learning_rate <= POLYNOMIAL_END_LR:
            raise ValueError(f"lr_scheduler: polynomial decays to {POLYNOMIAL_END_LR}: learning_rate must be larger, "
                             f"got {self.learning_rate}")


@dataclasses.dataclass(kw_only=True)
class TextToImageConfig(TrainConfig):
    """train_text_to_image.py: the U-Net (and optionally the text encoder) on frozen-VAE latents."""

    # the model: a pipeline to fine-tune, or an architecture to train from scratch
    pretrained: str | None = None  # pipeline folder or SD 1.x single .safetensors file
    pretrained_config: str | None = None  # a single file's architecture: a pipeline folder (default: SD 1.5's)
    unet: dict | None = None  # diffusers UNet2DConditionModel config keys
    text_encoder: dict | None = None  # transformers CLIPTextConfig keys (a new, randomly initialised encoder)
    text_encoder_path: str | None = None  # or a trained text-encoder folder to start from (<pipeline>/text_encoder)
    # draw a new text encoder's token embeddings from N(0, std^2) instead of CLIP's N(0, 0.02^2): see load_components
    token_embedding_std: float | None = None
    tokenizer: str | None = None  # tokenizer folder; default: the CLIP BPE vocabulary open_clip ships
    vae_path: str | None = None  # a VAE folder (train_vae.py writes one)
    vae: dict | None = None  # a VAE config with random weights: only for smoke tests (latents carry no image)
    scheduler: dict | None = None  # diffusers DDPMScheduler config: the training noise schedule
    prediction_type: str | None = None  # override the scheduler's: "epsilon" or "v_prediction"
    train_text_encoder: bool = False
    text_encoder_learning_rate: float | None = None  # default: learning_rate
    # LoRA (fine-tuning only): train low-rank adapters of these U-Net layers instead of its weights (with
    # train_text_encoder, of the text encoder's attention projections too); the run exports
    # <output_dir>/lora/pytorch_lora_weights.safetensors (pipe.load_lora_weights reads it, in diffusers too)
    lora_rank: int | None = None
    lora_alpha: float | None = None  # the adapters' scale is lora_alpha / lora_rank; default: the rank (scale 1)
    lora_target_modules: list = dataclasses.field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # ControlNet (fine-tuning only): train a ControlNet (Zhang et al. 2023) that steers the frozen U-Net with control
    # images (folders: the file named by metadata.jsonl's conditioning_column; shapes: each shape's silhouette). It
    # starts as a copy of the U-Net's down path (or from controlnet_path); the run exports <output_dir>/controlnet
    controlnet: bool = False
    controlnet_path: str | None = None  # a ControlNet folder to go on training
    conditioning_column: str = "conditioning_image"
    # Textual inversion (fine-tuning only; Gal et al. 2023): learn the embedding of a new word, placeholder_token
    # (num_vectors vectors, started from initializer_token's), all models frozen; each caption is one of
    # caption_templates with the word for {}. Exports <output_dir>/learned_embeds.safetensors, which
    # pipe.load_textual_inversion reads (diffusers' too)
    placeholder_token: str | None = None
    initializer_token: str | None = None
    num_vectors: int = 1
    caption_templates: list = dataclasses.field(default_factory=lambda: [
        "{}", "an image of {}", "a picture of {}", "a rendering of {}", "a drawing of {}", "{}, on its own"])
    # Latent consistency distillation (with LoRA; Luo et al. 2023, as LCM-LoRA): the adapters learn to make an image
    # in 2-8 steps of the LCMScheduler (export_scheduler: lcm, guidance 1-2); the teacher is the frozen model (the
    # adapters off), guided with a w drawn from lcm_guidance_range per sample, one DDIM step of the
    # lcm_ddim_timesteps grid; pseudo-Huber loss of constant lcm_huber_c (null: squared error)
    lcm_distill: bool = False
    lcm_guidance_range: list = dataclasses.field(default_factory=lambda: [3.0, 15.0])
    lcm_ddim_timesteps: int = 50
    lcm_huber_c: float | None = 0.001
    # DreamBooth (Ruiz et al. 2023): every training image has the caption instance_prompt (data_dir may then be a
    # plain folder of images). with_prior_preservation (fine-tuning only) pairs each sample with an image of its
    # class (class_data_dir, captioned class_prompt; the pretrained pipeline first generates the missing ones up to
    # num_class_images there, class_generation_steps steps at class_guidance_scale, sample_batch_size at a time);
    # their loss, times prior_loss_weight, is added, so that the model keeps what it knew of the class
    instance_prompt: str | None = None
    with_prior_preservation: bool = False
    class_prompt: str | None = None
    class_data_dir: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_generation_steps: int = 50
    class_guidance_scale: float = 7.5
    sample_batch_size: int = 4
    prior_generation_precision: str | None = None  # "fp32", "fp16", "bf16"; null: fp16 on a GPU, else fp32
    # the objective
    caption_dropout: float = 0.1  # the empty caption trains the unconditional branch used by guidance
    snr_gamma: float | None = None  # min-SNR-gamma weighting (Hang et al. 2023); 5.0 is the paper's choice
    high_noise_weight: float | None = None  # x min(1 + 1/SNR, this): weight on layout (see train/loss.py)
    timestep_bias_range: list | None = None  # [begin, end): draw timestep_bias_portion of the timesteps from here
    timestep_bias_portion: float = 0.5
    noise_offset: float = 0.0
    # input perturbation (Ning et al. 2023; diffusers' --input_perturbation, 0.1 there): z_t is made from
    # eps + value * xi with a fresh xi ~ N(0, I) while the target stays eps (train/loss.py)
    input_perturbation: float = 0.0
    # DREAM (Zhou et al. 2023; diffusers' --dream_training, --dream_detail_preservation): one more U-Net pass per
    # step, without gradients, moves the input and the target by the model's own error (train/loss.py); eps only
    dream_training: bool = False
    dream_detail_preservation: float = 1.0
    # multiplies the VAE's scaling_factor (the exported pipeline's VAE config carries the product): the U-Net sees
    # latents of about this std, so every SNR of the noise schedule grows by its square. SD's schedule was made for
    # 64x64 latents; at 16x16 the same noise hides an image's details sooner (Chen 2023, "input scaling")
    latent_scale: float = 1.0
    cache_latents: bool = False  # encode every image once; keeps posterior mean and std, so sampling stays random
    use_ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    # validation and export
    validation_prompts: list = dataclasses.field(default_factory=list)
    validation_seeds: list = dataclasses.field(default_factory=lambda: [0])
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 5.0
    validation_images: list = dataclasses.field(default_factory=list)  # ControlNet: one control image per prompt
    export_scheduler: str = "dpm++"  # the sampler the exported pipeline starts with: ddpm, ddim, euler, dpm++, ...

    choices: typing.ClassVar[dict[str, tuple]] = {
        **TrainConfig.choices, "prediction_type": (None, "epsilon", "v_prediction"),
        "prior_generation_precision": (None, "no", "fp32", "fp16", "bf16"),
    }
    bookkeeping = TrainConfig.bookkeeping + (
        "validation_prompts", "validation_seeds", "validation_inference_steps", "validation_guidance_scale",
        "validation_images", "export_scheduler", "sample_batch_size")
    input_paths = ("pretrained", "pretrained_config", "text_encoder_path", "tokenizer", "vae_path", "controlnet_path")

    def validate(self) -> None:
        super().validate()
        sources = [k for k in ("pretrained", "unet") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError("give exactly one of 'pretrained' (a pipeline folder or .safetensors file to fine-tune) "
                             f"and 'unet' (an architecture to train from scratch); got {sources or 'neither'}")
        if self.unet:
            if bool(self.text_encoder) == bool(self.text_encoder_path):
                raise ValueError("training from scratch ('unet' given) needs exactly one of 'text_encoder' "
                                 "(CLIPTextConfig keys, random weights) and 'text_encoder_path' (a trained "
                                 "text-encoder folder)")
            if bool(self.vae_path) == bool(self.vae):
                raise ValueError("training from scratch needs exactly one of 'vae_path' (a trained VAE folder, from "
                                 "train_vae.py) and 'vae' (random weights, smoke tests only)")
        if self.lora_rank is not None:
            if not self.pretrained:
                raise ValueError("lora_rank fine-tunes a pretrained pipeline through low-rank adapters: give "
                                 "'pretrained' (a pipeline folder or .safetensors file), or drop lora_rank to train "
                                 "a U-Net from scratch")
            if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
                raise ValueError(f"lora_rank must be a positive integer (4 to 128 is usual), got {self.lora_rank}")
            if self.lora_alpha is not None and not self.lora_alpha > 0:
                raise ValueError(f"lora_alpha must be positive (or null: the rank), got {self.lora_alpha}")
            if not self.lora_target_modules or not all(isinstance(t, str) for t in self.lora_target_modules):
                raise ValueError(f"lora_target_modules must list layer names (e.g. [to_q, to_k, to_v, to_out.0]), "
                                 f"got {self.lora_target_modules}")
        elif self.lora_alpha is not None:
            raise ValueError("lora_alpha is given without lora_rank: set lora_rank to train LoRA adapters")
        if self.controlnet:
            if not self.pretrained:
                raise ValueError("controlnet: true trains a ControlNet for a pretrained U-Net: give 'pretrained' (a "
                                 "pipeline folder or .safetensors file)")
            if self.lora_rank is not None or self.train_text_encoder:
                raise ValueError("controlnet: true trains the ControlNet alone (the U-Net and the text encoder stay "
                                 "frozen): drop lora_rank and train_text_encoder")
            if self.validation_images and len(self.validation_images) != len(self.validation_prompts):
                raise ValueError(f"validation_images has {len(self.validation_images)} control images for "
                                 f"{len(self.validation_prompts)} validation_prompts: give one per prompt (or none: "
                                 "the first samples' control images)")
        elif self.controlnet_path or self.validation_images:
            raise ValueError("controlnet_path and validation_images are for ControlNet training: set controlnet: true")
        if self.placeholder_token is not None:
            if not self.pretrained:
                raise ValueError("placeholder_token (textual inversion) learns a word for a pretrained pipeline: give "
                                 "'pretrained' (a pipeline folder or .safetensors file)")
            if self.lora_rank is not None or self.train_text_encoder or self.controlnet or self.use_ema:
                raise ValueError("textual inversion trains the new word's embedding alone: drop lora_rank, "
                                 "train_text_encoder and controlnet, and set use_ema: false")
            if not isinstance(self.placeholder_token, str) or not self.placeholder_token.strip():
                raise ValueError(f"placeholder_token must be a word such as '<my-cat>', got {self.placeholder_token!r}")
            if not self.initializer_token:
                raise ValueError("textual inversion needs initializer_token: an existing word the new one starts from "
                                 "(e.g. 'cat')")
            if not isinstance(self.num_vectors, int) or self.num_vectors < 1:
                raise ValueError(f"num_vectors must be a positive integer, got {self.num_vectors}")
            if not self.caption_templates or not all(isinstance(t, str) and "{}" in t for t in self.caption_templates):
                raise ValueError(f"caption_templates must be captions with {{}} where the new word goes, got "
                                 f"{self.caption_templates}")
        elif self.initializer_token is not None:
            raise ValueError("initializer_token is for textual inversion: give placeholder_token too")
        if self.lcm_distill:
            self._check_lcm_distill()
        self._check_dreambooth()
        if self.token_embedding_std is not None:
            if not self.text_encoder:
                raise ValueError("token_embedding_std initialises a new text encoder: it needs 'text_encoder' "
                                 "(CLIPTextConfig keys), not a pretrained or text_encoder_path one")
            if self.token_embedding_std <= 0:
                raise ValueError(f"token_embedding_std must be positive, got {self.token_embedding_std}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be a probability in [0, 1], got {self.caption_dropout}")
        if self.timestep_bias_range is not None:
            r = self.timestep_bias_range
            if not (len(r) == 2 and all(isinstance(x, int) for x in r) and 0 <= r[0] < r[1]):
                raise ValueError(f"timestep_bias_range must be [begin, end) with 0 <= begin < end, got {r}")
            if not 0.0 <= self.timestep_bias_portion <= 1.0:
                raise ValueError(f"timestep_bias_portion must be in [0, 1], got {self.timestep_bias_portion}")
        if self.high_noise_weight is not None and self.high_noise_weight < 1:
            raise ValueError(f"high_noise_weight caps a weight that is at least 1: give a value >= 1 (e.g. 20) or "
                             f"null, got {self.high_noise_weight}")
        if not 0 < self.latent_scale < float("inf"):
            raise ValueError(f"latent_scale must be a positive number (1 keeps the VAE's scaling_factor), got "
                             f"{self.latent_scale}")
        for key in ("noise_offset", "input_perturbation", "dream_detail_preservation"):
            value = getattr(self, key)
            if not 0 <= value < float("inf"):  # (the type is checked with every key's)
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive (or null for no min-SNR weighting), got {self.snr_gamma}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.cache_latents and (self.random_flip or not self.center_crop):
            raise ValueError("cache_latents: true encodes each image once, so it needs deterministic images: set "
                             "center_crop: true and random_flip: false (or cache_latents: false)")
        from ..schedulers import SCHEDULERS

        if self.export_scheduler not in SCHEDULERS:
            raise ValueError(f"config key 'export_scheduler' = {self.export_scheduler!r}: choose one of "
                             f"{list(SCHEDULERS)}")
        if self.validation_steps and not self.validation_prompts:
            raise ValueError("validation_steps is set but validation_prompts is empty: give prompts or set 0")


    def _check_dreambooth(self) -> None:
        if self.instance_prompt is not None:
            if not isinstance(self.instance_prompt, str) or not self.instance_prompt.strip():
                raise ValueError(f"instance_prompt must be a caption such as 'a photo of sks dog', got "
                                 f"{self.instance_prompt!r}")
            if self.placeholder_token is not None or self.controlnet:
                raise ValueError("instance_prompt (DreamBooth) captions every image itself: drop placeholder_token "
                                 "(textual inversion captions with caption_templates) and controlnet (which reads "
                                 "control images from metadata.jsonl)")
        if not self.with_prior_preservation:
            given = [k for k in ("class_prompt", "class_data_dir") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} are for DreamBooth's prior preservation: set "
                                 "with_prior_preservation: true (or drop them)")
            return
        needed = ("pretrained", "instance_prompt", "class_prompt", "class_data_dir")
        missing = [k for k in needed if not getattr(self, k)]
        if missing:
            raise ValueError(f"with_prior_preservation: true needs {', '.join(missing)} (a pretrained pipeline, the "
                             "caption of the training images, e.g. 'a photo of sks dog', the caption of their class, "
                             "e.g. 'a photo of a dog', and a folder for the class images)")
        if self.lcm_distill or self.cache_latents:
            raise ValueError("with_prior_preservation works with full, LoRA and text-encoder fine-tuning: drop "
                             "lcm_distill and cache_latents")
        for key in ("num_class_images", "class_generation_steps", "sample_batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not 0 <= self.prior_loss_weight < float("inf"):
            raise ValueError(f"prior_loss_weight must be a number >= 0 (1 is DreamBooth's), got "
                             f"{self.prior_loss_weight}")

    def _check_lcm_distill(self) -> None:
        if self.lora_rank is None or self.controlnet or self.placeholder_token or self.train_text_encoder:
            raise ValueError("lcm_distill: true distils a pretrained pipeline into LoRA adapters of its U-Net (the "
                             "teacher is the U-Net without them): set lora_rank (and pretrained), and drop controlnet, "
                             "placeholder_token and train_text_encoder")
        if self.snr_gamma is not None or self.high_noise_weight is not None or self.timestep_bias_range:
            raise ValueError("snr_gamma, high_noise_weight and timestep_bias_range weigh the denoising loss; "
                             "consistency distillation has its own (lcm_huber_c): drop them")
        if self.input_perturbation or self.dream_training:
            raise ValueError("input_perturbation and dream_training change the denoising loss's input; consistency "
                             "distillation takes the teacher's step from z_t as it is: drop them")
        w = self.lcm_guidance_range
        numbers = isinstance(w, list) and len(w) == 2 and all(isinstance(v, (int, float)) for v in w)
        if not (numbers and 0 <= w[0] <= w[1]):
            raise ValueError(f"lcm_guidance_range must be [low, high] with 0 <= low <= high (LCM's w: 3 to 15 is the "
                             f"paper's), got {w}")
        if not isinstance(self.lcm_ddim_timesteps, int) or self.lcm_ddim_timesteps < 1:
            raise ValueError(f"lcm_ddim_timesteps must be a positive integer (50 is LCM's), got "
                             f"{self.lcm_ddim_timesteps}")
        if self.lcm_huber_c is not None and not self.lcm_huber_c > 0:
            raise ValueError(f"lcm_huber_c must be positive (or null: squared error), got {self.lcm_huber_c}")


@dataclasses.dataclass(kw_only=True)
class VAETrainConfig(TrainConfig):
    """train_vae.py: an AutoencoderKL from scratch (or fine-tuned) on L1 + L2 reconstruction and a small KL term."""

    vae: dict | None = None  # diffusers AutoencoderKL config keys
    pretrained_vae: str | None = None  # a VAE folder to fine-tune instead
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-6  # small: keeps the latents near N(0, I)-ish without blurring reconstructions
    # pull the first 3 latent channels (posterior means) towards the image averaged over each latent pixel's 8x8
    # block (MSE, this weight): colours then lie apart in large, smooth latent directions (see loss.VAEObjective)
    anchor_weight: float = 0.0
    scale_samples: int = 256  # images whose posterior-latent std sets scaling_factor = 1 / std
    deterministic_encoder: bool = False  # export encode() as a point mass at the mean (see train/vae.py)
    check_reconstructions: int = 200  # shapes data: analyze this many reconstructions at export (0: skip)
    # images of this size set scaling_factor and are the reconstructions checked at export (default: resolution):
    # e.g. train on 64 px images, use at 128
    export_resolution: int | None = None
    # train on random patch_size x patch_size patches of the `resolution` images (a fully convolutional VAE learns
    # the same local map from patches, at a fraction of the cost per image); null: whole images
    patch_size: int | None = None
    use_ema: bool = False
    # "colours": at export, re-express the latents so that the shapes palette's colours lie further apart in the
    # scaled latents (train/vae.py: colour_discriminant_map; needs deterministic_encoder and shapes data);
    # "balanced": centre the latents and scale their principal directions by variance^-latent_map_power
    # (balancing_map; needs deterministic_encoder)
    latent_map: str | None = None
    latent_map_power: float = 0.25  # 0 only centres, 0.5 whitens, 0.25 halfway on a log scale

    bookkeeping = TrainConfig.bookkeeping + ("scale_samples", "check_reconstructions", "export_resolution",
                                             "deterministic_encoder", "latent_map",
                                             "latent_map_power")  # (these act at export only)
    input_paths = ("pretrained_vae",)

    def validate(self) -> None:
        super().validate()
        if bool(self.vae) == bool(self.pretrained_vae):
            raise ValueError("give exactly one of 'vae' (an architecture to train from scratch) and 'pretrained_vae' "
                             "(a VAE folder to fine-tune)")
        if self.use_ema:
            raise ValueError("use_ema is not supported by train_vae.py; set it to false")
        if min(self.l1_weight, self.l2_weight, self.kl_weight, self.anchor_weight) < 0 or self.scale_samples <= 0:
            raise ValueError("l1_weight, l2_weight, kl_weight, anchor_weight must be >= 0 and scale_samples positive")
        if self.export_resolution is not None and (self.export_resolution <= 0 or self.export_resolution % 8):
            raise ValueError(f"export_resolution={self.export_resolution} must be a positive multiple of 8 (the VAE "
                             "downsamples by 8), or null for 'resolution'")
        if self.latent_map not in (None, "colours", "balanced"):
            raise ValueError(f"latent_map={self.latent_map!r}: choose 'colours', 'balanced' or null")
        if not 0 <= self.latent_map_power <= 0.5:
            raise ValueError(f"latent_map_power={self.latent_map_power} must lie in [0, 0.5] (0 only centres the "
                             "latents, 0.5 whitens them)")
        if self.latent_map == "balanced" and not self.deterministic_encoder:
            raise ValueError("latent_map: balanced needs deterministic_encoder: true (it is fitted to the posterior "
                             "means)")
        if self.latent_map == "colours" and not (self.deterministic_encoder and self.dataset == "shapes"):
            raise ValueError("latent_map: colours needs deterministic_encoder: true and dataset: shapes (it spreads "
                             "the shapes palette apart in the latents of a point-mass encoder)")
        if self.patch_size is not None and not (0 < self.patch_size <= self.resolution and self.patch_size % 8 == 0):
            raise ValueError(f"patch_size={self.patch_size} must be a positive multiple of 8 (the VAE downsamples by "
                             f"8) no larger than resolution={self.resolution}, or null for whole images")


# --- reading and overriding --------------------------------------------------------------------------------------
def _accepts(annotation, value) -> bool:
    """Whether `value` (as YAML produced it) fits a field annotated `annotation`."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (dict, list, str, bool):
        return isinstance(value, annotation)
    return True


def _members(annotation) -> set:
    """The types a (possibly union) annotation names."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return set(typing.get_args(annotation))
    return {annotation}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_config(cls, values: dict[str, Any]):
    """`cls(**values)` with every key and type checked; the error names the key and lists the valid ones."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {cls.__name__}; valid keys: {sorted(types_)}")
    kwargs = {}
    for key, value in values.items():
        annotation = types_[key]
        if isinstance(value, str) and not _accepts(annotation, value) and _accepts(annotation, 0.5):
            try:  # PyYAML reads "1e-4" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if value is False and "no" in cls.choices.get(key, ()):
            value = "no"  # YAML 1.1 reads an unquoted no as False: `mixed_precision: no`
        if not _accepts(annotation, value):
            shown = getattr(annotation, "__name__", None) or str(annotation)
            raise ValueError(f"config key {key!r} = {value!r} has the wrong type: expected {shown}")
        wants_float = float in _members(annotation) and int not in _members(annotation)
        kwargs[key] = float(value) if wants_float and isinstance(value, int) else value
    config = cls(**kwargs)
    config.validate()
    return config


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--a', '1', '--b.c', 'x', '--d=2'] -> {'a': 1, 'b': {'c': 'x'}, 'd': 2}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ValueError(f"unexpected argument {arg!r}: overrides take the form --key value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {arg} has no value (use --key value)")
            key, text = arg[2:], args[i + 1]
            i += 2
        *parents, leaf = key.split(".")
        target = out
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"override --{key}: {parent!r} is not a dict-valued key")
        target[leaf] = _parse_value(text)
    return out


def _merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(cls, path: str | Path | None = None, overrides: dict | list[str] | None = None):
    """Read `path` (YAML), apply `overrides` (a dict or command-line tokens) and check the result."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping of keys to values")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return build_config(cls, _merge(values, overrides or {}))


def parse_command_line(cls, argv: list[str]):
    """`--config FILE` then `--key value` overrides, as the training scripts take them."""
    argv = list(argv)
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            del argv[i]
            break
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a path to a YAML file")
            path = argv[i + 1]
            del argv[i:i + 2]
            break
    if argv and argv[0] in ("-h", "--help"):
        names = ", ".join(sorted(_field_types(cls)))
        raise SystemExit(f"usage: --config FILE.yaml [--key value ...]\nkeys of {cls.__name__}: {names}")
    return load_config(cls, path, argv)


def config_to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
