"""The diffusers pipeline folder layout (model_index.json + one subfolder per component) and Stable Diffusion 1.x
and 2.x single-file checkpoints, read into and written from latentdiff components."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Collection

import torch

from .checkpoints import load_safetensors, read_json, require_path, save_safetensors, write_json
from .config import DIFFUSERS_VERSION

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"  # the repository's pipelines/ (editable install)
SD15_CONFIG = PIPELINES / "sd-v1-5"
SD21_CONFIG = PIPELINES / "sd-v2-1"  # 768 px, v-prediction
EMBEDDED = PIPELINES / "tiny-shapes"

# component -> (library, class) as diffusers' model_index.json names them
MODEL_INDEX = {
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def load_vae(folder: Path, **kwargs):
    """The autoencoder of a vae/ folder: AutoencoderKL, or AutoencoderTiny (TAESD) where its config says so."""
    from .models.vae import AutoencoderKL
    from .models.vae_tiny import AutoencoderTiny

    declared = read_json(require_path(folder, "VAE folder") / "config.json").get("_class_name")
    return (AutoencoderTiny if declared == "AutoencoderTiny" else AutoencoderKL).from_pretrained(folder, **kwargs)


def _scheduler_from_folder(folder: Path):
    """The scheduler a folder names; one we do not implement (DEISMultistepScheduler, say) is replaced by
    DPM-Solver++ 2M over the same noise schedule, with a warning."""
    import warnings

    from . import schedulers

    config = read_json(folder / "scheduler_config.json")
    name = config.get("_class_name", "DPMSolverMultistepScheduler")
    classes = {cls.__name__: cls for cls in schedulers.SCHEDULERS.values()}
    if name not in classes:
        warnings.warn(f"{folder / 'scheduler_config.json'}: {name} is not implemented in latentdiff; using "
                      f"DPMSolverMultistepScheduler with the same noise schedule (supported: {sorted(classes)})",
                      stacklevel=3)
        name = "DPMSolverMultistepScheduler"
    return classes[name].from_config(config)


def component_dtypes(torch_dtype) -> dict[str, torch.dtype | None]:
    """The dtype each model of a pipeline loads in, from from_pretrained's torch_dtype as diffusers takes it: one
    dtype for all; a dict by component name with "default" for the rest; None or "auto" for the files' own dtypes.
    A dtype's name ("float16") reads as that dtype (diffusers ignores strings, loading float32)."""
    def one(value, where: str) -> torch.dtype | None:
        if value is None or value == "auto":
            return None
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            value = getattr(torch, value)
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise ValueError(f"torch_dtype{where}={value!r}: give a floating dtype (torch.float16, torch.bfloat16, "
                             "torch.float32, or its name), 'auto' (the files' own), or None")
        return value

    names = ("text_encoder", "unet", "vae", "controlnet", "adapter", "image_encoder")
    if isinstance(torch_dtype, dict):
        unknown = sorted(set(torch_dtype) - {*names, "default"})
        if unknown:
            raise ValueError(f"torch_dtype names {unknown}; its keys are components {list(names)} or 'default'")
        return {name: one(torch_dtype.get(name, torch_dtype.get("default")), f"[{name!r}]") for name in names}
    return dict.fromkeys(names, one(torch_dtype, ""))


def load_pipeline_folder(folder: str | os.PathLike, torch_dtype: torch.dtype | str | dict | None = None,
                         variant: str | None = None, skip: Collection[str] = (),
                         extras: Collection[str] = (), text: bool = True) -> dict:
    """Components of a pipeline folder in the diffusers layout (ours or one diffusers saved), but those named in
    `skip` (the caller has them); `extras`: "controlnet" (its ControlNet or ControlNets), "adapter" (its
    T2I-Adapter), "image_encoder" and "feature_extractor" (an image variation pipeline's); `text=False`: no
    tokenizer and text encoder (the image variation pipeline has none). `variant`: the weights files of that
    name (diffusion_pytorch_model.fp16.safetensors, ...), as diffusers' argument; a model saved in shards (an
    .index.json and its files) loads too. `torch_dtype`: see component_dtypes."""
    dtypes = component_dtypes(torch_dtype)
    from .models.text import CLIPTokenizer, load_text_encoder
    from .models.unet import UNet2DConditionModel

    folder = require_path(folder, "pipeline folder")
    if folder.is_file():
        raise ValueError(f"{folder} is a file; from_pretrained takes a pipeline folder (model_index.json, unet/, "
                         "vae/, ...). For a single-file checkpoint use from_single_file.")
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"{folder} is not a pipeline folder (it has no model_index.json){_what_it_is(folder)}")
    index = read_json(folder / "model_index.json")
    needed = ("unet", "vae", "scheduler", *(("text_encoder", "tokenizer") if text else ()),
              *(name for name in ("image_encoder", "feature_extractor") if name in extras))
    missing = [name for name in needed if name not in skip and not any(index.get(name) or ())]  # ([null, null])
    if missing:
        kind = index.get("_class_name")
        hint = {"StableDiffusionImageVariationPipeline": ": it is an image variation pipeline (no text encoder); "
                "load it with LatentDiffusionImageVariationPipeline.from_pretrained"}.get(kind, "")
        if not hint and not text:
            hint = (f": it is a {kind}, not an image variation pipeline (which conditions on a CLIP image encoder, "
                    "image_encoder/)")
        raise ValueError(f"{folder / 'model_index.json'} lacks the components {missing}{hint}")
    loaders = {
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        "text_encoder": lambda: load_text_encoder(folder / "text_encoder", torch_dtype=dtypes["text_encoder"],
                                                  variant=variant),
        "unet": lambda: UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtypes["unet"],
                                                             variant=variant),
        "vae": lambda: load_vae(folder / "vae", torch_dtype=dtypes["vae"], variant=variant),
        "scheduler": lambda: _scheduler_from_folder(folder / "scheduler"),
    }
    if not text:
        del loaders["tokenizer"], loaders["text_encoder"]
    if "image_encoder" in extras:
        loaders["image_encoder"] = lambda: _load_image_encoder(folder / "image_encoder", dtypes["image_encoder"],
                                                               variant)
    if "feature_extractor" in extras:
        loaders["feature_extractor"] = lambda: _load_feature_extractor(folder / "feature_extractor")
    if "controlnet" in extras:
        loaders["controlnet"] = lambda: _load_controlnets(folder, index, dtypes["controlnet"], variant)
    if "adapter" in extras:
        loaders["adapter"] = lambda: _load_adapter(folder, index, dtypes["adapter"], variant)
    if "low_res_scheduler" in extras:  # the x4 upscaler's (pipeline_upscale.py)
        loaders["low_res_scheduler"] = lambda: _low_res_scheduler(folder, index)
        loaders["max_noise_level"] = lambda: int(index.get("max_noise_level", 350))
    return {name: load() for name, load in loaders.items() if name not in skip}


def _load_image_encoder(folder: Path, dtype: torch.dtype | None, variant: str | None):
    """transformers' CLIPVisionModelWithProjection of an image_encoder/ folder (safetensors only), in `dtype`."""
    from .ip_adapter import load_image_encoder

    encoder = load_image_encoder(require_path(folder, "image encoder folder"), variant)
    return encoder if dtype is None else encoder.to(dtype)


def _load_feature_extractor(folder: Path):
    """transformers' CLIPImageProcessor of a feature_extractor/ folder (the image encoder's preprocessing)."""
    from .ip_adapter import clip_vision

    CLIPImageProcessor = clip_vision("CLIPImageProcessor")
    if not (require_path(folder, "feature extractor folder") / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{folder} has no preprocessor_config.json (the image encoder's CLIPImageProcessor)")
    return CLIPImageProcessor.from_pretrained(folder)


def _low_res_scheduler(folder: Path, index: dict):
    """The x4 upscaler's noise-augmentation scheduler (low_res_scheduler/)."""
    if not index.get("low_res_scheduler") or not (folder / "low_res_scheduler").is_dir():
        raise ValueError(f"{folder} has no low_res_scheduler (the x4 upscaler's noise augmentation): not an x4 "
                         "upscaler's folder; pass one, low_res_scheduler=DDPMScheduler.from_pretrained(...)")
    return _scheduler_from_folder(folder / "low_res_scheduler")


def _load_adapter(folder: Path, index: dict, dtype: torch.dtype | None, variant: str | None):
    """The folder's T2I-Adapter (adapter/), or its MultiAdapter (adapter/, adapter_1/, ...)."""
    from .models.t2i_adapter import MultiAdapter, T2IAdapter

    entry = index.get("adapter")
    if not entry or not (folder / "adapter").is_dir():
        raise ValueError(f"{folder} has no T2I-Adapter (no adapter/ folder, or none in model_index.json): pass one, "
                         "LatentDiffusionAdapterPipeline.from_pretrained(folder, adapter=T2IAdapter.from_pretrained("
                         "adapter_folder))")
    if entry[-1] == "MultiAdapter":
        return MultiAdapter.from_pretrained(folder / "adapter", torch_dtype=dtype, variant=variant)
    if entry[-1] != "T2IAdapter":
        raise ValueError(f"{folder / 'model_index.json'}: adapter is a {entry[-1]}; latentdiff loads T2IAdapter and "
                         "MultiAdapter")
    return T2IAdapter.from_pretrained(folder / "adapter", torch_dtype=dtype, variant=variant)


def _load_controlnets(folder: Path, index: dict, dtype: torch.dtype | None, variant: str | None):
    """The folder's ControlNet (controlnet/) or ControlNets (controlnet/, controlnet_1/, ...: diffusers'
    MultiControlNetModel)."""
    from .models.controlnet import ControlNetModel

    entry = index.get("controlnet")
    if not entry or not (folder / "controlnet").is_dir():
        raise ValueError(f"{folder} has no ControlNet (no controlnet/ folder, or none in model_index.json): pass one, "
                         "LatentDiffusionControlNetPipeline.from_pretrained(folder, controlnet=ControlNetModel."
                         "from_pretrained(controlnet_folder))")
    if entry[-1] not in ("ControlNetModel", "MultiControlNetModel"):
        raise ValueError(f"{folder / 'model_index.json'}: controlnet is a {entry[-1]}; latentdiff loads "
                         "ControlNetModel and MultiControlNetModel (Stable Diffusion 1.x/2.x ControlNets)")
    nets, path = [], folder / "controlnet"
    while path.is_dir():
        nets.append(ControlNetModel.from_pretrained(path, torch_dtype=dtype, variant=variant))
        path = folder / f"controlnet_{len(nets)}"
    return nets if entry[-1] == "MultiControlNetModel" else nets[0]


def _what_it_is(folder: Path) -> str:
    """For a folder that is not a pipeline folder: what it holds instead and how to load that."""
    config = folder / "config.json"
    if config.exists():
        try:
            data = read_json(config)
            kind = data.get("_class_name") or (data.get("architectures") or [None])[0]
        except (ValueError, AttributeError, TypeError):  # (not JSON, or not an object)
            kind = None
        loader = {"UNet2DConditionModel": "latentdiff.UNet2DConditionModel.from_pretrained",
                  "AutoencoderKL": "latentdiff.AutoencoderKL.from_pretrained",
                  "AutoencoderTiny": "latentdiff.AutoencoderTiny.from_pretrained",
                  "CLIPTextModel": "latentdiff.models.text.load_text_encoder",
                  "ControlNetModel": "latentdiff.ControlNetModel.from_pretrained",
                  "T2IAdapter": "latentdiff.T2IAdapter.from_pretrained"}.get(kind)
        if loader:
            return (f"; it holds one {kind}: load it with {loader}({str(folder)!r}), or give the pipeline folder "
                    "above it")
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if files:
        return f"; it holds {files}: for a single-file checkpoint use from_single_file(path to the file)"
    return ""


def pipeline_index(components: dict) -> dict:
    """The model_index.json of a pipeline of these components, as diffusers' DiffusionPipeline.from_pretrained
    reads it: the diffusers pipeline class that loads the folder (an inpainting U-Net needs its pipeline, a
    ControlNet its own) and (library, class) for each component."""
    scheduler = components["scheduler"]
    inpainting = components["unet"].config.in_channels == 2 * components["vae"].config.latent_channels + 1
    controlnet = components.get("controlnet")
    pipeline = "StableDiffusion" + ("ControlNet" if controlnet is not None else "") + (
        "Inpaint" if inpainting else "") + "Pipeline"
    if components["unet"].config.in_channels == 2 * components["vae"].config.latent_channels:
        pipeline = "StableDiffusionInstructPix2PixPipeline"
    depth = components["unet"].config.in_channels == components["vae"].config.latent_channels + 1
    if depth:  # (SD 2's depth model: diffusers' pipeline takes the depth estimator's two entries, empty here)
        pipeline = "StableDiffusionDepth2ImgPipeline"
    adapter, low_res_scheduler = components.get("adapter"), components.get("low_res_scheduler")
    if adapter is not None:  # (diffusers' T2I-Adapter pipeline)
        pipeline = "StableDiffusionAdapterPipeline"
    elif low_res_scheduler is not None:  # (the x4 upscaler)
        pipeline = "StableDiffusionUpscalePipeline"
    elif components["unet"].config.time_cond_proj_dim is not None and pipeline == "StableDiffusionPipeline":
        pipeline = "LatentConsistencyModelPipeline"  # (an LCM-distilled U-Net, as its published folders say)
    index = {
        "_class_name": pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        **MODEL_INDEX,
        "vae": ["diffusers", components["vae"].config.diffusers_class],  # (AutoencoderKL or TAESD's AutoencoderTiny)
        "scheduler": ["diffusers", type(scheduler).__name__],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    if components.get("text_encoder") is None:  # (the image variation pipeline: an image encoder instead)
        del index["text_encoder"], index["tokenizer"]
        index.update(_class_name="StableDiffusionImageVariationPipeline",
                     image_encoder=["transformers", "CLIPVisionModelWithProjection"],
                     feature_extractor=["transformers", "CLIPImageProcessor"])
    if adapter is not None:
        index["adapter"] = ["diffusers", type(adapter).__name__]
    if depth:
        index.update(depth_estimator=[None, None])
        del index["safety_checker"], index["image_encoder"], index["requires_safety_checker"]
    if low_res_scheduler is not None:  # (diffusers' upscale pipeline takes neither of the last two keys)
        index.update(low_res_scheduler=["diffusers", type(low_res_scheduler).__name__], watermarker=[None, None],
                     max_noise_level=int(components.get("max_noise_level", 350)))
        del index["image_encoder"], index["requires_safety_checker"]
    if controlnet is not None:
        index["controlnet"] = ["diffusers", type(controlnet).__name__]
    return index


def save_pipeline_folder(components: dict, folder: str | os.PathLike, variant: str | None = None) -> None:
    """Write a folder that both latentdiff and diffusers' StableDiffusionPipeline.from_pretrained load (with
    `variant`: its weights files under diffusers' names for that variant, which from_pretrained(variant=) reads)."""
    from .models.text import save_text_encoder

    folder = Path(folder)
    index = pipeline_index(components)
    components["unet"].save_pretrained(folder / "unet", variant=variant)
    components["vae"].save_pretrained(folder / "vae", variant=variant)
    components["scheduler"].save_config(folder / "scheduler")
    if components.get("text_encoder") is None:
        components["image_encoder"].save_pretrained(folder / "image_encoder", variant=variant)
        components["feature_extractor"].save_pretrained(folder / "feature_extractor")
    else:
        save_text_encoder(components["text_encoder"], folder / "text_encoder", variant=variant)
        components["tokenizer"].save_pretrained(folder / "tokenizer")
    if components.get("adapter") is not None:  # (several: adapter/, adapter_1/, ..., diffusers' MultiAdapter layout)
        components["adapter"].save_pretrained(folder / "adapter", variant=variant)
    if components.get("low_res_scheduler") is not None:
        components["low_res_scheduler"].save_config(folder / "low_res_scheduler")
    if components.get("controlnet") is not None:  # one: controlnet/; several: controlnet/, controlnet_1/, ...
        for i, net in enumerate(getattr(components["controlnet"], "nets", [components["controlnet"]])):
            net.save_pretrained(folder / ("controlnet" if i == 0 else f"controlnet_{i}"), variant=variant)
    write_json(index, folder / "model_index.json")  # last: a folder with model_index.json is complete


def load_single_file(path: str | os.PathLike, config: str | os.PathLike | None = None,
                     torch_dtype: torch.dtype | str | dict | None = None, prefer_ema: bool = False,
                     prediction_type: str | None = None) -> dict:
    """Components from a Stable Diffusion 1.x or 2.x original checkpoint (.safetensors). The architecture
    (configs, tokenizer, scheduler) comes from `config`, a pipeline folder; by default the committed
    pipelines/sd-v1-5 for SD 1.x files and pipelines/sd-v2-1 for SD 2.x files. The file cannot tell SD 2.x's
    768 px v-prediction models (2.0-v, 2.1 and most fine-tunes: the default, as diffusers') from its 512 px
    epsilon-prediction base models: pass `prediction_type="epsilon"` for those (that also makes 512 px the
    default size), or `config=` a folder of the model. Inpainting files (9 input channels) take the input width
    from the file; SD 2.x inpainting defaults to epsilon at 512 px, as it was trained.
    `prediction_type` overrides the scheduler's in any case; `torch_dtype`: see component_dtypes."""
    import warnings

    from .convert import CONTROL, check_supported, original_to_diffusers
    from .models.text import CLIPTokenizer, build_text_encoder_from_folder, read_text_config
    from .models.unet import UNet2DConditionModel, UNetConfig
    from .models.vae import AutoencoderKL, VAEConfig
    from .checkpoints import load_into

    dtypes = component_dtypes(torch_dtype)
    path = require_path(path, "checkpoint")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; from_single_file takes one .safetensors file (use from_pretrained "
                         "for pipeline folders)")
    if prediction_type not in (None, "epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type={prediction_type!r}: choose 'epsilon', 'v_prediction' or 'sample'")
    state_dict = load_safetensors(path)
    arch = check_supported(state_dict, path)
    if any(k.startswith(CONTROL) for k in state_dict):
        warnings.warn(f"{path} also holds a ControlNet (control_model.*), which the pipeline does not load: load it "
                      "with ControlNetModel.from_single_file(path) for LatentDiffusionControlNetPipeline",
                      stacklevel=3)
    sd2, inpainting = arch.startswith("sd2"), arch.endswith("-inpainting")
    folder = require_path(config or (SD21_CONFIG if sd2 else SD15_CONFIG), "architecture folder (config=)")
    unet_config = read_json(folder / "unet" / "config.json")
    scheduler = _scheduler_from_folder(folder / "scheduler")
    if sd2 and config is None:
        if inpainting and prediction_type is None:
            prediction_type = "epsilon"  # SD 2.x inpainting was fine-tuned from the 512 px epsilon base model
        elif prediction_type is None:
            warnings.warn(f"{path}: a Stable Diffusion 2.x checkpoint, taken as a 768 px v-prediction model (2.0-v, "
                          "2.1 and their fine-tunes); a 2.x base model (512 px) gives noise that way: load it with "
                          "prediction_type='epsilon' (CLI: latentdiff convert FILE FOLDER --prediction-type epsilon, "
                          "then use FOLDER)", stacklevel=3)
        if prediction_type == "epsilon":
            unet_config = {**unet_config, "sample_size": 64}
    if prediction_type is not None:
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
    if inpainting:  # latents, mask and masked-image latents in: LatentDiffusionInpaintPipeline
        conv_in = state_dict["model.diffusion_model.input_blocks.0.0.weight"]
        unet_config = {**unet_config, "in_channels": conv_in.shape[1]}
    vae_config = read_json(folder / "vae" / "config.json")
    text_layers = read_text_config(folder / "text_encoder").num_hidden_layers
    parts = original_to_diffusers(state_dict, unet_config, vae_config, prefer_ema=prefer_ema, text_layers=text_layers)
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.from_dict(unet_config))
        vae = AutoencoderKL(VAEConfig.from_dict(vae_config))
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        "text_encoder": build_text_encoder_from_folder(folder / "text_encoder", parts["text_encoder"],
                                                       source=f"{path} (cond_stage_model)",
                                                       torch_dtype=dtypes["text_encoder"]),
        "unet": load_into(unet, parts["unet"], f"{path} (model.diffusion_model)", dtype=dtypes["unet"]).eval(),
        "vae": load_into(vae, parts["vae"], f"{path} (first_stage_model)", dtype=dtypes["vae"]).eval(),
        "scheduler": scheduler,
    }


def save_single_file(components: dict, path: str | os.PathLike) -> None:
    """The reverse: one original-layout .safetensors file from a pipeline's components. A text encoder with GELU
    activations (OpenCLIP's, as SD 2.x's) is written in SD 2.x's OpenCLIP layout, one with QuickGELU (OpenAI CLIP's,
    as SD 1.x's) in SD 1.x's. An SD 2.x text encoder is written as deep as it runs (23 blocks of OpenCLIP's 24 for
    SD 2.x): SD 2.x's own files hold the 24th block, which no pipeline runs; loaders skip its absence."""
    from .convert import diffusers_to_original

    if components["vae"].config.diffusers_class != "AutoencoderKL":
        raise ValueError(f"a single-file checkpoint holds the SD VAE (AutoencoderKL), not this pipeline's "
                         f"{components['vae'].config.diffusers_class}: put an AutoencoderKL in pipe.vae first, or "
                         "save a pipeline folder (save_pretrained)")
    text_encoder = components["text_encoder"]
    state_dict = diffusers_to_original(components["unet"].state_dict(), components["vae"].state_dict(),
                                       text_encoder.state_dict(), openclip=text_encoder.config.hidden_act == "gelu")
    save_safetensors(state_dict, path)
