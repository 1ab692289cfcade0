"""latentdiff: latent text-to-image diffusion (Stable Diffusion 1.x style) in compact PyTorch.

The public names are imported lazily, so `import latentdiff` (and the CLI) start fast.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LatentDiffusionPipeline": "latentdiff.pipeline",
    "AutoPipelineForText2Image": "latentdiff.auto_pipeline",
    "AutoPipelineForImage2Image": "latentdiff.auto_pipeline",
    "AutoPipelineForInpainting": "latentdiff.auto_pipeline",
    "LatentDiffusionImg2ImgPipeline": "latentdiff.pipeline",
    "LatentDiffusionInpaintPipeline": "latentdiff.pipeline",
    "LatentDiffusionControlNetPipeline": "latentdiff.pipeline_controlnet",
    "LatentDiffusionControlNetImg2ImgPipeline": "latentdiff.pipeline_controlnet",
    "LatentDiffusionControlNetInpaintPipeline": "latentdiff.pipeline_controlnet",
    "LatentDiffusionAdapterPipeline": "latentdiff.pipeline_t2i_adapter",
    "LatentConsistencyModelPipeline": "latentdiff.pipeline_lcm",
    "LatentDiffusionPAGPipeline": "latentdiff.pipeline_pag",
    "LatentDiffusionInstructPix2PixPipeline": "latentdiff.pipeline_instruct_pix2pix",
    "LatentDiffusionPAGImg2ImgPipeline": "latentdiff.pipeline_pag",
    "LatentDiffusionPAGInpaintPipeline": "latentdiff.pipeline_pag",
    "LatentDiffusionControlNetPAGPipeline": "latentdiff.pipeline_pag",
    "LatentDiffusionControlNetPAGInpaintPipeline": "latentdiff.pipeline_pag",
    "LatentConsistencyModelImg2ImgPipeline": "latentdiff.pipeline_lcm",
    "LatentDiffusionUpscalePipeline": "latentdiff.pipeline_upscale",
    "LatentDiffusionDepth2ImgPipeline": "latentdiff.pipeline_depth2img",
    "LatentDiffusionImageVariationPipeline": "latentdiff.pipeline_image_variation",
    "T2IAdapter": "latentdiff.models.t2i_adapter",
    "PipelineOutput": "latentdiff.pipeline",
    "ControlNetModel": "latentdiff.models.controlnet",
    "MultiControlNetModel": "latentdiff.models.controlnet",
    "UNet2DConditionModel": "latentdiff.models.unet",
    "UNetConfig": "latentdiff.models.unet",
    "AutoencoderKL": "latentdiff.models.vae",
    "VAEConfig": "latentdiff.models.vae",
    "AutoencoderTiny": "latentdiff.models.vae_tiny",
    "CLIPTokenizer": "latentdiff.models.text",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")


def __dir__():
    return __all__ + ["__version__"]
