"""Latent consistency models: the LCMScheduler, an LCM-distilled U-Net (time_cond_proj_dim: the guidance scale as an
input) and the pipelines that run them, each against diffusers with the same weights; LCM-LoRA's layers."""
import json
import warnings

import numpy as np
import pytest
import torch

from latentdiff import LatentConsistencyModelPipeline, LatentDiffusionPipeline, UNet2DConditionModel
from latentdiff.models.embeddings import guidance_embedding
from latentdiff.schedulers import LCMScheduler, sample_lcm, scheduler_from_name
from tiny import TINY_UNET, diffusers_pipeline, generate, randomized

pytestmark = pytest.mark.usefixtures("one_thread")

COND_DIM = 16


# ---- the scheduler ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction"},
                                    {"original_inference_steps": 100, "timestep_scaling": 5.0, "clip_sample": True}])
@pytest.mark.parametrize("grid", [(1, {}), (4, {}), (8, {}), (4, {"original_inference_steps": 20}),
                                  (3, {"strength": 0.5}), (None, {"timesteps": [999, 499, 259, 19]})])
def test_scheduler_matches_diffusers(config, grid):
    """Timesteps, next samples (noise drawn from per-sample generators) and the denoised estimates."""
    import diffusers

    steps, options = grid
    ours, ref = LCMScheduler(**config), diffusers.LCMScheduler(**config)
    ours.set_timesteps(steps, **options)
    ref.set_timesteps(steps, **options)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref = x.clone()
    ours_gen = [torch.Generator().manual_seed(s) for s in (1, 2)]
    ref_gen = [torch.Generator().manual_seed(s) for s in (1, 2)]
    for i, t in enumerate(ours.timesteps):
        output = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10 + i))
        got = ours.step(output, t, x, generator=ours_gen)
        expected = ref.step(output, ref.timesteps[i], x_ref, generator=ref_gen)
        torch.testing.assert_close(got.prev_sample, expected.prev_sample, rtol=0, atol=2e-5)
        torch.testing.assert_close(got.denoised, expected.denoised, rtol=0, atol=2e-5)
        x, x_ref = got.prev_sample, expected.prev_sample
    assert torch.equal(x, got.denoised)  # the last step adds no noise


def test_sample_lcm_is_the_scheduler_loop():
    """The pure sampler and the class agree (a model that predicts fixed noise, one generator)."""
    from latentdiff.guidance import Denoiser

    sched = LCMScheduler()
    sched.set_timesteps(4)
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    got = sample_lcm(Denoiser(lambda x, t: eps), x0, sched.timesteps, sched.alphas_cumprod,
                     torch.Generator().manual_seed(5))
    x, g = x0, torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        x = sched.step(eps, t, x, generator=g).prev_sample
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)


def test_scheduler_errors_and_config():
    sched = LCMScheduler()
    with pytest.raises(ValueError, match="more than original_inference_steps=50"):
        sched.set_timesteps(51)
    with pytest.raises(ValueError, match="strength=0.05 leaves 2 of the 50"):
        sched.set_timesteps(4, strength=0.05)
    with pytest.raises(ValueError, match="strength < 1 with timesteps="):
        sched.set_timesteps(timesteps=[999, 499], strength=0.5)
    with pytest.raises(ValueError, match="takes no custom sigmas"):
        sched.set_timesteps(sigmas=[14.6, 1.0, 0.0])
    with pytest.raises(ValueError, match="must decrease strictly"):
        sched.set_timesteps(timesteps=[499, 999])
    with pytest.warns(UserWarning, match=r"timesteps \[500\] are not on the distillation grid"):
        sched.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="original_inference_steps=2000 must lie in"):
        LCMScheduler(original_inference_steps=2000)
    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        LCMScheduler(thresholding=True)
    # from another scheduler's config (a pipeline's): its keys LCM shares are kept (as diffusers' from_config keeps
    # them), LCM's own at their defaults
    lcm = scheduler_from_name("lcm", {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "steps_offset": 1,
                                      "clip_sample": True, "set_alpha_to_one": False})
    assert (lcm.config.beta_schedule, lcm.config.original_inference_steps, lcm.config.clip_sample) == (
        "linear", 50, True)


# ---- the U-Net ----------------------------------------------------------------------------------------------------
def test_guidance_embedding_matches_diffusers():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 1.5, 7.5, 14.0])
    for dim in (16, 17, 256):
        expected = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, dim)
        torch.testing.assert_close(guidance_embedding(w, dim), expected, rtol=0, atol=0)


def test_unet_with_guidance_input_matches_diffusers(tmp_path):
    """time_cond_proj_dim: the U-Net's time embedding adds the projected guidance embedding; config and weights
    load both ways; a bad timestep_cond is refused with the shape it needs."""
    import diffusers

    torch.manual_seed(0)
    ref = randomized(diffusers.UNet2DConditionModel(**TINY_UNET, time_cond_proj_dim=COND_DIM), 1)
    ref.save_pretrained(tmp_path / "ref")
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "ref").eval()
    assert ours.time_embedding.cond_proj.weight.shape == (32, COND_DIM)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, 32)
    cond = guidance_embedding(torch.tensor([7.0, 1.0]), COND_DIM)
    with torch.no_grad():
        expected = ref(x, 500, ctx, timestep_cond=cond).sample
        torch.testing.assert_close(ours(x, 500, ctx, timestep_cond=cond), expected, rtol=0, atol=1e-5)
        # one condition for the batch; k contexts per sample (guidance over an LCM U-Net)
        torch.testing.assert_close(ours(x, 500, ctx, timestep_cond=cond[:1]),
                                   ref(x, 500, ctx, timestep_cond=cond[:1].expand(2, -1)).sample, rtol=0, atol=1e-5)
        twice = ours(x, 500, torch.cat([ctx, ctx]), timestep_cond=cond)
        torch.testing.assert_close(twice, torch.cat([expected, expected]), rtol=0, atol=1e-5)
        assert (ours(x, 500, ctx, timestep_cond=cond * 0) - expected).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["time_cond_proj_dim"] == COND_DIM
    again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours")
    torch.testing.assert_close(again.time_embedding.cond_proj.weight, ref.time_embedding.cond_proj.weight)
    with pytest.raises(ValueError, match=r"timestep_cond must be a tensor \[2 \(or 1\), 16\]"):
        ours(x, 500, ctx, timestep_cond=cond[:, :8])
    with pytest.raises(ValueError, match="this U-Net takes none"):
        UNet2DConditionModel(ours.config.replace(time_cond_proj_dim=None))(x, 500, ctx, timestep_cond=cond)


# ---- pipelines ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lcm_folder(tiny_folders, tmp_path_factory):
    """A tiny LCM-distilled pipeline as diffusers saves one: a U-Net with time_cond_proj_dim, an LCMScheduler, and
    model_index.json naming LatentConsistencyModelPipeline."""
    import diffusers

    folder = tmp_path_factory.mktemp("lcm") / "pipe"
    ref = diffusers_pipeline(tiny_folders[0] / "tokenizer", scheduler_cls="LCMScheduler",
                             pipeline_cls="LatentConsistencyModelPipeline", time_cond_proj_dim=COND_DIM)
    randomized(ref.unet, 5, 0.05)
    ref.save_pretrained(folder, safe_serialization=True)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "LatentConsistencyModelPipeline"
    assert isinstance(diffusers.DiffusionPipeline.from_pretrained(folder).scheduler, diffusers.LCMScheduler)
    return folder


def _reference(folder, cls: str = "LatentConsistencyModelPipeline"):
    import diffusers

    ref = getattr(diffusers, cls).from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("kwargs", [{}, {"num_inference_steps": 1, "guidance_scale": 3.0},
                                    {"num_inference_steps": 3, "original_inference_steps": 30},
                                    {"timesteps": [999, 639, 259]}])
def test_lcm_pipeline_matches_diffusers(lcm_folder, kwargs):
    """LatentConsistencyModelPipeline: its defaults (4 steps, guidance 8.5), fewer or custom steps; two prompts,
    two images each, noise drawn in every step from each image's generator."""
    ref, ours = _reference(lcm_folder), LatentConsistencyModelPipeline.from_pretrained(lcm_folder)
    assert isinstance(ours.scheduler, LCMScheduler)
    prompts = ["a red circle", "a blue star"]
    kwargs = {"num_inference_steps": 4, "guidance_scale": 8.5, "num_images_per_prompt": 2, **kwargs}
    expected = generate(ref, prompts, images=4, **kwargs)
    np.testing.assert_allclose(generate(ours, prompts, images=4, **kwargs), expected, atol=2e-4, rtol=0)
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # (each image its own noise)


def test_stable_diffusion_pipelines_run_an_lcm_unet_as_diffusers_does(lcm_folder):
    """Text-to-image and img2img: one unguided U-Net call per step with the guidance scale embedded
    (do_classifier_free_guidance is False), the negative prompt unused."""
    from PIL import Image

    from latentdiff import LatentDiffusionImg2ImgPipeline

    ours = LatentDiffusionPipeline.from_pretrained(lcm_folder)
    calls = []
    ours.unet.register_forward_hook(lambda module, args, kwargs_, out: calls.append(args[0].shape[0]),
                                    with_kwargs=True)
    seen = []
    got = generate(ours, negative_prompt="blurry", guidance_scale=6.0,
                   callback_on_step_end=lambda pipe, i, t, d: seen.append(pipe.do_classifier_free_guidance) or d)
    assert calls == [1] * 4 and seen == [False] * 4
    expected = generate(_reference(lcm_folder, "StableDiffusionPipeline"), negative_prompt="blurry",
                        guidance_scale=6.0)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    image = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    kwargs = dict(image=image, strength=0.6, num_inference_steps=5)
    expected = generate(_reference(lcm_folder, "StableDiffusionImg2ImgPipeline"), **kwargs)
    np.testing.assert_allclose(generate(LatentDiffusionImg2ImgPipeline.from_pipe(ours), **kwargs), expected,
                               atol=2e-4, rtol=0)


def test_lcm_folder_round_trip_and_errors(lcm_folder, tiny_folders, tmp_path):
    ours = LatentConsistencyModelPipeline.from_pretrained(lcm_folder)
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline" and index["scheduler"][1] == "LCMScheduler"
    expected = generate(ours)
    np.testing.assert_allclose(generate(_reference(tmp_path / "saved")), expected, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="not LCM-distilled. For LCM-LoRA use LatentDiffusionPipeline"):
        LatentConsistencyModelPipeline.from_pretrained(tiny_folders[1])("a red circle")
    with pytest.raises(ValueError, match="more than original_inference_steps=50"):
        ours("a red circle", num_inference_steps=60)


def test_lcm_lora_layers_and_scheduler_match_diffusers(tiny_folders, tmp_path):
    """LCM-LoRA: a LoRA over the layers LCM-LoRA adapts (attention, feed-forward, ResNet convs, shortcuts, time
    projections, down- and upsamplers), on the plain pipeline with an LCMScheduler and guidance 1.5."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
    ref = _reference(tiny_folders[0], "StableDiffusionPipeline")
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    ref.unet.add_adapter(config)
    state = get_peft_model_state_dict(ref.unet)
    assert any("time_emb_proj" in k for k in state) and any("conv_shortcut" in k for k in state)
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state, safe_serialization=True,
                                                        unet_lora_adapter_metadata=config.to_dict())
    ours = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
    ours.scheduler = scheduler_from_name("lcm", ours.scheduler.config)
    ours.load_lora_weights(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = generate(ref, guidance_scale=1.5)
    np.testing.assert_allclose(generate(ours, guidance_scale=1.5), expected, atol=2e-4, rtol=0)


def test_kohya_lora_with_ldm_names_on_an_lcm_unet(lcm_folder, tmp_path):
    """kohya's LoRA names the U-Net's layers as the original LDM code does; an LCM U-Net's extra guidance projection
    (no LDM name) does not stop those names from resolving."""
    from safetensors.torch import save_file

    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_folder)
    before = pipe.unet.down_blocks[0].attentions[0].proj_in.weight.clone()
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(2, 32, 1, 1, generator=g),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.randn(32, 2, 1, 1, generator=g),
               "lora_unet_input_blocks_1_1_proj_in.alpha": torch.tensor(1.0)}, tmp_path / "style.safetensors")
    pipe.load_lora_weights(tmp_path / "style.safetensors")
    assert (pipe.unet.down_blocks[0].attentions[0].proj_in.weight - before).abs().max() > 1e-3


def test_optimized_lcm_pipeline_same_images(lcm_folder):
    """optimize_for_inference packs the guidance projection with the rest of the time MLP."""
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_folder)
    expected = generate(pipe, guidance_scale=8.5)
    pipe.optimize_for_inference()
    np.testing.assert_allclose(generate(pipe, guidance_scale=8.5), expected, atol=2e-4, rtol=0)


@pytest.mark.slow  # (a torch.compile graph of ~40 s on a 2-core CPU; make test-slow)
def test_compiled_lcm_pipeline_same_images(lcm_folder):
    """pipe.compile() with the guidance embedding as the U-Net's timestep_cond: the eager images; a new guidance
    scale (another timestep_cond value, same shape) reuses the graph."""
    from torch._dynamo.utils import counters

    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_folder)
    with torch.no_grad():  # (so that the guidance scale moves the images well beyond the tolerance)
        pipe.unet.time_embedding.cond_proj.weight.mul_(100)
    eager = [generate(pipe, guidance_scale=g) for g in (8.5, 3.0)]
    pipe.compile(max_autotune=False)
    np.testing.assert_allclose(generate(pipe, guidance_scale=8.5), eager[0], atol=2e-4, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    np.testing.assert_allclose(generate(pipe, guidance_scale=3.0), eager[1], atol=2e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs
    assert np.abs(eager[0] - eager[1]).max() > 1e-3  # (5x the tolerance)


def test_controlnet_over_an_lcm_unet_matches_diffusers(lcm_folder):
    """A ControlNet made from the LCM U-Net (from_unet: the guidance projection is the U-Net's alone) guiding it, as
    diffusers' ControlNet pipeline runs it: the guidance embedding goes to the U-Net, not to the ControlNet."""
    import diffusers

    from latentdiff import ControlNetModel, LatentDiffusionControlNetPipeline

    ours = LatentDiffusionControlNetPipeline.from_pretrained(lcm_folder, controlnet=randomized(
        ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(lcm_folder / "unet"),
                                  conditioning_embedding_out_channels=(8, 16)), 3))
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(lcm_folder, safety_checker=None, controlnet=(
        diffusers.ControlNetModel(**{k: v for k, v in ours.controlnet.config.to_dict().items() if k[0] != "_"})))
    ref.controlnet.load_state_dict(ours.controlnet.state_dict())
    ref.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    expected = generate(ref, image=control, guidance_scale=8.5)
    np.testing.assert_allclose(generate(ours, image=control, guidance_scale=8.5), expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("kwargs", [{}, {"strength": 0.5, "num_inference_steps": 3},
                                    {"strength": 0.3, "original_inference_steps": 20, "num_inference_steps": 2},
                                    {"timesteps": [999, 759, 499, 259], "strength": 0.5}])
def test_lcm_img2img_matches_diffusers(lcm_folder, kwargs):
    """LatentConsistencyModelImg2ImgPipeline: every step runs at any strength (the grid spans the strength); with
    timesteps given, the strength selects from them."""
    from PIL import Image

    from latentdiff import LatentConsistencyModelImg2ImgPipeline

    image = Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8))
    ours = LatentConsistencyModelImg2ImgPipeline.from_pretrained(lcm_folder)
    kwargs = {"image": image, "guidance_scale": 8.5, "num_inference_steps": 4, **kwargs}
    prompts = ["a red circle", "a blue star"]
    expected = generate(_reference(lcm_folder, "LatentConsistencyModelImg2ImgPipeline"), prompts, images=2, **kwargs)
    got = generate(ours, prompts, images=2, **kwargs)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    assert len(ours.scheduler.timesteps) == (4 if "timesteps" in kwargs else kwargs["num_inference_steps"])


@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_tcd_scheduler_in_the_pipeline_matches_diffusers(tiny_folders, eta):
    """TCD (as with a TCD-LoRA): the pipeline's eta is the scheduler's gamma; noise from each image's generator."""
    import diffusers

    from latentdiff.schedulers import TCDScheduler

    ref = _reference(tiny_folders[0], "StableDiffusionPipeline")
    ref.scheduler = diffusers.TCDScheduler.from_config(ref.scheduler.config)
    ours = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
    ours.scheduler = scheduler_from_name("tcd", ours.scheduler.config)
    assert isinstance(ours.scheduler, TCDScheduler)
    expected = generate(ref, images=2, num_images_per_prompt=2, guidance_scale=1.0, eta=eta)
    got = generate(ours, images=2, num_images_per_prompt=2, guidance_scale=1.0, eta=eta)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
