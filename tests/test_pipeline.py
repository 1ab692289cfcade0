"""The pipeline against diffusers' StableDiffusionPipeline with identical tiny random weights, both folder
directions, and its behaviour: seeds, guidance, callbacks, output types and every bad input."""
import contextlib
import shutil

import numpy as np
import pytest
import torch

from latentdiff import LatentDiffusionImg2ImgPipeline, LatentDiffusionPipeline

PROMPTS = ["a small red circle", "a large blue star in the top right corner on a black background"]


@pytest.fixture(scope="module")
def folders(tiny_folders):
    return tiny_folders


def latents_for(n, seed=0):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


# each scheduler from one of the two folders, in turn (the folders load the same whatever scheduler comes after)
@pytest.mark.parametrize("scheduler, direction", [
    (name, ["diffusers->ours", "ours->diffusers"][i % 2]) for i, name in enumerate([
        "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler",
        "UniPCMultistepScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "DPMSolverSinglestepScheduler",
        "DEISMultistepScheduler", "DDIMScheduler"])])
def test_same_image_as_diffusers(folders, scheduler, direction):
    import diffusers

    from latentdiff import schedulers

    diffusers_folder, ours_folder = folders
    load_from = diffusers_folder if direction == "diffusers->ours" else ours_folder
    ref = diffusers.StableDiffusionPipeline.from_pretrained(load_from, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(load_from)
    ref.scheduler = getattr(diffusers, scheduler).from_config(dict(ref.scheduler.config))
    ours.scheduler = getattr(schedulers, scheduler).from_config(dict(ours.scheduler.config))
    kwargs = dict(num_inference_steps=6, guidance_scale=5.0, output_type="np", negative_prompt=["", "blurry"])
    expected = ref(PROMPTS, latents=latents_for(2), **kwargs).images
    got = ours(PROMPTS, latents=latents_for(2), progress=False, **kwargs).images
    assert got.shape == expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler", ["dpm++sde", "dpm2_a"])
def test_sde_sampler_same_image_as_diffusers(folders, sampler):
    """DPM++ 2M SDE and DPM2-ancestral draw noise in steps from the call's generators: one per image gives
    diffusers' images."""
    import diffusers

    from latentdiff import schedulers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[1], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folders[1])
    ours.scheduler = schedulers.scheduler_from_name(sampler, ours.scheduler.config, use_karras_sigmas=True)
    ref.scheduler = getattr(diffusers, type(ours.scheduler).__name__).from_config(dict(ours.scheduler.config))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    kwargs = dict(num_inference_steps=6, guidance_scale=5.0, output_type="np")
    expected = ref(PROMPTS, latents=latents_for(2), generator=gens(), **kwargs).images
    got = ours(PROMPTS, latents=latents_for(2), generator=gens(), progress=False, **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    other = ours(PROMPTS, latents=latents_for(2), generator=[torch.Generator().manual_seed(9)] * 2, progress=False,
                 **kwargs).images
    assert np.abs(other - got).max() > 1e-2  # the noise drawn in the steps shows


@pytest.mark.filterwarnings("ignore:Should have t:UserWarning")  # torchsde, under diffusers' scheduler
def test_dpmpp_sde_same_image_as_diffusers(folders):
    """DPM++ SDE (Karras): with the Brownian tree's seed in the config, diffusers' image; without one, ours seeds it
    from the call's generators (diffusers' pipeline passes them no generator: it draws from torch's global one), so
    a seed gives the same image, each image of a batch as if alone."""
    import diffusers

    from latentdiff import schedulers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[1], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folders[1])
    ours.scheduler = schedulers.scheduler_from_name("dpmsolver_sde", ours.scheduler.config, use_karras_sigmas=True,
                                                    noise_sampler_seed=3)
    ref.scheduler = diffusers.DPMSolverSDEScheduler.from_config(dict(ours.scheduler.config))
    kwargs = dict(num_inference_steps=5, guidance_scale=5.0, output_type="np")
    expected = ref(PROMPTS, latents=latents_for(2), **kwargs).images
    got = ours(PROMPTS, latents=latents_for(2), progress=False, **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    ours.scheduler = schedulers.DPMSolverSDEScheduler.from_config(ours.scheduler.config, noise_sampler_seed=None)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    pair = ours(PROMPTS, generator=gens(3, 4), progress=False, **kwargs).images
    alone = ours(PROMPTS[1], generator=gens(4), progress=False, **kwargs).images
    np.testing.assert_allclose(pair[1:], alone, atol=1e-5, rtol=0)
    assert np.abs(ours(PROMPTS, generator=gens(3, 5), progress=False, **kwargs).images[1] - pair[1]).max() > 1e-2


@pytest.mark.parametrize("scheduler, grid", [
    ("DPMSolverMultistepScheduler", dict(timesteps=[999, 850, 736, 645, 545, 455, 343, 233, 124, 24])),
    ("EulerDiscreteScheduler", dict(sigmas=[14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152,
                                            0.029, 0.0]))])
def test_custom_timesteps_and_sigmas_as_diffusers(folders, scheduler, grid):
    """pipe(..., timesteps=...) / (..., sigmas=...): the given grid instead of num_inference_steps, diffusers' image."""
    import diffusers

    from latentdiff import schedulers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[1], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folders[1])
    ref.scheduler = getattr(diffusers, scheduler).from_config(dict(ref.scheduler.config))
    ours.scheduler = getattr(schedulers, scheduler).from_config(dict(ours.scheduler.config))
    steps = []
    kwargs = dict(guidance_scale=5.0, output_type="np", **grid)
    expected = ref(PROMPTS[0], latents=latents_for(1), **kwargs).images
    got = ours(PROMPTS[0], latents=latents_for(1), progress=False, **kwargs,
               callback_on_step_end=lambda p, i, t, s: steps.append(float(t))).images
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert len(steps) == len(grid.get("timesteps", grid.get("sigmas", [])[1:])) == 10 + ("sigmas" in grid)
    assert steps == ours.scheduler.timesteps.tolist()
    ours.scheduler = schedulers.DDIMScheduler.from_config(ours.scheduler.config)
    with pytest.raises(ValueError, match="DDIMScheduler takes no custom"):
        ours(PROMPTS[0], progress=False, **grid)


def test_diffusers_callbacks_interrupt_and_dynamic_guidance(folders):
    """diffusers' documented callbacks: `pipe._interrupt = True` stops the loop (then decodes); setting
    `pipe._guidance_scale = 0` ends guidance from the next step (diffusers' example also halves prompt_embeds, which
    ours needs not); pipe.num_timesteps / guidance_scale / do_classifier_free_guidance read the running call."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[1], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folders[1])
    seen = []

    def interrupt(pipe, i, t, kwargs):
        seen.append((pipe.num_timesteps, pipe.guidance_scale, pipe.do_classifier_free_guidance))
        pipe._interrupt = i == 1
        return kwargs

    def dynamic_cfg(pipe, i, t, kwargs):
        if i == int(pipe.num_timesteps * 0.4):
            if "prompt_embeds" in kwargs:  # diffusers' example: the conditional half only from here
                kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return kwargs

    kwargs = dict(num_inference_steps=5, guidance_scale=5.0, output_type="np")
    for callback, ref_inputs in ((interrupt, ["latents"]), (dynamic_cfg, ["prompt_embeds"])):
        expected = ref(PROMPTS[0], latents=latents_for(1), callback_on_step_end=callback,
                       callback_on_step_end_tensor_inputs=ref_inputs, **kwargs).images
        got = ours(PROMPTS[0], latents=latents_for(1), callback_on_step_end=callback, progress=False,
                   **kwargs).images
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert seen == [(5, 5.0, True)] * 4  # two steps each library, then stopped
    plain = ours(PROMPTS[0], latents=latents_for(1), progress=False, **kwargs).images
    assert np.abs(plain - got).max() > 1e-3  # the guidance change shows
    with pytest.raises(ValueError, match="set pipe._guidance_scale = 0"):
        ours(PROMPTS[0], callback_on_step_end=dynamic_cfg, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_stable_diffusion_scheduler_settings_as_diffusers(folders):
    """Built with a scheduler whose config has steps_offset 0 and clip_sample True (DDIM's defaults), both pipelines
    sample with steps_offset 1 and no clipping (diffusers' StableDiffusionPipeline changes them, with a warning)."""
    import diffusers

    from latentdiff import schedulers

    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=0,
                  clip_sample=True)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[1], safety_checker=None,
                                                            scheduler=diffusers.DDIMScheduler(**config))
    ref.set_progress_bar_config(disable=True)
    scheduler = schedulers.DDIMScheduler(**config)
    with pytest.warns(UserWarning, match=r"DDIMScheduler has steps_offset=0, clip_sample=True; using steps_offset=1, "
                                         r"clip_sample=False as diffusers' StableDiffusionPipeline does"):
        ours = LatentDiffusionPipeline.from_pretrained(folders[1], scheduler=scheduler)
    assert ours.scheduler is scheduler and scheduler.config.steps_offset == 1 and not scheduler.config.clip_sample
    assert (ref.scheduler.config.steps_offset, ref.scheduler.config.clip_sample) == (1, False)
    kwargs = dict(num_inference_steps=5, guidance_scale=5.0, output_type="np")
    expected = ref(PROMPTS[0], latents=latents_for(1), **kwargs).images
    np.testing.assert_allclose(ours(PROMPTS[0], latents=latents_for(1), progress=False, **kwargs).images, expected,
                               atol=1e-4, rtol=0)


def test_saved_folder_layout(folders):
    _, ours = folders
    import json

    index = json.loads((ours / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["safety_checker"] == [None, None]
    weights = sorted(p.relative_to(ours).as_posix() for p in ours.rglob("*") if p.suffix in
                     (".safetensors", ".bin", ".ckpt", ".pt"))
    assert weights == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]


def test_config_as_diffusers(folders):
    """pipe.config: diffusers' for the same folder (each component's (library, class), the settings, the folder),
    read-only, attributes too; it follows a swapped component and from_pipe."""
    import diffusers

    from latentdiff import LatentDiffusionImg2ImgPipeline, schedulers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[1], safety_checker=None)
    pipe = LatentDiffusionPipeline.from_pretrained(folders[1])
    assert dict(pipe.config) == dict(ref.config) and pipe.name_or_path == ref.name_or_path == folders[1]
    assert pipe.config.unet == ("diffusers", "UNet2DConditionModel") and pipe.config.requires_safety_checker is False
    for change in (lambda c: c.__setitem__("unet", None), lambda c: setattr(c, "unet", None), lambda c: c.clear(),
                   lambda c: c.update(unet=None), lambda c: c.pop("unet")):
        with pytest.raises(TypeError, match="pipe.config is read-only"):
            change(pipe.config)
    with pytest.raises(AttributeError, match="pipe.config has no 'controlnet'"):
        pipe.config.controlnet
    pipe.scheduler = schedulers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    assert pipe.config.scheduler == ref.config.scheduler == ("diffusers", "EulerDiscreteScheduler")
    img2img = LatentDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert dict(img2img.config) == dict(diffusers.StableDiffusionImg2ImgPipeline.from_pipe(ref).config)
    assert LatentDiffusionPipeline(**{k: v for k, v in pipe.components.items()}).config._name_or_path is None


def test_custom_loop_helpers_as_diffusers(folders, pipe):
    """numpy_to_pil, progress_bar and prepare_latents, which diffusers' custom denoising loops call on the
    pipeline."""
    import diffusers

    from latentdiff import schedulers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[1], safety_checker=None)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)  # (a starting scale of 14.6)
    euler = LatentDiffusionPipeline.from_pipe(
        pipe, scheduler=schedulers.EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    args = (2, 4, 32, 24, torch.float32, torch.device("cpu"))  # (this VAE downsamples by 2)
    for generator in (lambda: torch.Generator().manual_seed(3),
                      lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]):
        ours, theirs = euler.prepare_latents(*args, generator()), ref.prepare_latents(*args, generator())
        assert ours.shape == (2, 4, 16, 12) and torch.equal(ours, theirs) and ours.std() > 10
    given = torch.randn(2, 4, 16, 12, dtype=torch.float64)
    torch.testing.assert_close(euler.prepare_latents(*args, None, given), ref.prepare_latents(*args, None, given),
                               rtol=0, atol=0)

    g = np.random.default_rng(0)
    for images in (g.random((2, 8, 6, 3)), g.random((8, 6, 3)), g.random((2, 8, 6, 1))):
        ours, theirs = pipe.numpy_to_pil(images), diffusers.DiffusionPipeline.numpy_to_pil(images)
        assert len(ours) == len(theirs) and [im.mode for im in ours] == [im.mode for im in theirs]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, theirs))
    import io

    shown = io.StringIO()
    pipe.set_progress_bar_config(file=shown, desc="mine")
    try:
        assert list(pipe.progress_bar(range(3))) == [0, 1, 2] and "mine: 100%" in shown.getvalue()
        with pipe.progress_bar(total=4) as bar:
            bar.update(4)
        assert bar.total == 4 and "4/4" in shown.getvalue()
        pipe.set_progress_bar_config(disable=True)
        assert pipe.progress_bar(range(3)).disable
        with pytest.raises(ValueError, match="progress_bar needs an iterable or a total"):
            pipe.progress_bar()
    finally:
        pipe.set_progress_bar_config()


def test_folder_scheduler_classes(folders, tmp_path):
    """A folder's scheduler loads as the class it names: SD 1.5's PNDMScheduler (PLMS) as ours; one we do not
    implement as DPM-Solver++ over the same noise schedule, with a warning that names it."""
    import json

    from latentdiff import schedulers

    folder = tmp_path / "pipe"
    shutil.copytree(folders[1], folder)
    file = folder / "scheduler" / "scheduler_config.json"
    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
            "clip_sample": False}
    file.write_text(json.dumps(sd15))
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, schedulers.PNDMScheduler) and pipe.scheduler.config.skip_prk_steps
    file.write_text(json.dumps({**sd15, "_class_name": "LMSDiscreteScheduler"}))
    lms = LatentDiffusionPipeline.from_pretrained(folder)
    assert isinstance(lms.scheduler, schedulers.LMSDiscreteScheduler)
    assert run(lms, PROMPTS[0], num_inference_steps=3).shape == (1, 3, 16, 16)  # the pipeline's loop runs it
    file.write_text(json.dumps({**sd15, "_class_name": "KDPM2DiscreteScheduler"}))
    dpm2 = LatentDiffusionPipeline.from_pretrained(folder)
    assert isinstance(dpm2.scheduler, schedulers.KDPM2DiscreteScheduler)
    assert run(dpm2, PROMPTS[0], num_inference_steps=3).shape == (1, 3, 16, 16)  # (two model calls a step)
    file.write_text(json.dumps({**sd15, "_class_name": "DEISMultistepScheduler"}))
    assert isinstance(LatentDiffusionPipeline.from_pretrained(folder).scheduler, schedulers.DEISMultistepScheduler)
    file.write_text(json.dumps({**sd15, "_class_name": "DPMSolverSDEScheduler"}))
    assert isinstance(LatentDiffusionPipeline.from_pretrained(folder).scheduler, schedulers.DPMSolverSDEScheduler)
    file.write_text(json.dumps({**sd15, "_class_name": "EDMEulerScheduler"}))
    with pytest.warns(UserWarning, match="EDMEulerScheduler is not implemented in latentdiff; using "
                                         "DPMSolverMultistepScheduler with the same noise schedule"):
        pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, schedulers.DPMSolverMultistepScheduler)
    assert (pipe.scheduler.config.beta_end, pipe.scheduler.config.steps_offset) == (0.012, 1)


def test_diffusers_loading_idioms(folders):
    """diffusers' loading options that hold here anyway are taken; from_pipe shares the modules; attention slicing
    is taken and changes nothing (the attention never holds a whole score matrix)."""
    loaded = LatentDiffusionPipeline.from_pretrained(folders[1], use_safetensors=True, local_files_only=True,
                                                     low_cpu_mem_usage=True, safety_checker=None)
    with pytest.raises(ValueError, match="use_safetensors=False: latentdiff loads safetensors only"):
        LatentDiffusionPipeline.from_pretrained(folders[1], use_safetensors=False)
    with pytest.raises(TypeError, match=r"from_pretrained: unexpected arguments \['revision'\]"):
        LatentDiffusionPipeline.from_pretrained(folders[1], revision="main")
    img2img = LatentDiffusionImg2ImgPipeline.from_pipe(loaded)
    assert type(img2img) is LatentDiffusionImg2ImgPipeline
    assert all(getattr(img2img, name) is getattr(loaded, name) for name in loaded.component_names)
    from latentdiff.schedulers import DDIMScheduler

    ddim = DDIMScheduler.from_config(loaded.scheduler.config)
    assert LatentDiffusionPipeline.from_pipe(img2img, scheduler=ddim).scheduler is ddim
    with pytest.raises(TypeError, match=r"from_pipe: unexpected arguments \['text_model'\]"):
        LatentDiffusionPipeline.from_pipe(loaded, text_model=None)
    before = run(loaded, PROMPTS[0], latents=latents_for(1), num_inference_steps=2)
    loaded.enable_attention_slicing()
    loaded.enable_attention_slicing(2)
    assert torch.equal(run(loaded, PROMPTS[0], latents=latents_for(1), num_inference_steps=2), before)
    loaded.disable_attention_slicing()
    with pytest.raises(ValueError, match="slice_size=0"):
        loaded.enable_attention_slicing(0)
    with pytest.warns(UserWarning, match="scaled_dot_product_attention .* already; nothing changes"):
        loaded.enable_xformers_memory_efficient_attention()
    loaded.disable_xformers_memory_efficient_attention()
    assert torch.equal(run(loaded, PROMPTS[0], latents=latents_for(1), num_inference_steps=2), before)
    loaded.enable_vae_tiling()
    loaded.enable_vae_slicing()
    assert loaded.vae.use_tiling and loaded.vae.use_slicing
    torch.testing.assert_close(run(loaded, PROMPTS[0], latents=latents_for(1), num_inference_steps=2), before,
                               rtol=0, atol=1e-5)
    loaded.disable_vae_tiling()
    loaded.disable_vae_slicing()
    assert not loaded.vae.use_tiling and not loaded.vae.use_slicing


def test_encode_prompt_as_diffusers(folders):
    """encode_prompt takes diffusers' arguments and returns what diffusers' does; its embeddings passed back as
    prompt_embeds= and negative_prompt_embeds= give the same images as the prompts."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[1], safety_checker=None)
    ours = LatentDiffusionPipeline.from_pretrained(folders[1])
    args = (PROMPTS, "cpu", 2, True, ["", "blurry"])
    with torch.no_grad():
        expected = ref.encode_prompt(*args)
    got = ours.encode_prompt(*args)
    assert got[0].shape == (4, 77, 32)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    cond, uncond = ours.encode_prompt(PROMPTS[0], do_classifier_free_guidance=False)
    assert cond.shape == (1, 77, 32) and uncond is None
    kwargs = dict(latents=latents_for(2), num_inference_steps=3)
    embeds, negative = ours.encode_prompt(PROMPTS, num_images_per_prompt=1, negative_prompt=["", "blurry"])
    torch.testing.assert_close(run(ours, None, prompt_embeds=embeds, negative_prompt_embeds=negative, **kwargs),
                               run(ours, PROMPTS, negative_prompt=["", "blurry"], **kwargs), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.encode_prompt(PROMPTS, lora_scale=0.5)[0], embeds, rtol=0, atol=0)  # no LoRA


def test_torch_dtype_forms(folders):
    """torch_dtype as diffusers takes it: a dtype, a dict by component with "default", "auto" (the files' own); a
    dtype's name; anything else is an error naming the forms."""
    pipe = LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype={"unet": torch.bfloat16,
                                                                            "default": torch.float16})
    assert (pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype) == (torch.bfloat16, torch.float16,
                                                                           torch.float16)
    pipe = LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype={"vae": "bfloat16"})
    assert (pipe.unet.dtype, pipe.vae.dtype) == (torch.float32, torch.bfloat16)
    assert LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype="auto").unet.dtype == torch.float32
    assert LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype="float16").unet.dtype == torch.float16
    img = run(LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype={"unet": torch.bfloat16}),
              PROMPTS[0], latents=latents_for(1), num_inference_steps=2)
    assert torch.isfinite(img).all()
    with pytest.raises(ValueError, match="torch_dtype='half16': give a floating dtype"):
        LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype="half16")
    with pytest.raises(ValueError, match=r"torch_dtype\['unet'\]=torch.int8"):
        LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype={"unet": torch.int8})
    with pytest.raises(ValueError, match=r"torch_dtype names \['transformer'\]"):
        LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype={"transformer": torch.float16})


def test_variant_and_sharded_folders_load(folders, tmp_path):
    """Folders diffusers writes with save_pretrained(variant="fp16") (diffusion_pytorch_model.fp16.safetensors, ...)
    or in shards (max_shard_size: an .index.json and its pieces, for every model) load, to the same tensors."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[0], safety_checker=None)
    ref.save_pretrained(tmp_path / "variant", variant="fp16")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "variant" / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert (tmp_path / "sharded" / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert (tmp_path / "sharded" / "text_encoder" / "model.safetensors.index.json").exists()
    plain = LatentDiffusionPipeline.from_pretrained(folders[0])
    plain.save_pretrained(tmp_path / "ours", variant="fp16")  # and ours writes them, for both libraries
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16", safety_checker=None)
    for got in (LatentDiffusionPipeline.from_pretrained(tmp_path / "variant", variant="fp16"),
                LatentDiffusionPipeline.from_pretrained(tmp_path / "sharded"),
                LatentDiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16"), theirs):
        for name in ("unet", "vae", "text_encoder"):
            expected, loaded = ({k.removeprefix("text_model."): v for k, v in getattr(p, name).state_dict().items()}
                                for p in (plain, got))  # (transformers' text model keys may carry the prefix)
            assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="only as safetensors"):
        plain.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(FileNotFoundError, match=r"model.safetensors \(found \['model.fp16.safetensors'\]: pass "
                                                r"variant='fp16'\)"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "variant")
    with pytest.raises(FileNotFoundError, match=r"pass variant=None"):
        LatentDiffusionPipeline.from_pretrained(folders[0], variant="fp16")
    shards = sorted((tmp_path / "sharded" / "unet").glob("*-of-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"shard listed in diffusion_pytorch_model.safetensors.index.json not "
                                                f"found: .*{shards[-1].name}"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "sharded")


@pytest.fixture(scope="module")
def pipe(folders):
    return LatentDiffusionPipeline.from_pretrained(folders[1])


def run(pipe, prompt, **kw):
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("output_type", "pt")
    return pipe(prompt, progress=False, **kw).images


def test_seed_is_batch_invariant(pipe):
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    alone = run(pipe, PROMPTS[1], generator=g(7))
    batch = run(pipe, PROMPTS, generator=[g(3), g(7)])
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=0)
    # a single generator seeded s gives image i the seed s + i
    several = run(pipe, PROMPTS[1], num_images_per_prompt=3, generator=g(5))
    torch.testing.assert_close(several[2:], run(pipe, PROMPTS[1], generator=g(7)), atol=1e-5, rtol=0)
    assert not torch.allclose(several[0], several[1])


def test_stochastic_sampler_is_batch_invariant(pipe):
    from latentdiff.schedulers import EulerAncestralDiscreteScheduler

    pipe2 = LatentDiffusionPipeline(**{**pipe.components, "scheduler":
                                       EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)})
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    alone = run(pipe2, PROMPTS[0], generator=g(11))
    batch = run(pipe2, PROMPTS, generator=[g(1), g(11)][::-1])
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=0)


def test_prompts_and_negatives_are_encoded_in_one_batch(folders):
    """A call's prompts and negative prompts that are not cached yet go through the text encoder as one batch
    (repeats once), with each one's own embedding; cached ones are not encoded again."""
    pipe = LatentDiffusionPipeline.from_pretrained(folders[1])
    batches = []
    pipe.text_encoder.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    cond, uncond = pipe.encode_prompt(["a red circle", "a blue star", "a red circle"], "cpu", 1, True,
                                      negative_prompt="blurry")
    assert batches == [3]  # two prompts and the negative
    for prompt, got in [("a red circle", cond[0]), ("a blue star", cond[1]), ("a red circle", cond[2]),
                        ("blurry", uncond[2])]:
        torch.testing.assert_close(got, pipe.text_encoder(pipe.tokenizer([prompt])).last_hidden_state[0])
    batches.clear()
    pipe.encode_prompt(["a blue star", "a green square"], "cpu", 1, True)
    assert batches == [2]  # the new prompt and the empty negative
    pipe._embedding_cache.clear()
    batches.clear()
    pipe.encode_prompt("a red circle", "cpu", 1, False)  # (unguided: no negative)
    assert batches == [1]


def test_prompt_cache_follows_the_text_encoders_weights(folders):
    from latentdiff import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(folders[1])
    before = pipe.embed_prompts(["a red circle"])
    assert torch.equal(pipe.embed_prompts(["a red circle"]), before)  # cached
    state = {k: v + 0.01 for k, v in pipe.text_encoder.state_dict().items()}
    pipe.text_encoder.load_state_dict(state)  # new weights, same module
    after = pipe.embed_prompts(["a red circle"])
    assert not torch.allclose(after, before)
    expected = pipe.text_encoder(pipe.tokenizer(["a red circle"])).last_hidden_state
    torch.testing.assert_close(after, expected)

    def replace_weights(scale: float) -> None:  # fresh tensors: new addresses, version counters from 0
        for name, p in list(pipe.text_encoder.named_parameters()):
            module, _, attr = name.rpartition(".")
            setattr(pipe.text_encoder.get_submodule(module), attr, torch.nn.Parameter(p * scale, requires_grad=False))

    with torch.no_grad():
        replace_weights(0.5)
    halved = pipe.embed_prompts(["a red circle"])
    assert not torch.allclose(halved, after)
    torch.testing.assert_close(halved, pipe.text_encoder(pipe.tokenizer(["a red circle"])).last_hidden_state)
    # weights made under inference_mode keep no version counter: encoded every time, nothing cached, no error
    with torch.inference_mode():
        replace_weights(2.0)
    first = pipe.embed_prompts(["a red circle"])
    assert not pipe._embedding_cache
    with torch.inference_mode():
        torch.testing.assert_close(first, pipe.text_encoder(pipe.tokenizer(["a red circle"])).last_hidden_state)


def test_guidance_one_is_conditional_only(pipe):
    calls = []
    unet = pipe.unet
    original = unet.forward

    def spy(x, t, ctx, *a, **k):
        calls.append((x.shape[0], ctx.shape[0]))
        return original(x, t, ctx, *a, **k)

    unet.forward = spy
    try:
        a = run(pipe, PROMPTS[0], guidance_scale=1.0, latents=latents_for(1))
        assert calls and all(c == (1, 1) for c in calls)
        # equal to the conditional-only prediction: guidance s with eps_u == eps_c reduces to it, so compare with
        # prompt_embeds as negative embeddings (eps_u = eps_c) at a high scale
        calls.clear()
        embeds = pipe.embed_prompts([PROMPTS[0]])
        b = run(pipe, None, prompt_embeds=embeds, negative_prompt_embeds=embeds, guidance_scale=9.0,
                latents=latents_for(1))
        assert calls and all(c == (1, 2) for c in calls)  # guided: the latents once, for both contexts
    finally:
        unet.forward = original
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_callback_reads_replaces_and_stops(pipe):
    seen = []

    def callback(p, step, t, state):
        seen.append((step, int(t)))
        if step == 1:
            return {"latents": torch.zeros_like(state["latents"]), "stop": True}

    out = run(pipe, PROMPTS[0], callback_on_step_end=callback, output_type="latent", latents=latents_for(1),
              callback_on_step_end_tensor_inputs=["latents"])  # (diffusers' argument: only latents are given)
    assert [s for s, _ in seen] == [0, 1]
    assert torch.count_nonzero(out) == 0
    with pytest.raises(ValueError, match=r"tensor_inputs=\['latents', 'prompt_embeds'\]: the callback is given"):
        run(pipe, PROMPTS[0], callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents",
                                                                                              "prompt_embeds"])


def test_fused_qkv_projections_give_the_same_images(folders):
    from latentdiff.models.attention import Attention

    pipe = LatentDiffusionPipeline.from_pretrained(folders[1])
    before = run(pipe, PROMPTS[0], latents=latents_for(1))
    pipe.fuse_qkv_projections()
    fused = run(pipe, PROMPTS[0], latents=latents_for(1))
    for model in (pipe.unet, pipe.vae):  # self-attentions in both were fused and used
        assert any(m.fused for m in model.modules() if isinstance(m, Attention)), type(model).__name__
    torch.testing.assert_close(fused, before, rtol=0, atol=1e-5)
    pipe.unfuse_qkv_projections()
    assert not any(m.fused for m in pipe.unet.modules() if isinstance(m, Attention))


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler"])
def test_denoising_projects_the_time_embedding_once_per_call(folders, scheduler, monkeypatch):
    """The loop's U-Net calls take the ResNet blocks' time projections from one table made for all steps
    (cache_timesteps): each block projects once per generation, whatever the number of steps, and the images are
    those of the U-Net computing them at every step (test_same_image_as_diffusers compares them to diffusers')."""
    import latentdiff.pipeline
    import latentdiff.schedulers as schedulers
    from latentdiff.models.resnet import ResnetBlock2D

    pipe = LatentDiffusionPipeline.from_pretrained(folders[1])
    pipe.scheduler = getattr(schedulers, scheduler).from_config(pipe.scheduler.config)
    rows, blocks = [], [m for m in pipe.unet.modules() if isinstance(m, ResnetBlock2D)]
    for block in blocks:
        block.time_emb_proj.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    tabled = run(pipe, PROMPTS[0], latents=latents_for(1), num_inference_steps=6)
    assert rows == [6] * len(blocks)  # one projection of the 6 timesteps each
    monkeypatch.setattr(latentdiff.pipeline, "cache_timesteps", lambda model, timesteps: contextlib.nullcontext())
    rows.clear()
    plain = run(pipe, PROMPTS[0], latents=latents_for(1), num_inference_steps=6)
    assert rows == [2] * 6 * len(blocks)  # at every step, for both contexts (its first stage has attention)
    torch.testing.assert_close(tabled, plain, rtol=0, atol=1e-5)


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the reads of a tensor's value by the host (on a GPU each one waits for the GPU: a sync)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler",
                                       "PNDMScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler",
                                       "KDPM2DiscreteScheduler", "DPMSolverSinglestepScheduler",
                                       "DEISMultistepScheduler"])
def test_denoising_reads_no_values_per_step(folders, scheduler):
    """The loop reads the timesteps once, not one per step: a per-step read would sync the GPU every step."""
    import latentdiff.schedulers as schedulers

    pipe = LatentDiffusionPipeline.from_pretrained(folders[1])
    pipe.scheduler = getattr(schedulers, scheduler).from_config(pipe.scheduler.config)
    denoise, reads = pipe.denoise, {}

    def counted(*args, **kwargs):
        with HostReads() as mode:
            out = denoise(*args, **kwargs)
        reads[len(args[1])] = mode.count  # by the number of timesteps
        return out

    pipe.denoise = counted
    for steps in (4, 8):  # PNDM (Runge-Kutta start) needs more than 3
        run(pipe, PROMPTS[0], num_inference_steps=steps, output_type="latent")
    few, many = reads.values()
    assert len(reads) == 2 and few == many <= 1, reads


def test_image_processor_as_diffusers(pipe):
    """diffusers' custom-loop ending (output_type="latent", the VAE, image_processor.postprocess) gives the
    pipeline's own images, and diffusers' VaeImageProcessor's."""
    from diffusers.image_processor import VaeImageProcessor

    latents = run(pipe, PROMPTS[0], latents=latents_for(1), output_type="latent")
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    for output_type in ("pt", "np"):
        got = pipe.image_processor.postprocess(decoded, output_type=output_type)
        expected = VaeImageProcessor().postprocess(decoded, output_type=output_type)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.asarray(got), np.asarray(run(pipe, PROMPTS[0], latents=latents_for(1),
                                                                   output_type=output_type)), atol=1e-6, rtol=0)
    pil = pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True])
    assert np.array_equal(np.asarray(pil[0]), np.asarray(VaeImageProcessor().postprocess(decoded)[0]))
    assert pipe.image_processor.postprocess(latents, output_type="latent") is latents


def test_output_types(pipe):
    from PIL import Image

    kw = dict(latents=latents_for(1), num_inference_steps=2)
    pil = pipe(PROMPTS[0], progress=False, **kw).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (16, 16)
    arr = run(pipe, PROMPTS[0], output_type="np", **kw)
    assert arr.shape == (1, 16, 16, 3) and arr.min() >= 0 and arr.max() <= 1
    pt = run(pipe, PROMPTS[0], output_type="pt", **kw)
    assert pt.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(np.asarray(pil[0]), (arr[0] * 255).round(), atol=0)
    lat = run(pipe, PROMPTS[0], output_type="latent", **kw)
    assert lat.shape == (1, 4, 8, 8)
    assert run(pipe, PROMPTS[0], return_dict=True, **kw) is not None
    assert isinstance(pipe(PROMPTS[0], progress=False, return_dict=False, **kw), tuple)


def test_bad_inputs(pipe, folders, tmp_path):
    with pytest.raises(ValueError, match="height=20 must be a positive multiple of 8"):
        run(pipe, PROMPTS[0], height=20)
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but prompt has 2"):
        run(pipe, PROMPTS, negative_prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="2 generators for 1 images"):
        run(pipe, PROMPTS[0], generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="output_type='jpg'"):
        run(pipe, PROMPTS[0], output_type="jpg")
    with pytest.raises(ValueError, match="cross_attention_kwargs=.*only 'scale' .* and 'ip_adapter_masks'"):
        run(pipe, PROMPTS[0], cross_attention_kwargs={"scale": 0.5, "attention_mask": None})
    assert run(pipe, PROMPTS[0], cross_attention_kwargs=None, num_inference_steps=1) is not None
    assert run(pipe, PROMPTS[0], cross_attention_kwargs={"scale": 0.5}, num_inference_steps=1) is not None  # no LoRA
    with pytest.raises(ValueError, match="latents have shape"):
        run(pipe, PROMPTS[0], latents=torch.zeros(1, 4, 9, 9))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "nowhere")
    unet_folder = folders[1] / "unet"  # a component's folder given for the pipeline's
    with pytest.raises(FileNotFoundError, match=r"unet is not a pipeline folder \(it has no model_index.json\); it "
                                                r"holds one UNet2DConditionModel: load it with latentdiff"):
        LatentDiffusionPipeline.from_pretrained(unet_folder)
    with pytest.raises(TypeError, match="prompt must be a string"):
        run(pipe, 3)
    if not torch.cuda.is_available():  # (before anything moves)
        with pytest.raises(ValueError, match="device 'cuda': no CUDA GPU is usable here"):
            pipe.to("cuda")
        assert pipe.device.type == "cpu"
    with pytest.raises(ValueError, match="device 'gpu' is not a device name"):
        pipe.to("gpu")
    with pytest.raises(ValueError, match="guidance_scale=nan must be a finite number"):
        run(pipe, PROMPTS[0], guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="latents contain NaN or infinite values"):
        run(pipe, PROMPTS[0], latents=torch.full((1, 4, 8, 8), float("inf")))
    with pytest.raises(TypeError, match="callback_on_step_end must be a function"):
        run(pipe, PROMPTS[0], callback_on_step_end="print")
    with pytest.raises(TypeError, match="callback_on_step_end returned 'int': return the dict it was given"):
        run(pipe, PROMPTS[0], callback_on_step_end=lambda p, i, t, tensors: 5)
    with pytest.raises(ValueError, match="guidance_scale='7' must be a finite number"):
        run(pipe, PROMPTS[0], guidance_scale="7")
    assert run(pipe, PROMPTS[0], guidance_scale=np.float32(3.0), num_inference_steps=1) is not None
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or a list of them .* got int: e.g. "
                                        r"generator=torch.Generator\(\).manual_seed\(42\)"):
        run(pipe, PROMPTS[0], generator=42)
    with pytest.raises(TypeError, match="height='64' must be a whole number of pixels"):
        run(pipe, PROMPTS[0], height="64")
    assert run(pipe, PROMPTS[0], height=np.int64(64), num_inference_steps=1) is not None
    with pytest.raises(ValueError, match=r"prompt_embeds of shape \(1, 77, 5\): the U-Net attends to \[batch, "):
        run(pipe, None, prompt_embeds=torch.zeros(1, 77, 5))


def test_from_pretrained_takes_components_as_diffusers_does(folders, pipe, monkeypatch):
    from latentdiff import UNet2DConditionModel
    from latentdiff.schedulers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    def not_loaded(*args, **kwargs):
        raise AssertionError("a U-Net given to from_pretrained was loaded from the folder too")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", not_loaded)
    got = LatentDiffusionPipeline.from_pretrained(folders[1], unet=pipe.unet, scheduler=scheduler,
                                                  safety_checker=None, requires_safety_checker=False,
                                                  feature_extractor=None)
    assert got.unet is pipe.unet and got.scheduler is scheduler and got.vae is not pipe.vae
    with pytest.raises(ValueError, match="latentdiff has no safety_checker: pass safety_checker=None"):
        LatentDiffusionPipeline.from_pretrained(folders[1], unet=pipe.unet, safety_checker=object())
    with pytest.raises(ValueError, match="latentdiff has no safety_checker: pass requires_safety_checker=False"):
        LatentDiffusionPipeline.from_pretrained(folders[1], unet=pipe.unet, requires_safety_checker=True)
    with pytest.raises(TypeError, match=r"unexpected arguments \['feature_extractr'\]; components that can be given"):
        LatentDiffusionPipeline.from_pretrained(folders[1], feature_extractr=None)


def test_images_holding_nan_are_reported(pipe, monkeypatch):
    decode = pipe.vae.decode

    def overflowing(z):  # as a float16 model that overflowed would give them
        out = decode(z)
        out[1:] = float("nan")
        return out

    monkeypatch.setattr(pipe.vae, "decode", overflowing)
    with pytest.warns(UserWarning, match=r"images \[1\] of this call hold NaN or infinite values \(shown black\)"):
        images = pipe(PROMPTS, num_inference_steps=2, output_type="np", progress=False).images
    assert np.isfinite(images).all() and images[1].max() == 0 and images[0].max() > 0


def test_progress_bar_config(pipe, capsys):
    pipe(PROMPTS[0], num_inference_steps=2, output_type="latent")
    assert "denoising" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)  # as diffusers' pipelines take it
    try:
        pipe(PROMPTS[0], num_inference_steps=2, output_type="latent")
        assert "denoising" not in capsys.readouterr().err
        pipe.set_progress_bar_config(desc="steps")
        pipe(PROMPTS[0], num_inference_steps=2, output_type="latent")
        assert "steps" in capsys.readouterr().err
    finally:
        pipe.set_progress_bar_config()


def test_torch_dtype_on_load_and_bf16(folders):
    pipe = LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    cast = LatentDiffusionPipeline.from_pretrained(folders[1]).to(torch.bfloat16)  # pipe.to(dtype), as diffusers
    assert cast.unet.dtype == cast.vae.dtype == cast.text_encoder.dtype == torch.bfloat16
    assert cast.to("cpu", torch.float32).dtype == torch.float32 and cast.device.type == "cpu"
    img = run(pipe, PROMPTS[0], latents=latents_for(1), num_inference_steps=3)
    ref = run(LatentDiffusionPipeline.from_pretrained(folders[1]), PROMPTS[0], latents=latents_for(1),
              num_inference_steps=3)
    assert torch.isfinite(img).all() and (img - ref).abs().mean() < 0.05


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_bf16_on_a_cpu_without_onednn_bf16_warns_until_optimized(folders, monkeypatch):
    """Where oneDNN has no bfloat16 (AVX2-only CPUs; forced here) a bf16 U-Net runs PyTorch's slow fallbacks: the
    call says so and names the fix; optimize_for_inference() computes its layers in float32 (same image up to
    bf16 rounding) and the warning stops. With oneDNN's bfloat16 there is nothing to say. float16 alike, where
    oneDNN has no float16 (all CPUs but AVX512-FP16 ones)."""
    import warnings

    from latentdiff.models import packed

    pipe = LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype=torch.bfloat16)
    said = {}
    for supported in (False, True):
        monkeypatch.setattr(packed, "bfloat16_supported", lambda: supported)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain = run(pipe, PROMPTS[0], latents=latents_for(1), num_inference_steps=2)
        said[supported] = [str(w.message) for w in caught if "without oneDNN kernels" in str(w.message)]
    assert said[True] == [] and len(said[False]) == 1, said
    assert "torch.bfloat16" in said[False][0] and "pipe.optimize_for_inference()" in said[False][0]
    monkeypatch.setattr(packed, "bfloat16_supported", lambda: False)
    pipe.optimize_for_inference()
    assert pipe.unet.dtype == torch.bfloat16 and packed.is_packed(pipe.unet)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without oneDNN kernels")
        optimized = run(pipe, PROMPTS[0], latents=latents_for(1), num_inference_steps=2)
    reference = run(LatentDiffusionPipeline.from_pretrained(folders[1]), PROMPTS[0], latents=latents_for(1),
                    num_inference_steps=2)
    errors = [(image - reference).abs().mean().item() for image in (plain, optimized)]
    assert (optimized - plain).abs().mean() < 0.02 and errors[1] < 0.02, errors
    if not packed.half_supported(torch.float16):  # (most CPUs): float16 alike
        half = LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype=torch.float16)
        with pytest.warns(UserWarning, match="torch.float16 on a CPU without oneDNN.*optimize_for_inference"):
            run(half, PROMPTS[0], latents=latents_for(1), num_inference_steps=2)
        half.optimize_for_inference()
        assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32  # (the VAE decodes in fp32)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*without oneDNN kernels")
            image = run(half, PROMPTS[0], latents=latents_for(1), num_inference_steps=2)
        assert (image - reference).abs().mean() < 0.02


def test_fp16_decode_is_upcast(folders):
    pipe = LatentDiffusionPipeline.from_pretrained(folders[1], torch_dtype=torch.float16)
    img = run(pipe, PROMPTS[0], latents=latents_for(1), num_inference_steps=2)
    assert img.dtype == torch.float32 and torch.isfinite(img).all()
    assert pipe.vae.dtype == torch.float16  # restored after the fp32 decode


def test_img2img(pipe):
    img2img = LatentDiffusionImg2ImgPipeline(**pipe.components)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = img2img(PROMPTS[0], image, strength=0.5, num_inference_steps=10, generator=g(), output_type="pt",
                  progress=False).images
    assert out.shape == (1, 3, 16, 16)
    steps = []
    img2img(PROMPTS[0], image, strength=0.5, num_inference_steps=10, generator=g(), output_type="latent",
            progress=False, callback_on_step_end=lambda p, i, t, s: steps.append(int(t)))
    assert len(steps) == 5 and steps == [int(t) for t in pipe.scheduler.timesteps[5:]]
    # strength 0: no denoising, the re-encoded image comes back
    same = img2img(PROMPTS[0], image, strength=0.0, num_inference_steps=10, generator=g(), output_type="latent",
                   progress=False).images
    assert same.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="strength=1.5"):
        img2img(PROMPTS[0], image, strength=1.5)
    with pytest.raises(ValueError, match=r"image tensor values span \[0, 255\]; expected \[0, 1\] \(8-bit pixels "):
        img2img(PROMPTS[0], torch.linspace(0, 255, 768).view(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"an image array must be \[B, H, W, 3\] or \[H, W, 3\]"):
        img2img(PROMPTS[0], np.zeros((3, 16, 16), np.float32))
    with pytest.raises(TypeError, match="an image array must hold floats in \\[0, 1\\] or uint8 pixels; got int64"):
        img2img(PROMPTS[0], np.zeros((16, 16, 3), np.int64))
    with pytest.raises(ValueError, match="strength='0.5' must lie in"):
        img2img(PROMPTS[0], image, strength="0.5")
    with pytest.raises(ValueError, match=r"must be \[B, 3, H, W\] or \[3, H, W\] \(RGB\); got shape \(1, 5, 16, 16\)"):
        img2img(PROMPTS[0], torch.zeros(1, 5, 16, 16))  # (4 channels: latents, test_img2img_takes_latents_...)
    with pytest.raises(ValueError, match="image tensor contains NaN"):
        img2img(PROMPTS[0], image.clone().fill_(float("nan")))
    from PIL import Image

    with pytest.raises(ValueError, match=r"must share one size; got \[\(16, 16\), \(24, 16\)\]"):
        img2img([PROMPTS[0]] * 2, [Image.new("RGB", (16, 16)), Image.new("RGB", (24, 16))])


def img2img_against_diffusers(folders, scheduler: str, steps: list | None = None, **kwargs):
    """Our img2img pipeline's image and diffusers' (same folder, scheduler class, image, seed and arguments)."""
    import diffusers

    from latentdiff import schedulers

    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folders[1], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionImg2ImgPipeline.from_pretrained(folders[1])
    ref.scheduler = getattr(diffusers, scheduler).from_config(dict(ref.scheduler.config))
    ours.scheduler = getattr(schedulers, scheduler).from_config(dict(ours.scheduler.config))
    image = kwargs.pop("image", torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    kwargs = dict(guidance_scale=5.0, output_type="np", **kwargs)
    expected = ref(PROMPTS[0], image=image, generator=torch.Generator().manual_seed(0), **kwargs).images
    callback = None if steps is None else lambda p, i, t, s: steps.append(int(t))
    got = ours(PROMPTS[0], image, generator=torch.Generator().manual_seed(0), progress=False,
               callback_on_step_end=callback, **kwargs).images
    return got, expected


def test_image_inputs_read_as_diffusers_reads_them(folders):
    """Tensors in [0, 1] (diffusers' form; with a negative value, [-1, 1]), numpy arrays (float in [0, 1] or uint8,
    channels last), lists of them and PIL images: the same images as diffusers' img2img from the same input."""
    from PIL import Image

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    got, expected = img2img_against_diffusers(folders, "DDIMScheduler", image=image, strength=0.7)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    ours = LatentDiffusionImg2ImgPipeline.from_pretrained(folders[1])
    pixels = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    same = (image * 2 - 1, image[0].permute(1, 2, 0).numpy(), [image[0]], [image[0].permute(1, 2, 0).numpy()])
    for variant in same:
        np.testing.assert_allclose(ours.preprocess(variant), image * 2 - 1, atol=1e-6, rtol=0)
    for variant in (pixels, Image.fromarray(pixels)):
        eight_bit = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1
        np.testing.assert_allclose(ours.preprocess(variant), eight_bit, atol=1e-6, rtol=0)


def test_img2img_takes_latents_as_diffusers(folders, pipe):
    """A tensor with the VAE's latent channels is taken as (scaled) latents, as diffusers' img2img takes it: the
    same image from a text-to-image call's latents; the latents upscaled 2x ("hires fix") give an image twice as
    large."""
    latents = run(pipe, PROMPTS[0], output_type="latent", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(3))
    got, expected = img2img_against_diffusers(folders, "DDIMScheduler", image=latents, strength=0.6)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    img2img = LatentDiffusionImg2ImgPipeline.from_pipe(pipe)
    big = torch.nn.functional.interpolate(latents, scale_factor=2, mode="nearest")
    out = run(img2img, PROMPTS[0], image=big, strength=0.5, output_type="np")
    assert out.shape == (1, 2 * got.shape[1], 2 * got.shape[2], 3)
    with pytest.raises(ValueError, match="the image latents contain NaN"):
        run(img2img, PROMPTS[0], image=torch.full_like(latents, float("nan")))


def test_img2img_with_heun_as_diffusers(folders):
    """Heun lists each timestep but the first twice: img2img starts at entry 2 x (steps skipped), as diffusers'."""
    got, expected = img2img_against_diffusers(folders, "HeunDiscreteScheduler", strength=0.6, num_inference_steps=5)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_img2img_with_custom_timesteps_as_diffusers(folders):
    """img2img over a grid given in full: strength selects from it, as diffusers' img2img does."""
    steps = []
    got, expected = img2img_against_diffusers(folders, "DPMSolverMultistepScheduler", steps, strength=0.5,
                                              timesteps=[999, 850, 736, 645, 545, 455, 343, 233, 124, 24])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert steps == [455, 343, 233, 124, 24]


def test_img2img_with_pndm_starts_at_the_right_noise_level(pipe):
    """PNDM lists its second timestep twice (PLMS) or its first three steps four entries each (Runge-Kutta), so
    img2img does not slice its grid by step count: it starts at the scheduler's start_index, whose timestep is the
    noise level the image was noised to, and then visits each later level once."""
    from latentdiff.schedulers import PNDMScheduler

    image = torch.rand(1, 3, 16, 16) * 2 - 1
    for skip_prk_steps, steps in ((True, 10), (False, 10)):
        scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=skip_prk_steps)
        img2img = LatentDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": scheduler})
        visited = []
        out = img2img(PROMPTS[0], image, strength=0.5, num_inference_steps=steps, output_type="pt", progress=False,
                      generator=torch.Generator().manual_seed(0),
                      callback_on_step_end=lambda p, i, t, s: visited.append(int(t)))
        levels = sorted(set(scheduler.timesteps.tolist()) & set(range(1, 1000, 100)), reverse=True)
        assert visited == levels[5:], (skip_prk_steps, visited)  # leading spacing, steps_offset 1: 901, 801, ...
        assert torch.isfinite(out.images).all()


def test_same_seed_same_image_as_diffusers(folders):
    """One image per call: the seed alone (no latents given) gives diffusers' image."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[1], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folders[1])
    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, output_type="np")
    expected = ref(PROMPTS[0], generator=torch.Generator().manual_seed(42), **kwargs).images
    got = ours(PROMPTS[0], generator=torch.Generator().manual_seed(42), progress=False, **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_to_diffusers_shares_the_tensors_and_the_images(folders):
    """latentdiff.pipeline.to_diffusers (the reference that the full-size test and benchmarks/gpu.py build): diffusers'
    pipeline over our very tensors, with our scheduler's class and config, gives our images."""
    from latentdiff.pipeline import to_diffusers

    ours = LatentDiffusionPipeline.from_pretrained(folders[1])
    ref = to_diffusers(ours)
    assert type(ref.scheduler).__name__ == type(ours.scheduler).__name__
    assert ref.unet.conv_in.weight.data_ptr() == ours.unet.conv_in.weight.data_ptr()
    assert ref.vae.decoder.conv_out.weight.data_ptr() == ours.vae.decoder.conv_out.weight.data_ptr()
    assert ref.tokenizer.model_max_length == 77
    kwargs = dict(num_inference_steps=5, guidance_scale=4.0, output_type="np")
    expected = ref(PROMPTS, latents=latents_for(2), **kwargs).images
    got = ours(PROMPTS, latents=latents_for(2), progress=False, **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_guidance_rescale_matches_diffusers(folders):
    """guidance_rescale (Lin et al. 2024) gives diffusers' images, changes them, and is refused outside [0, 1]."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[1], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folders[1])
    kwargs = dict(num_inference_steps=5, guidance_scale=7.5, output_type="np")
    expected = ref(PROMPTS, latents=latents_for(2), guidance_rescale=0.7, **kwargs).images
    got = ours(PROMPTS, latents=latents_for(2), guidance_rescale=0.7, progress=False, **kwargs).images
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    plain = ours(PROMPTS, latents=latents_for(2), progress=False, **kwargs).images
    assert np.abs(got - plain).max() > 1e-2
    with pytest.raises(ValueError, match=r"guidance_rescale=1.5 must lie in \[0, 1\]"):
        ours(PROMPTS, guidance_rescale=1.5, num_inference_steps=2, progress=False)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler")
def test_compile_gives_the_eager_images_and_follows_the_unet(folders, tmp_path):
    from latentdiff import UNet2DConditionModel
    from latentdiff.models.unet import UNetConfig
    from tiny import TINY_UNET, randomized

    pipe = LatentDiffusionPipeline.from_pretrained(folders[1])
    # one layer a block: inductor's time goes by layers (~55 s here against ~95 for the folder's two)
    pipe.unet = randomized(UNet2DConditionModel(UNetConfig(**{**TINY_UNET, "layers_per_block": 1})), 3)
    eager = run(pipe, PROMPTS[0], guidance_scale=5.0, latents=latents_for(1), num_inference_steps=2)
    pipe.compile(max_autotune=False)  # autotuning only picks kernels; it would triple this test's compile time
    compiled = run(pipe, PROMPTS[0], guidance_scale=5.0, latents=latents_for(1), num_inference_steps=2)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]  # a second call reuses the graph (nothing it guards on changed)
    torch.testing.assert_close(run(pipe, PROMPTS[0], guidance_scale=5.0, latents=latents_for(1),
                                   num_inference_steps=2), compiled, atol=0, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs
    module, fn = pipe._compiled
    assert module is pipe.unet and fn is not pipe.unet and type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert pipe._unet_call().compiled is fn and pipe._seen_calls is None  # (outside a denoising loop)
    pipe.save_pretrained(tmp_path / "saved")  # pipe.unet is still the plain module
    saved = LatentDiffusionPipeline.from_pretrained(tmp_path / "saved").unet.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in pipe.unet.state_dict().items()) and saved.keys() == \
        pipe.unet.state_dict().keys()

    # a replaced U-Net, or one moved by pipe.to(), is compiled anew (the old graph froze the old weights)
    pipe.unet = LatentDiffusionPipeline.from_pretrained(folders[1]).unet
    assert pipe._unet_call().compiled._orig_mod is pipe.unet and pipe._compiled[0] is pipe.unet
    pipe.to(dtype=torch.float32)
    assert pipe._compiled is None
    pipe.disable_compile()
    assert pipe._unet_call() is pipe.unet


def test_call_layout_tells_apart_what_dynamo_guards_on():
    from latentdiff.pipeline import call_layout

    x, t = torch.zeros(2, 4, 8, 8), torch.tensor(3.0)
    key = call_layout((x, t), {"scale": 1.0, "extra": [x[:1], None]})
    assert key == call_layout((torch.ones(2, 4, 8, 8), torch.tensor(9.0)),
                              {"scale": 1.0, "extra": [torch.ones(1, 4, 8, 8), None]})  # (values are not guarded)
    for args, kwargs in [((x, t), {"scale": 2.0, "extra": [x[:1], None]}),  # a number's value
                         ((x[:1], t), {"scale": 1.0, "extra": [x[:1], None]}),  # a shape
                         ((x.to(memory_format=torch.channels_last), t), {"scale": 1.0, "extra": [x[:1], None]}),
                         ((x.double(), t), {"scale": 1.0, "extra": [x[:1], None]}),  # a dtype
                         ((x, t), {"scale": 1.0, "extra": (x[:1], None)}),  # the nesting
                         ((x, t), {"scale": 1.0, "extra": [x[:1]]}),
                         ((x, t), {"extra": [x[:1], None], "scale": 1.0}),  # the keywords' order
                         ((x, t), {"scale": 1.0, "extra": [x[:1].clone().requires_grad_(), None]})]:
        assert call_layout(args, kwargs) != key, (args, kwargs)
    y = torch.zeros(2, 4, 8, 8)
    assert call_layout((x, x), {}) != call_layout((x, y), {})  # the same tensor twice, or two
    assert call_layout((x, object()), {}) is None  # (anything else: the guards run)
    with torch.no_grad():
        without_grad = call_layout((x, t), {})
    assert without_grad != call_layout((x, t), {})  # (grad mode)


def test_compiled_calls_skip_the_guards_only_for_a_layout_seen_in_the_loop():
    """CompiledCall: within a denoising loop, a call laid out as an earlier one runs the graph that call ran
    without checking the guards (shown here by a change the guards would catch, which a loop never makes); a new
    layout, and any call outside a loop, checks them (and compiles anew where they fail)."""
    from types import SimpleNamespace

    from latentdiff.pipeline import CompiledCall

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = 2.0

        def forward(self, x):
            return x * self.scale

    model = Scaled()
    pipe = SimpleNamespace(_seen_calls=set())
    call = CompiledCall(torch.compile(model, backend="eager"), pipe)
    x = torch.ones(3)
    assert call(x).tolist() == [2.0] * 3 and len(pipe._seen_calls) == 1
    assert call.scale == 2.0 and call._orig_mod is model  # (the model's attributes, as torch.compile's wrapper)
    model.scale = 3.0
    assert call(torch.ones(3)).tolist() == [2.0] * 3  # seen: unchecked
    assert call(torch.ones(4)).tolist() == [3.0] * 4  # new: checked, compiled anew
    pipe._seen_calls = None
    assert call(x).tolist() == [3.0] * 3  # outside a loop: checked
    pipe._seen_calls = set()
    with torch.compiler.set_stance("force_eager"):  # another stance is left alone
        model.scale = 4.0
        assert call(x).tolist() == [4.0] * 3 and not pipe._seen_calls

    class Shifted(torch.nn.Module):  # (a class of its own: its forward's cache starts empty)
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, x):
            return x + self.shift

    # two models of one class share dynamo's cache, where only the guards tell their graphs apart: what one call of a
    # model has seen does not skip the guards of another's
    first, second = (CompiledCall(torch.compile(Shifted(s), backend="eager"), pipe) for s in (1.0, 5.0))
    assert first(x).tolist() == [2.0] * 3 and second(x).tolist() == [6.0] * 3


def test_compiled_calls_take_the_text_projected_outside_the_graph(folders):
    """CompiledCall projects the text's keys and values for the cross-attentions outside the compiled graph
    (attention.TextProjections): the graph reads them (stale ones show in its output) and gives the eager U-Net's
    output; they are projected once per context and projection weights, within a loop (after a step callback too)
    and outside one, and anew for another tensor, for one changed in place, for a weight changed in place and after
    compile() again; the layers hold nothing between calls; with cross_attention_kwargs (which may change what the
    text's projections are) the graph projects the text itself."""
    from types import SimpleNamespace

    from latentdiff.models.attention import TextProjections
    from latentdiff.pipeline import CompiledCall

    loaded = LatentDiffusionPipeline.from_pretrained(folders[1])
    unet = loaded.unet.eval()
    pipe = SimpleNamespace(_seen_calls=set())
    call = CompiledCall(torch.compile(unet, backend="eager"), pipe)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor(10)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)

    def spoiled():  # the projections made so far zeroed: a call that does not make them anew is wrong
        for buffers in unet._text_projections._buffers.values():
            for keys, values in buffers:
                keys.zero_()
                values.zero_()

    with torch.no_grad():
        want = unet(x, t, context)
        torch.testing.assert_close(call(x, t, context), want)
        layers = TextProjections.of(unet).layers
        assert len(layers) == sum(1 for name, _ in unet.named_modules() if name.endswith(".attn2"))
        assert all(layer.text_kv is None for layer in layers)
        spoiled()
        assert (call(x, t, context) - want).abs().max() > 1e-3  # the same context in the same loop: not made anew
        torch.testing.assert_close(call(x, t, context.clone()), want)  # another tensor
        spoiled()
        context.mul_(1.0)  # (changed in place: its version moves on)
        torch.testing.assert_close(call(x, t, context), want)
        spoiled()
        torch.testing.assert_close(call(x, t, encoder_hidden_states=context,  # the graph's own projections
                                        cross_attention_kwargs={"scale": 1.0}), want)
        pipe._seen_calls = None  # outside a loop: the same
        spoiled()
        assert (call(x, t, context) - want).abs().max() > 1e-3
        layers[0].to_v.weight.mul_(1.0)  # a projection weight changed in place (as a LoRA change writes them)
        torch.testing.assert_close(call(x, t, context), want)
        spoiled()
        loaded._forget_compiled()  # (what compile() does again)
        torch.testing.assert_close(call(x, t, context), want)
    assert all(layer.text_kv is None for layer in layers)
    assert TextProjections.of(unet) is None  # (with autograd: the graph projects the text itself)


def test_small_attention_is_written_out_under_compile(monkeypatch):
    """Under torch.compile on a CPU, attention over few query-key pairs runs as small_attention (its products
    and softmax, for inductor to fuse), the same up to rounding; larger ones and eager calls run SDPA."""
    from latentdiff.models import attention

    calls = []

    def counted(q, k, v):
        calls.append(q.shape[-2] * k.shape[-2])
        return attention.small_attention.__wrapped__(q, k, v)

    counted.__wrapped__ = attention.small_attention
    monkeypatch.setattr(attention, "small_attention", counted)
    layer = attention.Attention(32, heads=2, dim_head=16, context_dim=24).eval()
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 64, 32, generator=gen), torch.randn(2, 77, 24, generator=gen)
    long = torch.randn(2, 200, 24, generator=gen)
    compiled = torch.compile(layer, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, context), layer(x, context), atol=1e-6, rtol=1e-5)
        assert calls == [64 * 77]
        torch.testing.assert_close(compiled(x, long), layer(x, long), atol=1e-6, rtol=1e-5)
        assert calls == [64 * 77]  # (64 x 200 pairs: SDPA)
        q, k, v = torch.randn(3, 2, 4, 10, 8, generator=gen)
        torch.testing.assert_close(counted.__wrapped__(q, k, v),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_denoising_loops_forget_the_call_layouts_after_callbacks(folders):
    """A callback may change anything the compiled calls' guards check: the loop's record of call layouts is
    emptied after each, and exists only during the loop."""
    pipe = LatentDiffusionPipeline.from_pretrained(folders[1])
    seen = []

    def callback(p, i, t, state):
        seen.append(set(p._seen_calls))
        p._seen_calls.add(("a layout", i))
        return state

    run(pipe, PROMPTS[0], num_inference_steps=3, latents=latents_for(1), callback_on_step_end=callback)
    assert seen == [set()] * 3 and pipe._seen_calls is None


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_compile_and_optimize_for_inference_share_the_models_out(folders):
    """After compile(), optimize_for_inference() packs the VAE and the text encoder and leaves the U-Net to
    torch.compile; a U-Net optimized for inference (which torch.compile cannot trace) is refused by compile(), and
    when it replaces the compiled one, before anything is traced."""
    from latentdiff.models.packed import is_packed

    pipe = LatentDiffusionPipeline.from_pretrained(folders[1])
    pipe.compile()
    pipe.optimize_for_inference()
    assert not is_packed(pipe.unet) and is_packed(pipe.vae) and is_packed(pipe.text_encoder)
    optimized = LatentDiffusionPipeline.from_pretrained(folders[1]).optimize_for_inference()
    with pytest.raises(ValueError, match=r"call compile\(\) before optimize_for_inference\(\)"):
        optimized.compile()
    assert optimized._compile_options is None  # (refused: nothing changed)
    pipe.unet = optimized.unet
    with pytest.raises(ValueError, match="torch.compile cannot trace"):
        pipe._unet_call()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_pipeline_optimized_for_inference_makes_the_same_images(folders, tmp_path):
    """pipe.optimize_for_inference() packs the U-Net, the VAE and the text encoder (no plain nn.Linear or
    nn.Conv2d left) and makes the same images up to float rounding; saving it afterwards is refused with the fix."""
    from latentdiff.models.amx_layers import AmxConv2d, AmxUpsampleConv
    from latentdiff.models.packed import PackedConv2d, PackedUpsampleConv

    plain = LatentDiffusionPipeline.from_pretrained(folders[1])
    fast = LatentDiffusionPipeline.from_pretrained(folders[1]).optimize_for_inference()
    for model in (fast.unet, fast.vae, fast.text_encoder):
        kinds = {type(m) for m in model.modules()}
        assert torch.nn.Linear not in kinds and torch.nn.Conv2d not in kinds, type(model).__name__
    assert any(type(m) in (PackedUpsampleConv, AmxUpsampleConv) for m in fast.vae.modules())
    assert any(type(m) in (PackedConv2d, AmxConv2d) for m in fast.unet.modules())
    expected = run(plain, PROMPTS[0], generator=torch.Generator().manual_seed(3))
    got = run(fast, PROMPTS[0], generator=torch.Generator().manual_seed(3))
    assert expected.std() > 0.05
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="before optimize_for_inference"):
        fast.save_pretrained(tmp_path / "saved")


def test_freeu_same_image_as_diffusers(folders):
    """pipe.enable_freeu as diffusers' pipelines take it; disable_freeu gives the plain image back."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[0], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionPipeline.from_pretrained(folders[0])
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    plain = ours(PROMPTS[0], latents=latents_for(1), progress=False, **kwargs).images
    ref.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    ours.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    expected = ref(PROMPTS[0], latents=latents_for(1), **kwargs).images
    got = ours(PROMPTS[0], latents=latents_for(1), progress=False, **kwargs).images
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    assert np.abs(got - plain).max() > 1e-3
    ours.disable_freeu()
    np.testing.assert_array_equal(ours(PROMPTS[0], latents=latents_for(1), progress=False, **kwargs).images, plain)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                       "UniPCMultistepScheduler"])
def test_zero_terminal_snr_pipeline_same_image_as_diffusers(folders, tmp_path, scheduler):
    """Lin et al. 2024's recipe: a v-prediction model on a zero-terminal-SNR schedule, sampled from pure noise
    ("trailing" spacing) with guidance_rescale 0.7; the folder's scheduler config carries it both ways."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[0], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, scheduler).from_config(
        dict(ref.scheduler.config), rescale_betas_zero_snr=True, timestep_spacing="trailing",
        prediction_type="v_prediction")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = LatentDiffusionPipeline.from_pretrained(tmp_path)
    assert ours.scheduler.config.rescale_betas_zero_snr and type(ours.scheduler).__name__ == scheduler
    kwargs = dict(num_inference_steps=5, guidance_scale=7.0, guidance_rescale=0.7, output_type="np")
    expected = ref(PROMPTS[0], latents=latents_for(1), **kwargs).images
    got = ours(PROMPTS[0], latents=latents_for(1), progress=False, **kwargs).images
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
