"""ControlNet against diffusers: the model (ControlNetModel, same weights, every option), the U-Net's residual inputs,
from_unet, and the pipeline against StableDiffusionControlNetPipeline (one ControlNet and several, guess mode, the
guidance window, control images as tensors and as PIL images resized, batches); folders both ways; the errors."""
import dataclasses
import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import ControlNetModel, LatentDiffusionControlNetPipeline, LatentDiffusionPipeline, MultiControlNetModel
from latentdiff.models.controlnet import ControlNetConfig
from latentdiff.models.unet import UNet2DConditionModel, UNetConfig
from tiny import generate, randomized

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=(2, 4), layers_per_block=2, norm_num_groups=8, sample_size=8)


def reference(model: torch.nn.Module, cls: str) -> torch.nn.Module:
    """diffusers' model of the same config with the same weights."""
    import diffusers

    ref = getattr(diffusers, cls)(**{k: v for k, v in model.config.to_dict().items() if not k.startswith("_")})
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()


def small_controlnet(seed: int = 0, **changes) -> ControlNetModel:
    config = ControlNetConfig.from_unet(UNetConfig(**SMALL_UNET),
                                        **{"conditioning_embedding_out_channels": (8, 16), **changes})
    config.validate()
    return randomized(ControlNetModel(config), seed)


def max_difference(ours, theirs) -> float:
    (down, mid), (ref_down, ref_mid) = ours, theirs
    assert len(down) == len(ref_down)
    return max((a - b).abs().max().item() for a, b in zip([*down, mid], [*ref_down, ref_mid]))


INPUTS = dict(sample=torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
              encoder_hidden_states=torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2)),
              controlnet_cond=torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)))


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("changes, call", [
    ({}, {}),
    ({}, dict(conditioning_scale=0.6, guess_mode=True)),
    ({"controlnet_conditioning_channel_order": "bgr"}, dict(conditioning_scale=1.3)),
    ({"global_pool_conditions": True}, {}),
    ({"num_attention_heads": (4, 8)}, {}),
    ({"conditioning_channels": 1, "transformer_layers_per_block": 2, "use_linear_projection": True}, {}),
])
def test_controlnet_matches_diffusers(changes, call):
    ours = small_controlnet(**changes)
    ref = reference(ours, "ControlNetModel")
    inputs = dict(INPUTS)
    inputs["controlnet_cond"] = inputs["controlnet_cond"][:, :ours.config.conditioning_channels]
    with torch.no_grad():
        got = ours(**inputs, timestep=torch.tensor([10, 500]), **call)
        expected = ref(**inputs, timestep=torch.tensor([10, 500]), return_dict=False, **call)
    assert max_difference(got, expected) < 1e-5
    assert got.mid_block_res_sample is got[1] and len(got.down_block_res_samples) == 6
    if changes.get("global_pool_conditions"):
        assert got.mid_block_res_sample.shape[-2:] == (1, 1)


def test_shared_samples_equal_the_repeated_batch():
    """k contexts per sample, as the U-Net takes them: the residuals of torch.cat([sample] * k)."""
    ours = small_controlnet()
    ref = reference(ours, "ControlNetModel")
    contexts = torch.randn(4, 7, 32)
    with torch.no_grad():
        got = ours(INPUTS["sample"], 3, contexts, INPUTS["controlnet_cond"])
        expected = ref(torch.cat([INPUTS["sample"]] * 2), 3, contexts, torch.cat([INPUTS["controlnet_cond"]] * 2),
                       return_dict=False)
    assert max_difference(got, expected) < 1e-5


def test_unet_adds_the_residuals_as_diffusers():
    unet = randomized(UNet2DConditionModel(UNetConfig(**SMALL_UNET)), 5)
    ref_unet = reference(unet, "UNet2DConditionModel")
    controlnet = small_controlnet()
    x, ctx = INPUTS["sample"], INPUTS["encoder_hidden_states"]
    with torch.no_grad():
        down, mid = controlnet(x, 10, ctx, INPUTS["controlnet_cond"])
        got = unet(x, 10, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        expected = ref_unet(x, 10, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        plain = unet(x, 10, ctx)
        # shared samples: residuals for the contexts' batch
        contexts = torch.cat([torch.randn_like(ctx), ctx])
        down2, mid2 = controlnet(x, 10, contexts, INPUTS["controlnet_cond"])
        shared = unet(x, 10, contexts, down_block_additional_residuals=down2, mid_block_additional_residual=mid2)
        repeated = ref_unet(torch.cat([x, x]), 10, contexts, down_block_additional_residuals=down2,
                            mid_block_additional_residual=mid2).sample
    assert (got - expected).abs().max() < 1e-5
    assert (got - plain).abs().max() > 1e-2  # the residuals changed the output
    assert (shared - repeated).abs().max() < 1e-5
    with pytest.raises(ValueError, match="together"):
        unet(x, 10, ctx, down_block_additional_residuals=down)
    with pytest.raises(ValueError, match="got 5 tensors, but this U-Net has 6 skip connections"):
        unet(x, 10, ctx, down_block_additional_residuals=down[:5], mid_block_additional_residual=mid)
    with pytest.raises(ValueError, match=r"mid_block_additional_residual is \(1, 64, 4, 4\)"):
        unet(x, 10, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid[:1])


def test_from_unet_copies_the_down_path_and_starts_at_zero():
    import diffusers

    unet = randomized(UNet2DConditionModel(UNetConfig(**SMALL_UNET)), 5)
    ours = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    ref = diffusers.ControlNetModel.from_unet(reference(unet, "UNet2DConditionModel"),
                                              conditioning_embedding_out_channels=(8, 16))
    assert ControlNetConfig.from_dict(dict(ref.config)) == ours.config
    theirs = ref.state_dict()
    for key, value in ours.state_dict().items():
        if key.startswith("controlnet_cond_embedding.") and "conv_out" not in key:
            continue  # (random initialisation)
        assert torch.equal(value, theirs[key]), key
    x, ctx = INPUTS["sample"], INPUTS["encoder_hidden_states"]
    with torch.no_grad():  # zero convolutions: the U-Net's output is unchanged at first
        down, mid = ours(x, 10, ctx, INPUTS["controlnet_cond"])
        assert torch.equal(unet(x, 10, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid),
                           unet(x, 10, ctx))


def test_config_covers_every_diffusers_option():
    import diffusers

    params = inspect.signature(diffusers.ControlNetModel.__init__).parameters
    ours = {f.name for f in dataclasses.fields(ControlNetConfig)} | set(ControlNetConfig.fixed)
    assert ours == set(params) - {"self"}
    for f in dataclasses.fields(ControlNetConfig):
        default = params[f.name].default
        assert f.default == (tuple(default) if isinstance(default, list) else default), f.name
    for key, accepted in ControlNetConfig.fixed.items():
        assert params[key].default == accepted, key
    # a config diffusers writes reads back as the same architecture
    config = ControlNetConfig.from_unet(UNetConfig(**SMALL_UNET), conditioning_embedding_out_channels=(8, 16))
    saved = dict(diffusers.ControlNetModel(**{k: v for k, v in config.to_dict().items()
                                              if not k.startswith("_")}).config)
    assert ControlNetConfig.from_dict(saved) == config


@pytest.mark.parametrize("key, value, message", [
    ("class_embed_type", "timestep", "not supported"),
    ("controlnet_conditioning_channel_order", "rbg", "expected 'rgb' or 'bgr'"),
    ("layers_per_block", [2, 2], "expected a positive int"),
    ("mid_block_type", "UNetMidBlock2D", "supports only"),
    ("conditioning_embedding_out_channels", [], "non-empty"),
])
def test_config_errors_name_the_key(key, value, message):
    data = {**ControlNetConfig().to_dict(), key: value}
    with pytest.raises(ValueError, match=message) as error:
        ControlNetConfig.from_dict(data)
    assert key in str(error.value)


def test_control_image_of_the_wrong_size_is_an_error():
    controlnet = small_controlnet()
    with pytest.raises(ValueError, match=r"controlnet_cond must be the control image .* \(2, 3, 16, 16\)"):
        controlnet(INPUTS["sample"], 1, INPUTS["encoder_hidden_states"], torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="attention_mask is not supported"):
        controlnet(**INPUTS, timestep=1, attention_mask=torch.ones(2, 7))


# ---------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def controlnet_folders(tmp_path_factory, tiny_folders):
    """Two random ControlNets for the tiny pipeline, saved by diffusers."""
    import diffusers

    root = tmp_path_factory.mktemp("controlnets")
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_folders[0] / "unet")
    folders = []
    for seed in (0, 1):
        net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
        randomized(net, seed).save_pretrained(root / f"cn{seed}", safe_serialization=True)
        folders.append(root / f"cn{seed}")
    return folders


CONTROL = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))


def pair(tiny_folders, controlnet_folders, count: int = 1, scheduler: str = "DDIMScheduler"):
    import diffusers

    from latentdiff import schedulers

    nets = [diffusers.ControlNetModel.from_pretrained(f) for f in controlnet_folders[:count]]
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        tiny_folders[0], controlnet=nets[0] if count == 1 else nets, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionControlNetPipeline.from_pretrained(
        tiny_folders[0], controlnet=[ControlNetModel.from_pretrained(f) for f in controlnet_folders[:count]])
    ref.scheduler = getattr(diffusers, scheduler).from_config(dict(ref.scheduler.config))
    ours.scheduler = getattr(schedulers, scheduler).from_config(dict(ours.scheduler.config))
    return ours, ref


@pytest.mark.parametrize("kwargs", [
    dict(image=CONTROL),
    dict(image=CONTROL, guess_mode=True, controlnet_conditioning_scale=0.8),
    dict(image=CONTROL, control_guidance_start=0.25, control_guidance_end=0.75),
    dict(image=CONTROL, guidance_scale=1.0),
    dict(image=CONTROL, num_images_per_prompt=2, negative_prompt="blue", images=2),
])
def test_pipeline_matches_diffusers(tiny_folders, controlnet_folders, kwargs):
    ours, ref = pair(tiny_folders, controlnet_folders)
    got, expected = generate(ours, **kwargs), generate(ref, **kwargs)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    plain = generate(LatentDiffusionPipeline.from_pipe(ours), **{k: v for k, v in kwargs.items() if k in (
        "guidance_scale", "num_images_per_prompt", "negative_prompt", "images")})
    assert np.abs(got - plain).max() > 1e-3  # the ControlNet changed the image


def test_several_controlnets_match_diffusers(tiny_folders, controlnet_folders):
    ours, ref = pair(tiny_folders, controlnet_folders, count=2, scheduler="EulerAncestralDiscreteScheduler")
    assert isinstance(ours.controlnet, MultiControlNetModel)
    other = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    kwargs = dict(image=[CONTROL, other], controlnet_conditioning_scale=[0.7, 1.2], control_guidance_end=[1.0, 0.5])
    np.testing.assert_allclose(generate(ours, **kwargs), generate(ref, **kwargs), atol=2e-4, rtol=0)
    # a scale of 0 leaves that ControlNet out (not run at all)
    single = LatentDiffusionControlNetPipeline.from_pipe(ours, controlnet=ours.controlnet.nets[0])
    kwargs.update(controlnet_conditioning_scale=[0.7, 0.0])
    np.testing.assert_allclose(generate(ours, **kwargs), generate(single, image=CONTROL,
                                                                  controlnet_conditioning_scale=0.7), atol=1e-6)


def test_pil_control_images_resized_and_batched_as_diffusers(tiny_folders, controlnet_folders):
    ours, ref = pair(tiny_folders, controlnet_folders)
    pixels = (CONTROL[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    small = Image.fromarray(pixels)
    big = Image.fromarray(np.ascontiguousarray(pixels[::-1])).resize((27, 21))  # 21 px high: rounded down to 16
    kwargs = dict(image=[small, big], height=24, width=16)
    got = generate(ours, ["a red circle", "a blue square"], images=2, **kwargs)
    np.testing.assert_allclose(got, generate(ref, ["a red circle", "a blue square"], images=2, **kwargs), atol=2e-4,
                               rtol=0)
    assert got.shape == (2, 24, 16, 3)
    # the default size is the image's, rounded down to a multiple of 8
    assert ours.prepare_control_image(big).shape == (1, 3, 16, 24)
    assert ours.prepare_control_image(pixels).shape == (1, 3, 16, 16)  # (an 8-bit [H, W, C] array: / 255)
    assert torch.equal(ours.prepare_control_image(pixels), ours.prepare_control_image(small))


INIT = Image.fromarray(np.random.default_rng(7).integers(0, 256, (16, 16, 3), dtype=np.uint8))
MASK = Image.fromarray(np.pad(np.full((8, 10), 255, np.uint8), ((4, 4), (6, 0))))


@pytest.mark.parametrize("task, inpainting_unet", [("img2img", False), ("inpaint", False), ("inpaint", True)])
def test_img2img_and_inpainting_match_diffusers(tiny_folders, controlnet_folders, tmp_path, task, inpainting_unet):
    """diffusers' StableDiffusionControlNetImg2ImgPipeline / ...InpaintPipeline (a plain U-Net, and an inpainting one
    of 9 input channels, whose mask channels the ControlNet does not see), with their own default scales."""
    import diffusers

    from latentdiff import LatentDiffusionControlNetImg2ImgPipeline, LatentDiffusionControlNetInpaintPipeline
    from tiny import diffusers_pipeline

    folder = tiny_folders[0]
    if inpainting_unet:
        folder = tmp_path / "inpainting"
        diffusers_pipeline(tiny_folders[0] / "tokenizer", pipeline_cls="StableDiffusionInpaintPipeline",
                           in_channels=9).save_pretrained(folder, safe_serialization=True)
    kind = {"img2img": "Img2Img", "inpaint": "Inpaint"}[task]
    ref = getattr(diffusers, f"StableDiffusionControlNet{kind}Pipeline").from_pretrained(
        folder, controlnet=diffusers.ControlNetModel.from_pretrained(controlnet_folders[0]), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    cls = {"img2img": LatentDiffusionControlNetImg2ImgPipeline, "inpaint": LatentDiffusionControlNetInpaintPipeline}
    ours = cls[task].from_pretrained(folder, controlnet=ControlNetModel.from_pretrained(controlnet_folders[0]))
    inputs = dict(image=INIT, control_image=CONTROL, strength=0.6)
    if task == "inpaint":
        inputs["mask_image"] = MASK
    got, expected = generate(ours, **inputs), generate(ref, **inputs)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    plain = generate(ours, **{**inputs, "controlnet_conditioning_scale": 0.0})
    assert np.abs(got - plain).max() > 1e-3  # the ControlNet changed the image
    if inpainting_unet:  # saved, the folder names the pipeline diffusers needs for it
        ours.save_pretrained(tmp_path / "saved")
        loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
        assert type(loaded).__name__ == "StableDiffusionControlNetInpaintPipeline"


def test_folders_both_ways(tiny_folders, controlnet_folders, tmp_path):
    import diffusers

    ours, _ = pair(tiny_folders, controlnet_folders, count=2)
    ours.save_pretrained(tmp_path / "ours")
    ref = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours", safety_checker=None)
    assert type(ref).__name__ == "StableDiffusionControlNetPipeline"
    assert len(ref.controlnet.nets) == 2
    for net, mine in zip(ref.controlnet.nets, ours.controlnet.nets):
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in mine.state_dict().items())
    ref.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    loaded = LatentDiffusionControlNetPipeline.from_pretrained(tmp_path / "theirs")
    assert isinstance(loaded.controlnet, MultiControlNetModel)
    # pipe.config (diffusers' generic DiffusionPipeline.from_pretrained keeps the file's two version keys too)
    assert dict(loaded.config) == {k: v for k, v in ref.config.items() if k not in ("_class_name", "_diffusers_version")
                                   } | {"_name_or_path": tmp_path / "theirs"}
    kwargs = dict(image=[CONTROL, CONTROL], controlnet_conditioning_scale=[0.5, 0.5])
    np.testing.assert_allclose(generate(loaded, **kwargs), generate(ours, **kwargs), atol=1e-6)
    # the plain pipeline loads such a folder without its ControlNet
    assert "controlnet" not in LatentDiffusionPipeline.from_pretrained(tmp_path / "theirs").components


def test_errors(tiny_folders, controlnet_folders):
    ours, _ = pair(tiny_folders, controlnet_folders)
    with pytest.raises(ValueError, match="needs the control image"):
        ours("x", progress=False)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        ours("x", image=CONTROL * 2 - 1, progress=False)
    with pytest.raises(ValueError, match="has 1 channels but the ControlNet takes 3"):
        ours("x", image=CONTROL[:, :1], progress=False)
    with pytest.raises(ValueError, match="height=20 must be a positive multiple of 8"):
        ours("x", image=CONTROL, height=20, progress=False)
    with pytest.raises(ValueError, match="need 0 <= start < end <= 1"):
        ours("x", image=CONTROL, control_guidance_start=0.5, control_guidance_end=0.5, progress=False)
    with pytest.raises(ValueError, match="got 2 control images for 1 prompts"):
        ours("x", image=torch.cat([CONTROL, CONTROL]), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 2 entries for 1 ControlNets"):
        ours("x", image=CONTROL, controlnet_conditioning_scale=[1.0, 1.0], progress=False)
    with pytest.raises(ValueError, match="has no ControlNet"):
        LatentDiffusionControlNetPipeline.from_pretrained(tiny_folders[0])
    with pytest.raises(TypeError, match="controlnet must be a ControlNetModel"):
        LatentDiffusionControlNetPipeline.from_pretrained(tiny_folders[0], controlnet="cn")
    other = ControlNetModel(ControlNetConfig.from_unet(UNetConfig(**{**SMALL_UNET, "cross_attention_dim": 16}),
                                                       conditioning_embedding_out_channels=(8, 16)))
    with pytest.raises(ValueError, match="made for another U-Net architecture: its cross_attention_dim"):
        LatentDiffusionControlNetPipeline.from_pipe(ours, controlnet=other)("x", image=CONTROL, progress=False)
    with pytest.raises(ValueError, match="CUDA graphs are not available with ControlNets"):
        ours.enable_cuda_graphs()


# ---------------------------------------------------------------- single files


def test_single_file_reads_as_diffusers_reads_it(tmp_path):
    """A file in lllyasviel's layout (written from the table) loads in diffusers' from_single_file and in ours as the
    same weights: the table is the one diffusers' converter uses (which knows only the usual four widths of the
    control image's convs; ours reads any)."""
    import diffusers
    from safetensors.torch import save_file

    from latentdiff.convert import diffusers_to_controlnet

    ours = small_controlnet(conditioning_channels=1, transformer_layers_per_block=2,
                            conditioning_embedding_out_channels=(16, 32, 96, 256))
    ours.save_pretrained(tmp_path / "folder")
    layout = diffusers_to_controlnet(ours.state_dict(), ours.config)
    assert "input_hint_block.14.weight" in layout and "zero_convs.5.0.weight" in layout
    expected = ours.state_dict()
    for prefix in ("", "control_model."):
        extra = {"model.diffusion_model.out.0.weight": torch.ones(3)} if prefix else {}
        save_file({**{prefix + k: v.contiguous() for k, v in layout.items()}, **extra}, tmp_path / "cn.safetensors")
        theirs = diffusers.ControlNetModel.from_single_file(
            tmp_path / "cn.safetensors", config=str(tmp_path / "folder"), local_files_only=True).state_dict()
        loaded = ControlNetModel.from_single_file(tmp_path / "cn.safetensors", config=tmp_path / "folder")
        assert loaded.config == ours.config
        for key, value in expected.items():
            assert torch.equal(theirs[key], value) and torch.equal(loaded.state_dict()[key], value), key
    del layout["zero_convs.5.0.bias"]
    save_file({k: v.contiguous() for k, v in layout.items()}, tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match=r"missing keys.*zero_convs\.5\.0\.bias"):
        ControlNetModel.from_single_file(tmp_path / "cut.safetensors", config=tmp_path / "folder")
    save_file({"conv_in.weight": torch.ones(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="is not a ControlNet single file"):
        ControlNetModel.from_single_file(tmp_path / "other.safetensors")


@pytest.mark.parametrize("preset, hint", [("sd15", (16, 32, 96, 256)), ("sd2", (16, 32, 96, 256)),
                                          ("sd15", (8, 16))])
def test_single_file_config_is_read_from_the_file(preset, hint):
    """Without config=, SD 1.x or 2.x by the text width, and the control image's channels and widths from the file
    (shapes only: the models stay on the meta device)."""
    from latentdiff.convert import diffusers_to_controlnet
    from latentdiff.models.controlnet import _infer_config

    config = ControlNetConfig.from_unet(getattr(UNetConfig, preset)(), conditioning_embedding_out_channels=hint,
                                        conditioning_channels=1)
    with torch.device("meta"):
        layout = diffusers_to_controlnet(ControlNetModel(config).state_dict(), config)
    assert ControlNetConfig.from_dict(_infer_config(layout, "")) == config


def test_controlnet_beside_a_stable_diffusion_model_in_one_file(tiny_folders, controlnet_folders, tmp_path):
    """ControlNet 1.0's files: a whole SD model and the ControlNet under control_model.; each loader takes its part
    (the pipeline's says what it left), and a ControlNet-only file given to the pipeline's loader says where to go."""
    from safetensors.torch import load_file, save_file

    from latentdiff.convert import diffusers_to_controlnet
    from latentdiff.layout import save_single_file

    net = ControlNetModel.from_pretrained(controlnet_folders[0])
    layout = diffusers_to_controlnet(net.state_dict(), net.config)
    save_single_file(LatentDiffusionPipeline.from_pretrained(tiny_folders[1]).components, tmp_path / "sd.safetensors")
    both = {**load_file(tmp_path / "sd.safetensors"), **{"control_model." + k: v for k, v in layout.items()}}
    save_file(both, tmp_path / "both.safetensors")
    with pytest.warns(UserWarning, match=r"also holds a ControlNet .* ControlNetModel.from_single_file"):
        pipe = LatentDiffusionPipeline.from_single_file(tmp_path / "both.safetensors", config=tiny_folders[1])
    assert torch.equal(pipe.unet.conv_in.weight, LatentDiffusionPipeline.from_pretrained(
        tiny_folders[1]).unet.conv_in.weight)
    loaded = ControlNetModel.from_single_file(tmp_path / "both.safetensors", config=controlnet_folders[0])
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    save_file(layout, tmp_path / "cn.safetensors")
    with pytest.raises(ValueError, match="this is a ControlNet single file .*ControlNetModel.from_single_file"):
        LatentDiffusionPipeline.from_single_file(tmp_path / "cn.safetensors", config=tiny_folders[1])


def test_pipeline_from_a_single_file_with_a_controlnet(tiny_folders, controlnet_folders, tmp_path):
    """As diffusers' from_single_file(path, controlnet=...): the file's models and the given ControlNet; without one,
    the error says what to pass. A ControlNet folder given as a pipeline folder says how to load it."""
    from latentdiff.layout import save_single_file

    save_single_file(LatentDiffusionPipeline.from_pretrained(tiny_folders[1]).components, tmp_path / "sd.safetensors")
    net = ControlNetModel.from_pretrained(controlnet_folders[0])
    pipe = LatentDiffusionControlNetPipeline.from_single_file(tmp_path / "sd.safetensors", config=tiny_folders[1],
                                                              controlnet=net)
    assert pipe.controlnet is net
    reference = LatentDiffusionControlNetPipeline.from_pretrained(tiny_folders[1], controlnet=net)
    np.testing.assert_allclose(generate(pipe, image=CONTROL), generate(reference, image=CONTROL), atol=1e-6)
    with pytest.raises(ValueError, match="a single file holds no controlnet: pass it"):
        LatentDiffusionControlNetPipeline.from_single_file(tmp_path / "sd.safetensors", config=tiny_folders[1])
    with pytest.raises(FileNotFoundError, match=r"holds one ControlNetModel: load it with latentdiff.ControlNetModel"):
        LatentDiffusionPipeline.from_pretrained(controlnet_folders[0])


@pytest.mark.skipif(not (__import__("shutil").which("c++") or __import__("shutil").which("g++")),
                    reason="inductor needs a C++ compiler")
@pytest.mark.slow  # (two AOTInductor compiles, U-Net and ControlNet, of ~40 s each on a 2-core CPU)
def test_compile_cache_keeps_the_controlnets_too(tiny_folders, controlnet_folders, tmp_path):
    """compile(cache_dir=) with a ControlNet: both models compiled ahead of time into the folder (same images as
    eager); a new pipeline of the same weights loads both packages and compiles nothing."""
    from latentdiff.compile_cache import CachedCompiledModel

    ours, _ = pair(tiny_folders, controlnet_folders)
    kwargs = dict(image=CONTROL, num_inference_steps=2, controlnet_conditioning_scale=0.8)
    eager = generate(ours, **kwargs)
    ours.compile(max_autotune=False, cache_dir=tmp_path)
    compiled = generate(ours, **kwargs)
    np.testing.assert_allclose(compiled, eager, atol=1e-4, rtol=0)
    (net, call), = ours._compiled_nets.values()
    assert net is ours.controlnet and isinstance(call, CachedCompiledModel) and len(call.compiled_packages) == 1
    unet = ours._unet_call()
    assert len(unet.compiled_packages) == 1 and call._fallback is None and unet._fallback is None
    again, _ = pair(tiny_folders, controlnet_folders)
    again.compile(max_autotune=False, cache_dir=tmp_path)
    np.testing.assert_array_equal(generate(again, **kwargs), compiled)
    (_, call), = again._compiled_nets.values()
    assert (call.compiled_packages, again._unet_call().compiled_packages) == ([], [])
    assert len(call.loaded_packages) == len(again._unet_call().loaded_packages) == 1


@pytest.mark.skipif(not (__import__("shutil").which("c++") or __import__("shutil").which("g++")),
                    reason="inductor needs a C++ compiler")
@pytest.mark.slow  # (two torch.compile graphs of ~30 s each on a 2-core CPU; make test-slow)
def test_compile_covers_the_controlnets(tiny_folders, controlnet_folders):
    """pipe.compile(): the ControlNet runs through torch.compile too (same images as eager); one replaced since is
    compiled anew; optimize_for_inference() after compile() leaves the ControlNets to torch.compile."""
    ours, _ = pair(tiny_folders, controlnet_folders)
    kwargs = dict(image=CONTROL, num_inference_steps=2)
    eager = generate(ours, **kwargs)
    ours.compile(max_autotune=False)
    ours.optimize_for_inference()
    np.testing.assert_allclose(generate(ours, **kwargs), eager, atol=1e-4, rtol=0)
    (net, compiled), = ours._compiled_nets.values()
    assert net is ours.controlnet and compiled._orig_mod is net
    ours.controlnet = ControlNetModel.from_pretrained(controlnet_folders[1])
    other = generate(ours, **kwargs)
    assert ours._compiled_nets[id(ours.controlnet)][0] is ours.controlnet and np.abs(other - eager).max() > 1e-4
