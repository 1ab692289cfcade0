"""Text-to-image and image-to-image generation with classifier-free guidance (Ho & Salimans 2022) in latent space
(Rombach et al. 2022). Data flow: prompt -> 77 token ids -> text encoder -> context; latents x_T ~ N(0, I) from
per-image generators; for each timestep one batched U-Net call over [unconditional, conditional]; scheduler step;
VAE decode of x_0 / scaling_factor."""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import inspect

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cuda_graphs import CUDAGraphModel
from .guidance import ClassifierFreeGuidance
from .ip_adapter import IPAdapterMixin
from .lora import LoRALoaderMixin, lora_call_scale, model_lora_scaled
from .models.attention import TextProjections, cache_text_keys, tensors_key
from .models.embeddings import guidance_embedding
from .models.unet import cache_timesteps
from .offload import ModelOffload
from .schedules import randn
from .textual_inversion import TextualInversionLoaderMixin

Generators = torch.Generator | list[torch.Generator] | None


def inductor_settings(device: torch.device | str, max_autotune: bool = True, freezing: bool = True):
    """A context in which torch.compile'd models compile as pipe.compile() has them: weights frozen (constant-
    folded, pre-packed), max-autotune, and on a CPU the graph driven from C++ and float32 linear layers packed for
    oneDNN rather than MKL (inductor_passes.OneDNNLinears: MKL's packed weights take at least 5.57 MiB each). The
    settings are read when a graph compiles, so the first calls must run inside it (torch.compile's `options`
    argument does not turn freezing on: measured, the U-Net 1.39x its eager self with options=, 1.9-2.0x with
    this)."""
    import torch._inductor.config

    cpu = torch.device(device).type == "cpu"
    settings = {"freezing": freezing, "max_autotune": max_autotune, "cpp_wrapper": cpu}
    if cpu:
        from .inductor_passes import OneDNNLinears

        given = torch._inductor.config.post_grad_custom_pre_pass
        given = list(given) if isinstance(given, (list, tuple)) else [] if given is None else [given]
        if not any(isinstance(p, OneDNNLinears) for p in given):
            settings["post_grad_custom_pre_pass"] = [*given, OneDNNLinears()]
    return torch._inductor.config.patch(**settings)


class _Unlaid(Exception):
    """An argument call_layout does not describe."""


def call_layout(args: tuple, kwargs: dict) -> tuple | None:
    """What dynamo's guards check of a call's arguments, as a hashable key: the nesting of tuples, lists and dicts;
    each tensor's type, shape, strides, dtype, device, autograd flag and inference-ness, and which arguments are
    the same tensor; the values of None, bools, numbers and strings. None for anything else."""
    tensors: list[torch.Tensor] = []

    def layout(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return (type(value), value.shape, value.stride(), value.dtype, value.device, value.requires_grad,
                    value.is_inference())
        if isinstance(value, (tuple, list)):
            return (type(value), tuple(layout(v) for v in value))
        if isinstance(value, dict):
            return (dict, tuple((k, layout(v)) for k, v in value.items()))
        if value is None or isinstance(value, (bool, int, float, str)):
            return (type(value), value)
        raise _Unlaid

    try:
        key = layout((args, kwargs))
    except _Unlaid:
        return None
    ids = [id(t) for t in tensors]
    return key, tuple(ids.index(i) for i in ids), torch.is_grad_enabled()


class CompiledCall:
    """A torch.compile'd model as a denoising loop calls it. dynamo checks its guards on every call (tiny-shapes'
    U-Net: ~5000 checks, mostly of module attributes, 0.9 ms of a 12 ms call on a 2-core CPU). Within a loop, a
    call whose arguments are laid out as those of an earlier call of the same model in the same loop (call_layout)
    runs without them, under torch.compiler.set_stance(skip_guard_eval_unsafe=True): nothing that the guards read
    beyond the arguments can change between two calls of a loop, as long as no user code runs in between
    (denoise() forgets the layouts seen after each callback). Outside a loop (`pipe._seen_calls` None), under
    another stance, and for a new layout, the guards run as usual (and may compile). The text's keys and values
    are projected outside the graph, once per context and weights (attention.TextProjections)."""

    def __init__(self, compiled: Callable, pipe: LatentDiffusionPipeline):
        self.compiled, self.pipe = compiled, pipe

    def __getattr__(self, name: str):  # the model's attributes (its config, ...), as torch.compile's wrapper has
        if name in ("compiled", "pipe"):
            raise AttributeError(name)
        return getattr(self.compiled, name)

    def __call__(self, *args, **kwargs):
        context, text = self._text(args, kwargs)
        if text is None:
            return self._call(self.pipe._seen_calls, args, kwargs)
        with text.given(context):
            return self._call(self.pipe._seen_calls, args, kwargs)

    def _text(self, args: tuple, kwargs: dict) -> tuple:
        """(context, its TextProjections) for a call whose text the cross-attentions can get projected outside the
        graph (TextProjections.for_call); else (None, None)."""
        model = getattr(self.compiled, "_orig_mod", None)
        return (None, None) if model is None else TextProjections.for_call(model, args, kwargs)

    def _call(self, seen: set | None, args: tuple, kwargs: dict):
        layout = None if seen is None or _stance() != ("default", False, None) else call_layout(args, kwargs)
        # (per compiled model: models of one class share dynamo's cache, where the guards tell their graphs apart)
        key = None if layout is None else (id(self.compiled), layout)
        if key is None or key not in seen:
            out = self.compiled(*args, **kwargs)
            if key is not None:
                seen.add(key)
            return out
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return self.compiled(*args, **kwargs)


def _warn_if_slow_on_this_cpu(unet: torch.nn.Module) -> None:
    """Warn where a bfloat16 or float16 U-Net on the CPU would run PyTorch's slow fallback kernels: oneDNN has no
    such kernels on CPUs without AVX-512 (bfloat16) or AVX512-FP16 (float16), where its convolutions and matrix
    products run 10-200x slower than in float32 (a 2-core AVX2 AMD EPYC: 0.6-14 GFLOP/s against ~120), unless
    optimize_for_inference() made it compute them in float32 (packed.Float32Compute)."""
    from .models import packed

    dtype = getattr(unet, "dtype", None)
    if dtype not in (torch.bfloat16, torch.float16) or getattr(unet, "device", None) != torch.device("cpu"):
        return
    if packed.half_supported(dtype) or packed.is_packed(unet):
        return
    warnings.warn(f"the U-Net is {dtype} on a CPU without oneDNN kernels for it: PyTorch's fallback convolutions "
                  f"and matrix products run 10-200x slower than in float32 here; call pipe.optimize_for_inference() "
                  f"first (it computes them in float32) or load the pipeline in float32", stacklevel=3)


def _stance() -> tuple | None:
    """torch.compiler's stance now (stance, skip_guard_eval_unsafe, backend); None where this torch keeps none."""
    stance = getattr(torch._dynamo.eval_frame, "_stance", None)
    return None if stance is None else (stance.stance, stance.skip_guard_eval_unsafe, stance.backend)


def _cache_folder(folder: str | os.PathLike, device: torch.device) -> str:
    """compile(cache_dir=)'s folder, made if missing, checked writable, for a pipeline on `device`."""
    if device.type != "cpu":
        raise ValueError(f"compile(cache_dir=...) keeps compiled models for the CPU, and this pipeline is on {device}:"
                         " there torch.compile's own caches (TORCHINDUCTOR_CACHE_DIR) keep compiled graphs between "
                         "processes; leave cache_dir out")
    path = os.fspath(folder)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"compile(cache_dir={path!r}): that is a file, not a folder; give a folder (it is made if "
                         "missing)")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-check-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"compile(cache_dir={path!r}): cannot write there ({error.strerror}); give a folder this "
                         "process may write to") from error
    return path


def _require_traceable(model: torch.nn.Module, what: str = "the U-Net") -> None:
    from .models.packed import is_packed

    if is_packed(model):
        raise ValueError(f"{what} was optimized for inference (its weights re-laid out for oneDNN and our kernels), "
                         "which torch.compile cannot trace: load the pipeline again and call compile() before "
                         "optimize_for_inference() (which then packs only the VAE and the text encoder)")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, NHWC numpy in [0, 1], NCHW tensor in [0, 1], or the latents


def _as_list(prompt: str | list[str], what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")


def _per_image_generators(generator: Generators, n: int) -> list[torch.Generator] | None:
    """One generator per image, so that an image depends only on its own seed, not on its batch. A single
    generator seeded with s serves the first image; image i gets a fresh generator seeded s + i."""
    if generator is None:
        return None
    given = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    wrong = [type(g).__name__ for g in given if not isinstance(g, torch.Generator)]
    if wrong:
        raise TypeError(f"generator must be a torch.Generator or a list of them (one per image), got {wrong[0]}: "
                        "e.g. generator=torch.Generator().manual_seed(42)")
    if isinstance(generator, (list, tuple)):
        if len(given) != n:
            raise ValueError(f"got {len(given)} generators for {n} images: pass one per image, or a single one")
        return given
    seed = generator.initial_seed()
    return [generator] + [torch.Generator(generator.device).manual_seed(seed + i) for i in range(1, n)]


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that this machine has, or a ValueError that says what it has instead."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is usable here (torch {torch.__version__}): use "
                             "'cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), cuda:0 to "
                             f"cuda:{count - 1}")
    return device


def to_images(x: torch.Tensor, output_type: str):
    """Decoded images in [-1, 1] -> the requested output type (a warning where they hold NaN or infinities)."""
    x = x.detach().float()
    if not torch.isfinite(x).all():
        bad = [i for i, image in enumerate(x) if not torch.isfinite(image).all()]
        warnings.warn(f"images {bad} of this call hold NaN or infinite values (shown black): the model overflowed, "
                      "typically in float16; run it in float32 or bfloat16", stacklevel=3)
        x = x.nan_to_num(-1.0, 1.0, -1.0)
    x = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return x
    array = x.permute(0, 2, 3, 1).cpu().numpy()
    return array if output_type == "np" else numpy_to_pil(array)


def numpy_to_pil(images: np.ndarray) -> list:
    """Images in [0, 1] as a numpy array ([N, H, W, C] or one [H, W, C]) -> PIL images, one channel as grayscale."""
    from PIL import Image

    images = ((images[None] if images.ndim == 3 else images) * 255).round().astype(np.uint8)
    return [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in images]


class ImageProcessor:
    """`pipe.image_processor`, for diffusers' custom loops: postprocess(images in [-1, 1], output_type) gives
    what a pipeline call returns for that output_type ("pil", "np", "pt"; "latent" as is)."""

    def postprocess(self, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None):
        if output_type == "latent":
            return image
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}: choose 'pil', 'np', 'pt' or 'latent'")
        if do_denormalize is not None and not all(do_denormalize):
            raise ValueError("do_denormalize with False entries: images here are always in [-1, 1]; leave it None")
        return to_images(image, output_type)


def _stable_diffusion_settings(scheduler) -> None:
    """diffusers' StableDiffusionPipeline, when built, changes two settings of a scheduler's config (in place, with
    a deprecation warning): steps_offset to 1, the offset Stable Diffusion was sampled with, and clip_sample to
    False, since a latent's x0 estimate is not bounded by [-1, 1] as pixels are (DDPM's and DDIM's default clips
    it, which spoils the image). Done here too, so that a folder gives diffusers' images."""
    config = getattr(scheduler, "config", None)
    fixes = {}
    if hasattr(config, "get") and config.get("steps_offset", 1) != 1:  # (not every scheduler has the key)
        fixes["steps_offset"] = 1
    if hasattr(config, "get") and config.get("clip_sample", False) is True:
        fixes["clip_sample"] = False
    if fixes and hasattr(config, "replace"):
        was = ", ".join(f"{key}={config[key]!r}" for key in fixes)
        warnings.warn(f"{type(scheduler).__name__} has {was}; using {', '.join(f'{k}={v!r}' for k, v in fixes.items())}"
                      " as diffusers' StableDiffusionPipeline does (set them in scheduler_config.json to silence this)",
                      stacklevel=3)
        scheduler.config = config.replace(**fixes)


class PipelineConfig(dict):
    """`pipe.config`, as diffusers' FrozenDict: a read-only dict whose keys read as attributes too."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"pipe.config has no {name!r}; it holds {list(self)}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("pipe.config is read-only: it describes the pipeline's components; change a component "
                        "instead (pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config), ...)")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = __ior__ = _read_only
    update = setdefault = pop = popitem = clear = _read_only


class LatentDiffusionPipeline(LoRALoaderMixin, TextualInversionLoaderMixin, IPAdapterMixin):
    """`pipe = LatentDiffusionPipeline.from_pretrained(folder); pipe(prompt).images[0]`."""

    component_names = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
    # settings kept in model_index.json beside the components, taken by __init__ (the x4 upscaler's max_noise_level)
    config_names: tuple[str, ...] = ()

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler):
        _stable_diffusion_settings(scheduler)
        self.tokenizer, self.text_encoder, self.unet, self.vae, self.scheduler = (
            tokenizer, text_encoder, unet, vae, scheduler)
        self.name_or_path: str | os.PathLike | None = None  # the folder or file it was loaded from, as given
        self._embedding_cache: dict[tuple, torch.Tensor] = {}
        self._embedding_weights: tuple = ()
        self._graphed: CUDAGraphModel | None = None
        self._graph_channels_last: torch.nn.Module | None = None
        self._compile_options: dict | None = None  # set by compile()
        self._compiled: tuple[torch.nn.Module, Callable] | None = None  # (the U-Net it was made from, compiled)
        self._compile_cache: str | os.PathLike | None = None  # compile(cache_dir=)
        self._seen_calls: set | None = None  # within a denoising loop: the layouts of its compiled calls so far
        self._progress_bar: dict[str, Any] = {}  # set_progress_bar_config()
        self._offload: ModelOffload | None = None  # enable_model_cpu_offload()
        self._num_timesteps, self._guidance_scale, self._interrupt = 0, 7.5, False  # the running call (callbacks)
        self.image_processor = ImageProcessor()

    # ---- components, devices, persistence -------------------------------------------------------------------
    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*self.component_names, *self.config_names)}

    @property
    def config(self) -> PipelineConfig:
        """As diffusers' `pipe.config`: (library, class) of each component as diffusers names it, (None, None) for
        one it lacks, the settings (requires_safety_checker: False) and `_name_or_path`, the folder or file the
        pipeline was loaded from: model_index.json as save_pretrained would write it now, less the two keys diffusers
        adds only in the file (_class_name, _diffusers_version)."""
        from .layout import pipeline_index

        entries = {name: tuple(value) if isinstance(value, list) else value
                   for name, value in pipeline_index(self.components).items() if not name.startswith("_")}
        return PipelineConfig({**entries, "_name_or_path": self.name_or_path})

    def _models(self) -> list[torch.nn.Module]:
        """The pipeline's neural networks (with an IP-Adapter's image encoder where one is loaded)."""
        return [m for m in (self.text_encoder, self.unet, self.vae, self.image_encoder) if m is not None]

    def _denoisers(self) -> list[torch.nn.Module]:
        """The networks each denoising step runs (their text keys and time embeddings are cached over a run)."""
        return [self.unet]

    @property
    def device(self) -> torch.device:
        """Where the denoising runs: the U-Net's device (the accelerator, with model CPU offload)."""
        return self._offload.device if self._offload is not None else self.unet.device

    @property
    def _execution_device(self) -> torch.device:  # (diffusers' name)
        return self.device

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        """Keep the models in CPU memory and move each stage to `device` (cuda:`gpu_id`) only while it runs: the
        text encoder, then the U-Net with its ControlNets or adapters, then the VAE (latentdiff.offload), as
        diffusers' method of this name does. The accelerator then holds one stage's weights at a time (SD 1.5 in
        fp16: the U-Net's 1.7 GB instead of 2.1 GB for all); each call moves every stage there and back once. Set
        the components first (a model put into the pipeline afterwards is not offloaded); `remove_all_hooks()`
        ends it. Not with compile() or CUDA graphs."""
        if self._compile_options is not None or self._graphed is not None:
            raise ValueError("model CPU offload moves the models at every call, which compile() and CUDA graphs "
                             "cannot follow: call disable_compile() / disable_cuda_graphs() first")
        device = torch.device(device)
        if gpu_id is not None:
            device = torch.device(device.type, gpu_id)
        device = usable_device(device)
        self.remove_all_hooks()
        self._embedding_cache.clear()
        self._offload = ModelOffload(self._offload_stages(), device)

    def _offload_stages(self) -> list[list[torch.nn.Module]]:
        """The models of each stage of a call, in order (see enable_model_cpu_offload)."""
        first = [m for m in (self.text_encoder, self.image_encoder) if m is not None]
        return [first, [m for m in self._models() if all(m is not x for x in (*first, self.vae))], [self.vae]]

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        """Not in latentdiff: diffusers' sequential offload moves each layer's weights to the GPU for each of its
        calls (the least GPU memory, many times slower); latentdiff offloads whole models, one stage of a call at a
        time (enable_model_cpu_offload)."""
        raise NotImplementedError("latentdiff has no sequential (per-layer) CPU offload: use "
                                  "pipe.enable_model_cpu_offload(), which keeps one stage's models on the GPU at a "
                                  "time (SD 1.5 in fp16: the U-Net's 1.7 GB), or enable_vae_tiling() for large images")

    def maybe_free_model_hooks(self) -> None:
        """diffusers' method, which its custom loops call last: with model CPU offload, the stage that ran last (the
        VAE after a decode) goes back to CPU memory, as a call of the pipeline ends; without offload, nothing."""
        if self._offload is not None:
            self._offload.unload()

    def remove_all_hooks(self) -> None:
        """End model CPU offload (diffusers' name): the models stay in CPU memory; `.to()` moves them again."""
        if self._offload is not None:
            self._offload.remove()
            self._offload = None

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Taken for diffusers' code, and nothing to do: diffusers slices attention so as not to hold a whole
        [tokens x tokens] score matrix at once, and latentdiff's attention never holds one (PyTorch's SDPA kernels
        on the CPU and the GPU, and ours on AMX, run an online softmax over blocks of keys). diffusers' own
        documentation advises against slicing on top of SDPA: slower, no memory saved."""
        if not (slice_size in (None, "auto", "max") or (type(slice_size) is int and slice_size > 0)):
            raise ValueError(f"slice_size={slice_size!r}: use 'auto', 'max' or a positive number of heads")

    def disable_attention_slicing(self) -> None:
        """See enable_attention_slicing: nothing to undo."""

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """Taken for diffusers' code: latentdiff's attention already runs PyTorch's scaled_dot_product_attention,
        whose flash and memory-efficient kernels (on a GPU) do what xformers' would; nothing to enable, no xformers
        needed. Says so once, since the call suggests the caller expects a change."""
        if attention_op is not None:
            raise ValueError("attention_op: latentdiff takes no xformers operator (its attention is PyTorch's SDPA)")
        warnings.warn("enable_xformers_memory_efficient_attention(): latentdiff's attention is PyTorch's "
                      "scaled_dot_product_attention (flash / memory-efficient kernels on GPUs) already; nothing "
                      "changes", UserWarning, stacklevel=2)

    def disable_xformers_memory_efficient_attention(self) -> None:
        """See enable_xformers_memory_efficient_attention: nothing to undo."""

    def enable_vae_tiling(self) -> None:
        """diffusers' pipeline method: pipe.vae.enable_tiling() (decodes in tiles, whole-image statistics kept)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_vae_slicing(self) -> None:
        """diffusers' pipeline method: pipe.vae.enable_slicing() (a batch decoded one image at a time)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU in the U-Net (UNet2DConditionModel.enable_freeu; SD 1.x: s1=0.9, s2=0.2, b1=1.5, b2=1.6), as
        diffusers' pipelines take it; CUDA graphs are captured and a compiled U-Net compiled anew."""
        self.unet.enable_freeu(s1, s2, b1, b2)
        self._unet_changed()

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()
        self._unet_changed()

    def _unet_changed(self) -> None:
        """After a change to what the U-Net computes that captured graphs or a compiled graph would not see."""
        if self._graphed is not None:
            self._graphed = CUDAGraphModel(self.unet)
        if self._compiled is not None:
            self._forget_compiled()

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm's options for the denoising progress bar of later calls (diffusers' method: `disable=True` silences
        it, as a call's `progress=False` does)."""
        self._progress_bar = dict(kwargs)

    def progress_bar(self, iterable=None, total: int | None = None):
        """A tqdm bar with set_progress_bar_config's options, over `iterable` or of `total` steps (diffusers'
        method, for custom denoising loops)."""
        if iterable is None and total is None:
            raise ValueError("progress_bar needs an iterable or a total: pipe.progress_bar(timesteps) or "
                             "pipe.progress_bar(total=num_inference_steps)")
        return tqdm(iterable, **self._progress_bar) if iterable is not None else tqdm(total=total,
                                                                                      **self._progress_bar)

    numpy_to_pil = staticmethod(numpy_to_pil)  # (diffusers' static method)

    def to(self, device=None, dtype: torch.dtype | None = None):
        """Move and/or cast the models: to(device), to(dtype), to(device, dtype), as diffusers' pipelines take it."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError(f"to({device}, {dtype}): give a device and a dtype, or one of them")
            device, dtype = None, device
        device = None if device is None else usable_device(device)
        if device is not None and self._offload is not None:
            raise ValueError(f"to({str(device)!r}): model CPU offload is on, and it moves each model to "
                             f"{self._offload.device} when it runs: call pipe.remove_all_hooks() first")
        for module in self._models():
            module.to(device=device, dtype=dtype)
        self._embedding_cache.clear()
        if self._graphed is not None:  # captured graphs point at the old tensors; off a GPU they cannot run
            if self.device.type == "cuda":
                self._graphed = CUDAGraphModel(self.unet)
            else:
                self.disable_cuda_graphs()
        self._compiled = None  # its frozen weights are the old ones: compile anew on the next call
        return self

    def enable_cuda_graphs(self, channels_last: bool = True) -> None:
        """Run the U-Net from CUDA graphs (latentdiff.cuda_graphs): each batch size and image size is captured on
        its first call (two warm-up calls and a capture), after which a denoising step is one launch instead of
        ~1,300 kernel launches. Same images as eager (in the same memory format). Needs the pipeline on a CUDA
        device; moving it elsewhere with `.to()` or `disable_cuda_graphs()` frees the graphs.

        `channels_last` first puts the U-Net's weights (hence its activations) in channels-last memory format, which
        cuDNN's fp16/bf16 convolutions work in (NCHW ones are transposed around each convolution) and which the
        fused GroupNorm kernels read directly (models/group_norm.py): 13% less GPU time per step for SD 1.5 at batch
        4 on an H200. Eagerly it does not pay at small batches (more host time per call), but replayed from graphs
        the host time is gone. `disable_cuda_graphs()` returns the weights to the usual format."""
        if self._offload is not None:
            raise ValueError("CUDA graphs need the U-Net to stay on the GPU: call pipe.remove_all_hooks() (model "
                             "CPU offload) and pipe.to('cuda') first")
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the pipeline on a CUDA device, but it is on {self.device}; call "
                             "pipe.to('cuda') first")
        self.disable_cuda_graphs()
        self.disable_compile()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self._graph_channels_last = self.unet
        self._graphed = CUDAGraphModel(self.unet)

    def disable_cuda_graphs(self) -> None:
        self._graphed = None
        if self._graph_channels_last is not None:  # the U-Net enable_cuda_graphs() put in channels-last
            self._graph_channels_last.to(memory_format=torch.contiguous_format)
            self._graph_channels_last = None

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Compute each self-attention's queries, keys and values with one matrix product over concatenated weights
        (in the U-Net and/or the VAE), as diffusers' method of this name does: fewer kernel launches on a GPU, at
        the price of a copy of those weights (SD 1.5's U-Net: 74 MB in fp16). Same images up to float rounding;
        saved files are unchanged. `unfuse_qkv_projections()` undoes it."""
        for model in self._chosen(unet, vae):
            model.fuse_qkv_projections()

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        for model in self._chosen(unet, vae):
            model.unfuse_qkv_projections()

    def _chosen(self, unet: bool, vae: bool) -> list[torch.nn.Module]:
        return [model for model, chosen in ((self.unet, unet), (self.vae, vae)) if chosen]

    def optimize_for_inference(self, winograd: bool = True) -> "LatentDiffusionPipeline":
        """Make CPU inference fast (models/packed.py): the U-Net (UNet2DConditionModel.optimize_for_inference), the
        VAE and the text encoder in eval mode and channels-last, with their linear and conv weights re-laid out once
        for oneDNN, Winograd 3x3 convs where they pay (`winograd=False` saves their extra memory) and the
        upsamplers' convs run on the low-resolution maps; attention, and fp32 linear layers, on CPUs with AMX by our
        kernels (models/amx.py), attention (half precision computed in fp32) and fp32 GEGLUs on AVX2-only CPUs by
        others (models/fma.py). Same images up to float rounding. Afterwards the pipeline cannot compute gradients
        (train), be saved, cast or moved (each refuses with the fix): load it again for that. On CPUs where oneDNN
        has no bfloat16 (AVX2-only), bfloat16 layers are computed in float32 (packed.Float32Compute: twice their
        weight memory; SD 1.5's U-Net ~8x diffusers' bfloat16 forward there); float16 ones too where it has no
        float16 (all CPUs but AVX512-FP16 ones), and a float16 VAE on the CPU that decodes in float32
        (config.force_upcast) becomes float32. Layers not on the CPU, or in other dtypes, stay as they are. After
        compile(), the U-Net is left to torch.compile (which packs its weights itself; a packed U-Net does not
        trace) and only the VAE and the text encoder are packed: tiny-shapes on a 2-core AMX CPU, 0.221 s per image
        compiled, 0.217 with both (the VAE decode 22 -> 17 ms). Returns self."""
        from .models.packed import pack_for_inference

        if self._compile_options is None:
            self.unet.optimize_for_inference(winograd)
        vae = self.vae
        if vae.device.type == "cpu" and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
            vae.float()  # (it decodes in float32 anyway, see _decode; a packed VAE cannot be cast per call)
        for model in (self.vae, self.text_encoder):
            if model is not None:  # (the image variation pipeline has no text encoder)
                pack_for_inference(model, winograd)
        return self

    def compile(self, max_autotune: bool = True, cache_dir: str | os.PathLike | None = None) -> None:
        """Run the U-Net through torch.compile (inductor) for inference: its weights are frozen into the graph
        (constant-folded, convolution and linear weights pre-packed), on the CPU the graph is driven by C++ rather
        than Python, and with `max_autotune` matrix products use kernels picked by timing candidates. The first call
        with a new batch or image size compiles (tiny-shapes on a 2-core CPU: 1-2 minutes); later calls reuse it.
        Same images as eager up to float rounding. Weights changed in place afterwards are not seen (they are
        frozen): call compile() again (which clears torch.compile's caches: other compiled models of the process
        compile again too); LoRA changes, replacing `pipe.unet` and `pipe.to()` recompile by themselves. `pipe.unet`
        stays the plain module (save_pretrained, state_dict unchanged). Turns CUDA graphs off. A U-Net already
        optimized for inference is refused (its re-laid-out layers do not trace): compile() first, then
        optimize_for_inference() packs the rest.

        `cache_dir` (on a CPU): keep the compiled U-Net (and ControlNets) in this folder, as AOTInductor packages
        that later processes load in seconds instead of compiling again (compile_cache: one package per batch and
        image size, keyed by the weights, settings, code, torch version and CPU; SD 1.5's U-Net in float32 takes
        3.45 GB a package, unpacked into the temporary folder while loaded). The folder can be emptied at any time."""
        _require_traceable(self.unet)
        if self._offload is not None:
            raise ValueError("compile() freezes the U-Net's weights where they are, and model CPU offload moves them "
                             "at every call: call pipe.remove_all_hooks() first")
        if cache_dir is not None:
            cache_dir = _cache_folder(cache_dir, self.device)
        self.disable_cuda_graphs()
        self._compile_options = {"max_autotune": max_autotune}
        self._compile_cache = cache_dir
        self._forget_compiled()

    def _forget_compiled(self) -> None:
        """Compile the U-Net anew on the next call, for weights changed in place. A new torch.compile of the same
        module would find the old graph in dynamo's cache (kept with the forward's code, guarded on shapes and
        dtypes, not on values) and run its frozen weights: the caches go too (torch.compiler.reset(); any other
        compiled model of this process compiles again on its next call). So do the text's projections kept for
        the compiled calls (attention.TextProjections: kept while the context and weights look unchanged, which a
        weight written through `.data` does not show)."""
        if "torch._dynamo" in sys.modules:  # (else nothing was compiled, and importing it costs ~2 s)
            torch.compiler.reset()
        self._compiled = None
        for component in list(vars(self).values()):
            if isinstance(component, torch.nn.Module):
                TextProjections.forget(component)

    def disable_compile(self) -> None:
        self._compile_options = self._compiled = self._compile_cache = None

    def _compiled_call(self, model: torch.nn.Module) -> Callable:
        """`model` as compile() has it run: through torch.compile, or, with a cache_dir, from the packages kept
        there (compile_cache.CachedCompiledModel, which falls back on torch.compile for calls it cannot keep)."""
        if self._compile_cache is None:
            return torch.compile(model)
        from .compile_cache import CachedCompiledModel

        options = dict(self._compile_options)
        return CachedCompiledModel(model, self._compile_cache, lambda: inductor_settings(self.device, **options),
                                   lambda: CompiledCall(torch.compile(model), self), self, options)

    def _looped(self, compiled: Callable) -> Callable:
        """A compiled model as a denoising loop calls it: torch.compile's wrapped in CompiledCall (which projects
        the text outside its graph and skips guards within the loop); a CachedCompiledModel does both itself."""
        return compiled if self._compile_cache is not None else CompiledCall(compiled, self)

    def _unet_call(self):
        """The U-Net as denoising calls it: compiled, or replayed from CUDA graphs, when that is enabled."""
        if self._compile_options is not None:
            if self._compiled is None or self._compiled[0] is not self.unet:  # new, or the U-Net was replaced
                _require_traceable(self.unet)
                self._compiled = (self.unet, self._compiled_call(self.unet))
            return self._looped(self._compiled[1])
        if self._graphed is None:
            return self.unet
        if self._graphed.model is not self.unet:  # the U-Net was replaced since: capture anew
            self._graphed = CUDAGraphModel(self.unet)
        return self._graphed

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, torch_dtype: torch.dtype | str | dict | None = None,
                        variant: str | None = None, **components):
        """The pipeline of a folder in the diffusers layout. As in diffusers, a component given by name (`unet=`,
        `scheduler=`, ...) is used instead of the folder's, which is then not loaded; `safety_checker=None`,
        `feature_extractor=None`, `image_encoder=None` and `requires_safety_checker=False` are accepted (latentdiff
        has none of those), and so are diffusers' loading options that hold here anyway: `use_safetensors` (not
        False: only safetensors load), `local_files_only` (a folder is always local) and `low_cpu_mem_usage`
        (weights are loaded once, never beside a randomly initialised copy). torch_dtype: one dtype for every
        model, a dict by component ({"unet": torch.float16, "default": torch.float32}), or "auto"/None (the files'
        own dtypes), as diffusers takes it."""
        from .layout import load_pipeline_folder

        if components.pop("use_safetensors", None) is False:
            raise ValueError("use_safetensors=False: latentdiff loads safetensors only (pickled weights can run "
                             "code); convert .bin/.ckpt files to .safetensors first, or leave use_safetensors out")
        components.pop("local_files_only", None)
        components.pop("low_cpu_mem_usage", None)
        optional = cls._optional(components)
        components = cls._given(components, "from_pretrained")
        extras = ("controlnet", "adapter", "low_res_scheduler", "image_encoder", "feature_extractor")
        loaded = load_pipeline_folder(folder, torch_dtype=torch_dtype, variant=variant, skip=components,
                                      extras=[n for n in extras if n in cls.component_names],
                                      text="text_encoder" in cls.component_names)
        return cls(**loaded, **components)._with({**optional, "name_or_path": folder})

    @classmethod
    def from_pipe(cls, pipe: LatentDiffusionPipeline, **components) -> LatentDiffusionPipeline:
        """This class of pipeline over `pipe`'s components (the same modules, no copy), as diffusers' from_pipe:
        `LatentDiffusionImg2ImgPipeline.from_pipe(pipe)`; components given by name replace `pipe`'s. A compiled
        pipeline's compile() settings come along (as a torch.compile'd component would in diffusers): the new
        pipeline compiles its U-Net on its first call (dynamo finds the graphs of the same module again; with a
        cache_dir, the packages are loaded from it)."""
        if pipe._offload is not None:
            raise ValueError("from_pipe: the pipeline has model CPU offload on, whose hooks belong to it: call "
                             "pipe.remove_all_hooks() first, then enable_model_cpu_offload() on the new pipeline")
        shared = {name: c for name, c in pipe.components.items() if name in (*cls.component_names, *cls.config_names)}
        optional = {name: getattr(pipe, name) for name in ("image_encoder", "feature_extractor")
                    if name not in cls.component_names}
        optional.update(cls._optional(components), name_or_path=pipe.name_or_path)
        made = cls(**{**shared, **cls._given(components, "from_pipe")})._with(optional)
        if pipe._compile_options is not None:
            made._compile_options, made._compile_cache = dict(pipe._compile_options), pipe._compile_cache
        return made

    @classmethod
    def _optional(cls, components: dict) -> dict:
        """Pops an IP-Adapter's image encoder and its image processor from a from_* call's components (diffusers
        takes them so): set on the pipeline after it is built (_with). (The image variation pipeline's are
        components of its own.)"""
        return {name: components.pop(name) for name in ("image_encoder", "feature_extractor")
                if components.get(name) is not None and name not in cls.component_names}

    def _with(self, optional: dict):
        for name, value in optional.items():
            setattr(self, name, value)
        return self

    @classmethod
    def _given(cls, components: dict, method: str) -> dict:
        """The components of a from_* call, less diffusers' safety-checker arguments (accepted when empty)."""
        for name in ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker"):
            if name not in cls.component_names and components.pop(name, None):
                raise ValueError(f"latentdiff has no {name.removeprefix('requires_')}: pass {name}="
                                 f"{False if name.startswith('requires') else None} or leave it out")
        unknown = sorted(set(components) - {*cls.component_names, *cls.config_names})
        if unknown:
            raise TypeError(f"{method}: unexpected arguments {unknown}; components that can be given: "
                            f"{[*cls.component_names, *cls.config_names]}")
        return components

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: str | os.PathLike | None = None,
                         torch_dtype: torch.dtype | str | dict | None = None, prefer_ema: bool = False,
                         prediction_type: str | None = None, **components):
        """The pipeline of a Stable Diffusion 1.x or 2.x single-file checkpoint; components given by name
        (`controlnet=` for the ControlNet pipelines, `scheduler=`, ...) are used instead of the file's, as in
        diffusers. SD 2.x files are taken as 768 px v-prediction models unless `prediction_type="epsilon"` (the
        512 px base models) or `config=` says otherwise: see layout.load_single_file."""
        from .layout import load_single_file

        optional = cls._optional(components)
        components = cls._given(components, "from_single_file")
        parts = {**load_single_file(path, config=config, torch_dtype=torch_dtype, prefer_ema=prefer_ema,
                                    prediction_type=prediction_type), **components}
        missing = [name for name in cls.component_names if name not in parts]
        if missing:
            example = {"adapter": "T2IAdapter.from_pretrained(folder)",
                       "low_res_scheduler": "DDPMScheduler.from_pretrained(folder, subfolder='low_res_scheduler')"
                       }.get(missing[0], "ControlNetModel.from_pretrained(folder)")
            raise ValueError(f"{cls.__name__}.from_single_file: a single file holds no {', '.join(missing)}: pass it, "
                             f"e.g. {missing[0]}={example}")
        return cls(**parts)._with({**optional, "name_or_path": path})

    def save_pretrained(self, folder: str | os.PathLike, variant: str | None = None,
                        safe_serialization: bool = True) -> None:
        """The diffusers folder layout, which diffusers' StableDiffusionPipeline.from_pretrained loads too;
        `variant`: the weights under diffusers' names for it (diffusion_pytorch_model.fp16.safetensors, ...)."""
        from .layout import save_pipeline_folder

        if not safe_serialization:
            raise ValueError("latentdiff writes weights only as safetensors (safe_serialization=False would be "
                             "pickle): leave it True")
        save_pipeline_folder(self.components, folder, variant=variant)

    # ---- text -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str] | None, device=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True, negative_prompt: str | list[str] | None = None,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      lora_scale: float | None = None, clip_skip: int | None = None):
        """diffusers' method: (prompt_embeds, negative_prompt_embeds) for `prompt` and `negative_prompt` (the empty
        prompt by default; None without guidance), each repeated num_images_per_prompt times, on `device` (default:
        the pipeline's), to pass to a later call as prompt_embeds= and negative_prompt_embeds=."""
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be at least 1")
        with model_lora_scaled(self.text_encoder, lora_scale):  # the text encoder's LoRA layers, lora_scale times
            cond, uncond = self._contexts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                          num_images_per_prompt, do_classifier_free_guidance, clip_skip)
        device = self.device if device is None else device
        return cond.to(device), None if uncond is None else uncond.to(device)

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """[B, 77, D] context for `prompts`. Repeated prompts (the empty negative prompt above all) are cached."""
        from .models.text import encode_prompt_ids

        # the cache holds for these weights only: swapping the encoder, replacing a weight tensor (its address) or
        # changing one in place (its version counter: load_state_dict, an optimizer step) empties it; weights made
        # under torch.inference_mode keep no version counter, so nothing is cached for them
        versions = tensors_key(self.text_encoder.parameters())
        weights = None if versions is None else (id(self.text_encoder), versions)
        if weights is None or weights != self._embedding_weights:
            self._embedding_cache.clear()
            self._embedding_weights = weights
        cache = {} if weights is None else self._embedding_cache  # (uncheckable weights: this call's prompts only)
        # (held here too: making room in the cache below may drop ones this call uses)
        found = {prompt: cache[(prompt, clip_skip)] for prompt in prompts if (prompt, clip_skip) in cache}
        new = list(dict.fromkeys(prompt for prompt in prompts if prompt not in found))
        if new:  # one batch through the text encoder (a prompt and its negative: one call, not two)
            ids = torch.cat([self.tokenizer(self.maybe_convert_prompt(prompt)) for prompt in new])
            embedded = encode_prompt_ids(self.text_encoder, ids.to(self.text_encoder.device), clip_skip)
            for prompt, embedding in zip(new, embedded):
                cache[(prompt, clip_skip)] = found[prompt] = embedding
            while len(cache) > 256:
                cache.pop(next(iter(cache)))
        return torch.stack([found[prompt] for prompt in prompts]).to(self.dtype)

    # ---- checks -----------------------------------------------------------------------------------------------
    def _inpainting_unet(self) -> bool:
        """Whether the U-Net is an inpainting one (latents, mask and masked-image latents in: 2 x the VAE's latent
        channels + 1) rather than a plain one (the latent channels); another count is an error."""
        channels, latent = self.unet.config.in_channels, self.vae.config.latent_channels
        if channels not in (latent, 2 * latent + 1):
            raise ValueError(f"the U-Net takes {channels} input channels but the VAE makes {latent}-channel latents: "
                             f"a plain U-Net takes {latent}, an inpainting one {2 * latent + 1} (latents, mask, "
                             f"masked-image latents), an InstructPix2Pix one {2 * latent} (latents, image latents: "
                             f"LatentDiffusionInstructPix2PixPipeline), a depth model {latent + 1} (latents, depth "
                             f"map: LatentDiffusionDepth2ImgPipeline), the x4 upscaler {latent + 3} (latents, small "
                             "image: LatentDiffusionUpscalePipeline)")
        return channels != latent

    def _require_plain_unet(self) -> None:
        if self._inpainting_unet():
            raise ValueError(f"the U-Net takes {self.unet.config.in_channels} input channels: an inpainting U-Net, "
                             "which runs in LatentDiffusionInpaintPipeline (image, mask_image)")

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default, width or default
        multiple = max(8, self.vae_scale_factor)  # latents of whole pixels, as Stable Diffusion requires
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be a whole number of pixels (an int, a multiple of "
                                f"{multiple})")
            if value <= 0 or value % multiple:
                raise ValueError(f"{name}={value} must be a positive multiple of {multiple} (the VAE works on "
                                 f"{self.vae_scale_factor}x{self.vae_scale_factor} pixel blocks); try "
                                 f"{max(multiple, round(value / multiple) * multiple)}")
        return int(height), int(width)

    def _size_for_image(self, image_height: int, image_width: int, height: int | None,
                        width: int | None) -> tuple[int, int]:
        """A call's (height, width) for a control image of that size: as given, else the image's rounded down to a
        multiple of 8 (as _check_size wants; diffusers rounds to the VAE's scale, 8 for SD), checked."""
        multiple = max(8, self.vae_scale_factor)
        height = height or image_height - image_height % multiple
        width = width or image_width - image_width % multiple
        return self._check_size(height, width)

    @staticmethod
    def _negatives(negative_prompt, batch: int) -> list[str]:
        """The negative prompts of a batch of `batch` prompts: the empty one for each by default."""
        negatives = [""] * batch if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and batch > 1:
            negatives = negatives * batch
        if len(negatives) != batch:
            raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {batch}: "
                             "give one negative prompt, or one per prompt")
        return negatives

    def _contexts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, n_per_prompt, guided,
                  clip_skip):
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass a prompt (or prompt_embeds)")
            prompts = _as_list(prompt, "prompt")
            negatives = (self._negatives(negative_prompt, len(prompts))
                         if guided and negative_prompt_embeds is None else [])
            both = self.embed_prompts(prompts + negatives, clip_skip)  # (one pass through the text encoder)
            cond, uncond = both[:len(prompts)], (both[len(prompts):] if negatives else None)
        else:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            width = self.unet.config.cross_attention_dim
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != width:
                raise ValueError(f"prompt_embeds of shape {tuple(prompt_embeds.shape)}: the U-Net attends to "
                                 f"[batch, tokens, {width}] (the text encoder's hidden states, as encode_prompt "
                                 "gives them)")
            cond = prompt_embeds.to(self.device, self.dtype)
            uncond = None
        batch = cond.shape[0]
        if guided:
            if negative_prompt_embeds is not None:
                uncond = negative_prompt_embeds.to(self.device, self.dtype)
            elif uncond is None:  # (prompt_embeds given)
                uncond = self.embed_prompts(self._negatives(negative_prompt, batch), clip_skip)
            if uncond.shape != cond.shape:
                raise ValueError(f"negative prompt embeddings {tuple(uncond.shape)} do not match the prompt "
                                 f"embeddings {tuple(cond.shape)}")
            uncond = uncond.repeat_interleave(n_per_prompt, dim=0)
        return cond.repeat_interleave(n_per_prompt, dim=0), uncond

    # ---- generation -------------------------------------------------------------------------------------------
    def _set_grid(self, num_inference_steps: int, timesteps: list | None, sigmas: list | None,
                  options: dict | None = None) -> int:
        """The scheduler's grid for a call: num_inference_steps spaced by its config, or the timesteps / sigmas
        given in full; `options`: further arguments of its set_timesteps. Returns the number of steps."""
        options = options or {}
        if timesteps is None and sigmas is None:
            self.scheduler.set_timesteps(num_inference_steps, device=self.device, **options)
        else:
            self.scheduler.set_timesteps(device=self.device, timesteps=timesteps, sigmas=sigmas, **options)
        return self.scheduler.num_inference_steps

    def prepare_latents(self, batch_size: int, num_channels_latents: int, height: int, width: int,
                        dtype: torch.dtype, device: torch.device | str, generator: Generators,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """diffusers' method, for custom loops: starting latents for batch_size images of height x width pixels,
        drawn as diffusers draws them (one row per generator of a list) or the given ones, on `device` in `dtype`
        (given ones keep theirs, as in diffusers), times the scheduler's starting scale."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn(shape, generator, device, dtype) if latents is None else latents.to(device)
        return latents * self.scheduler.init_noise_sigma

    def _starting_noise(self, latents: torch.Tensor | None, channels: int, n: int, height: int, width: int,
                        generators) -> torch.Tensor:
        """A text-to-image call's starting latents for n images: the given ones (checked) or drawn from each image's
        generator, at the scheduler's starting scale."""
        shape = (n, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for {n} images of "
                                 f"{height}x{width}")
            if not torch.isfinite(latents).all():
                raise ValueError("latents contain NaN or infinite values: pass finite starting noise (or leave "
                                 "latents None to draw it from the generator)")
            latents = latents.to(self.device, self.dtype)
        return self.prepare_latents(n, channels, height, width, self.dtype, self.device, generators, latents)

    def denoise(self, latents, timesteps, cond, uncond, guidance_scale, generators, eta, callback, progress,
                guidance_rescale: float = 0.0, conditioning: torch.Tensor | None = None,
                after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        """The guided sampling loop. `conditioning`: channels appended to the U-Net's input at every step (an
        inpainting U-Net's mask and masked-image latents); `after_step(i, latents)`: replaces the latents after
        step i (inpainting with a plain U-Net puts the known region back); `unet(x, t, context)`: the U-Net call
        of each step (one per timestep), instead of the U-Net's own (compiled or from CUDA graphs where enabled)."""
        scheduler = self.scheduler
        _warn_if_slow_on_this_cpu(self.unet)
        share = getattr(self.unet, "accepts_shared_samples", False)  # ours, also under torch.compile
        unet = self._unet_call() if unet is None else unet
        model = self._guidance(unet, cond, uncond, guidance_scale, guidance_rescale, share)
        step_kwargs = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
        # the scheduler looks each timestep up by value: read them all to the host once here, since reading a GPU
        # tensor's value in every step would make the host wait for the GPU each time (a sync per step, which
        # leaves the GPU idle while the next step's launches are issued); the U-Net gets the device tensor
        values = timesteps.tolist()
        # what diffusers' callbacks read and set: pipe.num_timesteps, pipe._guidance_scale (a new value takes effect
        # from the next step; <= 1 drops the unconditional pass), pipe._interrupt = True (stop, then decode)
        self._num_timesteps, self._guidance_scale, self._interrupt = len(timesteps), float(guidance_scale), False
        with self._compiling(), contextlib.ExitStack() as caches:
            # (compiled networks neither read nor fill these caches, and finding their layers walks every module)
            for network in self._denoisers() if self._compile_options is None else ():
                caches.enter_context(cache_text_keys(network))
                caches.enter_context(cache_timesteps(network, timesteps))
            caches.enter_context(self._loop_calls())
            bar = {"desc": "denoising", **self._progress_bar}
            bar["disable"] = bar.get("disable", False) or not progress
            for i, (t, value) in enumerate(zip(tqdm(timesteps, **bar), values)):
                x = scheduler.scale_model_input(latents, value)
                eps = model(x if conditioning is None else torch.cat([x, conditioning], dim=1), t)
                latents = scheduler.step(eps, value, latents, generator=generators, **step_kwargs).prev_sample
                if after_step is not None:
                    latents = after_step(i, latents)
                if callback is not None:
                    result = callback(self, i, t, {"latents": latents})
                    self._seen_calls.clear()  # (it may have changed what the compiled calls' guards check)
                    if result is not None and not isinstance(result, dict):
                        raise TypeError(f"callback_on_step_end returned {type(result).__name__!r}: return the "
                                        "dict it was given (its 'latents' may be replaced), or None")
                    result = result or {}
                    latents = result.get("latents", latents)
                    model.scale = self._checked_guidance(self._guidance_scale)
                    if result.get("stop") or self._interrupt:
                        break
        return latents

    @contextlib.contextmanager
    def _loop_calls(self):
        """A denoising loop, for CompiledCall: the layouts of its compiled calls are recorded meanwhile."""
        self._seen_calls = set()
        try:
            yield
        finally:
            self._seen_calls = None

    def _guidance(self, unet, cond, uncond, guidance_scale, guidance_rescale, share) -> ClassifierFreeGuidance:
        """The guided model a denoising loop calls (the PAG pipeline's adds perturbed-attention guidance)."""
        return ClassifierFreeGuidance(unet, cond, uncond, guidance_scale, guidance_rescale, share)

    def _step_unet(self, control: Callable | None, n: int, steps: int, ip_image, ip_embeds, guidance_scale: float,
                   cross_attention_kwargs: dict | None = None):
        """The U-Net call of each denoising step, for denoise(unet=): the U-Net's own (None), or with an LCM's
        guidance embedding, the IP-Adapters' image embeddings (ip_adapter_image / _embeds, and cross_attention_kwargs'
        ip_adapter_masks) and the ControlNets' residuals (control)."""
        embeds = self._ip_embeds(ip_image, ip_embeds, n, self._guided(guidance_scale))
        masks = (cross_attention_kwargs or {}).get("ip_adapter_masks")
        if masks is not None and embeds is None:
            raise ValueError("ip_adapter_masks given, but no IP-Adapter image: load_ip_adapter(...) and pass "
                             "ip_adapter_image")
        unet = self._unet_call()
        wrapped = embeds is not None or self._guidance_embedded
        if wrapped and isinstance(unet, CUDAGraphModel):
            raise ValueError(f"CUDA graphs take no {'IP-Adapter image' if embeds is not None else 'guidance embedding'}"
                             " (timestep_cond): disable_cuda_graphs() first")
        if self._guidance_embedded:
            unet = functools.partial(unet, timestep_cond=self._guidance_condition(guidance_scale, n))
        if embeds is not None:
            unet = WithImageEmbeds(unet, embeds, n, masks)
        if control is not None:
            return control(unet, n, steps)
        return unet if wrapped else None

    @property
    def _guidance_embedded(self) -> bool:
        """Whether the U-Net takes the guidance scale as an input (LCM-distilled: its config's time_cond_proj_dim):
        it then runs once per step, unguided, as in diffusers' pipelines."""
        return getattr(self.unet.config, "time_cond_proj_dim", None) is not None

    def _guided(self, guidance_scale: float) -> bool:
        """Whether a call runs the unconditional pass too (classifier-free guidance)."""
        return guidance_scale > 1.0 and not self._guidance_embedded

    def _guidance_condition(self, guidance_scale: float, n: int) -> torch.Tensor:
        """An LCM U-Net's timestep_cond for n images: the embedding of w = guidance_scale - 1 (diffusers' w)."""
        w = torch.tensor(float(guidance_scale) - 1).repeat(n)
        return guidance_embedding(w, self.unet.config.time_cond_proj_dim).to(self.device, self.dtype)

    @staticmethod
    def _checked_guidance(scale) -> float:
        if isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale):
            return float(scale)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1 and bool(torch.isfinite(scale)):
            return float(scale)
        raise ValueError(f"guidance_scale={scale!r} must be a finite number")

    # diffusers' read-only views of the running call, for callbacks
    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guided(self._guidance_scale)

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _compiling(self):
        """compile()'s inductor settings, for the calls that may compile (with a cache_dir, CachedCompiledModel
        enters them itself where it compiles: a process that only loads packages never imports inductor)."""
        if self._compile_options is None or self._compile_cache is not None:
            return contextlib.nullcontext()
        return inductor_settings(self.device, **self._compile_options)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """The latents as images of `output_type` (the last stage of a call: with model CPU offload, every model
        is back in CPU memory afterwards)."""
        try:
            return self._decode(latents, output_type)
        finally:
            if self._offload is not None:
                self._offload.unload()

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        vae = self.vae
        z = latents / vae.config.scaling_factor
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", True):
            # fp16 overflows in the SD VAE decoder's last blocks (black images); decode in fp32 instead.
            vae.float()
            try:
                images = vae.decode(z.float())
            finally:
                vae.half()
        else:
            images = vae.decode(z.to(vae.dtype))
        return to_images(images, output_type)

    @staticmethod
    def _check_call(output_type: str, guidance_scale: float, callback: Callable | None,
                    tensor_inputs: list[str] | None, cross_attention_kwargs: dict | None = None) -> None:
        """The arguments of a call that nothing else checks before the denoising loop starts."""
        lora_call_scale(cross_attention_kwargs)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}: choose 'pil', 'np', 'pt' or 'latent'")
        LatentDiffusionPipeline._checked_guidance(guidance_scale)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback_on_step_end must be a function callback(pipe, step, timestep, tensors) or "
                            f"None; got {type(callback).__name__}")
        if tensor_inputs is not None and set(tensor_inputs) - {"latents"}:
            raise ValueError(f"callback_on_step_end_tensor_inputs={list(tensor_inputs)}: the callback is given (and "
                             "may replace) only 'latents' (to end guidance part-way, set pipe._guidance_scale = 0 "
                             "in it: the unconditional pass then stops, no prompt_embeds to split)")

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
        height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
        guidance_scale: float = 7.5, num_images_per_prompt: int = 1, eta: float = 0.0,
        generator: Generators = None, latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil", return_dict: bool = True, clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None, progress: bool = True, guidance_rescale: float = 0.0,
        callback_on_step_end_tensor_inputs: list[str] | None = None, timesteps: list[int] | None = None,
        sigmas: list[float] | None = None, cross_attention_kwargs: dict | None = None, ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ):
        """`timesteps` / `sigmas`: the grid in full instead of num_inference_steps, for the schedulers that take one
        (as in diffusers: Euler both, DPM-Solver++ timesteps), e.g. an "Align Your Steps" schedule.
        `ip_adapter_image` (a PIL image) or `ip_adapter_image_embeds`: the image prompt of a loaded IP-Adapter."""
        return self._text_to_image(
            prompt, negative_prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt, eta,
            generator, latents, prompt_embeds, negative_prompt_embeds, output_type, return_dict, clip_skip,
            callback_on_step_end, progress, guidance_rescale, callback_on_step_end_tensor_inputs, timesteps, sigmas,
            cross_attention_kwargs, ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)

    def _text_to_image(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                       num_images_per_prompt, eta, generator, latents, prompt_embeds, negative_prompt_embeds,
                       output_type, return_dict, clip_skip, callback_on_step_end, progress, guidance_rescale,
                       callback_on_step_end_tensor_inputs, timesteps, sigmas, cross_attention_kwargs,
                       control: Callable | None = None, ip_adapter_image=None, ip_adapter_image_embeds=None,
                       grid_options: dict | None = None):
        """The text-to-image call; `control(unet, n, steps)`, where given, returns the U-Net call that the denoising
        loop makes for n images over `steps` timesteps (the ControlNet pipelines'), once the scheduler's grid is
        set; `grid_options`: further arguments of the scheduler's set_timesteps."""
        self._check_call(output_type, guidance_scale, callback_on_step_end, callback_on_step_end_tensor_inputs,
                         cross_attention_kwargs)
        self._require_plain_unet()
        with self._lora_scaled(lora_call_scale(cross_attention_kwargs)):
            height, width = self._check_size(height, width)
            if num_images_per_prompt < 1:
                raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be at least 1")
            guided = self._guided(guidance_scale)
            cond, uncond = self._contexts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                          num_images_per_prompt, guided, clip_skip)
            n = cond.shape[0]
            generators = _per_image_generators(generator, n)
            self._set_grid(num_inference_steps, timesteps, sigmas, grid_options)
            latents = self._starting_noise(latents, self.unet.config.in_channels, n, height, width, generators)
            unet = self._step_unet(control, n, len(self.scheduler.timesteps), ip_adapter_image,
                                   ip_adapter_image_embeds, guidance_scale, cross_attention_kwargs)
            latents = self.denoise(latents, self.scheduler.timesteps, cond, uncond, guidance_scale, generators, eta,
                                   callback_on_step_end, progress, guidance_rescale, unet=unet)
            images = self.decode(latents, output_type)
            return PipelineOutput(images) if return_dict else (images,)


class LatentDiffusionImg2ImgPipeline(LatentDiffusionPipeline):
    """SDEdit (Meng et al. 2022): encode an image, noise it to the timestep that `strength` selects, denoise from
    there. strength 1 ignores the image's content; strength 0 returns it (re-encoded) unchanged."""

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, image=None, strength: float = 0.8,
        negative_prompt: str | list[str] | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1, eta: float = 0.0, generator: Generators = None,
        prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil", return_dict: bool = True, clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None, progress: bool = True,
        callback_on_step_end_tensor_inputs: list[str] | None = None, cross_attention_kwargs: dict | None = None,
        timesteps: list[int] | None = None, sigmas: list[float] | None = None, ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ):
        """`timesteps` / `sigmas`: as in the text-to-image call; `strength` then selects from that grid."""
        return self._img2img(prompt, image, strength, negative_prompt, num_inference_steps, guidance_scale,
                             num_images_per_prompt, eta, generator, prompt_embeds, negative_prompt_embeds,
                             output_type, return_dict, clip_skip, callback_on_step_end, progress,
                             callback_on_step_end_tensor_inputs, cross_attention_kwargs, timesteps, sigmas,
                             ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)

    def _img2img(self, prompt, image, strength, negative_prompt, num_inference_steps, guidance_scale,
                 num_images_per_prompt, eta, generator, prompt_embeds, negative_prompt_embeds, output_type,
                 return_dict, clip_skip, callback_on_step_end, progress, callback_on_step_end_tensor_inputs,
                 cross_attention_kwargs, timesteps, sigmas, control: Callable | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, grid_options: dict | None = None):
        """The img2img call; `control(unet, n, steps)`, `grid_options`: see _text_to_image."""
        self._check_call(output_type, guidance_scale, callback_on_step_end, callback_on_step_end_tensor_inputs,
                         cross_attention_kwargs)
        self._require_plain_unet()
        with self._lora_scaled(lora_call_scale(cross_attention_kwargs)):
            pixels, cond, uncond, generators, timesteps = self._image_call(
                "img2img", image, strength, generator, prompt, negative_prompt, prompt_embeds,
                negative_prompt_embeds, num_images_per_prompt, guidance_scale, clip_skip, num_inference_steps,
                timesteps, sigmas, grid_options)
            latents = self._noised_latents(pixels, generators, timesteps)
            unet = self._step_unet(control, latents.shape[0], len(timesteps), ip_adapter_image,
                                   ip_adapter_image_embeds, guidance_scale, cross_attention_kwargs)
            latents = self.denoise(latents, timesteps, cond, uncond, guidance_scale, generators, eta,
                                   callback_on_step_end, progress, unet=unet)
            images = self.decode(latents, output_type)
            return PipelineOutput(images) if return_dict else (images,)

    @staticmethod
    def _per_image(pixels: torch.Tensor, n: int, num_images_per_prompt: int) -> torch.Tensor:
        """Input images (one, or one per prompt, or one per image) as one per image made (n)."""
        if pixels.shape[0] not in (1, n // num_images_per_prompt, n):
            raise ValueError(f"got {pixels.shape[0]} images for {n // num_images_per_prompt} prompts: give one, or one "
                             "per prompt")
        return pixels.repeat_interleave(n // pixels.shape[0], dim=0)

    def _image_call(self, task: str, image, strength, generator, prompt, negative_prompt, prompt_embeds,
                    negative_prompt_embeds, num_images_per_prompt, guidance_scale, clip_skip, num_inference_steps,
                    timesteps, sigmas, grid_options: dict | None = None):
        """What an image-conditioned call starts from: the pixels (one per image made), the contexts, a generator
        per image, and the timesteps that `strength` keeps of the grid (the scheduler set to start there); a grid
        that the scheduler made for the strength itself (grid_options' "strength": LCM img2img's) is kept whole."""
        if not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength!r} must lie in [0, 1]")
        if image is None:
            raise ValueError(f"{task} needs an image (a PIL image, a [B, 3, H, W] tensor in [0, 1], or a list of "
                             "them)")
        if task == "img2img" and self._are_latents(image):
            # latents (scaled, as output_type="latent" gives them) instead of pixels, as diffusers' img2img takes
            # them: e.g. a text-to-image call's latents, upscaled, refined at a larger size ("hires fix")
            if not torch.isfinite(image).all():
                raise ValueError("the image latents contain NaN or infinite values")
            pixels = image
            self._check_size(*(side * self.vae_scale_factor for side in image.shape[-2:]))
        else:
            pixels = self.preprocess(image)
            self._check_size(*pixels.shape[-2:])
        cond, uncond = self._contexts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                      num_images_per_prompt, self._guided(guidance_scale), clip_skip)
        n = cond.shape[0]
        pixels = self._per_image(pixels, n, num_images_per_prompt)
        generators = _per_image_generators(generator, n)
        steps = self._set_grid(num_inference_steps, timesteps, sigmas, grid_options)
        kept = steps if "strength" in (grid_options or {}) else min(int(steps * strength), steps)
        start = self.scheduler.start_index(steps - kept)
        self.scheduler.set_begin_index(start)
        return pixels, cond, uncond, generators, self.scheduler.timesteps[start:]

    def _are_latents(self, image) -> bool:
        """Whether an img2img image is latents ([B, the VAE's latent channels, h, w]; never for a VAE with 3 latent
        channels, where they could not be told from pixels) rather than pixels."""
        latent = self.vae.config.latent_channels
        return isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == latent != 3

    def _noised_latents(self, pixels: torch.Tensor, generators, timesteps: torch.Tensor) -> torch.Tensor:
        """Where img2img starts: the pixels' latents (or the latents given instead of pixels) noised to the first of
        `timesteps` with each image's generator (the latents themselves where no step is left: strength 0)."""
        latents = self._are_latents(pixels)  # (given instead of pixels: see _image_call)
        z0 = pixels.to(self.device, self.dtype) if latents else self._encode_sample(pixels, generators)
        if len(timesteps) == 0:
            return z0
        noise = randn(tuple(z0.shape), generators, self.device, self.dtype)
        return self.scheduler.add_noise(z0, noise, timesteps[:1].repeat(z0.shape[0]))

    def _encode_sample(self, pixels: torch.Tensor, generators) -> torch.Tensor:
        """Scaled latents of the pixels: a posterior sample drawn with each image's own generator, mean + std * noise
        (diffusers' retrieve_latents in "sample" mode; AutoencoderTiny's point mass draws nothing, as diffusers')."""
        vae = self.vae
        posterior = vae.encode(pixels.to(self.device, vae.dtype))
        return (posterior.sample(generators) * vae.config.scaling_factor).to(self.dtype)

    def preprocess(self, image) -> torch.Tensor:
        """Input images as one [B, 3, H, W] tensor in [-1, 1], from what diffusers' pipelines take: PIL images (one
        or a list); tensors [B, 3, H, W] or [3, H, W] and numpy arrays [B, H, W, 3] or [H, W, 3] (one or a list)
        in [0, 1], or in [-1, 1] where they hold a negative value (diffusers' rule); uint8 arrays as 8-bit pixels."""
        from PIL import Image

        images = list(image) if isinstance(image, (list, tuple)) else [image]
        kinds = {Image.Image: "PIL", np.ndarray: "array", torch.Tensor: "tensor"}
        kind = next((name for cls, name in kinds.items() if images and all(isinstance(i, cls) for i in images)), None)
        if kind is None:
            raise TypeError(f"image must be a PIL image, a tensor [B, 3, H, W] or a numpy array [B, H, W, 3] in [0, 1] "
                            f"(or a list of one of them); got {type(image).__name__}"
                            f"{' (empty)' if isinstance(image, (list, tuple)) and not images else ''}")
        sizes = [i.size if kind == "PIL" else tuple(i.shape[-2:] if kind == "tensor" else i.shape[-3:-1])
                 for i in images]
        if len(set(sizes)) > 1:
            raise ValueError(f"the images of one call must share one size; got {sizes} "
                             f"({'width, height' if kind == 'PIL' else 'height, width'}): resize them first")
        if kind == "PIL":
            arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        batches = [i if i.ndim == 4 else i[None] for i in images]
        if kind == "array":
            if any(a.ndim != 4 or a.shape[-1] != 3 for a in batches):
                raise ValueError(f"an image array must be [B, H, W, 3] or [H, W, 3] (RGB, channels last); got shape "
                                 f"{images[0].shape}")
            array = np.concatenate(batches)
            if array.dtype == np.uint8:
                array = array / 255.0
            elif not np.issubdtype(array.dtype, np.floating):
                raise TypeError(f"an image array must hold floats in [0, 1] or uint8 pixels; got {array.dtype}")
            pixels = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)
        else:
            if any(t.dim() != 4 or t.shape[1] != 3 for t in batches):
                raise ValueError(f"an image tensor must be [B, 3, H, W] or [3, H, W] (RGB); got shape "
                                 f"{tuple(images[0].shape)}")
            pixels = torch.cat(batches)
        low, high = pixels.aminmax()
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise ValueError(f"the image {kind} contains NaN or infinite values")
        if low < -1.001 or high > 1.001:
            raise ValueError(f"image {kind} values span [{low.item():.4g}, {high.item():.4g}]; expected [0, 1] (8-bit "
                             "pixels / 255), or [-1, 1]")
        return pixels if low < 0 else pixels * 2 - 1  # (no negative value: [0, 1], as diffusers reads it)


class LatentDiffusionInpaintPipeline(LatentDiffusionImg2ImgPipeline):
    """Inpainting: the image is kept where `mask_image` is black (0) and drawn anew where it is white (1), as
    diffusers' StableDiffusionInpaintPipeline does it. With an inpainting U-Net (in_channels 9, e.g. SD 1.5
    inpainting) the mask and the latents of the image with the masked part blanked are appended to the U-Net's
    input at every step; with a plain U-Net (4), after every step the known region is replaced by the image's
    latents noised to the next step's level. `strength` < 1 starts from the noised image instead of pure noise."""

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, image=None, mask_image=None, strength: float = 1.0,
        negative_prompt: str | list[str] | None = None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1, eta: float = 0.0, generator: Generators = None,
        latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
        clip_skip: int | None = None, callback_on_step_end: Callable | None = None, progress: bool = True,
        callback_on_step_end_tensor_inputs: list[str] | None = None, cross_attention_kwargs: dict | None = None,
        timesteps: list[int] | None = None, sigmas: list[float] | None = None, ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ):
        """mask_image: a PIL image (grey levels; >= 0.5 after /255 is repainted), or a tensor [B, 1, H, W] / [H, W]
        in [0, 1], of the image's size. `latents`: the starting noise (strength 1 only)."""
        return self._inpaint(prompt, image, mask_image, strength, negative_prompt, num_inference_steps,
                             guidance_scale, num_images_per_prompt, eta, generator, latents, prompt_embeds,
                             negative_prompt_embeds, output_type, return_dict, clip_skip, callback_on_step_end,
                             progress, callback_on_step_end_tensor_inputs, cross_attention_kwargs, timesteps, sigmas,
                             ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)

    def _inpaint(self, prompt, image, mask_image, strength, negative_prompt, num_inference_steps, guidance_scale,
                 num_images_per_prompt, eta, generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
                 return_dict, clip_skip, callback_on_step_end, progress, callback_on_step_end_tensor_inputs,
                 cross_attention_kwargs, timesteps, sigmas, control: Callable | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None):
        """The inpainting call; `control(unet, n, steps)`: see _text_to_image."""
        self._check_call(output_type, guidance_scale, callback_on_step_end, callback_on_step_end_tensor_inputs,
                         cross_attention_kwargs)
        plain = not self._inpainting_unet()
        latent_channels = self.vae.config.latent_channels
        with self._lora_scaled(lora_call_scale(cross_attention_kwargs)):
            pixels, cond, uncond, generators, timesteps = self._image_call(
                "inpainting", image, strength, generator, prompt, negative_prompt, prompt_embeds,
                negative_prompt_embeds, num_images_per_prompt, guidance_scale, clip_skip, num_inference_steps,
                timesteps, sigmas)
            n = pixels.shape[0]
            mask = self.preprocess_mask(mask_image, pixels.shape[-2:])
            if mask.shape[0] not in (1, n // num_images_per_prompt, n):
                raise ValueError(f"got {mask.shape[0]} masks for {n // num_images_per_prompt} prompts: give one mask, "
                                 "one per prompt or one per image")
            mask = mask.repeat_interleave(n // mask.shape[0], dim=0)
            shape = (n, latent_channels, *(d // self.vae_scale_factor for d in pixels.shape[-2:]))
            if latents is not None and (strength < 1.0 or tuple(latents.shape) != shape):
                raise ValueError(f"latents (the starting noise) are taken with strength 1 only, of shape {shape}; "
                                 f"got {tuple(latents.shape)} with strength {strength}")
            # the draws in diffusers' order, each image from its own generator: the image's posterior sample (when
            # used), the noise, the masked image's posterior sample
            z0 = self._encode_sample(pixels, generators) if plain or strength < 1 else None
            noise = randn(shape, generators, self.device, self.dtype) if latents is None else latents.to(
                self.device, self.dtype)
            masked = self._encode_sample(pixels * (mask < 0.5), generators)
            if strength == 1.0 or len(timesteps) == 0:
                start = noise * self.scheduler.init_noise_sigma if strength == 1.0 else z0
            else:
                start = self.scheduler.add_noise(z0, noise, timesteps[:1].repeat(n))
            small = F.interpolate(mask.to(self.device), size=shape[-2:]).to(self.dtype)  # (nearest, as diffusers)

            def keep_known(i: int, x: torch.Tensor) -> torch.Tensor:  # the image where the mask keeps it
                later = timesteps[i + 1:i + 2]
                known = z0 if len(later) == 0 else self.scheduler.add_noise(z0, noise, later)
                return (1 - small) * known + small * x

            unet = self._step_unet(control, n, len(timesteps), ip_adapter_image, ip_adapter_image_embeds,
                                   guidance_scale, cross_attention_kwargs)
            latents = self.denoise(start, timesteps, cond, uncond, guidance_scale, generators, eta,
                                   callback_on_step_end, progress,
                                   conditioning=None if plain else torch.cat([small, masked], dim=1),
                                   after_step=keep_known if plain else None, unet=unet)
            images = self.decode(latents, output_type)
            return PipelineOutput(images) if return_dict else (images,)

    @staticmethod
    def preprocess_mask(mask_image, size: tuple[int, int]) -> torch.Tensor:
        """[B, 1, H, W] of 0 (keep) and 1 (repaint): grey levels / 255 (PIL) or values in [0, 1] (tensors),
        binarized at 0.5 as diffusers' mask processor does."""
        if mask_image is None:
            raise ValueError("inpainting needs mask_image: white (1) where the image is to be repainted, black (0) "
                             "where it is kept")
        if isinstance(mask_image, torch.Tensor):
            mask = mask_image.float()
            mask = mask[None, None] if mask.dim() == 2 else mask[None] if mask.dim() == 3 else mask
            if mask.dim() != 4 or mask.shape[1] != 1:
                raise ValueError(f"a mask tensor must be [H, W], [1, H, W] or [B, 1, H, W]; got "
                                 f"{tuple(mask_image.shape)}")
            if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
                raise ValueError("mask tensor values must lie in [0, 1] (1: repaint)")
        else:
            from PIL import Image

            masks = mask_image if isinstance(mask_image, (list, tuple)) else [mask_image]
            if not all(isinstance(m, Image.Image) for m in masks):
                raise TypeError("mask_image must be a PIL image, a list of them or a tensor in [0, 1]")
            mask = torch.from_numpy(np.stack([np.asarray(m.convert("L"), dtype=np.float32) / 255.0
                                              for m in masks]))[:, None]
        if tuple(mask.shape[-2:]) != tuple(size):
            raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image {size[1]}x{size[0]} "
                             "(width x height): give a mask of the image's size")
        return (mask >= 0.5).float()


class WithImageEmbeds:
    """A U-Net call `unet(x, t, context, **kwargs)` given the IP-Adapters' image embeddings (a tensor per adapter)
    for the call's contexts, by their layout in blocks of n: [uncond; cond] as the embeddings were made (guidance),
    [cond] (guidance turned off part-way by a callback), [uncond; cond; cond] and, without guidance, [cond; cond]
    (perturbed-attention guidance's extra pass). The same tensors every step (the U-Net's caches key on them)."""

    def __init__(self, unet: Callable, embeds: list[torch.Tensor], n: int, masks=None):
        conditional = [e[-n:] for e in embeds]
        self.unet, self.masks = unet, None if masks is None else {"ip_adapter_masks": masks}
        self.by_rows = {n: conditional, embeds[0].shape[0]: embeds}
        if embeds[0].shape[0] == 2 * n:
            self.by_rows[3 * n] = [torch.cat([e, c]) for e, c in zip(embeds, conditional)]
        else:
            self.by_rows[2 * n] = [torch.cat([c, c]) for c in conditional]

    def __call__(self, x: torch.Tensor, t, context: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.unet(x, t, context, added_cond_kwargs={"image_embeds": self.by_rows[context.shape[0]]},
                         cross_attention_kwargs=self.masks, **kwargs)


def to_diffusers(pipe: LatentDiffusionPipeline):
    """diffusers' StableDiffusionPipeline over `pipe`'s very tensors (no copy): diffusers' U-Net and VAE classes of
    the same configs, transformers' CLIPTextModel (models.text.to_transformers), transformers' CLIPTokenizer read
    from the files ours writes, and diffusers' scheduler class of the same name and config. The reference that tests
    and benchmarks compare a pipeline with; needs diffusers and transformers installed."""
    import tempfile

    import diffusers
    import transformers

    from .models.text import to_transformers

    def twin(cls, model: torch.nn.Module) -> torch.nn.Module:
        with torch.device("meta"):
            ref = cls(**{k: v for k, v in model.config.to_dict().items() if not k.startswith("_")})
        ref.load_state_dict(model.state_dict(), strict=True, assign=True)
        left = [name for name, t in [*ref.named_parameters(), *ref.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"diffusers' {cls.__name__} has tensors ours does not provide: {left[:5]}")
        return ref.eval().requires_grad_(False)

    with tempfile.TemporaryDirectory() as folder:
        pipe.tokenizer.save_pretrained(folder)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    scheduler = getattr(diffusers, type(pipe.scheduler).__name__).from_config(pipe.scheduler.config.to_dict())
    ref = diffusers.StableDiffusionPipeline(
        vae=twin(diffusers.AutoencoderKL, pipe.vae), text_encoder=to_transformers(pipe.text_encoder),
        tokenizer=tokenizer, unet=twin(diffusers.UNet2DConditionModel, pipe.unet), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref
