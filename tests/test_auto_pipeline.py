"""The auto pipelines pick the class diffusers' AutoPipelineFor* pick (by name: ours for theirs), from folders and
from pipelines, with controlnet= and enable_pag=; combinations without a pipeline are refused by name."""
import pytest

import latentdiff
from latentdiff import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

pytestmark = pytest.mark.usefixtures("one_thread")

OURS = {  # diffusers' class -> ours
    "StableDiffusionPipeline": "LatentDiffusionPipeline", "StableDiffusionImg2ImgPipeline":
    "LatentDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline": "LatentDiffusionInpaintPipeline",
    "StableDiffusionControlNetPipeline": "LatentDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline": "LatentDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline": "LatentDiffusionControlNetInpaintPipeline",
    "StableDiffusionPAGPipeline": "LatentDiffusionPAGPipeline",
    "StableDiffusionPAGImg2ImgPipeline": "LatentDiffusionPAGImg2ImgPipeline",
    "StableDiffusionPAGInpaintPipeline": "LatentDiffusionPAGInpaintPipeline",
    "StableDiffusionControlNetPAGInpaintPipeline": "LatentDiffusionControlNetPAGInpaintPipeline",
    "StableDiffusionControlNetPAGPipeline": "LatentDiffusionControlNetPAGPipeline",
}


@pytest.fixture(scope="module")
def controlnet(tiny_folders):
    from latentdiff import ControlNetModel, UNet2DConditionModel

    return ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_folders[0] / "unet"),
                                     conditioning_embedding_out_channels=(8, 16))


@pytest.mark.parametrize("task", ["Text2Image", "Image2Image", "Inpainting"])
@pytest.mark.parametrize("options", [{}, {"controlnet": True}, {"enable_pag": True},
                                     {"controlnet": True, "enable_pag": True}])
def test_same_choice_as_diffusers(tiny_folders, controlnet, task, options):
    import diffusers

    folder = tiny_folders[0]
    theirs_options = dict(options)
    if options.get("controlnet"):
        theirs_options["controlnet"] = diffusers.ControlNetModel(**{
            k: v for k, v in controlnet.config.to_dict().items() if not k.startswith("_")})
        options = {**options, "controlnet": controlnet}
    auto = getattr(latentdiff, f"AutoPipelineFor{task}")
    try:
        theirs = type(getattr(diffusers, f"AutoPipelineFor{task}").from_pretrained(
            folder, safety_checker=None, **theirs_options)).__name__
    except ValueError:  # (diffusers has none for this combination; ours may)
        theirs = None
    try:
        ours = type(auto.from_pretrained(folder, **options)).__name__
    except ValueError as e:
        assert theirs is None and "no " in str(e)
        return
    if theirs is not None:
        assert ours == OURS[theirs]
    plain = latentdiff.LatentDiffusionPipeline.from_pretrained(folder)
    assert type(auto.from_pipe(plain, **options)).__name__ == ours


def test_families_from_folders_and_pipes(tiny_folders, tmp_path):
    """An LCM folder gives the LCM pipelines; a PAG pipeline's layers carry over to its img2img twin; a folder of
    another family is refused by name."""
    import json
    import shutil

    from tiny import diffusers_pipeline

    folder = tmp_path / "lcm"
    diffusers_pipeline(tiny_folders[0] / "tokenizer", pipeline_cls="LatentConsistencyModelPipeline",
                       time_cond_proj_dim=8).save_pretrained(folder, safe_serialization=True)
    assert type(AutoPipelineForText2Image.from_pretrained(folder)).__name__ == "LatentConsistencyModelPipeline"
    lcm = AutoPipelineForImage2Image.from_pretrained(folder)
    assert type(lcm).__name__ == "LatentConsistencyModelImg2ImgPipeline"
    with pytest.raises(ValueError, match="no inpaint pipeline for the lcm family"):
        AutoPipelineForInpainting.from_pipe(lcm)
    layers = ["mid", "up_blocks.1"]
    pag = AutoPipelineForText2Image.from_pretrained(tiny_folders[0], enable_pag=True, pag_applied_layers=layers)
    edit = AutoPipelineForImage2Image.from_pipe(pag)
    assert type(edit).__name__ == "LatentDiffusionPAGImg2ImgPipeline" and edit.pag_applied_layers == layers
    other = tmp_path / "other"
    shutil.copytree(tiny_folders[0], other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="names KandinskyPipeline, which latentdiff's auto pipelines do not map"):
        AutoPipelineForText2Image.from_pretrained(other)
    with pytest.raises(TypeError, match="is not built directly"):
        AutoPipelineForText2Image()
