"""A tiny random Stable Diffusion pipeline built with diffusers + transformers (the references), saved as a folder."""
from __future__ import annotations

import torch

TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32,
)
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon",
    timestep_spacing="leading",
)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (diffusers zero-initialises some output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def diffusers_pipeline(tokenizer_folder, scheduler_cls: str = "DDIMScheduler", seed: int = 0,
                       pipeline_cls: str = "StableDiffusionPipeline", text: dict | None = None,
                       scheduler: dict | None = None, **unet_config):
    """diffusers' StableDiffusionPipeline (or `pipeline_cls`) with tiny random components and the tokenizer from
    `tokenizer_folder`; `unet_config` overrides TINY_UNET (in_channels=9: an inpainting U-Net), `text` TINY_TEXT
    and `scheduler` SCHEDULER."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = perturb(diffusers.UNet2DConditionModel(**{**TINY_UNET, **unet_config}), seed + 1)
    vae = perturb(diffusers.AutoencoderKL(**TINY_VAE), seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT, **(text or {})})).eval()
    scheduler = getattr(diffusers, scheduler_cls)(**{**SCHEDULER, **(scheduler or {})})
    return getattr(diffusers, pipeline_cls)(
        vae=vae.eval(), text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder),
        unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def randomized(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Every weight drawn anew (zero-initialised output layers too, so that they matter), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def generate(pipe, prompt: str = "a red circle", images: int = 1, **kwargs):
    """Images (np) from ours or diffusers' pipeline alike: 4 steps, guidance 5, a generator per image (as ours
    draws them; diffusers draws a batch from one generator)."""
    from latentdiff import LatentDiffusionPipeline

    kwargs = {"num_inference_steps": 4, "guidance_scale": 5.0, "output_type": "np",
              "generator": [torch.Generator().manual_seed(i) for i in range(images)], **kwargs}
    if isinstance(pipe, LatentDiffusionPipeline):
        kwargs["progress"] = False
    return pipe(prompt, **kwargs).images
