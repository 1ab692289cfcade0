"""The CLI end to end on a tiny pipeline: generate, --from-png reproduction, --prompts-file, convert, info, errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import LatentDiffusionPipeline
from latentdiff.cli import PNG_KEY, main


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_and_reproduce(tiny_folders, tmp_path, capsys, monkeypatch):
    folder = tiny_folders[1]
    code, out, _ = run(["generate", "a small red circle", "--model", folder, "--steps", 3, "--guidance", 4,
                        "--seed", 5, "--num-images", 2, "--out", tmp_path / "out", "--negative", "blurry"], capsys)
    assert code == 0
    paths = out.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a-small-red-circle-s5.png", "a-small-red-circle-s6.png"]
    settings = json.loads(Image.open(paths[0]).text[PNG_KEY])
    assert settings["prompt"] == "a small red circle" and settings["seed"] == 5 and settings["steps"] == 3
    assert settings["negative_prompt"] == "blurry" and settings["scheduler"] == "dpm++"
    assert settings["model"] == str(folder) and len(settings["model_hash"]) == 16
    code, out, _ = run(["generate", "--from-png", paths[1], "--out", tmp_path / "repro"], capsys)
    assert code == 0
    again = np.asarray(Image.open(out.strip()))
    assert np.array_equal(again, np.asarray(Image.open(paths[1])))
    assert not np.array_equal(again, np.asarray(Image.open(paths[0])))
    # again, where that name now holds another image: it is kept, the reproduction numbered
    taken = out.strip()
    Image.open(paths[0]).save(taken, pnginfo=None)
    code, out, _ = run(["generate", "--from-png", paths[1], "--out", tmp_path / "repro"], capsys)
    assert code == 0 and out.strip().endswith("a-small-red-circle-s6-repro-2.png")
    assert np.array_equal(np.asarray(Image.open(out.strip())), again)
    assert np.array_equal(np.asarray(Image.open(taken)), np.asarray(Image.open(paths[0])))
    # --optimize (the models packed for oneDNN): the same image up to float rounding
    packed = []
    original = LatentDiffusionPipeline.optimize_for_inference
    monkeypatch.setattr(LatentDiffusionPipeline, "optimize_for_inference",
                        lambda pipe: packed.append(pipe) or original(pipe))
    code, out, _ = run(["generate", "--from-png", paths[1], "--out", tmp_path / "fast", "--optimize"], capsys)
    assert code == 0 and len(packed) == 1
    fast = np.asarray(Image.open(out.strip())).astype(int)
    assert np.abs(fast - again.astype(int)).max() <= 1


def test_prompts_file_skips_only_images_of_the_same_settings(tiny_folders, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue star\n")
    args = ["generate", "--prompts-file", prompts, "--model", tiny_folders[1], "--steps", 2, "--out", tmp_path]
    code, out, _ = run(args, capsys)
    first = out.split()
    assert code == 0 and [p.rsplit("/", 1)[1] for p in first] == ["a-red-circle-s0.png", "a-blue-star-s0.png"]
    before = {p: open(p, "rb").read() for p in first}
    code, out, err = run(args, capsys)
    assert code == 0 and out == "" and "skipping 2 images already made with the same settings" in err
    # other settings under the same names: new numbered files, the earlier images untouched
    code, out, err = run([*args, "--steps", 3], capsys)
    assert code == 0 and [p.rsplit("/", 1)[1] for p in out.split()] == ["a-red-circle-s0-2.png", "a-blue-star-s0-2.png"]
    assert json.loads(Image.open(out.split()[0]).text[PNG_KEY])["steps"] == 3 and "skipping" not in err
    assert {p: open(p, "rb").read() for p in first} == before
    code, out, err = run([*args, "--steps", 3], capsys)  # those are found again, past the first name
    assert code == 0 and out == "" and "skipping 2 images" in err
    # --force makes them again, in place
    code, out, err = run([*args, "--force"], capsys)
    assert code == 0 and out.split() == first and "skipping" not in err
    assert {p: open(p, "rb").read() for p in first} == before  # (the same settings give the same image)


def test_prompts_sharing_a_file_name_do_not_overwrite_each_other(tiny_folders, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle!\na red circle?\na red circle!\n")  # one slug; the first prompt twice
    code, out, _ = run(["generate", "--prompts-file", prompts, "--model", tiny_folders[1], "--steps", 2, "--out",
                        tmp_path], capsys)
    assert code == 0 and [p.rsplit("/", 1)[1] for p in out.split()] == ["a-red-circle-s0.png", "a-red-circle-s0-2.png"]
    made = [json.loads(Image.open(p).text[PNG_KEY])["prompt"] for p in out.split()]
    assert made == ["a red circle!", "a red circle?"]


def test_variant_weights(tiny_folders, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(tiny_folders[1], tmp_path / "variant")
    for weights in folder.rglob("*.safetensors"):
        weights.rename(weights.with_suffix(".fp16.safetensors"))
    code, _, err = run(["generate", "x", "--model", folder, "--steps", 2, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "pass variant='fp16'" in err
    code, out, _ = run(["generate", "x", "--model", folder, "--variant", "fp16", "--steps", 2, "--out",
                        tmp_path / "out"], capsys)
    assert code == 0 and json.loads(Image.open(out.strip()).text[PNG_KEY])["variant"] == "fp16"
    code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
    assert code == 0 and np.array_equal(np.asarray(Image.open(again.strip())), np.asarray(Image.open(out.strip())))


def test_lora(tiny_folders, tmp_path, capsys):
    """--lora PATH:SCALE gives the Python API's image with that adapter at that scale (--optimize packs after
    merging it), is stored in the PNG with the file's hash, and --from-png makes the image again."""
    from latentdiff.checkpoints import save_safetensors
    from latentdiff.schedulers import scheduler_from_name

    folder = tiny_folders[1]
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    state = {}
    for path, layer in pipe.unet.named_modules():
        if path.endswith(("attn2.to_k", "attn2.to_v")):
            state[f"unet.{path}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g)
            state[f"unet.{path}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g)
    save_safetensors(state, tmp_path / "style.safetensors")
    args = ["generate", "a red circle", "--model", folder, "--steps", 3, "--out", tmp_path / "out"]
    code, out, _ = run(args + ["--lora", f"{tmp_path / 'style.safetensors'}:0.5", "--optimize"], capsys)
    assert code == 0
    made = np.asarray(Image.open(out.strip())).astype(int)
    lora = json.loads(Image.open(out.strip()).text[PNG_KEY])["loras"]
    assert lora[0][:2] == [str(tmp_path / "style.safetensors"), 0.5] and len(lora[0][2]) == 16
    pipe.load_lora_weights(tmp_path / "style.safetensors")
    pipe.set_adapters("default_0", 0.5)
    pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)  # the CLI's default
    expected = np.asarray(pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, progress=False,
                               generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
    assert np.abs(made - expected).max() <= 1
    code, plain, _ = run(args + ["--out", tmp_path / "plain"], capsys)
    assert np.abs(np.asarray(Image.open(plain.strip())).astype(int) - made).max() > 10  # the LoRA does something
    code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
    assert code == 0 and np.abs(np.asarray(Image.open(again.strip())).astype(int) - made).max() <= 1
    code, _, err = run(args + ["--lora", f"{tmp_path / 'missing.safetensors'}:0.5"], capsys)
    assert code == 2 and "--lora file or folder not found" in err and "missing.safetensors" in err


def test_controlnet(tiny_folders, tmp_path, capsys):
    """--controlnet PATH:SCALE with --control-image gives the Python API's image (a folder or a single file), is
    stored in the PNG with the files' hashes, and --from-png makes the image again."""
    from latentdiff import ControlNetModel, LatentDiffusionControlNetPipeline
    from latentdiff.checkpoints import save_safetensors
    from latentdiff.convert import diffusers_to_controlnet
    from latentdiff.schedulers import scheduler_from_name

    folder = tiny_folders[1]
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    net.save_pretrained(tmp_path / "cn")
    save_safetensors(diffusers_to_controlnet(net.state_dict(), net.config), tmp_path / "cn.safetensors")
    control = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    control.save(tmp_path / "edges.png")
    args = ["generate", "a red circle", "--model", folder, "--steps", 3, "--out", tmp_path / "out",
            "--control-image", tmp_path / "edges.png"]
    code, out, _ = run(args + ["--controlnet", f"{tmp_path / 'cn'}:0.7"], capsys)
    assert code == 0
    made = np.asarray(Image.open(out.strip())).astype(int)
    settings = json.loads(Image.open(out.strip()).text[PNG_KEY])
    assert settings["controlnets"][0][:2] == [str(tmp_path / "cn"), 0.7]
    assert settings["control_images"][0][0] == str(tmp_path / "edges.png")
    controlled = LatentDiffusionControlNetPipeline.from_pipe(pipe, controlnet=net)
    controlled.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)  # the CLI's default
    expected = np.asarray(controlled("a red circle", image=control, controlnet_conditioning_scale=0.7,
                                     num_inference_steps=3, guidance_scale=5.0, progress=False,
                                     generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
    assert np.abs(made - expected).max() <= 1
    code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
    assert code == 0 and np.abs(np.asarray(Image.open(again.strip())).astype(int) - made).max() <= 1
    code, single, err = run(args + ["--controlnet", f"{tmp_path / 'cn.safetensors'}:0.7", "--out",
                                    tmp_path / "single"], capsys)
    assert code == 0, err
    assert np.abs(np.asarray(Image.open(single.strip())).astype(int) - made).max() <= 1
    # with --image: ControlNet img2img, as the Python API's
    from latentdiff import LatentDiffusionControlNetImg2ImgPipeline

    start = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    start.save(tmp_path / "start.png")
    code, out, err = run(args + ["--controlnet", tmp_path / "cn", "--image", tmp_path / "start.png", "--out",
                                 tmp_path / "i2i"], capsys)
    assert code == 0, err
    img2img = LatentDiffusionControlNetImg2ImgPipeline.from_pipe(controlled)
    expected = np.asarray(img2img("a red circle", image=start, control_image=control, controlnet_conditioning_scale=1.0,
                                  num_inference_steps=3, guidance_scale=5.0, progress=False,
                                  generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
    assert np.abs(np.asarray(Image.open(out.strip())).astype(int) - expected).max() <= 1
    code, _, err = run(args[:-2] + ["--controlnet", tmp_path / "cn"], capsys)
    assert code == 2 and "--controlnet needs the image it follows" in err
    code, _, err = run(args, capsys)
    assert code == 2 and "give --controlnet PATH too" in err


def test_freeu(tiny_folders, tmp_path, capsys):
    """--freeu sd1 gives the Python API's image with enable_freeu(0.9, 0.2, 1.5, 1.6), is stored in the PNG and
    reproduced from it; a malformed value is a one-line error."""
    from latentdiff.schedulers import scheduler_from_name

    folder = tiny_folders[1]
    args = ["generate", "a red circle", "--model", folder, "--steps", 3, "--out", tmp_path / "out"]
    code, out, _ = run(args + ["--freeu", "sd1"], capsys)
    assert code == 0 and json.loads(Image.open(out.strip()).text[PNG_KEY])["freeu"] == [0.9, 0.2, 1.5, 1.6]
    made = np.asarray(Image.open(out.strip())).astype(int)
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
    pipe.enable_freeu(0.9, 0.2, 1.5, 1.6)
    expected = np.asarray(pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, progress=False,
                               generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
    assert np.abs(made - expected).max() <= 1
    code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
    assert code == 0 and np.abs(np.asarray(Image.open(again.strip())).astype(int) - made).max() <= 1
    code, _, err = run(args + ["--freeu", "1,2,3"], capsys)
    assert code == 2 and "give four positive numbers" in err


def test_sigmas(tiny_folders, tmp_path, capsys):
    """--sigmas karras / exponential / beta: the sampler's noise levels on that grid, as the Python API's scheduler
    option gives them (the grid's option on, the others off, whatever the model's config says), stored in the PNG
    and reproduced from it; a sampler without such grids is a one-line error naming those that have them."""
    from latentdiff.cli import SIGMA_GRIDS, build_parser, sigma_grid_options
    from latentdiff.schedulers import SCHEDULERS, DPMSolverMultistepScheduler, scheduler_from_name

    folder = tiny_folders[1]
    args = ["generate", "a red circle", "--model", folder, "--steps", 3, "--out", tmp_path / "out"]
    code, out, _ = run(args + ["--sigmas", "karras"], capsys)
    assert code == 0 and json.loads(Image.open(out.strip()).text[PNG_KEY])["sigmas"] == "karras"
    made = np.asarray(Image.open(out.strip())).astype(int)
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    expected = np.asarray(pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, progress=False,
                               generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
    assert np.abs(made - expected).max() <= 1
    code, plain, _ = run(args[:-1] + [tmp_path / "plain"], capsys)
    assert code == 0 and np.abs(np.asarray(Image.open(plain.strip())).astype(int) - made).max() > 1  # (a new grid)
    code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
    assert code == 0 and np.abs(np.asarray(Image.open(again.strip())).astype(int) - made).max() <= 1
    code, out, _ = run(args + ["--sigmas", "beta", "--scheduler", "euler"], capsys)
    assert code == 0 and json.loads(Image.open(out.strip()).text[PNG_KEY])["sigmas"] == "beta"

    karras_model = DPMSolverMultistepScheduler(use_karras_sigmas=True).config  # a model's config with a grid on
    scheduler = scheduler_from_name("dpm++", karras_model, **sigma_grid_options("dpm++", "beta"))
    assert scheduler.config.use_beta_sigmas and not scheduler.config.use_karras_sigmas
    assert sigma_grid_options("dpm++", None) == {}
    code, _, err = run(args + ["--sigmas", "karras", "--scheduler", "ddim"], capsys)
    assert code == 2 and "--sigmas karras: the ddim sampler has no such noise-level grid" in err
    assert "dpm++" in err and len(err.strip().splitlines()) == 1
    # the samplers --sigmas' help names (by hand: the parser does not import torch) are those that take each grid
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                  if a.dest == "sigmas")
    listed = action.help.rsplit("): ", 1)[1].split(", ")
    for grid in SIGMA_GRIDS:
        taking = []
        for name in SCHEDULERS:
            try:
                sigma_grid_options(name, grid)
                taking.append(name)
            except ValueError:
                pass
        assert sorted(listed) == sorted(taking)


def test_pag(tiny_folders, tmp_path, capsys):
    """--pag SCALE:LAYERS gives the PAG pipeline's image, is stored in the PNG and reproduced from it; malformed or
    combined with an input image, a one-line error."""
    from latentdiff import LatentDiffusionPAGPipeline
    from latentdiff.schedulers import scheduler_from_name

    folder = tiny_folders[1]
    args = ["generate", "a red circle", "--model", folder, "--steps", 3, "--out", tmp_path / "out"]
    code, out, _ = run(args + ["--pag", "2.5:mid,up_blocks.1"], capsys)
    assert code == 0 and json.loads(Image.open(out.strip()).text[PNG_KEY])["pag"] == [2.5, ["mid", "up_blocks.1"]]
    made = np.asarray(Image.open(out.strip())).astype(int)
    pipe = LatentDiffusionPAGPipeline.from_pretrained(folder, pag_applied_layers=["mid", "up_blocks.1"])
    pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
    expected = np.asarray(pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, progress=False,
                               pag_scale=2.5, generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
    assert np.abs(made - expected).max() <= 1
    code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
    assert code == 0 and np.abs(np.asarray(Image.open(again.strip())).astype(int) - made).max() <= 1
    code, _, err = run(args + ["--pag", "x:mid"], capsys)
    assert code == 2 and "give a positive scale" in err
    code, _, err = run(args + ["--pag", "3", "--image", out.strip()], capsys)
    assert code == 2 and "--pag runs text to image alone" in err


def test_ip_adapter(tiny_folders, ip_folder, tmp_path, capsys):
    """--ip-adapter PATH:SCALE --ip-image IMG gives the Python API's image, stored in the PNG and reproduced."""
    from latentdiff.schedulers import scheduler_from_name

    (ip_folder / "ip.safetensors").rename(ip_folder / "ip-adapter_sd15.safetensors")  # (the folder's default name)
    try:
        prompt_image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        prompt_image.save(tmp_path / "prompt.png")
        args = ["generate", "a red circle", "--model", tiny_folders[0], "--steps", 3, "--out", tmp_path / "out"]
        code, out, err = run(args + ["--ip-adapter", f"{ip_folder}:0.6", "--ip-image", tmp_path / "prompt.png"],
                             capsys)
        assert code == 0, err
        settings = json.loads(Image.open(out.strip()).text[PNG_KEY])
        assert settings["ip_adapter"][0][:2] == [str(ip_folder), 0.6] and "ip_image" in settings
        made = np.asarray(Image.open(out.strip())).astype(int)
        pipe = LatentDiffusionPipeline.from_pretrained(tiny_folders[0])
        pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
        pipe.load_ip_adapter(ip_folder)
        pipe.set_ip_adapter_scale(0.6)
        expected = np.asarray(pipe("a red circle", ip_adapter_image=prompt_image, num_inference_steps=3,
                                   guidance_scale=5.0, progress=False,
                                   generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
        assert np.abs(made - expected).max() <= 1
        code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
        assert code == 0 and np.abs(np.asarray(Image.open(again.strip())).astype(int) - made).max() <= 1
        code, _, err = run(args + ["--ip-adapter", str(ip_folder)], capsys)
        assert code == 2 and "--ip-adapter and --ip-image go together" in err
    finally:
        (ip_folder / "ip-adapter_sd15.safetensors").rename(ip_folder / "ip.safetensors")


def test_image_variation(variation_folder, tmp_path, capsys):
    """With an image variation model, --image alone: variations named after the image, the Python API's images,
    stored in the PNG and reproduced; a prompt, or an option for other models, is refused by name."""
    from latentdiff import LatentDiffusionImageVariationPipeline
    from latentdiff.schedulers import scheduler_from_name

    photo = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    args = ["generate", "--model", variation_folder, "--image", tmp_path / "photo.png", "--steps", 3,
            "--out", tmp_path / "out"]
    code, out, err = run(args + ["--num-images", 2, "--seed", 4], capsys)
    assert code == 0, err
    paths = out.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["photo-variation-s4.png", "photo-variation-s5.png"]
    stored = Image.open(paths[1])
    settings = json.loads(stored.text[PNG_KEY])
    assert settings["image"][0] == str((tmp_path / "photo.png").resolve()) and settings["prompt"] == ""
    assert stored.text["parameters"] == "variation of photo.png | seed 5"
    pipe = LatentDiffusionImageVariationPipeline.from_pretrained(variation_folder)
    pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
    expected = pipe(photo, num_inference_steps=3, guidance_scale=5.0, progress=False,
                    generator=torch.Generator().manual_seed(5)).images[0]
    made = np.asarray(stored).astype(int)
    assert np.abs(made - np.asarray(expected).astype(int)).max() <= 1
    assert np.abs(made - np.asarray(Image.open(paths[0])).astype(int)).max() > 8  # (the seed matters)
    code, again, _ = run(["generate", "--from-png", paths[1], "--out", tmp_path / "repro"], capsys)
    assert code == 0 and np.array_equal(np.asarray(Image.open(again.strip())).astype(int), made)
    for extra, message in ((["a red circle"], "leave out a prompt"), (["--strength", 0.5], "leave out --strength"),
                           (["--negative", "x", "--lora", "f"], "leave out --negative, --lora")):
        code, _, err = run(args[:1] + extra + args[1:], capsys)
        assert code == 2 and message in err, err
    code, _, err = run(args[:3] + args[5:], capsys)
    assert code == 2 and "give --image PATH" in err
    code, out, _ = run(["info", variation_folder], capsys)
    assert code == 0 and "CLIPVisionModelWithProjection" in out and "CLIPImageProcessor" in out


def test_t2i_adapter(tiny_folders, tmp_path, capsys):
    """--t2i-adapter PATH:SCALE --adapter-image IMG gives the Python API's image, stored in the PNG and reproduced."""
    from latentdiff import LatentDiffusionAdapterPipeline, T2IAdapter
    from latentdiff.models.t2i_adapter import T2IAdapterConfig
    from latentdiff.schedulers import scheduler_from_name
    from tiny import randomized

    adapter = randomized(T2IAdapter(T2IAdapterConfig(channels=(32, 64), num_res_blocks=1, downscale_factor=2)), 3)
    adapter.save_pretrained(tmp_path / "adapter")
    sketch = Image.fromarray(np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    sketch.save(tmp_path / "sketch.png")
    args = ["generate", "a red circle", "--model", tiny_folders[1], "--steps", 3, "--out", tmp_path / "out"]
    code, out, err = run(args + ["--t2i-adapter", f"{tmp_path / 'adapter'}:0.8", "--adapter-image",
                                 tmp_path / "sketch.png"], capsys)
    assert code == 0, err
    made = np.asarray(Image.open(out.strip())).astype(int)
    pipe = LatentDiffusionAdapterPipeline.from_pretrained(tiny_folders[1], adapter=adapter)
    pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
    expected = np.asarray(pipe("a red circle", image=sketch, adapter_conditioning_scale=0.8, num_inference_steps=3,
                               guidance_scale=5.0, progress=False,
                               generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
    assert np.abs(made - expected).max() <= 1
    code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
    assert code == 0 and np.abs(np.asarray(Image.open(again.strip())).astype(int) - made).max() <= 1
    code, _, err = run(args + ["--t2i-adapter", tmp_path / "adapter"], capsys)
    assert code == 2 and "--t2i-adapter and --adapter-image go together" in err


def test_embedding(tiny_folders, tmp_path, capsys):
    """--embedding PATH:TOKEN makes TOKEN a word of the prompts (and of --negative), as the Python API's
    load_textual_inversion does; --from-png makes the image again."""
    from latentdiff.checkpoints import save_safetensors
    from latentdiff.schedulers import scheduler_from_name

    folder = tiny_folders[1]
    save_safetensors({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                     tmp_path / "neg.safetensors")
    args = ["generate", "a red circle", "--model", folder, "--steps", 3, "--negative", "<neg>"]
    code, out, _ = run(args + ["--embedding", f"{tmp_path / 'neg.safetensors'}:<neg>", "--out", tmp_path / "a"],
                       capsys)
    assert code == 0
    made = np.asarray(Image.open(out.strip())).astype(int)
    assert json.loads(Image.open(out.strip()).text[PNG_KEY])["embeddings"][0][1] == "<neg>"
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.load_textual_inversion(tmp_path / "neg.safetensors", token="<neg>")
    pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
    expected = np.asarray(pipe("a red circle", negative_prompt="<neg>", num_inference_steps=3, guidance_scale=5.0,
                               progress=False, generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
    assert np.abs(made - expected).max() <= 1
    code, plain, _ = run(args + ["--out", tmp_path / "b"], capsys)  # "<neg>" read as plain text
    assert np.abs(np.asarray(Image.open(plain.strip())).astype(int) - made).max() > 5
    code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
    assert code == 0 and np.abs(np.asarray(Image.open(again.strip())).astype(int) - made).max() <= 1


def test_image_inputs(tiny_folders, tmp_path, capsys):
    """--image (img2img) and --image --mask (inpainting) give the Python pipelines' images, are stored with their
    files' hashes, and --from-png makes them again."""
    from latentdiff import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline
    from latentdiff.schedulers import scheduler_from_name

    folder = tiny_folders[1]
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 6:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = LatentDiffusionPipeline.from_pretrained(folder)
    base.scheduler = scheduler_from_name("dpm++", base.scheduler.config)
    for extra, cls, kwargs in (([], LatentDiffusionImg2ImgPipeline, {"strength": 0.6}),
                               (["--mask", tmp_path / "mask.png"], LatentDiffusionInpaintPipeline,
                                {"mask_image": Image.open(tmp_path / "mask.png"), "strength": 1.0})):
        args = ["generate", "a red circle", "--model", folder, "--steps", 4, "--image", tmp_path / "in.png",
                "--out", tmp_path / cls.__name__, *extra] + (["--strength", 0.6] if not extra else [])
        code, out, _ = run(args, capsys)
        assert code == 0
        made = np.asarray(Image.open(out.strip())).astype(int)
        settings = json.loads(Image.open(out.strip()).text[PNG_KEY])
        assert settings["strength"] == kwargs["strength"] and settings["image"][0] == str(tmp_path / "in.png")
        expected = cls.from_pipe(base)("a red circle", Image.open(tmp_path / "in.png"), num_inference_steps=4,
                                       guidance_scale=5.0, progress=False,
                                       generator=torch.Generator().manual_seed(0), **kwargs).images[0]
        assert np.abs(made - np.asarray(expected).astype(int)).max() <= 1
        code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
        assert code == 0 and np.abs(np.asarray(Image.open(again.strip())).astype(int) - made).max() <= 1
    code, _, err = run(["generate", "x", "--model", folder, "--mask", tmp_path / "mask.png"], capsys)
    assert code == 2 and "give --image PATH" in err
    code, _, err = run(["generate", "x", "--model", folder, "--image", tmp_path / "in.png", "--height", 32], capsys)
    assert code == 2 and "the image's own size is used" in err


def test_convert_both_ways_and_info(tiny_folders, tmp_path, capsys):
    folder = tiny_folders[1]
    code, _, _ = run(["convert", folder, tmp_path / "one.safetensors"], capsys)
    assert code == 0
    code, _, _ = run(["convert", tmp_path / "one.safetensors", tmp_path / "back", "--config", folder], capsys)
    assert code == 0 and (tmp_path / "back" / "model_index.json").exists()
    # an existing destination is not written over without --force
    before = (tmp_path / "one.safetensors").read_bytes()
    code, _, err = run(["convert", tmp_path / "back", tmp_path / "one.safetensors"], capsys)
    assert code == 2 and "one.safetensors exists: give a new destination, or --force" in err
    code, _, err = run(["convert", tmp_path / "one.safetensors", tmp_path / "back", "--config", folder], capsys)
    assert code == 2 and "back exists and is not empty" in err
    assert (tmp_path / "one.safetensors").read_bytes() == before
    code, _, _ = run(["convert", tmp_path / "back", tmp_path / "one.safetensors", "--force"], capsys)
    assert code == 0 and (tmp_path / "one.safetensors").read_bytes() == before  # (the same weights again)
    code, _, _ = run(["convert", tmp_path / "one.safetensors", tmp_path / "v", "--config", folder,
                      "--prediction-type", "v_prediction"], capsys)
    scheduler = json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert code == 0 and scheduler["prediction_type"] == "v_prediction"
    code, out, _ = run(["info", tmp_path / "back"], capsys)
    assert code == 0
    assert "UNet2DConditionModel" in out and "AutoencoderKL" in out and "CLIPTextModel" in out
    assert "float32" in out and "params" in out


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--model", "/no/such/folder"], "not found: /no/such/folder"),
    (["generate", "x", "--height", "20"], "height=20 must be a positive multiple of 8"),
    (["convert", "/no/such.safetensors", "out"], "not found"),
    (["generate"], "give a prompt"),
    (["generate", "x", "--num-images", "0"], "--num-images must be at least 1; got 0"),
    (["generate", "x", "--out", "image.png"], "--out is the folder images are written to"),
    (["generate", "x", "--device", "gpu0"], "device 'gpu0' is not a device name: use cpu, cuda or cuda:N"),
    (["generate", "x", "--device", "cuda"], "device 'cuda': no CUDA GPU is usable here"),
    (["eval", "--device", "cuda:1"], "device 'cuda:1': no CUDA GPU is usable here"),
])
def test_errors_are_one_line(tiny_folders, args, message, capsys, monkeypatch):
    if "--height" in args:
        args = args + ["--model", str(tiny_folders[1])]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (as on a machine without a GPU)
    code, _, err = run(args, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_train_in_process(tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).parents[1] / "training" / "configs" / "vae_smoke.yaml"
    code, _, err = run(["train", "vae", "--config", config, "--output_dir", tmp_path / "vae",
                        "--max_train_steps", 2, "--checkpointing_steps", 0, "--validation_steps", 0,
                        "--scale_samples", 8], capsys)
    assert code == 0, err
    assert (tmp_path / "vae" / "vae" / "config.json").exists()
    lines = (tmp_path / "vae" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    code, _, err = run(["train", "vae", "--config", config, "--bogus", 1], capsys)
    assert code == 2 and "unknown config key(s) ['bogus']" in err


def test_scheduler_choices_are_the_library_names():
    """--scheduler lists its names by hand (the parser does not import torch): each is a SCHEDULERS name, and each
    SCHEDULERS name is offered."""
    from latentdiff.cli import build_parser
    from latentdiff.schedulers import SCHEDULERS

    parser = build_parser()
    for name in SCHEDULERS:
        assert parser.parse_args(["generate", "x", "--scheduler", name]).scheduler == name
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "x", "--scheduler", "klms"])
    offered = next(a.choices for a in parser._subparsers._group_actions[0].choices["generate"]._actions
                   if a.dest == "scheduler")
    assert sorted(offered) == sorted(SCHEDULERS)


def test_vae(tiny_folders, tmp_path, capsys):
    """--vae FOLDER (here TAESD's AutoencoderTiny) decodes with that VAE: the Python API's image with pipe.vae
    replaced; stored in the PNG with its hash, and --from-png makes the image again."""
    import diffusers

    from latentdiff import AutoencoderTiny
    from latentdiff.schedulers import scheduler_from_name
    from tiny import randomized

    folder = tiny_folders[1]
    torch.manual_seed(0)
    randomized(diffusers.AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                                         num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)), 0, scale=0.06
               ).save_pretrained(tmp_path / "taesd", safe_serialization=True)
    args = ["generate", "a red circle", "--model", folder, "--steps", 3, "--out", tmp_path / "out"]
    code, out, _ = run(args + ["--vae", tmp_path / "taesd"], capsys)
    assert code == 0
    made = np.asarray(Image.open(out.strip())).astype(int)
    stored = json.loads(Image.open(out.strip()).text[PNG_KEY])["vae"][0]
    assert stored[0] == str(tmp_path / "taesd") and len(stored[2]) == 16
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.vae = AutoencoderTiny.from_pretrained(tmp_path / "taesd")
    pipe.scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
    expected = np.asarray(pipe("a red circle", num_inference_steps=3, guidance_scale=5.0, progress=False,
                               generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
    assert np.abs(made - expected).max() <= 1
    code, plain, _ = run(args + ["--out", tmp_path / "plain"], capsys)
    assert np.abs(np.asarray(Image.open(plain.strip())).astype(int) - made).max() > 10
    code, again, _ = run(["generate", "--from-png", out.strip(), "--out", tmp_path / "repro"], capsys)
    assert code == 0 and np.abs(np.asarray(Image.open(again.strip())).astype(int) - made).max() <= 1
    code, _, err = run(args + ["--vae", tmp_path / "nowhere"], capsys)
    assert code == 2 and "--vae folder not found" in err


def test_compile_flags(tiny_folders, tmp_path, capsys, monkeypatch):
    """--compile calls pipe.compile() with its cache folder: --compile-cache, else latentdiff's cache folder's
    compiled/ (compiling itself is tested in test_compile_cache); --compile-cache alone is refused."""
    asked = []
    monkeypatch.setattr(LatentDiffusionPipeline, "compile", lambda self, cache_dir=None: asked.append(cache_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    base = ["generate", "a small red circle", "--model", tiny_folders[1], "--steps", 1, "--out", tmp_path / "out",
            "--force"]
    assert run([*base, "--compile"], capsys)[0] == 0
    assert run([*base, "--compile", "--compile-cache", tmp_path / "kept"], capsys)[0] == 0
    assert asked == [str(tmp_path / "xdg" / "latentdiff" / "compiled"), str(tmp_path / "kept")]
    code, _, err = run([*base, "--compile-cache", tmp_path / "kept"], capsys)
    assert code == 2 and "--compile-cache is where --compile keeps compiled models: add --compile" in err
    assert len(asked) == 2
