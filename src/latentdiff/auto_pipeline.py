"""diffusers' AutoPipelineForText2Image / ForImage2Image / ForInpainting: the pipeline class for a task, picked
from what a folder's model_index.json names (or a pipeline's class), a `controlnet=` given and `enable_pag=True`:

    pipe = AutoPipelineForText2Image.from_pretrained(folder, enable_pag=True)     # LatentDiffusionPAGPipeline
    edit = AutoPipelineForImage2Image.from_pipe(pipe)                            # LatentDiffusionPAGImg2ImgPipeline
"""
from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path

from .checkpoints import read_json, require_path

# (task, family) -> latentdiff's class, as "module:Class"; a family: "" (Stable Diffusion), "controlnet", "pag",
# "controlnet-pag", "lcm", "adapter"
_CLASSES = {
    ("text2img", ""): "pipeline:LatentDiffusionPipeline",
    ("text2img", "controlnet"): "pipeline_controlnet:LatentDiffusionControlNetPipeline",
    ("text2img", "pag"): "pipeline_pag:LatentDiffusionPAGPipeline",
    ("text2img", "controlnet-pag"): "pipeline_pag:LatentDiffusionControlNetPAGPipeline",
    ("text2img", "lcm"): "pipeline_lcm:LatentConsistencyModelPipeline",
    ("text2img", "adapter"): "pipeline_t2i_adapter:LatentDiffusionAdapterPipeline",
    ("img2img", ""): "pipeline:LatentDiffusionImg2ImgPipeline",
    ("img2img", "controlnet"): "pipeline_controlnet:LatentDiffusionControlNetImg2ImgPipeline",
    ("img2img", "pag"): "pipeline_pag:LatentDiffusionPAGImg2ImgPipeline",
    ("img2img", "lcm"): "pipeline_lcm:LatentConsistencyModelImg2ImgPipeline",
    ("inpaint", ""): "pipeline:LatentDiffusionInpaintPipeline",
    ("inpaint", "controlnet"): "pipeline_controlnet:LatentDiffusionControlNetInpaintPipeline",
    ("inpaint", "pag"): "pipeline_pag:LatentDiffusionPAGInpaintPipeline",
    ("inpaint", "controlnet-pag"): "pipeline_pag:LatentDiffusionControlNetPAGInpaintPipeline",
}
# diffusers' pipeline class names (a folder's model_index.json) -> family
_DIFFUSERS_FAMILIES = {
    "StableDiffusion": "", "StableDiffusionImg2Img": "", "StableDiffusionInpaint": "",
    "StableDiffusionControlNet": "controlnet", "StableDiffusionControlNetImg2Img": "controlnet",
    "StableDiffusionControlNetInpaint": "controlnet", "StableDiffusionPAG": "pag", "StableDiffusionPAGImg2Img": "pag",
    "StableDiffusionPAGInpaint": "pag", "StableDiffusionControlNetPAG": "controlnet-pag",
    "StableDiffusionControlNetPAGInpaint": "controlnet-pag", "LatentConsistencyModel": "lcm",
    "LatentConsistencyModelImg2Img": "lcm", "StableDiffusionAdapter": "adapter",
}


def _class(task: str, family: str):
    entry = _CLASSES.get((task, family))
    if entry is None:
        offered = sorted(f for t, f in _CLASSES if t == task)
        raise ValueError(f"no {task} pipeline for the {family or 'Stable Diffusion'} family in latentdiff (families "
                         f"with one: {', '.join(repr(f or 'stable-diffusion') for f in offered)})")
    module, name = entry.split(":")
    return getattr(import_module(f"latentdiff.{module}"), name)


def _with_options(family: str, kwargs: dict) -> str:
    """The family once `controlnet=` and `enable_pag=` (popped) are taken into account, as diffusers takes them."""
    if kwargs.get("controlnet") is not None and "controlnet" not in family:
        family = "controlnet" + (family and f"-{family}")
    if kwargs.pop("enable_pag", False) and "pag" not in family:
        family = f"{family}-pag" if family else "pag"
    return family


def _family_of_pipeline(pipe) -> str:
    from .pipeline_controlnet import ControlNetMixin
    from .pipeline_lcm import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline
    from .pipeline_pag import PAGMixin
    from .pipeline_t2i_adapter import LatentDiffusionAdapterPipeline

    if isinstance(pipe, (LatentConsistencyModelPipeline, LatentConsistencyModelImg2ImgPipeline)):
        return "lcm"
    if isinstance(pipe, LatentDiffusionAdapterPipeline):
        return "adapter"
    family = "controlnet" if isinstance(pipe, ControlNetMixin) else ""
    if isinstance(pipe, PAGMixin):
        family = f"{family}-pag" if family else "pag"
    return family


class _AutoPipeline:
    task = ""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is not built directly: use {type(self).__name__}.from_pretrained("
                        "folder) or .from_pipe(pipe)")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs):
        """The task's pipeline for the folder's family (model_index.json's _class_name), with `controlnet=` and
        `enable_pag=True` as diffusers takes them; the other arguments go to that class's from_pretrained."""
        index = read_json(require_path(Path(folder), "pipeline folder") / "model_index.json")
        name = str(index.get("_class_name", "StableDiffusionPipeline")).removesuffix("Pipeline")
        if name not in _DIFFUSERS_FAMILIES:
            raise ValueError(f"{folder}: model_index.json names {name}Pipeline, which latentdiff's auto pipelines do "
                             f"not map (they map {', '.join(sorted(k + 'Pipeline' for k in _DIFFUSERS_FAMILIES))})")
        family = _with_options(_DIFFUSERS_FAMILIES[name], kwargs)
        return _class(cls.task, family).from_pretrained(folder, **kwargs)

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        """The task's pipeline over `pipe`'s components (no copy), of `pipe`'s family (with `controlnet=` and
        `enable_pag=True` as in from_pretrained)."""
        return _class(cls.task, _with_options(_family_of_pipeline(pipe), kwargs)).from_pipe(pipe, **kwargs)


class AutoPipelineForText2Image(_AutoPipeline):
    """diffusers' AutoPipelineForText2Image for latentdiff's pipelines."""
    task = "text2img"


class AutoPipelineForImage2Image(_AutoPipeline):
    """diffusers' AutoPipelineForImage2Image for latentdiff's pipelines."""
    task = "img2img"


class AutoPipelineForInpainting(_AutoPipeline):
    """diffusers' AutoPipelineForInpainting for latentdiff's pipelines."""
    task = "inpaint"
