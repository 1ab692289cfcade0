"""Text-to-image training: the U-Net (and optionally the text encoder) learns to denoise frozen-VAE latents.

    image -> VAE posterior sample * scaling_factor = z0;  caption (or "" with p = caption_dropout) -> context
    t ~ U{0..T-1}, eps ~ N(0, I);  loss = || unet(z_t, t, context) - (eps or v) ||^2, optionally min-SNR weighted

The model comes from a pipeline to fine-tune (`pretrained`) or is built from the config's architectures. At the
end a pipeline folder (`<output_dir>/pipeline`) is written with the EMA weights, loadable by latentdiff and diffusers
(LoRA: `<output_dir>/lora`; a ControlNet trained over the frozen U-Net, `controlnet: true`: `<output_dir>/controlnet`).
DreamBooth's prior preservation adds a class sample to each instance sample (dreambooth.py).
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import load_into, save_safetensors
from ..lora import save_lora_weights
from ..textual_inversion import add_words, word_tokens
from .data import CLASS_STREAMS, TrainingView, build_latent_cache, build_source, inference_encoder
from .dreambooth import PriorPreservationView, class_source, ensure_class_images
from .ema import EMA
from .lora import TEXT_LORA_TARGETS, adapter_state, add_lora_layers, lora_disabled
from .loop import FitResult, Trainer, make_accelerator, make_optimizer
from .loss import Draws, DrawSpec, consistency_distillation_loss, diffusion_loss

# Stable Diffusion's training noise schedule (the default for models trained from scratch)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon", clip_sample=False, steps_offset=1, timestep_spacing="leading")


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # a DDPMScheduler holding the training noise schedule and prediction type


def text_encoder_config(values: dict):
    """A CLIPTextConfig: CLIP's vocabulary and 77 positions, the sizes from `values` (CLIPTextConfig keys; an
    unknown key is an error here, where transformers would silently keep it)."""
    from ..models.text import CLIPTextConfig, text_config_tiny

    known = CLIPTextConfig.keys()
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"text_encoder: unknown CLIPTextConfig key(s) {unknown}; valid keys include hidden_size, "
                         "intermediate_size, num_hidden_layers, num_attention_heads, hidden_act, projection_dim")
    return text_config_tiny(**values)


def load_components(config) -> Components:
    """The pipeline to fine-tune, or new models (initialised from `config.seed`) around a trained VAE."""
    from ..models.text import CLIPTokenizer, build_text_encoder, load_text_encoder
    from ..models.unet import UNet2DConditionModel, UNetConfig
    from ..models.vae import AutoencoderKL, VAEConfig
    from ..schedulers import DDPMScheduler

    overrides = {"prediction_type": config.prediction_type} if config.prediction_type else {}
    if config.pretrained:
        from ..layout import load_pipeline_folder, load_single_file

        path = Path(config.pretrained)
        if not path.exists():
            raise FileNotFoundError(f"pretrained: {path} not found (a pipeline folder or a .safetensors file)")
        if path.is_dir() and config.pretrained_config:
            raise ValueError("pretrained_config is for single-file checkpoints; a pipeline folder has its own configs")
        parts = load_pipeline_folder(path) if path.is_dir() else load_single_file(path, config.pretrained_config)
        scheduler = DDPMScheduler.from_config(parts["scheduler"].config, **overrides)
        return Components(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["vae"], scheduler)

    vae = (AutoencoderKL.from_pretrained(config.vae_path) if config.vae_path else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if vae is None:
            vae = AutoencoderKL(VAEConfig.from_dict(config.vae)).eval()
        unet_values = dict(config.unet)
        unet_values.setdefault("sample_size", config.resolution // vae.vae_scale_factor)
        unet = UNet2DConditionModel(UNetConfig.from_dict(unet_values))
        if config.text_encoder_path:
            text_encoder = load_text_encoder(config.text_encoder_path, torch.float32)
        else:
            text_encoder = build_text_encoder(text_encoder_config(config.text_encoder))
            if config.token_embedding_std:
                # CLIP draws token embeddings with std 0.02, small next to what its random attention layers add
                # to the residual stream, so the random encoder's output for a word is mostly a mix of the words
                # before it ("left" vs "right" in shapes captions: cosine 0.77 between the two, 0.84 within each).
                # Drawn at std 1, each word's own embedding dominates its output state (-0.04 vs 0.99), and the
                # U-Net can find the word by attention from the first step.
                with torch.no_grad():
                    text_encoder.get_input_embeddings().weight.normal_(0.0, config.token_embedding_std)
    tokenizer = CLIPTokenizer.from_pretrained(config.tokenizer) if config.tokenizer else CLIPTokenizer()
    scheduler = DDPMScheduler.from_config({**SD_SCHEDULE, **(config.scheduler or {})}, **overrides)
    return Components(tokenizer, text_encoder, unet, vae, scheduler)


def check_components(c: Components, config) -> None:
    from ..schedulers import scheduler_from_name

    schedule = c.scheduler.config
    if schedule.rescale_betas_zero_snr and schedule.prediction_type == "epsilon":
        raise ValueError("the noise schedule has zero terminal SNR (scheduler rescale_betas_zero_snr: true) but the "
                         "U-Net would predict epsilon, which tells nothing about the image at the last step, where "
                         "the latents are pure noise: set prediction_type: v_prediction (Lin et al. 2024, sec. 3.2)")
    try:  # (refused now, not when the pipeline is exported at the end)
        scheduler_from_name(config.export_scheduler, schedule)
    except ValueError as e:
        raise ValueError(f"export_scheduler {config.export_scheduler!r} cannot sample this noise schedule ({e}); "
                         "choose another sampler") from e
    resolution = config.resolution
    if c.unet.config.cross_attention_dim != c.text_encoder.config.hidden_size:
        raise ValueError(f"unet.cross_attention_dim = {c.unet.config.cross_attention_dim} must equal the text "
                         f"encoder's hidden_size = {c.text_encoder.config.hidden_size}")
    if c.unet.config.in_channels != c.vae.config.latent_channels:
        raise ValueError(f"unet.in_channels = {c.unet.config.in_channels} must equal the VAE's latent_channels = "
                         f"{c.vae.config.latent_channels}")
    if resolution % c.vae.vae_scale_factor:
        raise ValueError(f"resolution = {resolution} must be a multiple of the VAE's downsampling factor "
                         f"{c.vae.vae_scale_factor}")


class TextToImageTask:
    """The pieces Trainer drives (see loop.py): models, optimizer, data view, loss, EMA, validation, export."""

    def __init__(self, config, accelerator, components: Components):
        check_components(components, config)
        self.config, self.accelerator, self.c = config, accelerator, components
        if config.with_prior_preservation:  # (by the pretrained models, before anything changes them)
            ensure_class_images(config, components, accelerator)
        device = accelerator.device
        # frozen modules run in the mixed-precision dtype; trained ones keep fp32 master weights
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision,
                                                                                  torch.float32)
        text_encoder, unet = components.text_encoder, components.unet
        frozen = {"vae": components.vae} | ({} if config.train_text_encoder else {"text_encoder": text_encoder})
        if config.controlnet:  # the ControlNet is trained; the U-Net steered by it stays as it is
            controlnet = load_controlnet(config, unet, components.vae.vae_scale_factor)
            frozen["unet"] = unet
        self.inversion = config.placeholder_token is not None
        if self.inversion:  # only the new word's rows of the text encoder's token table train
            frozen = {"vae": components.vae, "unet": unet}
            self.new_words, self.new_ids, self.kept_rows = add_placeholder(config, components.tokenizer, text_encoder)
        # the exported pipeline gets the frozen modules' original weights, not their half-precision copies
        self.originals = {name: dict(module.state_dict()) for name, module in frozen.items()}
        for module in frozen.values():
            module.requires_grad_(False).eval().to(device, self.weight_dtype)
        self.vae = components.vae
        if config.latent_scale != 1.0:  # training, validation and the exported VAE config all use the product
            self.vae.config = self.vae.config.replace(
                scaling_factor=self.vae.config.scaling_factor * config.latent_scale)
        self.encoder: torch.nn.Module | None = None  # what encodes each step's images (made on first use)
        text_encoder.requires_grad_(config.train_text_encoder)
        trained = controlnet if config.controlnet else text_encoder if self.inversion else unet
        if self.inversion:
            text_encoder.get_input_embeddings().weight.requires_grad_(True)
        if config.gradient_checkpointing:
            trained.enable_gradient_checkpointing()
            if config.train_text_encoder:
                text_encoder.gradient_checkpointing_enable()
        self.lora = config.lora_rank is not None
        if self.lora:  # the models frozen but for the adapters (A drawn from the run's seed: the same on every process)
            add_lora_layers(unet, config.lora_rank, config.lora_alpha, config.lora_target_modules, config.seed)
            if config.train_text_encoder:  # its attention projections, as diffusers' LoRA scripts adapt them
                add_lora_layers(text_encoder, config.lora_rank, config.lora_alpha, TEXT_LORA_TARGETS, config.seed + 1)
        groups = [{"params": [p for p in trained.parameters() if p.requires_grad]}]
        if config.train_text_encoder:
            groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad],
                           "lr": config.text_encoder_learning_rate or config.learning_rate})
        optimizer, lr_scheduler = make_optimizer(groups, config)
        if config.train_text_encoder:
            self.unet, self.text_encoder, self.optimizer, self.lr_scheduler = accelerator.prepare(
                unet, text_encoder, optimizer, lr_scheduler)
            self.models = [self.unet, self.text_encoder]
        else:
            prepared, self.optimizer, self.lr_scheduler = accelerator.prepare(trained, optimizer, lr_scheduler)
            self.models = [prepared]
            self.text_encoder = prepared if self.inversion else text_encoder
            self.unet = unet if config.controlnet or self.inversion else prepared
        self.controlnet = self.models[0] if config.controlnet else None
        # after prepare: DDP has broadcast rank 0's weights, so every process averages the same ones
        self.ema = EMA(self._trained(), config.ema_decay, config.ema_warmup) if config.use_ema else None
        self.checkpoint_objects = [self.ema] if self.ema else []

        source = build_source(config)
        self.alphas_cumprod = components.scheduler.alphas_cumprod.to(device)
        if config.timestep_bias_range and config.timestep_bias_range[1] > len(self.alphas_cumprod):
            raise ValueError(f"timestep_bias_range {config.timestep_bias_range} ends past the "
                             f"{len(self.alphas_cumprod)} training timesteps")
        self.prediction_type = components.scheduler.config.prediction_type
        if config.dream_training and self.prediction_type != "epsilon":
            raise ValueError(f"dream_training: DREAM is defined for eps prediction, and this model predicts "
                             f"{self.prediction_type!r} (as diffusers, latentdiff has no v form of it): drop it")
        f = self.vae.vae_scale_factor
        latent_shape = (self.vae.config.latent_channels, config.resolution // f, config.resolution // f)
        bias = (*config.timestep_bias_range, config.timestep_bias_portion) if config.timestep_bias_range else None
        spec = DrawSpec(latent_shape, len(self.alphas_cumprod), config.noise_offset, bias, config.input_perturbation)
        cache = build_latent_cache(source, self.vae, config, accelerator) if config.cache_latents else None
        view = dict(resolution=config.resolution, seed=config.seed, random_crop=not config.center_crop,
                    random_flip=config.random_flip, caption_dropout=config.caption_dropout, draw_spec=spec,
                    tokenizer=components.tokenizer)
        classes = class_source(config) if config.with_prior_preservation else None
        length = max(len(source), len(classes)) if classes is not None else None
        self.view = TrainingView(source, cache=cache, conditioning=config.controlnet, length=length,
                                 caption_templates=config.caption_templates if self.inversion else None,
                                 placeholder=" ".join(self.new_words) if self.inversion else None, **view)
        if classes is not None:  # DreamBooth: each instance sample paired with a class sample (dreambooth.py)
            self.view = PriorPreservationView(self.view, TrainingView(classes, length=length, streams=CLASS_STREAMS,
                                                                      **view))
        self.source = source
        self.uncond: torch.Tensor | None = None  # (lcm_distill: see _consistency_loss)

    def _unet(self):
        return self.accelerator.unwrap_model(self.unet)

    def _trained(self) -> torch.nn.Module:
        """The model the optimizer trains (unwrapped): the U-Net, or the ControlNet."""
        return self.accelerator.unwrap_model(self.models[0])

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        device, config = self.accelerator.device, self.config
        # the sample's draws and token ids, made by the data loader (TrainingView with a DrawSpec and a tokenizer)
        draws = Draws(**{key: batch[key].to(device) for key in ("timesteps", "noise", "posterior_noise", "uniform",
                                                                 "input_noise") if key in batch})
        with torch.no_grad():
            if "mean" in batch:  # cached posterior
                mean, std = batch["mean"].to(device), batch["std"].to(device)
            else:
                if self.encoder is None:  # (on the CPU a packed copy of the VAE's encoding half)
                    self.encoder = inference_encoder(self.vae)
                posterior = self.encoder.encode(batch["pixel_values"].to(device, self.weight_dtype))
                mean, std = posterior.mean.float(), posterior.std.float()
            z0 = (mean + std * draws.posterior_noise) * self.vae.config.scaling_factor
        ids = batch["input_ids"].to(device)
        with torch.set_grad_enabled(config.train_text_encoder or self.inversion):
            # encode_prompt_ids without clip skip, called on the module itself so that a DDP-wrapped encoder works
            context = self.text_encoder(ids).last_hidden_state
        if config.lcm_distill:
            return self._consistency_loss(z0, context, draws), {}
        model = self.unet
        if self.controlnet is not None:
            control = batch["conditioning_pixel_values"].to(device)
            model = ControlledStep(self.unet, self.controlnet, control, self.weight_dtype)
        losses = diffusion_loss(model, z0, context, draws.timesteps, draws.noise, self.alphas_cumprod,
                                self.prediction_type, config.snr_gamma, config.high_noise_weight, reduction="none",
                                input_noise=draws.input_noise,
                                dream=config.dream_detail_preservation if config.dream_training else None)
        if "prior" not in batch:
            return losses.mean(), {}
        prior = batch["prior"].to(device)  # DreamBooth: the instance samples' mean + weight x the class samples'
        instance_loss, prior_loss = losses[~prior].mean(), losses[prior].mean()
        return instance_loss + config.prior_loss_weight * prior_loss, {
            "instance_loss": instance_loss.detach(), "prior_loss": prior_loss.detach()}

    def _consistency_loss(self, z0: torch.Tensor, context: torch.Tensor, draws: Draws) -> torch.Tensor:
        """lcm_distill: the LoRA student against the U-Net without its adapters (train/loss.py)."""
        config, unet = self.config, self._unet()
        if self.uncond is None:  # the empty prompt's embedding (the text encoder is frozen here)
            ids = self.c.tokenizer([""]).to(context.device)
            with torch.no_grad():
                self.uncond = self.text_encoder(ids).last_hidden_state.to(context.dtype)

        def teacher(x, t, contexts):
            with lora_disabled(unet):
                return unet(x, t, contexts)

        return consistency_distillation_loss(
            self.unet, teacher, z0, context, self.uncond.expand_as(context), draws, self.alphas_cumprod,
            self.prediction_type, config.lcm_ddim_timesteps, tuple(config.lcm_guidance_range), config.lcm_huber_c,
            target_model=unet)

    def after_optimizer_step(self) -> None:
        if self.inversion:  # the other words' rows back as they were (the optimizer's weight decay moves them too)
            with torch.no_grad():
                table = self._trained().get_input_embeddings().weight
                table[:len(self.kept_rows)] = self.kept_rows.to(table)
        if self.ema is not None:
            self.ema.update(self._trained())

    # ---- sampling with the averaged weights ------------------------------------------------------------------------
    def sampling_unet(self, device) -> torch.nn.Module:
        """The U-Net to sample and export with: a copy holding the EMA weights, or the trained model itself."""
        return self._sampling_copy(device) if self._trained() is self._unet() else self._unet()

    def _sampling_copy(self, device) -> torch.nn.Module:
        """The trained model (U-Net or ControlNet) to sample and export with: a copy holding the EMA weights, or the
        model itself."""
        model = self._trained()
        if self.ema is None or self.lora:  # (LoRA: the adapters' averages are swapped in by _averaged())
            return model
        with torch.device("meta"):
            copy = type(model)(model.config)
        state = {k: v.to(device) for k, v in self.ema.state_for(model).items()}
        return load_into(copy, state, "EMA weights").eval()

    def _averaged(self):
        """With LoRA and EMA, a context in which the trained U-Net's adapters hold their averages."""
        return self.ema.applied(self._unet()) if self.ema is not None and self.lora else contextlib.nullcontext()

    def pipeline(self, unet, text_encoder=None, vae=None):
        from ..pipeline import LatentDiffusionPipeline
        from ..schedulers import scheduler_from_name

        scheduler = scheduler_from_name(self.config.export_scheduler, self.c.scheduler.config)
        text_encoder = text_encoder or self.accelerator.unwrap_model(self.text_encoder)
        return LatentDiffusionPipeline(tokenizer=self.c.tokenizer, text_encoder=text_encoder, unet=unet,
                                       vae=vae or self.vae, scheduler=scheduler)

    def validate(self, step: int) -> None:
        """Images for the fixed validation prompts and seeds, as one grid PNG per validation step (with a ControlNet,
        each row starts with its control image)."""
        config = self.config
        if self.accelerator.is_main_process:
            with self._averaged():
                pipe = self.pipeline(self.sampling_unet(self.accelerator.device))
                controls = [None] * len(config.validation_prompts)
                if self.controlnet is not None:
                    from ..pipeline_controlnet import LatentDiffusionControlNetPipeline

                    pipe = LatentDiffusionControlNetPipeline.from_pipe(
                        pipe, controlnet=self._sampling_copy(self.accelerator.device))
                    controls = self.validation_controls()
                rows = []
                for prompt, control in zip(config.validation_prompts, controls):
                    given = {} if control is None else {"image": control}
                    rows.append([pipe(prompt, num_inference_steps=config.validation_inference_steps,
                                      guidance_scale=config.validation_guidance_scale, progress=False,
                                      generator=torch.Generator().manual_seed(int(seed)), **given).images[0]
                                 for seed in config.validation_seeds])
                    if control is not None:
                        rows[-1].insert(0, control.resize(rows[-1][0].size))
            path = Path(config.output_dir) / "validation" / f"step-{step:07d}.png"
            save_grid(rows, path)
            log_images_to_tensorboard(Path(config.output_dir), step, path)
        self.accelerator.wait_for_everyone()

    def validation_controls(self) -> list:
        """The control images of the validation prompts: validation_images, or the first samples' control images."""
        from PIL import Image

        config = self.config
        if config.validation_images:
            return [Image.open(path).convert("RGB") for path in config.validation_images]
        return [self.source.load_conditioning(i % len(self.source)) for i in range(len(config.validation_prompts))]

    def export(self) -> None:
        """`<output_dir>/pipeline`: fp32 weights (EMA weights for the U-Net when EMA is on), written to a
        temporary folder first and renamed, so a folder that exists is complete. With LoRA, `<output_dir>/lora`:
        the adapters (averaged when EMA is on) as diffusers' LoRA file."""
        if self.accelerator.is_main_process and self.lora:
            config = self.config
            with self._averaged():
                state = adapter_state(self._unet())
            text = (adapter_state(self.accelerator.unwrap_model(self.text_encoder)) if config.train_text_encoder
                    else None)
            settings = {"r": config.lora_rank, "lora_alpha": config.lora_alpha or config.lora_rank}
            write_atomically(Path(config.output_dir) / "lora", lambda folder: save_lora_weights(
                folder, unet_lora_layers=state, text_encoder_lora_layers=text,
                unet_lora_adapter_metadata={**settings, "target_modules": list(config.lora_target_modules)},
                text_encoder_lora_adapter_metadata={**settings, "target_modules": list(TEXT_LORA_TARGETS)} if text
                else None))
        elif self.accelerator.is_main_process and self.inversion:
            table = self._trained().get_input_embeddings().weight
            learned = {self.config.placeholder_token: table[self.new_ids].detach().to("cpu", torch.float32)}
            path = Path(self.config.output_dir) / "learned_embeds.safetensors"
            save_safetensors(learned, path.with_name(".tmp-" + path.name))
            path.with_name(".tmp-" + path.name).replace(path)
        elif self.accelerator.is_main_process and self.controlnet is not None:
            controlnet = self._sampling_copy("cpu").to("cpu", torch.float32)
            write_atomically(Path(self.config.output_dir) / "controlnet", controlnet.save_pretrained)
        elif self.accelerator.is_main_process:
            unet = self.sampling_unet("cpu").to("cpu", torch.float32)
            text_encoder = self.accelerator.unwrap_model(self.text_encoder).to("cpu", torch.float32)
            vae = self.vae.to("cpu", torch.float32)
            for name, module in (("vae", vae), ("text_encoder", text_encoder)):
                if name in self.originals:
                    module.load_state_dict(self.originals[name])
            write_atomically(Path(self.config.output_dir) / "pipeline",
                             self.pipeline(unet, text_encoder, vae).save_pretrained)
        self.accelerator.wait_for_everyone()


def add_placeholder(config, tokenizer, text_encoder) -> tuple[list[str], list[int], torch.Tensor]:
    """Textual inversion's new word: placeholder_token (and placeholder_token_1, ... for num_vectors > 1, as
    load_textual_inversion names a word of several vectors) added to the tokenizer, their rows to the token table,
    started from initializer_token's. Returns the new words, their ids and a copy of the rows before them."""
    word, start = config.placeholder_token, config.initializer_token
    ids = tokenizer.encode(start)
    if len(ids) != 1:
        raise ValueError(f"initializer_token {start!r} is {len(ids)} tokens to the tokenizer: give a single known word "
                         "(e.g. 'cat', 'toy', 'star')")
    words = word_tokens(word, config.num_vectors)
    known = [w for w in words if w in tokenizer.get_vocab()]
    if known:
        raise ValueError(f"placeholder_token: {known} already in the vocabulary: choose a new word such as '<my-cat>'")
    kept = text_encoder.get_input_embeddings().weight.detach().clone()
    new_ids = add_words(tokenizer, text_encoder, words, [kept[ids[0]]] * len(words))
    return words, new_ids, kept


def load_controlnet(config, unet, vae_scale: int) -> torch.nn.Module:
    """The ControlNet to train: from controlnet_path, or a copy of the U-Net's down path (output convs at zero) whose
    control-image convs bring images to the latents' size: SD's widths (16, 32, 96, 256) for its 8x smaller
    latents, the first log2(f) + 1 of them for a VAE that downsamples by f."""
    from ..models.controlnet import ControlNetModel

    if config.controlnet_path:
        controlnet = ControlNetModel.from_pretrained(config.controlnet_path)
    else:
        steps = vae_scale.bit_length() - 1
        if 2 ** steps != vae_scale or steps > 3:
            raise ValueError(f"the VAE downsamples by {vae_scale}: a new ControlNet's control-image convs are made for "
                             "factors 1, 2, 4 or 8 (give controlnet_path for another)")
        with torch.random.fork_rng(devices=[]):  # (its control-image convs drawn from the run's seed)
            torch.manual_seed(config.seed)
            controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[
                :steps + 1])
    if controlnet.config.downscale != vae_scale:
        raise ValueError(f"controlnet_path {config.controlnet_path}: its control-image convs downsample by "
                         f"{controlnet.config.downscale} but the VAE's latents are {vae_scale}x smaller than images")
    return controlnet


class ControlledStep:
    """The frozen U-Net (in `dtype`) as diffusion_loss calls it, model(z_t, t, context), with the trained
    ControlNet's residuals for the batch's control images added."""

    def __init__(self, unet, controlnet, control: torch.Tensor, dtype: torch.dtype):
        self.unet, self.controlnet, self.control, self.dtype = unet, controlnet, control, dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        down, mid = self.controlnet(x, t, context, self.control)
        dtype = self.dtype
        return self.unet(x.to(dtype), t, context.to(dtype), down_block_additional_residuals=[d.to(dtype) for d in down],
                         mid_block_additional_residual=mid.to(dtype))


def write_atomically(final: Path, write) -> None:
    """write(folder) into a temporary folder, then renamed to `final`: a folder that exists is complete."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def save_grid(rows: list[list], path: Path) -> None:
    """PIL images, one list per row, pasted into one PNG."""
    from PIL import Image

    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(image, (j * w, i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def log_images_to_tensorboard(output_dir: Path, step: int, path: Path) -> None:
    """Also show the grid in TensorBoard when it is installed (it is optional: without it, nothing happens)."""
    try:
        import numpy as np
        from PIL import Image
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    with SummaryWriter(str(output_dir / "tensorboard")) as writer:
        writer.add_image("validation", np.asarray(Image.open(path)), step, dataformats="HWC")


def train_text_to_image(config) -> FitResult:
    """Train as `config` (a TextToImageConfig) says; call under `accelerate launch` or plainly (one process)."""
    accelerator = make_accelerator(config)
    task = TextToImageTask(config, accelerator, load_components(config))
    return Trainer(config, accelerator, task).fit()
