"""Write pipelines/sd-v1-5 and pipelines/sd-v2-1: the Stable Diffusion 1.5 and 2.1 (768 px, v-prediction)
architectures as diffusers pipeline folders without weights (configs, tokenizer, scheduler). from_single_file takes
the architecture from them. Run: python tools/write_sd_configs.py"""
import json
from pathlib import Path

from latentdiff.checkpoints import write_json
from latentdiff.models.text import CLIPTokenizer, text_config_sd2, text_config_sd15
from latentdiff.models.unet import UNetConfig
from latentdiff.models.vae import VAEConfig
from latentdiff.schedulers import DPMSolverMultistepScheduler

root = Path(__file__).resolve().parents[1] / "pipelines"
# name -> (U-Net, text encoder, tokenizer's padding token, prediction type)
MODELS = {"sd-v1-5": (UNetConfig.sd15(), text_config_sd15(), "<|endoftext|>", "epsilon"),
          "sd-v2-1": (UNetConfig.sd2(), text_config_sd2(), "!", "v_prediction")}

for name, (unet, text_config, pad, prediction) in MODELS.items():
    out = root / name
    write_json(unet.to_dict(), out / "unet" / "config.json")
    write_json(VAEConfig.sd15().to_dict(), out / "vae" / "config.json")  # SD 2.x kept SD 1.x's VAE
    text = text_config.to_dict()
    text.update(architectures=["CLIPTextModel"])
    write_json(json.loads(json.dumps(text, default=str)), out / "text_encoder" / "config.json")
    CLIPTokenizer(pad_token=pad).save_pretrained(out / "tokenizer")
    # their noise schedule (their folders name PNDM or DDIM; DPM-Solver++ 2M samples it well in fewer steps)
    DPMSolverMultistepScheduler.from_config(dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction, timestep_spacing="leading", steps_offset=1,
    )).save_config(out / "scheduler")
    write_json({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, out / "model_index.json")
    print(out)
