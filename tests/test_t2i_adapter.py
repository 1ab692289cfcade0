"""T2I-Adapter against diffusers: the adapter (full and light, colour and grey), the U-Net's
down_intrablock_additional_residuals (where diffusers adds them, for stages with and without attention), and the
pipeline against StableDiffusionAdapterPipeline; folders both ways; the errors."""
import dataclasses
import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import LatentDiffusionAdapterPipeline, LatentDiffusionPipeline, T2IAdapter
from latentdiff.models.t2i_adapter import T2IAdapterConfig
from latentdiff.models.unet import UNet2DConditionModel, UNetConfig
from tiny import generate, randomized

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(model: torch.nn.Module, cls: str) -> torch.nn.Module:
    import diffusers

    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.to_dict().items() if k[0] != "_"}
    ref = getattr(diffusers, cls)(**kwargs)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()


@pytest.mark.parametrize("config", [
    dict(in_channels=3, channels=(32, 64), num_res_blocks=2, downscale_factor=2),
    dict(in_channels=1, channels=(32, 64, 64), num_res_blocks=1, downscale_factor=4, adapter_type="light_adapter"),
])
def test_adapter_matches_diffusers(config):
    ours = randomized(T2IAdapter(T2IAdapterConfig(**config)), 0)
    ref = reference(ours, "T2IAdapter")
    x = torch.rand(2, config["in_channels"], 48, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = ours(x), ref(x)
    assert len(got) == len(expected) and all((a - b).abs().max() < 1e-6 for a, b in zip(got, expected))
    assert ours.total_downscale_factor == ref.total_downscale_factor and ours.num_features == len(got)


def test_config_covers_every_diffusers_option():
    import diffusers

    params = inspect.signature(diffusers.T2IAdapter.__init__).parameters
    assert {f.name for f in dataclasses.fields(T2IAdapterConfig)} == set(params) - {"self"}
    for f in dataclasses.fields(T2IAdapterConfig):
        default = params[f.name].default
        assert f.default == (tuple(default) if isinstance(default, list) else default), f.name
    with pytest.raises(ValueError, match="adapter_type = 'full_adapter_xl'.*SDXL"):
        T2IAdapterConfig.from_dict({"adapter_type": "full_adapter_xl"})


@pytest.mark.parametrize("down, up", [
    (("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")),
    (("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")),  # (tiny-shapes' first stage)
])
@torch.no_grad()
def test_unet_adds_feature_maps_where_diffusers_does(down, up):
    """A stage with attention: to its last layer's output (before downsampling); one without: to its (downsampled)
    output, skip connection included, as diffusers' in-place add does; with k contexts per sample too."""
    config = UNetConfig(block_out_channels=(32, 64), down_block_types=down, up_block_types=up, cross_attention_dim=32,
                        attention_head_dim=2, layers_per_block=2, norm_num_groups=8)
    ours = randomized(UNet2DConditionModel(config), 3)
    ref = reference(ours, "UNet2DConditionModel")
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    first = 16 if down[0].startswith("Cross") else 8
    maps = [torch.randn(2, 32, first, first, generator=g), torch.randn(2, 64, 8, 8, generator=g)]
    got = ours(x, 10, ctx, down_intrablock_additional_residuals=maps)
    expected = ref(x, 10, ctx, down_intrablock_additional_residuals=[m.clone() for m in maps]).sample
    assert (got - expected).abs().max() < 1e-5 and (got - ours(x, 10, ctx)).abs().max() > 1e-2
    shared = ours(x[:1], 10, ctx, down_intrablock_additional_residuals=maps)
    repeated = ref(x[:1].repeat(2, 1, 1, 1), 10, ctx, down_intrablock_additional_residuals=[m.clone() for m in maps])
    assert (shared - repeated.sample).abs().max() < 1e-5
    with pytest.raises(ValueError, match="1 feature maps for a U-Net of 2 down stages"):
        ours(x, 10, ctx, down_intrablock_additional_residuals=maps[:1])
    with pytest.raises(ValueError, match=r"feature map of shape \(2, 64, 4, 4\) where the U-Net's stage has"):
        ours(x, 10, ctx, down_intrablock_additional_residuals=[maps[0], maps[1][..., :4, :4]])


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    config = T2IAdapterConfig(in_channels=3, channels=(32, 64), num_res_blocks=1, downscale_factor=2)
    randomized(T2IAdapter(config), 5).save_pretrained(folder)
    return folder


CONTROL = Image.fromarray(np.random.default_rng(8).integers(0, 256, (20, 16, 3), dtype=np.uint8))


def pair(tiny_folders, adapter_folder):
    import diffusers

    ref = diffusers.StableDiffusionAdapterPipeline.from_pretrained(
        tiny_folders[0], adapter=diffusers.T2IAdapter.from_pretrained(adapter_folder), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionAdapterPipeline.from_pretrained(tiny_folders[0],
                                                          adapter=T2IAdapter.from_pretrained(adapter_folder))
    return ours, ref


@pytest.mark.parametrize("kwargs", [
    dict(image=CONTROL, height=16, width=16),  # (resized, as diffusers)
    dict(image=CONTROL, height=16, width=16, adapter_conditioning_scale=0.6, num_images_per_prompt=2, images=2),
    dict(image=CONTROL, height=24, width=16, guidance_scale=1.0),
])
def test_pipeline_matches_diffusers(tiny_folders, adapter_folder, kwargs):
    ours, ref = pair(tiny_folders, adapter_folder)
    got, expected = generate(ours, **kwargs), generate(ref, **kwargs)
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    plain = {k: v for k, v in kwargs.items() if k in ("height", "width", "guidance_scale", "num_images_per_prompt",
                                                      "images")}
    assert np.abs(got - generate(LatentDiffusionPipeline.from_pipe(ours), **plain)).max() > 1e-3


def test_folders_both_ways(tiny_folders, adapter_folder, tmp_path):
    import diffusers

    ours, ref = pair(tiny_folders, adapter_folder)
    ours.save_pretrained(tmp_path / "ours")
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours", safety_checker=None)
    assert type(loaded).__name__ == "StableDiffusionAdapterPipeline"
    assert all(torch.equal(v, loaded.adapter.state_dict()[k]) for k, v in ours.adapter.state_dict().items())
    ref.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    back = LatentDiffusionAdapterPipeline.from_pretrained(tmp_path / "theirs")
    kwargs = dict(image=CONTROL, height=16, width=16)
    np.testing.assert_allclose(generate(back, **kwargs), generate(ours, **kwargs), atol=1e-6)


def test_errors(tiny_folders, adapter_folder):
    ours, _ = pair(tiny_folders, adapter_folder)
    with pytest.raises(ValueError, match="needs image="):
        generate(ours)
    with pytest.raises(ValueError, match="the adapter image is 16x16 but height x width is 24x16"):
        generate(ours, image=torch.rand(1, 3, 16, 16), height=16, width=24)
    with pytest.raises(ValueError, match="has no T2I-Adapter"):
        LatentDiffusionAdapterPipeline.from_pretrained(tiny_folders[0])
    with pytest.raises(TypeError, match="adapter must be a T2IAdapter"):
        LatentDiffusionAdapterPipeline.from_pipe(ours, adapter=ours.unet)
    with pytest.raises(ValueError, match="CUDA graphs are not available with a T2I-Adapter"):
        ours.enable_cuda_graphs()


def test_several_adapters_match_diffusers(tiny_folders, adapter_folder, tmp_path):
    """A list of adapters (a colour one and a grey one), one control image and one weight each: diffusers'
    MultiAdapter; pipeline folders with adapter/ and adapter_1/ both ways; the errors."""
    import diffusers

    from latentdiff.models.t2i_adapter import MultiAdapter

    grey = T2IAdapterConfig(in_channels=1, channels=(32, 64), num_res_blocks=1, downscale_factor=2)
    randomized(T2IAdapter(grey), 6).save_pretrained(tmp_path / "grey")
    folders = [adapter_folder, tmp_path / "grey"]
    ref = diffusers.StableDiffusionAdapterPipeline.from_pretrained(
        tiny_folders[0], adapter=[diffusers.T2IAdapter.from_pretrained(f) for f in folders], safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = LatentDiffusionAdapterPipeline.from_pretrained(
        tiny_folders[0], adapter=[T2IAdapter.from_pretrained(f) for f in folders])
    assert isinstance(ours.adapter, MultiAdapter)
    sketch = Image.fromarray(np.random.default_rng(9).integers(0, 256, (16, 16), dtype=np.uint8))
    kwargs = dict(image=[CONTROL, sketch], height=16, width=16, adapter_conditioning_scale=[0.7, 0.4])
    got = generate(ours, **kwargs)
    np.testing.assert_allclose(got, generate(ref, **kwargs), atol=2e-4, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_1" / "config.json").exists()
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours", safety_checker=None)
    assert type(loaded.adapter).__name__ == "MultiAdapter" and len(loaded.adapter.adapters) == 2
    back = LatentDiffusionAdapterPipeline.from_pretrained(tmp_path / "ours")
    np.testing.assert_allclose(generate(back, **kwargs), got, atol=1e-6)
    with pytest.raises(ValueError, match="2 T2I-Adapters need one control image each"):
        generate(ours, image=CONTROL, height=16, width=16)
    with pytest.raises(ValueError, match="makes feature maps of other sizes"):
        MultiAdapter([ours.adapter.adapters[0], T2IAdapter(T2IAdapterConfig(in_channels=3, channels=(32, 64, 64),
                                                                           num_res_blocks=1, downscale_factor=2))])


@pytest.mark.slow  # (an AOTInductor compile of ~2 minutes on a 2-core CPU; make test-slow)
def test_compile_cache_takes_the_adapter_residuals(tiny_folders, adapter_folder, tmp_path):
    """compile(cache_dir=): the U-Net's calls with the adapter's residuals (down_intrablock_additional_residuals,
    inputs of the package) run from a package, with the eager images; a pipeline loaded anew loads it."""
    def loaded():
        return LatentDiffusionAdapterPipeline.from_pretrained(tiny_folders[0],
                                                              adapter=T2IAdapter.from_pretrained(adapter_folder))

    kwargs = dict(image=CONTROL, height=16, width=16, adapter_conditioning_scale=0.6)
    pipe = loaded()
    eager = generate(pipe, **kwargs)
    for compiled, loads in [(1, 0), (0, 1)]:
        pipe.compile(max_autotune=False, cache_dir=tmp_path)
        np.testing.assert_allclose(generate(pipe, **kwargs), eager, atol=1e-4, rtol=0)
        model = pipe._compiled[1]
        assert (len(model.compiled_packages), len(model.loaded_packages)) == (compiled, loads)
        pipe = loaded()
