"""`latentdiff generate | convert | info | compiled | train | eval`. Errors print one line, not a traceback (LATENTDIFF_DEBUG=1 shows it)."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from pathlib import Path

PNG_KEY = "latentdiff"  # the PNG text chunk holding the settings that reproduce an image
SIGMA_GRIDS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


def weights_hash(folder: Path) -> str:
    """sha256 over every safetensors file of a pipeline folder (or of a single file), in a fixed order."""
    from .checkpoints import files_sha256

    return files_sha256(folder, "*.safetensors")[:16]


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def parse_extra(spec: str, kind: str) -> list:
    """--lora / --controlnet PATH[:SCALE] -> [path, scale] (scale 1 by default); --embedding PATH[:TOKEN] ->
    [path, token] (the file's own token by default). Each with the file's weights hash appended, for the PNG's
    settings."""
    path, colon, value = spec.rpartition(":")
    if not (colon and path):
        path, value = spec, None
    if kind in ("loras", "controlnets", "ip_adapter", "t2i_adapter"):
        try:
            value = 1.0 if value is None else float(value)
        except ValueError:
            path, value = spec, 1.0
    from .checkpoints import require_path

    if kind == "vae":  # (a folder; no scale or token)
        path, value = spec, None
    path = require_path(path, {"loras": "--lora file or folder", "embeddings": "--embedding file",
                               "vae": "--vae folder",
                               "controlnets": "--controlnet file or folder",
                               "ip_adapter": "--ip-adapter file or folder",
                               "t2i_adapter": "--t2i-adapter folder"}[kind])
    return [str(path.resolve()), value, weights_hash(path)]


def freeu_factors(spec: str) -> list[float]:
    """--freeu S1,S2,B1,B2 (or "sd1": 0.9,0.2,1.5,1.6, the FreeU authors' values for SD 1.x)."""
    text = "0.9,0.2,1.5,1.6" if spec == "sd1" else spec
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(0 < v < float("inf") for v in values):
        raise ValueError(f"--freeu {spec!r}: give four positive numbers S1,S2,B1,B2 (e.g. 0.9,0.2,1.5,1.6) or sd1")
    return values


def pag_settings(spec: str) -> list:
    """--pag SCALE[:LAYER,LAYER...]: [scale, layers] of perturbed-attention guidance (layers "mid" by default)."""
    scale, _, layers = spec.partition(":")
    try:
        value = float(scale)
    except ValueError:
        value = -1.0
    names = [name for name in layers.split(",") if name] if layers else ["mid"]
    if not 0 < value < float("inf") or not names:
        raise ValueError(f"--pag {spec!r}: give a positive scale and optionally the layers, e.g. 3 or "
                         "3:mid,up_blocks.1 (regular expressions over the U-Net's self-attention names)")
    return [value, names]


def input_file(path: str, what: str) -> list[str]:
    """An input image of a call as the PNG's settings hold it: [resolved path, hash of its bytes]."""
    from .checkpoints import require_path

    path = require_path(path, what)
    return [str(path.resolve()), weights_hash(path)]


def declared_class(model: str | os.PathLike | None) -> str | None:
    """The pipeline class a --model folder's model_index.json names (None for a file, or no index)."""
    from .checkpoints import read_json

    index = Path(model) / "model_index.json" if model else None
    return read_json(index).get("_class_name") if index is not None and index.is_file() else None


def is_image_variation(pipe) -> bool:
    return type(pipe).__name__ == "LatentDiffusionImageVariationPipeline"


def image_inputs(args, variation: bool = False) -> dict:
    """--image (img2img), with --mask (inpainting), and --strength; --control-image (for --controlnet),
    --adapter-image (--t2i-adapter), --ip-image (--ip-adapter): as settings, [path, hash] per file. `variation`:
    the model is an image variation one, which takes --image alone (and the output's --height / --width)."""
    if variation:
        given = [flag for flag, value in (
            ("a prompt", args.prompt or args.prompts_file), ("--negative", args.negative), ("--mask", args.mask),
            ("--strength", args.strength), ("--image-guidance", args.image_guidance),
            ("--noise-level", args.noise_level), ("--depth-map", args.depth_map), ("--controlnet", args.controlnet),
            ("--t2i-adapter", args.t2i_adapter), ("--ip-adapter", args.ip_adapter), ("--lora", args.lora),
            ("--embedding", args.embedding), ("--pag", args.pag), ("--guidance-rescale", args.guidance_rescale))
            if value]
        if given:
            raise ValueError(f"an image variation model makes variations of --image alone: leave out "
                             f"{', '.join(given)}")
        if args.image is None:
            raise ValueError("an image variation model makes variations of an image: give --image PATH")
        return {"image": input_file(args.image, "--image file")}
    control = {}
    if args.control_image:
        if not args.controlnet:
            raise ValueError("--control-image is the image a ControlNet follows: give --controlnet PATH too")
        if args.guidance_rescale:
            raise ValueError("--guidance-rescale is not available with --controlnet")
        if len(args.control_image) not in (1, len(args.controlnet)):
            raise ValueError(f"got {len(args.control_image)} --control-image for {len(args.controlnet)} --controlnet: "
                             "give one per ControlNet")
        control = {"control_images": [input_file(f, "--control-image file") for f in args.control_image]}
    elif args.controlnet:
        raise ValueError("--controlnet needs the image it follows: give --control-image PATH")
    if bool(args.t2i_adapter) != bool(args.adapter_image):
        raise ValueError("--t2i-adapter and --adapter-image go together: the adapter and the image it follows")
    if args.t2i_adapter:
        if args.controlnet or args.image is not None or args.guidance_rescale:
            raise ValueError("--t2i-adapter goes with text to image only, without --controlnet, --image and "
                             "--guidance-rescale")
        control["adapter_image"] = input_file(args.adapter_image, "--adapter-image file")
    if bool(args.ip_adapter) != bool(args.ip_image):
        raise ValueError("--ip-adapter and --ip-image go together: the adapter and its image prompt")
    if args.ip_image:
        control["ip_image"] = input_file(args.ip_image, "--ip-image file")
    if args.image is None:
        given = [flag for flag, value in (("--mask", args.mask), ("--strength", args.strength),
                                          ("--image-guidance", args.image_guidance),
                                          ("--noise-level", args.noise_level), ("--depth-map", args.depth_map))
                 if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'acts' if len(given) == 1 else 'act'} on an input image: give "
                             "--image PATH")
        return control
    if args.height is not None or args.width is not None or args.guidance_rescale:
        raise ValueError("--height, --width and --guidance-rescale are for text to image: with --image the image's "
                         "own size is used (resize it first)")
    settings = {"image": input_file(args.image, "--image file")}
    if args.mask is not None:
        settings["mask"] = input_file(args.mask, "--mask file")
    strength = args.strength if args.strength is not None else 1.0 if args.mask else 0.8  # diffusers' defaults
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength {strength} must lie in [0, 1]")
    if args.image_guidance is not None:  # (only where given: as images made before it)
        if args.mask is not None or control:
            raise ValueError("--image-guidance (InstructPix2Pix) takes --image alone: no --mask, ControlNet or adapter")
        settings["image_guidance"] = args.image_guidance
    if args.noise_level is not None:  # (an x4 upscaler's; only where given: as images made before it)
        if args.mask is not None or control:
            raise ValueError("--noise-level (an x4 upscaler's) takes --image alone: no --mask, ControlNet or adapter")
        settings["noise_level"] = args.noise_level
    if args.depth_map is not None:  # (a depth-to-image model's)
        if args.mask is not None or control or args.noise_level is not None or args.image_guidance is not None:
            raise ValueError("--depth-map (a depth-to-image model's) takes --image and --strength only")
        settings["depth_map"] = input_file(args.depth_map, "--depth-map file")
    return {**settings, "strength": strength, **control}


def read_depth_map(path: str):
    """A depth map file as a [H, W] float tensor: a 2-D .npy array, or a one-channel image (8- or 16-bit PNG, ...);
    larger values nearer, as DPT-style depth models give them."""
    import numpy as np
    import torch
    from PIL import Image

    if path.endswith(".npy"):
        values = np.load(path, allow_pickle=False)
    else:
        with Image.open(path) as image:
            values = np.asarray(image if image.mode in ("I", "I;16", "F") else image.convert("L"))
    if values.ndim != 2:
        raise ValueError(f"--depth-map {path}: expected one channel ([H, W]); got shape {values.shape}")
    return torch.from_numpy(values.astype(np.float32))


def apply_extras(pipe, extras: dict):
    """Textual-inversion embeddings, LoRA adapters (at their scales), an IP-Adapter, a T2I-Adapter and ControlNets as
    the settings list them; returns the pipeline (a T2I-Adapter or ControlNet pipeline over the same components where
    one is given); a VAE folder (--vae) first, in place of the model's."""
    if extras.get("vae"):
        from .layout import load_vae

        pipe.vae = load_vae(Path(extras["vae"][0][0]), torch_dtype=pipe.dtype).to(pipe.device)
    for path, token, _ in extras.get("embeddings", []):
        pipe.load_textual_inversion(path, token=token)
    loras = extras.get("loras", [])
    for i, (path, _, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora{i}")
    if loras:
        pipe.set_adapters([f"lora{i}" for i in range(len(loras))], [scale for _, scale, _ in loras])
    if extras.get("ip_adapter"):
        path, scale, _ = extras["ip_adapter"][0]
        pipe.load_ip_adapter(path)
        pipe.set_ip_adapter_scale(scale)
    if extras.get("t2i_adapter"):
        from .models.t2i_adapter import T2IAdapter
        from .pipeline_t2i_adapter import LatentDiffusionAdapterPipeline

        adapter = T2IAdapter.from_pretrained(extras["t2i_adapter"][0][0], torch_dtype=pipe.dtype).to(pipe.device)
        pipe = LatentDiffusionAdapterPipeline.from_pipe(pipe, adapter=adapter)
    if extras.get("controlnets"):
        from .models.controlnet import ControlNetModel
        from .pipeline_controlnet import LatentDiffusionControlNetPipeline

        def load(path: str) -> ControlNetModel:  # (a single file: for the pipeline's U-Net's architecture)
            if Path(path).is_file():
                return ControlNetModel.from_single_file(path, torch_dtype=pipe.dtype, unet=pipe.unet)
            return ControlNetModel.from_pretrained(path, torch_dtype=pipe.dtype)

        nets = [load(path).to(pipe.device) for path, _, _ in extras["controlnets"]]
        pipe = LatentDiffusionControlNetPipeline.from_pipe(pipe, controlnet=nets)
    return pipe


def load_pipeline(model: str | None, dtype: str, device: str, optimize: bool = False, variant: str | None = None,
                  extras: dict | None = None, compile_cache: str | os.PathLike | None = None):
    """`extras`: {"loras": [[path, scale, hash], ...], "embeddings": [[path, token, hash], ...], "controlnets":
    [[path, scale, hash], ...]}, applied before optimizing. `compile_cache`: compile the U-Net (and ControlNets),
    kept in that folder on a CPU (pipe.compile(cache_dir=)); "" compiles without keeping it."""
    import torch

    from .layout import EMBEDDED
    from .pipeline import LatentDiffusionPipeline, usable_device

    device = usable_device(device)  # (checked before anything is loaded)
    path = Path(model) if model else EMBEDDED
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if path.is_file():
        pipe = LatentDiffusionPipeline.from_single_file(path, torch_dtype=torch_dtype)
    else:
        kind = LatentDiffusionPipeline
        declared = declared_class(path)
        if declared == "StableDiffusionUpscalePipeline":
            from .pipeline_upscale import LatentDiffusionUpscalePipeline as kind
        elif declared == "StableDiffusionImageVariationPipeline":
            from .pipeline_image_variation import LatentDiffusionImageVariationPipeline as kind
        pipe = kind.from_pretrained(path, torch_dtype=torch_dtype, variant=variant)
    pipe = pipe.to(device)
    pipe = apply_extras(pipe, extras or {})
    if compile_cache is not None:
        pipe.compile(cache_dir=(compile_cache or None) if device.type == "cpu" else None)
    if optimize:  # this process is ours: malloc may keep large freed buffers too (models/allocator.py)
        from .models.allocator import keep_freed_buffers

        pipe.optimize_for_inference()
        keep_freed_buffers()
    return pipe, path


def compile_folder(args) -> str | None:
    """--compile's cache folder (--compile-cache, or latentdiff's cache folder's compiled/); None without --compile.
    """
    if args.compile_cache is not None and not args.compile:
        raise ValueError("--compile-cache is where --compile keeps compiled models: add --compile, or leave it out")
    if not args.compile:
        return None
    return args.compile_cache if args.compile_cache is not None else default_compile_folder()


def default_compile_folder() -> str:
    from .models.native import cache_folder

    return str(cache_folder() / "compiled")


def cmd_compiled(args) -> None:
    """The compiled models kept by --compile (or compile(cache_dir=)): one line each; --prune deletes those this
    installation can never use."""
    from .compile_cache import packages, prune

    folder = Path(args.folder or default_compile_folder())
    if not folder.is_dir():
        raise FileNotFoundError(f"compiled-model folder not found: {folder} (--compile makes it at its first run)")
    if args.prune:
        removed = prune(folder)
        print(f"removed {len(removed)} files from {folder}" + "".join(f"\n  {p.name}" for p in removed))
        return
    found = packages(folder)
    total = sum(entry["bytes"] for entry in found)
    print(f"{folder}: {len(found)} compiled models, {total / 2**20:.1f} MiB")
    for entry in found:
        tensors = _tensor_shapes(entry.get("call"))
        model = entry.get("model", "?").rsplit(".", 1)[-1]
        print(f"  {entry['path'].name}  {model}, {entry['bytes'] / 2**20:.1f} MiB, "
              f"compiled {entry.get('created', '?')} in {entry.get('compile_seconds', '?')} s; first input "
              f"{tensors[0] if tensors else '?'}: {entry['stale'] or 'usable here'}")


def _tensor_shapes(layout) -> list[str]:
    """'2x4x16x16 float32' for each tensor of a package's call layout (its note's "call"), in order."""
    if isinstance(layout, list) and layout[:1] == ["tensor"] and len(layout) == 5:
        return [f"{'x'.join(map(str, layout[1]))} {layout[3].replace('torch.', '')}"]
    return [shape for item in layout for shape in _tensor_shapes(item)] if isinstance(layout, list) else []


def sigma_grid_options(scheduler: str, sigmas: str | None) -> dict:
    """The scheduler options --sigmas asks for ({} without it: the model's scheduler config decides): its grid on,
    the others off (a model's config may have turned one on). Refused, naming the samplers that take it, for a
    sampler without that grid."""
    if sigmas is None:
        return {}
    from .schedulers import SCHEDULERS

    key = SIGMA_GRIDS[sigmas]

    def takes(name: str) -> bool:
        config = SCHEDULERS[name].config_class
        return key in config() and True in config.supported.get(key, (True,))

    if not takes(scheduler):
        names = ", ".join(name for name in SCHEDULERS if takes(name))
        raise ValueError(f"--sigmas {sigmas}: the {scheduler} sampler has no such noise-level grid; choose one that "
                         f"has ({names}) or leave --sigmas out")
    keys = SCHEDULERS[scheduler].config_class()
    return {option: option == key for option in SIGMA_GRIDS.values() if option in keys}


def _settings_from_args(args, prompt: str, seed: int, model_path: Path, model_hash: str,
                        extras: dict | None = None) -> dict:
    """What reproduces an image, stored in its PNG: JSON values only (str, int, float, None), so the copy read back
    from a PNG compares equal."""
    return {
        "prompt": prompt, "negative_prompt": args.negative, "seed": seed, "steps": args.steps,
        "scheduler": args.scheduler, "guidance": args.guidance,
        "guidance_rescale": args.guidance_rescale, "height": args.height, "width": args.width,
        "eta": args.eta, "dtype": args.dtype, "model": str(model_path), "model_hash": model_hash,
        **({"variant": args.variant} if args.variant else {}),  # (absent otherwise: as images made before it)
        **({"sigmas": args.sigmas} if args.sigmas else {}),
        **({"freeu": freeu_factors(args.freeu)} if args.freeu else {}),
        **({"pag": pag_settings(args.pag)} if args.pag else {}),
        **(extras or {}),  # loras, embeddings: only where given (as images made before them)
    }


def read_png_settings(path: str) -> dict:
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get(PNG_KEY) if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"{path} carries no latentdiff settings (it was not written by `latentdiff generate`)")
    return json.loads(text)


def generate_one(pipe, settings: dict, out_path: Path) -> None:
    import torch
    from PIL import PngImagePlugin

    from .schedulers import scheduler_from_name

    pipe.scheduler = scheduler_from_name(settings["scheduler"], pipe.scheduler.config,
                                         **sigma_grid_options(settings["scheduler"], settings.get("sigmas")))
    if "freeu" in settings:
        pipe.enable_freeu(*settings["freeu"])
    else:
        pipe.disable_freeu()
    common = dict(negative_prompt=settings["negative_prompt"], num_inference_steps=settings["steps"],
                  guidance_scale=settings["guidance"], eta=settings["eta"], progress=False,
                  generator=torch.Generator().manual_seed(settings["seed"]))
    if "ip_image" in settings:  # an IP-Adapter's image prompt
        from PIL import Image

        common["ip_adapter_image"] = Image.open(settings["ip_image"][0]).convert("RGB")
    control, control_images = {}, None
    if "control_images" in settings:  # ControlNets (the CLI gives every scale, so diffusers' defaults do not apply)
        from PIL import Image

        scales = [scale for _, scale, _ in settings["controlnets"]]
        images = [Image.open(path).convert("RGB") for path, _ in settings["control_images"]] * (
            len(scales) // len(settings["control_images"]))
        control_images = images[0] if len(scales) == 1 else images
        control = {"controlnet_conditioning_scale": scales if len(scales) > 1 else scales[0]}
    if is_image_variation(pipe):
        from PIL import Image

        photo = Image.open(settings["image"][0]).convert("RGB")
        common.pop("negative_prompt")
        image = pipe(photo, height=settings["height"], width=settings["width"], **common).images[0]
    elif "image" in settings:  # img2img, inpainting with a mask, or an InstructPix2Pix model's edit
        from PIL import Image

        from . import pipeline as plain
        from . import pipeline_controlnet as controlled

        photo = Image.open(settings["image"][0]).convert("RGB")
        upscaler = hasattr(pipe, "low_res_scheduler")
        depth = pipe.unet.config.in_channels == pipe.vae.config.latent_channels + 1
        if "noise_level" in settings and not upscaler:
            raise ValueError("--noise-level is for an x4 upscaler model (a folder with low_res_scheduler/)")
        if ("depth_map" in settings) != depth:
            raise ValueError("a depth-to-image model needs --depth-map" if depth else
                             "--depth-map is for a depth-to-image model (a U-Net of latent channels + 1)")
        if depth:
            from .pipeline_depth2img import LatentDiffusionDepth2ImgPipeline

            task, inputs = LatentDiffusionDepth2ImgPipeline, {
                "strength": settings["strength"], "depth_map": read_depth_map(settings["depth_map"][0])}
        elif upscaler:  # (a 7-channel U-Net: the latents and the small image)
            if "mask" in settings or control or "image_guidance" in settings:
                raise ValueError("an x4 upscaler takes --image (the small image) and --noise-level only")
            task, inputs = type(pipe), {"noise_level": settings.get("noise_level", 20)}
        elif pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels:  # (8 channels: InstructPix2Pix)
            from .pipeline_instruct_pix2pix import LatentDiffusionInstructPix2PixPipeline

            if "mask" in settings or control:
                raise ValueError("an InstructPix2Pix model edits --image by the prompt: no --mask or ControlNet")
            task, inputs = LatentDiffusionInstructPix2PixPipeline, {
                "image_guidance_scale": settings.get("image_guidance", 1.5)}
        else:
            inputs = {"strength": settings["strength"]}
            if "mask" in settings:
                inputs["mask_image"] = Image.open(settings["mask"][0])
            kind = "Inpaint" if "mask" in settings else "Img2Img"
            if control:
                task = getattr(controlled, f"LatentDiffusionControlNet{kind}Pipeline")
                inputs["control_image"] = control_images
            else:
                task = getattr(plain, f"LatentDiffusion{kind}Pipeline")
        image = task.from_pipe(pipe)(settings["prompt"], image=photo, **inputs, **control, **common).images[0]
    elif control:
        image = pipe(settings["prompt"], image=control_images, height=settings["height"], width=settings["width"],
                     **control, **common).images[0]
    elif "adapter_image" in settings:  # a T2I-Adapter
        from PIL import Image

        image = pipe(settings["prompt"], image=Image.open(settings["adapter_image"][0]), height=settings["height"],
                     width=settings["width"], adapter_conditioning_scale=settings["t2i_adapter"][0][1],
                     **common).images[0]
    else:
        call = pipe
        if "pag" in settings:  # perturbed-attention guidance
            from .pipeline_pag import LatentDiffusionPAGPipeline

            call = LatentDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers=settings["pag"][1])
            common["pag_scale"] = settings["pag"][0]
        image = call(settings["prompt"], height=settings["height"], width=settings["width"],
                     guidance_rescale=settings.get("guidance_rescale", 0.0), **common).images[0]
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(settings))
    what = settings["prompt"] if not is_image_variation(pipe) else f"variation of {Path(settings['image'][0]).name}"
    info.add_text("parameters", f"{what} | seed {settings['seed']}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path, pnginfo=info)


def cmd_generate(args) -> None:
    from tqdm.auto import tqdm

    if Path(args.out).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") or Path(args.out).is_file():
        raise ValueError(f"--out is the folder images are written to (named from their prompt and seed); got "
                         f"{args.out!r}, a file: give a folder")
    if args.from_png:
        settings = read_png_settings(args.from_png)
        extras = {key: settings[key] for key in ("vae", "loras", "embeddings", "controlnets", "ip_adapter",
                                                 "t2i_adapter") if key in settings}
        pipe, path = load_pipeline(args.model or settings["model"], settings["dtype"], args.device, args.optimize,
                                   settings.get("variant"), extras, compile_folder(args))
        files = [(Path(file), h) for entries in extras.values() for file, _, h in entries]
        files += [(Path(settings[key][0]), settings[key][1]) for key in ("image", "mask") if key in settings]
        files += [(Path(file), h) for file, h in settings.get("control_images", [])]
        files += [(Path(settings[key][0]), settings[key][1]) for key in ("ip_image", "adapter_image")
                  if key in settings]
        for name, made_with in [(path, settings["model_hash"])] + files:
            digest = weights_hash(name)
            if digest != made_with:
                print(f"warning: {name} has weights hash {digest}, the image was made with {made_with}: the "
                      "result will differ", file=sys.stderr)
        out, _ = _output_path(Path(args.out), Path(args.from_png).stem + "-repro", settings)  # (made again anyway)
        generate_one(pipe, settings, out)
        print(out)
        return
    variation = declared_class(args.model) == "StableDiffusionImageVariationPipeline"
    inputs = image_inputs(args, True) if variation else None  # (checked before any other input is read)
    if variation:
        prompts = [""]  # (image_inputs refused a prompt)
    elif args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    elif args.prompt:
        prompts = [args.prompt]
    else:
        raise ValueError("give a prompt, --prompts-file FILE or --from-png IMAGE")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1; got {args.num_images}")
    sigma_grid_options(args.scheduler, args.sigmas)  # (refused before the model loads)
    extras = {key: [parse_extra(spec, key) for spec in specs]
              for key, specs in (("vae", [args.vae] if args.vae else []), ("embeddings", args.embedding),
                                 ("loras", args.lora),
                                 ("controlnets", args.controlnet),
                                 ("ip_adapter", [args.ip_adapter] if args.ip_adapter else []),
                                 ("t2i_adapter", [args.t2i_adapter] if args.t2i_adapter else [])) if specs}
    extras.update(inputs or image_inputs(args))
    if args.pag and set(extras) & {"controlnets", "t2i_adapter", "ip_adapter", "image"}:
        raise ValueError("--pag runs text to image alone: leave out --image, --controlnet, --t2i-adapter and "
                         "--ip-adapter with it")
    pipe, path = load_pipeline(args.model, args.dtype, args.device, args.optimize, args.variant, extras,
                               compile_folder(args))
    digest = weights_hash(path)
    todo, kept, claimed = [], [], {}
    for prompt in prompts:
        for seed in range(args.seed, args.seed + args.num_images):
            settings = _settings_from_args(args, prompt, seed, path, digest, extras)
            stem = f"{slug(Path(args.image).stem)}-variation" if variation else slug(prompt)
            out, made = _output_path(Path(args.out), f"{stem}-s{seed}", settings, claimed)
            if out not in claimed:  # (a prompt given twice is made once)
                (kept if made and not args.force else todo).append((settings, out))
            claimed[out] = settings
    if kept:
        names = ", ".join(str(out) for _, out in kept[:3]) + (", ..." if len(kept) > 3 else "")
        print(f"skipping {len(kept)} images already made with the same settings ({names}): --force makes them again",
              file=sys.stderr)
    for settings, out in tqdm(todo, disable=len(todo) < 2, desc="images"):
        generate_one(pipe, settings, out)
        print(out)


def _output_path(folder: Path, stem: str, settings: dict, claimed: dict | None = None) -> tuple[Path, bool]:
    """Where the image of `settings` goes, and whether it is there already: STEM.png, or, where that name holds an
    image made with other settings (steps, guidance, model, ...), STEM-2.png, -3, ...: an earlier image is never
    overwritten by a different one. `claimed`: the paths this command gives other images (prompts that differ
    beyond the slug's 60 characters, or only in punctuation, share a stem), with their settings."""
    claimed = claimed or {}
    for n in itertools.count(1):
        path = folder / (f"{stem}.png" if n == 1 else f"{stem}-{n}.png")
        if path in claimed:
            if claimed[path] == settings:
                return path, path.exists()
            continue
        if not path.exists():
            return path, False
        if _stored_settings(path) == settings:
            return path, True


def _stored_settings(path: Path) -> dict | None:
    """The settings in an image that `latentdiff generate` wrote, else None."""
    try:
        return read_png_settings(str(path))
    except (OSError, ValueError):  # not an image, not ours, or damaged
        return None


def cmd_convert(args) -> None:
    from .checkpoints import require_path
    from .layout import save_single_file
    from .pipeline import LatentDiffusionPipeline

    src, dst = require_path(args.src, "conversion source"), Path(args.dst)
    if (dst.is_file() or (dst.is_dir() and any(dst.iterdir()))) and not args.force:
        raise ValueError(f"{dst} exists{'' if dst.is_file() else ' and is not empty'}: give a new destination, or "
                         "--force to write over it")
    if src.is_file():
        LatentDiffusionPipeline.from_single_file(src, config=args.config,
                                                 prediction_type=args.prediction_type).save_pretrained(dst)
    else:
        if dst.suffix != ".safetensors":
            raise ValueError(f"{dst}: a single-file checkpoint must end in .safetensors")
        save_single_file(LatentDiffusionPipeline.from_pretrained(src).components, dst)
    print(dst)


def cmd_info(args) -> None:
    pipe, path = load_pipeline(args.path, "fp32", "cpu")
    print(f"pipeline: {path}")
    for name, component in pipe.components.items():
        if hasattr(component, "parameters"):
            params = list(component.parameters())
            dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
            print(f"  {name:17s} {type(component).__name__:29s} {sum(p.numel() for p in params):>13,d} params "
                  f"{'/'.join(dtypes)}")
        else:
            print(f"  {name:17s} {type(component).__name__}")
    print(f"  {'default size':17s} {pipe.unet.config.sample_size * pipe.vae_scale_factor}px")


def cmd_train(args) -> int:
    """In this process (one CPU or GPU); for several processes use `accelerate launch training/...`."""
    from .training import TextToImageConfig, VAETrainConfig, run_script, train_text_to_image, train_vae

    config_cls, train = {"text-to-image": (TextToImageConfig, train_text_to_image),
                         "vae": (VAETrainConfig, train_vae)}[args.task]
    return run_script(config_cls, train, ["--config", args.config, *args.overrides])


def cmd_eval(args) -> None:
    """SHAPES.md's prompt-adherence protocol on a shapes pipeline: one markdown table per prompt set."""
    from .evaluation import evaluate_pipeline, format_table

    pipe, path = load_pipeline(args.model, "fp32", args.device)
    for prompts in args.prompts:
        rows = evaluate_pipeline(pipe, args.guidance, prompts=prompts, steps=args.steps, seed=args.seed,
                                 guidance_rescale=args.guidance_rescale)
        print(f"\n{prompts} prompts, {args.steps} DPM-Solver++ steps, {path}:\n{format_table(rows)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", nargs="?")
    g.add_argument("--model", help="pipeline folder or SD 1.x/2.x .safetensors (default: the embedded tiny-shapes)")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="0..1, rescales guided predictions to the conditional one's spread (Lin et al.: 0.7)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--scheduler", default="dpm++",
                   choices=["ddpm", "ddim", "euler", "euler_a", "heun", "dpm++", "dpm++sde", "dpm++3m", "dpm++2s",
                            "deis", "dpmsolver_sde", "pndm", "unipc", "lms", "lcm", "tcd", "dpm2", "dpm2_a"],
                   help="sampler (lcm: latent consistency, 2-8 steps, for LCM models and LCM-LoRA: --steps 4, "
                        "--guidance 1 to 2 with an LCM-LoRA; tcd: for TCD-LoRA, its gamma is --eta, e.g. 0.3)")
    g.add_argument("--sigmas", default=None, choices=list(SIGMA_GRIDS),
                   help="the sampler's noise levels on this grid instead of its spaced timesteps' (karras: Karras et "
                        "al.'s, as in 'DPM++ 2M Karras'; exponential: even in log sigma; beta: Beta(0.6, 0.6) "
                        "quantiles): dpm++, dpm++sde, dpm++3m, dpm++2s, deis, unipc, euler, heun, lms, dpm2, dpm2_a, "
                        "dpmsolver_sde")
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--eta", type=float, default=0.0)
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--freeu", default=None, metavar="S1,S2,B1,B2",
                   help="FreeU with these factors (pipe.enable_freeu), or 'sd1' for 0.9,0.2,1.5,1.6")
    g.add_argument("--pag", default=None, metavar="SCALE[:LAYERS]",
                   help="perturbed-attention guidance of this scale (3 is diffusers' default) in these self-attention "
                        "layers (comma-separated regular expressions; 'mid' by default)")
    g.add_argument("--variant", default=None,
                   help="the model folder's weights of that variant (diffusion_pytorch_model.VARIANT.safetensors)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--optimize", action="store_true",
                   help="on the CPU, pack the models for oneDNN (and our AMX kernels) first "
                        "(pipe.optimize_for_inference(): SD 1.5's U-Net 1.3x faster in fp32 (1.9x on AMX CPUs), "
                        "1.6x in bf16 on AMX CPUs; on AVX2-only CPUs bf16 layers computed in float32, ~8x faster "
                        "than PyTorch's bf16 fallbacks there; same images up to float rounding) and let malloc keep "
                        "large freed buffers for reuse")
    g.add_argument("--compile", action="store_true",
                   help="compile the U-Net (and ControlNets) first (pipe.compile(): torch.compile, inductor; the "
                        "tiny-shapes U-Net ~2x faster a step). On the CPU the compiled model is kept in "
                        "--compile-cache and later runs load it in seconds; the first run compiles for minutes")
    g.add_argument("--compile-cache", default=None, metavar="FOLDER",
                   help="where --compile keeps compiled models on the CPU (default: latentdiff's cache folder, "
                        "compiled/, in $XDG_CACHE_HOME or ~/.cache); may be emptied at any time")
    g.add_argument("--vae", default=None, metavar="PATH",
                   help="a VAE folder to use instead of the model's: an AutoencoderKL (a fine-tuned SD VAE, say) or "
                        "TAESD's AutoencoderTiny (fast decoding)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA (.safetensors file or folder; diffusers' or kohya-ss's format) at SCALE (default 1); "
                        "repeat for several")
    g.add_argument("--embedding", action="append", default=[], metavar="PATH[:TOKEN]",
                   help="a textual-inversion embedding (.safetensors; diffusers' or A1111's) as TOKEN (default: the "
                        "file's own), for prompts and --negative to name; repeat for several")
    g.add_argument("--controlnet", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a ControlNet (diffusers folder, or lllyasviel's single .safetensors file) at SCALE (default "
                        "1), following --control-image; repeat for several")
    g.add_argument("--control-image", action="append", default=[], metavar="PATH",
                   help="the image a --controlnet follows (edges, depth, pose, ...; --height and --width default to "
                        "its size rounded down to a multiple of 8; with --image it is resized to that image's size); "
                        "one per --controlnet")
    g.add_argument("--t2i-adapter", default=None, metavar="PATH[:SCALE]",
                   help="a T2I-Adapter folder at SCALE (default 1), following --adapter-image (text to image)")
    g.add_argument("--adapter-image", default=None, help="the image a --t2i-adapter follows (sketch, depth, ...)")
    g.add_argument("--ip-adapter", default=None, metavar="PATH[:SCALE]",
                   help="an IP-Adapter (.safetensors file, or a folder holding ip-adapter_sd15.safetensors; its CLIP "
                        "image encoder in image_encoder/ beside it) at SCALE (default 1), with --ip-image")
    g.add_argument("--ip-image", default=None, help="the image prompt of --ip-adapter")
    g.add_argument("--image", default=None, help="an input image: img2img (or inpainting, with --mask); with an "
                   "image variation model, the image it varies (no prompt)")
    g.add_argument("--mask", default=None, help="with --image: repaint where this mask is white, keep where black")
    g.add_argument("--image-guidance", type=float, default=None,
                   help="with --image and an InstructPix2Pix model (8-channel U-Net): how closely the edit keeps to "
                        "the image (default 1.5)")
    g.add_argument("--depth-map", default=None,
                   help="with --image and a depth-to-image model: the image's depth (.npy [H, W], or a one-channel "
                        "8/16-bit image; larger nearer)")
    g.add_argument("--noise-level", type=int, default=None,
                   help="with --image and an x4 upscaler model: how far the small image is noised first (default 20)")
    g.add_argument("--strength", type=float, default=None,
                   help="with --image: how far the image is noised before denoising (default 0.8; 1.0 with --mask)")
    g.add_argument("--out", default="out", help="folder for the images, named PROMPT-sSEED.png")
    g.add_argument("--prompts-file", help="one prompt per line")
    g.add_argument("--force", action="store_true",
                   help="make images again where --out holds them with the same settings already (skipped "
                        "otherwise; an image of other settings is never overwritten: the new one is numbered "
                        "-2, -3, ...)")
    g.add_argument("--from-png", help="reproduce an image from the settings stored in its PNG")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="single-file checkpoint <-> pipeline folder")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--config", default=None, help="pipeline folder giving the architecture (default: SD 1.5's, "
                   "or SD 2.1's 768 px v-prediction one for SD 2.x files)")
    c.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
                   help="what the U-Net predicts, where the file cannot tell: SD 2.x base (512 px) models are "
                        "epsilon, SD 2.x 768 px ones v_prediction (the default for SD 2.x files)")
    c.add_argument("--force", action="store_true", help="write over an existing file or non-empty folder")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="train in this process (accelerate launch training/... for several)")
    t.add_argument("task", choices=["text-to-image", "vae"])
    t.add_argument("--config", required=True, help="a YAML file under training/configs/")
    t.epilog = "Further --key value pairs override the config's keys."
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="prompt adherence of a shapes pipeline (SHAPES.md protocol)")
    e.add_argument("--model", help="pipeline folder (default: the embedded tiny-shapes)")
    e.add_argument("--prompts", nargs="+", default=["heldout", "trained"], choices=["heldout", "trained"])
    e.add_argument("--guidance", nargs="+", type=float, default=[1, 3, 5, 7.5])
    e.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="as in generate (SHAPES.md's protocol leaves it at 0)")
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="a pipeline's components, parameter counts and dtypes")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("compiled", help="the compiled models that --compile keeps (list, or --prune)")
    k.add_argument("folder", nargs="?", default=None,
                   help="the folder (default: the one --compile uses, latentdiff/compiled in $XDG_CACHE_HOME or "
                        "~/.cache)")
    k.add_argument("--prune", action="store_true",
                   help="delete the compiled models this installation can never use (made by other latentdiff "
                        "code, another torch or CPU) and the leftovers of interrupted compiles")
    k.set_defaults(func=cmd_compiled)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, TypeError, OSError) as err:
        if os.environ.get("LATENTDIFF_DEBUG"):
            raise
        print(f"latentdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
