"""The U-Net against diffusers' UNet2DConditionModel (the oracle): same weights, same outputs; folder interop both
ways; strict loading; the config subset; precision, memory layout and gradient checkpointing."""
from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import TINY_UNET, perturb

from latentdiff.checkpoints import CheckpointError, load_into
from latentdiff.models.embeddings import timestep_embedding
from latentdiff.models.unet import SD_DOWN, SD_UP, UNet2DConditionModel, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
SMALL = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=24, attention_head_dim=2,
             down_block_types=(CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP))

# (config overrides on top of SMALL, latent height, width)
ORACLE_CASES = {
    "sd-like": (dict(), 16, 16),
    "pipeline-tiny": (dict(TINY_UNET), 8, 8),
    # plain stage first; linear projection; 2 transformer layers; 3 heads of 21 dims (inner 63 != 64 channels)
    "down-first": (dict(down_block_types=(DOWN, CA_DOWN, CA_DOWN), up_block_types=(CA_UP, CA_UP, UP),
                        layers_per_block=1, attention_head_dim=(1, 4, 3), transformer_layers_per_block=2,
                        use_linear_projection=True, upcast_attention=True), 40, 24),
    # SD's four stages, per-stage layers / depth / heads, other sinusoid variant, a size 8 does not divide
    "four-stages-odd": (dict(block_out_channels=(16, 32, 32, 32), down_block_types=SD_DOWN, up_block_types=SD_UP,
                             layers_per_block=(1, 2, 1, 1), transformer_layers_per_block=(1, 2, 1, 1),
                             attention_head_dim=(2, 4, 4, 8), flip_sin_to_cos=False, freq_shift=1), 13, 11),
    "mixed": (dict(down_block_types=(CA_DOWN, DOWN, CA_DOWN), up_block_types=(CA_UP, UP, CA_UP)), 12, 20),
}


def diffusers_kwargs(config: UNetConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}


def make_pair(config: UNetConfig, seed: int = 0, quick_init: bool = False):
    """diffusers' model with random weights (its own init, then perturbed everywhere), and ours holding the same
    tensors. `quick_init` skips diffusers' init for one cheap pass of scaled Gaussians (full-size models)."""
    torch.manual_seed(seed)
    if quick_init:
        with torch.device("meta"):
            ref = diffusers.UNet2DConditionModel(**diffusers_kwargs(config))
        ref = gaussian_weights(ref.to_empty(device="cpu"), seed).eval()
    else:
        ref = perturb(diffusers.UNet2DConditionModel(**diffusers_kwargs(config)), seed + 1, scale=0.02).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel(config)
    return ref, load_into(ours, ref.state_dict(), "diffusers model").eval()


@torch.no_grad()
def gaussian_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in) (unit-scale activations), biases ~ N(0, 0.02^2), norm scales ~ N(1, 0.02^2)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
        else:
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02, generator=g)
    return model


def inputs(config: UNetConfig, height: int = 16, width: int = 16, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.in_channels, height, width, generator=g)
    ctx = torch.randn(batch, 7, config.cross_attention_dim, generator=g)
    t = torch.tensor([981, 7, 500, 250][:batch])
    return sample, t, ctx


@pytest.fixture(scope="module")
def small():
    config = UNetConfig(**SMALL)
    ref, ours = make_pair(config)
    return config, ref, ours


# ---------------------------------------------------------------- oracle parity


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
@torch.no_grad()
def test_matches_diffusers(case):
    overrides, height, width = ORACLE_CASES[case]
    config = UNetConfig(**{**SMALL, **overrides})
    ref, ours = make_pair(config)
    sample, t, ctx = inputs(config, height, width)
    expected = ref(sample, t, ctx).sample
    got = ours(sample, t, ctx)
    assert got.shape == (2, config.out_channels, height, width)
    assert expected.std() > 0.1  # a non-trivial output
    assert (got - expected).abs().max() <= 1e-4


@torch.no_grad()
def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 37, 999])
    for dim, flip, shift in ((320, True, 0), (33, False, 1), (8, True, 1)):
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        got = timestep_embedding(t, dim, flip, shift)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- folders and strict loading


@torch.no_grad()
def test_diffusers_folder_loads_into_ours(small, tmp_path):
    config, ref, _ = small
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    assert ours.config == config and not ours.training
    sample, t, ctx = inputs(config)
    assert (ours(sample, t, ctx) - ref(sample, t, ctx).sample).abs().max() <= 1e-4


@torch.no_grad()
def test_our_folder_loads_into_diffusers(small, tmp_path):
    config, ref, ours = small
    ours.save_pretrained(tmp_path)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    for key, value in diffusers_kwargs(config).items():
        assert theirs.config[key] == (list(value) if isinstance(value, tuple) else value), key
    sample, t, ctx = inputs(config)
    assert (theirs(sample, t, ctx).sample - ours(sample, t, ctx)).abs().max() <= 1e-4


def _corrupt(folder, edit):
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("problem, key", [
    ("missing", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"),
    ("unexpected", "down_blocks.2.attentions.0.proj_in.weight"),
    ("mis-shaped", "conv_in.weight"),
])
def test_strict_loading_names_the_key(small, tmp_path, problem, key):
    _, _, ours = small
    ours.save_pretrained(tmp_path)
    edits = {
        "missing": lambda sd: sd.pop(key),
        "unexpected": lambda sd: sd.__setitem__(key, torch.zeros(1)),
        "mis-shaped": lambda sd: sd.__setitem__(key, torch.zeros(32, 4, 1, 1)),
    }
    _corrupt(tmp_path, edits[problem])
    with pytest.raises(CheckpointError, match=problem) as err:
        UNet2DConditionModel.from_pretrained(tmp_path)
    assert key in str(err.value)


# ---------------------------------------------------------------- config


def test_config_covers_every_diffusers_option():
    params = inspect.signature(diffusers.UNet2DConditionModel.__init__).parameters
    ours = {f.name for f in dataclasses.fields(UNetConfig)} | set(UNetConfig.fixed)
    assert ours == set(params) - {"self"}
    # a config.json that omits a key means diffusers' default, to us too
    for f in dataclasses.fields(UNetConfig):
        default = params[f.name].default
        assert f.default == (tuple(default) if isinstance(default, list) else default), f.name
    for key, accepted in UNetConfig.fixed.items():
        values = accepted.values if hasattr(accepted, "values") else (accepted,)
        assert params[key].default in values, key


def test_presets_match_the_published_configs():
    common = dict(act_fn="silu", block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
                  down_block_types=list(SD_DOWN), up_block_types=list(SD_UP), downsample_padding=1,
                  flip_sin_to_cos=True, freq_shift=0, in_channels=4, out_channels=4, layers_per_block=2,
                  mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, _diffusers_version="0.6.0")
    sd15 = dict(common, _class_name="UNet2DConditionModel", attention_head_dim=8, cross_attention_dim=768,
                sample_size=64)
    sd21 = dict(common, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, dual_cross_attention=False,
                num_class_embeds=None, only_cross_attention=False, sample_size=96, upcast_attention=True,
                use_linear_projection=True)
    assert UNetConfig.from_dict(sd15) == UNetConfig.sd15()
    assert UNetConfig.from_dict(sd21) == UNetConfig.sd2()
    assert UNetConfig.from_dict(UNetConfig.sd2().to_dict()) == UNetConfig.sd2()


@pytest.mark.parametrize("key, value", [
    ("class_embed_type", "timestep"),
    ("num_attention_heads", 8),
    ("addition_embed_type", "text_time"),
    ("conv_in_kernel", 7),
    ("mid_block_type", "UNetMidBlock2D"),
    ("down_block_types", [CA_DOWN, CA_DOWN, "SimpleCrossAttnDownBlock2D", DOWN]),
    ("up_block_types", [UP, CA_UP]),
    ("attention_head_dim", [5, 10]),
    ("transformer_layers_per_block", [[1, 2], [1, 2], [1, 2], [1, 2]]),
    ("layers_per_block", 0),
    ("norm_num_groups", 24),
    ("bogus_key", 1),
])
def test_unsupported_config_names_the_key(key, value):
    data = dict(UNetConfig.sd15().to_dict(), **{key: value})
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict(data)


@pytest.mark.parametrize("preset", ["sd15", "sd2"])
def test_full_size_parameter_count(preset):
    config = getattr(UNetConfig, preset)()
    with torch.device("meta"):
        ours = UNet2DConditionModel(config)
        ref = diffusers.UNet2DConditionModel(**diffusers_kwargs(config))
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())
    if preset == "sd15":
        assert ours.num_parameters() == 859_520_964
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes


# ---------------------------------------------------------------- inputs, precision, layout, training


@torch.no_grad()
def test_timestep_forms_and_per_sample_timesteps(small):
    config, _, ours = small
    sample, _, ctx = inputs(config)
    out = ours(sample, torch.tensor([500, 500]), ctx)
    for t in (500, 500.0, torch.tensor(500), torch.tensor([500.0])):
        torch.testing.assert_close(ours(sample, t, ctx), out, rtol=0, atol=1e-6)
    # each sample denoised at its own t, as if alone in the batch
    mixed = ours(sample, torch.tensor([10, 900]), ctx)
    for i, t in enumerate((10, 900)):
        torch.testing.assert_close(mixed[i:i + 1], ours(sample[i:i + 1], t, ctx[i:i + 1]), rtol=0, atol=1e-5)
    assert (mixed[1] - out[1]).abs().max() > 1e-2
    assert ours(sample, 500, ctx, return_dict=True).sample.shape == sample.shape


@torch.no_grad()
def test_diffusers_calling_conventions(small):
    """diffusers' pipelines' denoising line runs unchanged and gives diffusers' values: return_dict=False is a
    1-tuple (so [0] is the whole batch, not its first sample), return_dict=True has .sample; the conditioning
    arguments SD 1.x leaves empty are taken empty and refused otherwise. Called bare, the tensor itself. As in
    diffusers, the fourth argument is class_labels (the x4 upscaler's: test_upscale.py)."""
    config, ref, ours = small
    sample, t, ctx = inputs(config)
    kwargs = dict(encoder_hidden_states=ctx, timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs=None)
    expected = ref(sample, t, return_dict=False, **kwargs)[0]
    assert expected.shape == sample.shape
    for got in (ours(sample, t, return_dict=False, **kwargs)[0], ours(sample, t, **kwargs),
                ours(sample, t, ctx, return_dict=True).sample, ours(sample, t, ctx, None, return_dict=True)[0]):
        assert got.shape == sample.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="only 'scale' .* and 'ip_adapter_masks'"):
        ours(sample, t, ctx, cross_attention_kwargs={"attention_mask": None})
    torch.testing.assert_close(ours(sample, t, ctx, cross_attention_kwargs={"scale": 0.5}), expected, rtol=0,
                               atol=1e-4)  # the LoRA scale, without adapters: nothing to scale
    # a tensor (not read as a truth value), to a U-Net that takes none
    with pytest.raises(ValueError, match="timestep_cond is given but this U-Net takes none"):
        ours(sample, t, ctx, timestep_cond=torch.zeros(2, 256))


@pytest.mark.parametrize("case", ["down-first", "sd-like"])
@torch.no_grad()
def test_one_sample_shared_by_several_contexts(case):
    """k contexts per sample (guidance) give diffusers' result for the sample repeated k times, and the layers before
    the first cross-attention run on the unrepeated batch."""
    overrides, height, width = ORACLE_CASES[case]
    config = UNetConfig(**{**SMALL, **overrides})
    ref, ours = make_pair(config)
    sample, t, _ = inputs(config, height, width)
    ctx = torch.randn(6, 7, config.cross_attention_dim, generator=torch.Generator().manual_seed(5))
    batches = {}

    def record(name):
        def hook(module, args, output):
            batches.setdefault(name, args[0].shape[0])
        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in [("conv_in", ours.conv_in), ("first stage", ours.down_blocks[0].resnets[0]),
                                  ("mid", ours.mid_block.resnets[0])]]
    for k in (2, 3):
        batches.clear()
        expected = ref(torch.cat([sample] * k), t.repeat(k), ctx[:2 * k]).sample
        got = ours(sample, t, ctx[:2 * k])
        assert got.shape == expected.shape == (2 * k, config.out_channels, height, width)
        assert (got - expected).abs().max() <= 1e-4
        plain_first_stage = case == "down-first"
        assert batches == {"conv_in": 2, "first stage": 2 if plain_first_stage else 2 * k, "mid": 2 * k}
    for hook in hooks:
        hook.remove()


@torch.no_grad()
def test_cached_text_keys_give_the_same_result_and_follow_changes(small):
    """cache_text_keys: the cross-attentions project a context once while it comes back unchanged, and again when
    it is another tensor, was changed in place, or the projection weights were; nothing is cached with autograd."""
    from latentdiff.models.attention import cache_text_keys

    config, _, ours = small
    sample, t, ctx = inputs(config)
    calls = []
    to_k = [m.to_k for name, m in ours.named_modules() if name.endswith("attn2")]
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in to_k]
    try:
        expected, doubled = ours(sample, t, ctx), ours(sample, t, 2 * ctx)
        per_call = len(calls) // 2
        calls.clear()
        with cache_text_keys(ours):
            for _ in range(3):
                assert torch.equal(ours(sample, t, ctx), expected)
            assert len(calls) == per_call  # projected once for three calls
            ctx2 = ctx.clone()
            assert torch.equal(ours(sample, t, ctx2), expected) and len(calls) == 2 * per_call  # another tensor
            ctx2.mul_(2)
            assert torch.equal(ours(sample, t, ctx2), doubled) and len(calls) == 3 * per_call  # changed in place
            calls.clear()
            to_k[0].weight.mul_(2)  # (exactly undone below)
            changed = ours(sample, t, ctx2)
            assert len(calls) == 1  # the one layer whose weight changed
            to_k[0].weight.div_(2)
            with torch.enable_grad():
                calls.clear()
                ours(sample, t, ctx2)
                assert len(calls) == per_call
        assert not torch.equal(changed, doubled)
        assert all(m.context_cache is None for m in ours.modules() if hasattr(m, "context_cache"))
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def test_cached_timesteps_give_the_same_result_and_follow_changes(small):
    """cache_timesteps: calls whose timestep is an element of the timesteps (as iterating gives) take the ResNet
    blocks' time projections from a table made for all of them at once, with the plain call's results; another
    timestep tensor, timesteps or weights changed in place, and autograd compute them as usual."""
    from latentdiff.models.resnet import ResnetBlock2D
    from latentdiff.models.unet import cache_timesteps

    config, _, ours = small
    sample, _, ctx = inputs(config, batch=1)
    ctx = torch.cat([ctx, 2 * ctx])  # guidance: one sample, two contexts
    timesteps = torch.tensor([981, 500, 7, 500])
    expected = [ours(sample, int(t), ctx) for t in timesteps]
    blocks = [m for m in ours.modules() if isinstance(m, ResnetBlock2D)]
    rows = []
    hooks = [b.time_emb_proj.register_forward_hook(lambda m, i, o: rows.append(o.shape[0])) for b in blocks]
    try:
        with cache_timesteps(ours, timesteps):
            for t, want in zip(timesteps, expected):
                torch.testing.assert_close(ours(sample, t, ctx), want, rtol=0, atol=1e-5)
            assert rows == [4] * len(blocks)  # each block projected the 4 timesteps once, in one batch
            rows.clear()
            t = timesteps[2]
            torch.testing.assert_close(ours(sample, t.clone(), ctx), expected[2], rtol=0, atol=1e-5)
            assert rows == [2] * len(blocks)  # not an element of the timesteps: computed as usual
            rows.clear()
            blocks[0].time_emb_proj.weight.mul_(2)  # a weight changed in place: the table is made anew
            changed = ours(sample, t, ctx)
            blocks[0].time_emb_proj.weight.div_(2)  # (exactly undone)
            assert rows == [4] * len(blocks) and (changed - expected[2]).abs().max() > 1e-3
            rows.clear()
            timesteps[2] = 500  # the timesteps changed in place: t (a view) now reads 500, computed as usual
            torch.testing.assert_close(ours(sample, t, ctx), expected[1], rtol=0, atol=1e-5)
            assert rows == [2] * len(blocks)
            rows.clear()
            with torch.enable_grad():
                ours(sample, timesteps[0], ctx)
            assert rows == [2] * len(blocks)
        assert ours.time_table is None
    finally:
        for hook in hooks:
            hook.remove()


def test_cached_timesteps_compute_as_usual_with_inference_tensor_weights(small):
    """Weights made under torch.inference_mode keep no version counter, so no table can be checked against them:
    the calls compute the embedding as usual (they used to raise RuntimeError)."""
    from latentdiff.models.unet import cache_timesteps

    config, _, ours = small
    with torch.inference_mode():
        frozen = UNet2DConditionModel(config).eval()
        frozen.load_state_dict(ours.state_dict())
    sample, _, ctx = inputs(config, batch=1)
    timesteps = torch.tensor([981, 7])
    with torch.no_grad():
        expected = [ours(sample, int(t), ctx) for t in timesteps]
        with cache_timesteps(frozen, timesteps):
            for t, want in zip(timesteps, expected):
                torch.testing.assert_close(frozen(sample, t, ctx), want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_fused_qkv_projections_give_the_same_result_and_follow_the_weights():
    """fuse_qkv_projections: the self-attentions' q, k, v from one product over concatenated weights (made on first
    use, remade after the weights change in place or the model is cast), the same outputs, the state dict
    unchanged; with autograd the separate projections run (their weights get gradients)."""
    from latentdiff.models.attention import Attention

    config = UNetConfig(**SMALL)
    _, ours = make_pair(config)
    sample, t, ctx = inputs(config)
    expected, keys = ours(sample, t, ctx), list(ours.state_dict())
    ours.fuse_qkv_projections()
    torch.testing.assert_close(ours(sample, t, ctx), expected, rtol=1e-5, atol=1e-5)
    self_attention = [m for name, m in ours.named_modules() if name.endswith("attn1")]
    assert self_attention and all(len(m.fused) == 3 for m in self_attention)  # built, and used
    assert not any(m.fused for name, m in ours.named_modules() if name.endswith("attn2"))  # cross: never
    assert list(ours.state_dict()) == keys
    for m in self_attention:
        m.to_v.weight.mul_(1.5)
    changed = ours(sample, t, ctx)
    ours.unfuse_qkv_projections()
    assert all(m.fused is None for m in ours.modules() if isinstance(m, Attention))
    torch.testing.assert_close(changed, ours(sample, t, ctx), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, expected, atol=1e-3)
    ours.fuse_qkv_projections()
    ours(sample, t, ctx)
    ours.double()  # a cast drops the copies; the next call makes them in float64
    assert all(m.fused == [] for m in self_attention)
    assert ours(sample.double(), t, ctx.double()).dtype == torch.float64
    assert all(m.fused[1].dtype == torch.float64 for m in self_attention)
    ours.float()
    with torch.enable_grad():
        ours(sample, t, ctx).square().mean().backward()
    assert all(m.to_q.weight.grad is not None for m in self_attention)
    ours.optimize_for_inference(winograd=False)  # packed projections (re-laid out weights) run unfused
    torch.testing.assert_close(ours(sample, t, ctx), changed, rtol=1e-4, atol=1e-4)
    assert all(m.fused == [] for m in self_attention)  # nothing concatenated from packed weights


def test_bad_inputs_say_what_to_fix(small):
    config, _, ours = small
    sample, t, ctx = inputs(config)
    with pytest.raises(ValueError, match="one per sample"):
        ours(sample, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(TypeError, match="timestep"):
        ours(sample, "500", ctx)
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        ours(sample[:, :3], t, ctx)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        ours(sample, t, ctx[..., :16])
    with pytest.raises(ValueError, match="repeat"):
        ours(sample, t, ctx[:1])
    with pytest.raises(ValueError, match=r"\.to\(torch.float32\)"):
        ours(sample.bfloat16(), t, ctx)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_agrees_with_fp32(small, dtype):
    config, _, ours = small
    half = UNet2DConditionModel(config).to(dtype)
    half.load_state_dict(ours.state_dict())
    sample, t, ctx = inputs(config)
    expected = ours(sample, t, ctx)
    got = half(sample.to(dtype), t, ctx.to(dtype))
    assert got.dtype == dtype
    relative = (got.float() - expected).norm() / expected.norm()
    assert relative < (3e-2 if dtype == torch.bfloat16 else 5e-3)
    # the timestep features are computed in fp32: t = 999 and 1000, equal in bf16, still differ
    assert (half(sample.to(dtype), 999, ctx.to(dtype)) - half(sample.to(dtype), 1000, ctx.to(dtype))).abs().max() > 0


@torch.no_grad()
def test_channels_last_gives_the_same_result(small):
    config, _, ours = small
    sample, t, ctx = inputs(config)
    expected = ours(sample, t, ctx)
    cl = sample.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(cl, t, ctx), expected, rtol=0, atol=1e-5)
    model_cl = UNet2DConditionModel(config).to(memory_format=torch.channels_last)
    model_cl.load_state_dict(ours.state_dict())
    torch.testing.assert_close(model_cl(cl, t, ctx), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_convs_as_matrix_products_equal_the_conv(bias):
    """1x1 convs (ResNet shortcuts, SD 1.x's transformer projections, ControlNet zero convs) run on the CPU as
    matrix products: the conv's values and gradients, the input's memory format kept; anything else is the conv."""
    import torch.nn.functional as F
    from torch import nn

    from latentdiff.models.resnet import conv1x1, pointwise_weight

    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1, bias=bias)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 24, 5, 7).contiguous(memory_format=layout).requires_grad_()
        got = conv1x1(conv, x)
        assert got.is_contiguous(memory_format=layout)
        expected = F.conv2d(x, conv.weight, conv.bias)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        grads = torch.autograd.grad(got.square().sum(), [x, *conv.parameters()])
        torch.testing.assert_close(grads, torch.autograd.grad(expected.square().sum(), [x, *conv.parameters()]),
                                   rtol=0, atol=1e-4)
    x = torch.randn(2, 24, 5, 7)
    assert pointwise_weight(conv, x).shape == (40, 24)
    big = torch.randn(1, 24, 32, 32)  # larger float32 maps keep oneDNN's conv (faster there); bfloat16 NCHW does not
    assert pointwise_weight(conv, big) is None and pointwise_weight(conv, big.bfloat16()) is not None
    assert pointwise_weight(conv, big.bfloat16().contiguous(memory_format=torch.channels_last)) is None
    assert pointwise_weight(conv, x[:, :, :, ::2]) is not None  # (conv1x1 hands odd strides to the conv)
    torch.testing.assert_close(conv1x1(conv, x[:, :, :, ::2]), conv(x[:, :, :, ::2]), rtol=0, atol=0)
    others = [nn.Conv2d(24, 40, 3, padding=1), nn.Conv2d(24, 40, 1, stride=2), nn.Conv2d(24, 40, 1, padding=1),
              nn.Conv2d(24, 40, 1, groups=4), nn.Linear(24, 40)]
    assert all(pointwise_weight(layer, x) is None for layer in others)
    hooked = nn.Conv2d(24, 40, 1)
    hooked.register_forward_hook(lambda module, args, out: out * 0)  # a hook is still called
    assert pointwise_weight(hooked, x) is None and not conv1x1(hooked, x).any()


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(small):
    config, _, ours = small
    sample, t, ctx = inputs(config)
    model = UNet2DConditionModel(config).train()
    model.load_state_dict(ours.state_dict())
    calls = []
    model.down_blocks[0].resnets[0].register_forward_hook(lambda *_: calls.append(1))

    def gradients(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        calls.clear()
        model(sample, t, ctx).square().mean().backward()
        return len(calls), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_calls, plain = gradients(False)
    model.enable_gradient_checkpointing()
    ckpt_calls, ckpt = gradients(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the stage really ran again during backward
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # no recomputation outside training
        calls.clear()
        model.eval()(sample, t, ctx)
        assert len(calls) == 1


@pytest.mark.slow
@torch.no_grad()
def test_full_sd15_matches_diffusers():
    """The real architecture (3.4 GB of fp32 weights, shared by both models) at a small latent size (full-size, so
    `slow`: 22 s of the default run on a 2-core AVX2 host; the small configs cover every block type)."""
    config = UNetConfig.sd15()
    ref, ours = make_pair(config, quick_init=True)
    sample, t, ctx = inputs(config, 16, 16, batch=1)
    ctx = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(3))
    expected = ref(sample, t, ctx).sample
    assert expected.std() > 0.1
    assert (ours(sample, t, ctx) - expected).abs().max() <= 1e-4


@torch.no_grad()
def test_freeu_matches_diffusers():
    """enable_freeu as diffusers' (odd and non-power-of-two sizes: float32 FFTs), optimized and with k contexts per
    sample too; disable_freeu restores the plain output; non-positive factors are refused."""
    config = UNetConfig(**SMALL)
    ref, ours = make_pair(config)
    sample, t, ctx = inputs(config, 16, 12)
    plain = ours(sample, t, ctx)
    ref.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    ours.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    expected = ref(sample, t, ctx).sample
    got = ours(sample, t, ctx)
    assert (got - expected).abs().max() < 1e-4 and (got - plain).abs().max() > 1e-2
    shared = ours(sample[:1], t[:1], torch.cat([ctx[:1], ctx[1:]]))
    assert (shared - ref(sample[:1].repeat(2, 1, 1, 1), t[:1], torch.cat([ctx[:1], ctx[1:]])).sample).abs().max() < 1e-4
    if torch.backends.mkldnn.is_available():
        optimized = copy.deepcopy(ours).optimize_for_inference()
        assert (optimized(sample, t, ctx) - expected).abs().max() < 1e-4
    ours.disable_freeu()
    assert torch.equal(ours(sample, t, ctx), plain)
    with pytest.raises(ValueError, match="b2=0 must be a positive number"):
        ours.enable_freeu(0.9, 0.2, 1.5, 0)


def test_vae_upsamplers_run_on_the_phases_of_their_filter():
    """Upsample2D(phases=True) (the VAE decoder's) without autograd on CPU maps of 16x16 pixels or more: the conv of
    the 2x nearest upsampling computed from the four 2x2 phase filters equals interpolate + conv (both memory
    formats, kept), with the weight as it is at each call; autograd, 8x8 maps, other target sizes, hooked convs and
    upsamplers without phases=True (the U-Net's) take the plain path."""
    from latentdiff.models import resnet
    from latentdiff.models.vae import AutoencoderKL

    torch.manual_seed(0)
    up = resnet.Upsample2D(16, phases=True)
    calls = []
    original = resnet.upsampled_conv
    plain = lambda x: up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))  # noqa: E731
    try:
        resnet.upsampled_conv = lambda *args: calls.append(1) or original(*args)
        with torch.no_grad():
            for x in (torch.randn(2, 16, 16, 16), torch.randn(1, 16, 17, 20),
                      torch.randn(2, 16, 16, 16).contiguous(memory_format=torch.channels_last)):
                out, ref = up(x), plain(x)
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
                assert out.is_contiguous(memory_format=torch.channels_last) == \
                    ref.is_contiguous(memory_format=torch.channels_last) and out.shape == ref.shape
            assert len(calls) == 3
            x = torch.randn(2, 16, 16, 16)
            up.conv.weight.mul_(2)  # changed in place: seen
            torch.testing.assert_close(up(x), plain(x), atol=1e-5, rtol=1e-5)
            assert len(calls) == 4
            up(torch.randn(2, 16, 8, 8))  # too small to pay
            up(x, size=(31, 32))  # another target size
            handle = up.conv.register_forward_hook(lambda *args: None)
            up(x)
            handle.remove()
            resnet.Upsample2D(16)(x)  # the U-Net's
        x = torch.randn(2, 16, 16, 16, requires_grad=True)
        up(x).sum().backward()  # autograd: the plain conv
        assert len(calls) == 4 and x.grad is not None
    finally:
        resnet.upsampled_conv = original
    vae = AutoencoderKL.from_config(dict(block_out_channels=[32, 32], norm_num_groups=8,
                                         down_block_types=["DownEncoderBlock2D"] * 2,
                                         up_block_types=["UpDecoderBlock2D"] * 2))
    upsamplers = [m for m in vae.decoder.modules() if isinstance(m, resnet.Upsample2D)]
    assert upsamplers and all(m.phases for m in upsamplers)


@torch.no_grad()
def test_kept_phases_are_made_once_per_upsampler_and_weight():
    """Within resnet.kept_phases() (tiled VAE passes) an upsampler's phase filters are made at its first call and
    reused while its weight is the same, unchanged tensor; another upsampler, a weight changed in place or replaced
    has them made anew; outside it every call makes its own."""
    from latentdiff.models import resnet

    torch.manual_seed(0)
    ups = [resnet.Upsample2D(16, phases=True) for _ in range(2)]
    x = torch.randn(1, 16, 16, 16)
    plain = lambda up: up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))  # noqa: E731
    made = []
    original = resnet.upsampling_phases
    try:
        resnet.upsampling_phases = lambda w: made.append(1) or original(w)
        with resnet.kept_phases():
            for up in (ups[0], ups[0], ups[1], ups[1], ups[0]):
                torch.testing.assert_close(up(x), plain(up), atol=1e-5, rtol=1e-5)
            assert len(made) == 3
            other = torch.randn_like(ups[0].conv.weight)
            while other._version < ups[0].conv.weight._version:  # (a new weight of the same version)
                other.add_(0)
            ups[0].conv.weight = torch.nn.Parameter(other)
            torch.testing.assert_close(ups[0](x), plain(ups[0]), atol=1e-5, rtol=1e-5)
            ups[0].conv.weight.mul_(-1)
            torch.testing.assert_close(ups[0](x), plain(ups[0]), atol=1e-5, rtol=1e-5)
            assert len(made) == 5
        ups[0](x), ups[0](x)
        assert len(made) == 7
    finally:
        resnet.upsampling_phases = original
