"""Write pipelines/sd-v1-5: the Stable Diffusion 1.5 architecture as a diffusers pipeline folder without weights
(configs, tokenizer, scheduler). from_single_file takes the architecture from it. Run: python tools/write_sd15_configs.py"""
import json
from pathlib import Path

from latentdiff.checkpoints import write_json
from latentdiff.models.text import CLIPTokenizer, text_config_sd15
from latentdiff.models.unet import UNetConfig
from latentdiff.models.vae import VAEConfig
from latentdiff.schedulers import DPMSolverMultistepScheduler

out = Path(__file__).resolve().parents[1] / "pipelines" / "sd-v1-5"
write_json(UNetConfig.sd15().to_dict(), out / "unet" / "config.json")
write_json(VAEConfig.sd15().to_dict(), out / "vae" / "config.json")
text = text_config_sd15().to_dict()
text.update(architectures=["CLIPTextModel"])
write_json(json.loads(json.dumps(text, default=str)), out / "text_encoder" / "config.json")
CLIPTokenizer().save_pretrained(out / "tokenizer")
# SD 1.5's noise schedule (its folder names PNDM, which we do not implement; DPM-Solver++ 2M samples it well)
DPMSolverMultistepScheduler.from_config(dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
)).save_config(out / "scheduler")
write_json({
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
    "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}, out / "model_index.json")
print(out)
