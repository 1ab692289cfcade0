"""The VAE against diffusers' AutoencoderKL (random weights, same state dict), its config, its posterior, and the
memory options (slicing, exact tiling) against the plain pass."""
import dataclasses
import inspect
import weakref

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import latentdiff.models.vae as vae_module
from latentdiff.models.unet import UNetConfig
from latentdiff.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig


def config(widths=(32, 64), layers=1, **kw) -> VAEConfig:
    return VAEConfig(down_block_types=("DownEncoderBlock2D",) * len(widths),
                     up_block_types=("UpDecoderBlock2D",) * len(widths),
                     block_out_channels=widths, layers_per_block=layers, **kw)


def diffusers_kwargs(cfg: VAEConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}


def perturb(model, seed):
    """Random weights everywhere (some of diffusers' layers start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def pair(cfg: VAEConfig, seed=0):
    """diffusers' model with random weights, and ours holding the same state dict."""
    torch.manual_seed(seed)
    ref = perturb(diffusers.AutoencoderKL(**diffusers_kwargs(cfg)), seed)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def smooth_latents(batch, height, width, seed=1):
    """Structured latents: a smooth random field, a ramp and a bright disc (large flat and edge regions)."""
    g = torch.Generator().manual_seed(seed)
    z = F.interpolate(torch.randn(batch, 4, 3, 5, generator=g), size=(height, width), mode="bicubic") * 2
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    z[:, 0] += 3 * xx
    z[:, 1] += 4 * ((xx - 0.3) ** 2 + (yy + 0.2) ** 2 < 0.2).float()
    return z


# --- oracle parity ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("widths,layers", [((32,), 1), ((32, 64), 2), ((32, 32, 64), 1), ((32, 32, 32, 64), 2)])
def test_matches_diffusers(widths, layers):
    ref, ours = pair(config(widths, layers))
    images = torch.rand(2, 3, 40, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected, got = ref.encode(images).latent_dist, ours.encode(images)
        assert (got.mean - expected.mean).abs().max() <= 1e-4
        assert (got.std - expected.std).abs().max() <= 1e-4
        assert (got.kl() - expected.kl()).abs().max() <= 1e-3 * expected.kl().abs().max()
        sample = got.sample(torch.Generator().manual_seed(3))
        assert (sample - expected.sample(torch.Generator().manual_seed(3))).abs().max() <= 1e-4
        latents = torch.randn_like(got.mean)
        assert (ours.decode(latents) - ref.decode(latents).sample).abs().max() <= 1e-4
        recon = ours(images, sample_posterior=True, generator=torch.Generator().manual_seed(4))
        expected = ref(images, sample_posterior=True, generator=torch.Generator().manual_seed(4)).sample
        assert (recon - expected).abs().max() <= 1e-4


@torch.no_grad()
def test_diffusers_calling_conventions():
    """diffusers' idioms give the same values here: encode(x).latent_dist, return_dict=True (.latent_dist /
    .sample) and return_dict=False (1-tuples, so [0] is the whole batch), decode's generator; called bare, the
    posterior and the images themselves. tiled / sliced are keyword-only (diffusers' second argument is
    return_dict)."""
    ref, ours = pair(config())
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    for posterior in (ours.encode(images).latent_dist, ours.encode(images, return_dict=True).latent_dist,
                      ours.encode(images, return_dict=False)[0], ours.encode(images)):
        assert isinstance(posterior, DiagonalGaussian)
        torch.testing.assert_close(posterior.mean, ref.encode(images, return_dict=False)[0].mean, rtol=0, atol=1e-4)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = ref.decode(z, return_dict=False, generator=torch.Generator())[0]
    assert expected.shape == (2, 3, 16, 16)
    for got in (ours.decode(z, return_dict=False, generator=torch.Generator())[0], ours.decode(z).clone(),
                ours.decode(z, return_dict=True).sample):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours(images, return_dict=False)[0], ref(images, return_dict=False)[0], rtol=0,
                               atol=1e-4)
    with pytest.raises(TypeError):
        ours.decode(z, False, None, False)  # tiled is keyword-only


def test_without_mid_block_attention_matches_diffusers(tmp_path):
    ref, ours = pair(config((32, 64), 1, mid_block_add_attention=False), seed=7)
    assert not any("attentions" in k for k in ours.state_dict())
    images = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        assert (ours(images) - ref(images).sample).abs().max() <= 1e-4
        ours.save_pretrained(tmp_path)
        back = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
        assert not back.config.mid_block_add_attention
        assert torch.equal(back(images).sample, ref(images).sample)


def test_sd15_parameter_count_and_keys():
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.sd15())
        ref = diffusers.AutoencoderKL(**diffusers_kwargs(VAEConfig.sd15()))
    assert ours.num_parameters() == 83_653_863
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.vae_scale_factor == VAEConfig.sd15().vae_scale_factor == 8


def test_sd15_full_size_matches_diffusers():  # ~10 s on one CPU core
    ref, ours = pair(VAEConfig.sd15())
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        assert (ours(images) - ref(images).sample).abs().max() <= 1e-4


# --- config and folders ---------------------------------------------------------------------------------------------

def test_config_covers_every_diffusers_parameter():
    params = inspect.signature(diffusers.AutoencoderKL.__init__).parameters
    params = {name: p.default for name, p in params.items() if name != "self"}
    fields = {f.name: f.default for f in dataclasses.fields(VAEConfig)}
    assert set(params) <= set(fields) | set(VAEConfig.fixed), set(params) - set(fields) - set(VAEConfig.fixed)
    for name, default in params.items():  # omitted keys mean the same to both, and `fixed` accepts the default
        expected = tuple(default) if isinstance(default, (list, tuple)) else default
        assert (fields[name] if name in fields else VAEConfig.fixed[name]) == expected, name


def test_config_round_trips_and_rejects_what_it_does_not_implement():
    cfg = VAEConfig.sd15()
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    assert VAEConfig.from_dict(dict(diffusers.AutoencoderKL(**diffusers_kwargs(VAEConfig.tiny())).config)) \
        == VAEConfig.tiny()
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_dict({**cfg.to_dict(), "act_fn": "gelu"})
    with pytest.raises(ValueError, match="use_quant_conv"):
        VAEConfig.from_dict({**cfg.to_dict(), "use_quant_conv": False})
    with pytest.raises(ValueError, match="unknown config key 'colour'"):
        VAEConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_dict({**cfg.to_dict(), "down_block_types": ["DownEncoderBlock2D"] * 3})
    with pytest.raises(ValueError, match="up_block_types"):
        VAEConfig.from_dict({**cfg.to_dict(), "up_block_types": ["AttnUpDecoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig.from_dict({**cfg.to_dict(), "block_out_channels": [128, 256, 500, 512]})
    # another model's config (a U-Net folder given for the VAE, or the other way round): named as such
    with pytest.raises(ValueError, match=r"VAEConfig: this config is for UNet2DConditionModel \(its _class_name\), "
                                         r"not for AutoencoderKL: give the AutoencoderKL folder"):
        VAEConfig.from_dict(UNetConfig.sd15().to_dict())
    with pytest.raises(ValueError, match="UNetConfig: this config is for AutoencoderKL"):
        UNetConfig.from_dict(cfg.to_dict())


def test_folders_load_both_ways(tmp_path):
    ref, _ = pair(config((32, 64), 1, latent_channels=4, sample_size=48), seed=6)
    ref.save_pretrained(tmp_path / "theirs")
    ours = AutoencoderKL.from_pretrained(tmp_path / "theirs")
    assert ours.config == config((32, 64), 1, sample_size=48)
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    images = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        assert (ours(images) - ref(images).sample).abs().max() <= 1e-5
        assert torch.equal(back(images).sample, ref(images).sample)


# --- the posterior --------------------------------------------------------------------------------------------------

def test_diagonal_gaussian():
    moments = torch.randn(3, 8, 5, 6)
    moments[0, 4] = 50.0  # logvar beyond the clamp
    q = DiagonalGaussian(moments)
    assert torch.equal(q.mode(), moments[:, :4]) and q.logvar.max() == 20.0
    assert torch.allclose(q.var, q.std ** 2)
    normal = torch.distributions.Normal(q.mean, q.std)
    expected = torch.distributions.kl_divergence(normal, torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert torch.allclose(q.kl(), expected, rtol=1e-5)
    # one generator per image: each image's sample does not depend on the batch around it
    batch = q.sample([torch.Generator().manual_seed(i) for i in range(3)])
    alone = DiagonalGaussian(moments[1:2]).sample(torch.Generator().manual_seed(1))
    assert torch.equal(batch[1:2], alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        q.sample([torch.Generator(), torch.Generator()])


# --- inputs, precision, memory options ------------------------------------------------------------------------------

def test_bad_inputs_are_named():
    vae = AutoencoderKL(config((32, 32, 64)))
    with pytest.raises(ValueError, match=r"latents must be \[batch, 4"):
        vae.decode(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"images must be \[batch, 3"):
        vae.encode(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"bfloat16.*vae.dtype"):
        vae.decode(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="tile_size"):
        vae.enable_tiling(4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_decode_agrees_with_fp32(dtype):
    _, ours = pair(config((32, 32, 64), 2))
    latents = smooth_latents(1, 12, 20)
    with torch.no_grad():
        expected = ours.decode(latents)
        ours.to(dtype)
        low = ours.decode(latents.to(dtype))
        ours.enable_tiling(16)
        tiled = ours.decode(latents.to(dtype))
    assert low.dtype == tiled.dtype == dtype and torch.isfinite(low).all()
    for got in (low.float(), tiled.float()):
        diff = (got - expected).abs()
        assert diff.mean() <= 0.05 * expected.abs().mean() and diff.max() <= 0.1 * expected.abs().max()


def test_slicing_matches_the_batch():
    _, ours = pair(config((32, 64), 1))
    latents = torch.randn(3, 4, 12, 16)
    images = torch.rand(3, 3, 24, 32) * 2 - 1
    with torch.no_grad():
        sliced = ours.decode(latents, sliced=True)
        # bit-identical to decoding each image alone; equal to the batched pass up to rounding (CPU convolution
        # kernels can differ with the batch size)
        assert torch.equal(sliced[2:], ours.decode(latents[2:]))
        assert (sliced - ours.decode(latents)).abs().max() <= 1e-5
        ours.enable_slicing()
        assert torch.equal(ours.encode(images).mean[1:2], ours.encode(images[1:2], sliced=False).mean)
        assert (ours.encode(images).mean - ours.encode(images, sliced=False).mean).abs().max() <= 1e-5


@pytest.mark.parametrize("widths,layers", [((32, 64), 1), ((32, 32, 64), 2)])
@pytest.mark.parametrize("kind", ["random", "smooth"])
def test_tiled_equals_untiled(widths, layers, kind, monkeypatch):
    """Tiled encode/decode equal the plain passes up to float rounding (stated tolerance: 1e-4 max abs, fp32)."""
    _, ours = pair(config(widths, layers))
    f = ours.vae_scale_factor
    latents = torch.randn(2, 4, 13, 21) if kind == "random" else smooth_latents(2, 13, 21)
    images = torch.tanh(ours.decode(latents).detach())
    kept_latents, kept_images = latents.clone(), images.clone()
    measured = []
    monkeypatch.setattr(vae_module._WholeImageNorms, "finish",
                        lambda self, norm, finish=vae_module._WholeImageNorms.finish: (measured.append(norm),
                                                                                       finish(self, norm)))
    with torch.no_grad():
        expected, expected_mean = ours.decode(latents), ours.encode(images).mean
        ours.enable_tiling(tile_size=8 * f // 2)  # several tiles at every resolution, uneven edge tiles
        got, got_mean = ours.decode(latents), ours.encode(images).mean
    assert len(measured) > 10  # tiles were run with whole-image statistics
    assert (got - expected).abs().max() <= 1e-4 and (got - expected).abs().mean() <= 1e-5
    assert (got_mean - expected_mean).abs().max() <= 1e-4
    assert torch.equal(latents, kept_latents) and torch.equal(images, kept_images)  # inputs untouched
    with torch.enable_grad():  # no in-place writes with autograd on; same result
        assert (ours.decode(latents) - expected).abs().max() <= 1e-4


def test_tiling_with_one_tile_is_the_plain_pass():
    _, ours = pair(config((32, 32, 64), 1))
    latents = torch.randn(1, 4, 6, 10)
    with torch.no_grad():
        assert torch.equal(ours.decode(latents, tiled=True), ours.decode(latents))


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that operators returned inside the block (storages counted once, freed
    when their last such tensor dies): what a model keeps alive, apart from kernels' own scratch memory."""

    def __init__(self):
        super().__init__()
        self.refs, self.sizes, self.now, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in self.refs:
                    self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                    self.now += self.sizes[key]
                self.refs[key] += 1
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.now)
        return out


@torch.no_grad()
def test_plain_passes_keep_no_more_alive_than_diffusers():
    """Encode and decode hold no tensor longer than diffusers' do (the untiled decode once kept each upsampler's
    input alive through the ResNet after it: 128 MiB more at the peak for the SD VAE at batch 4, 512 px, fp16)."""
    ref, ours = pair(config((32, 64), 2))
    images, latents = torch.randn(2, 3, 64, 64), smooth_latents(2, 32, 32)
    for name, theirs, mine in (("encode", lambda: ref.encode(images).latent_dist.mean,
                                lambda: ours.encode(images).mean),
                               ("decode", lambda: ref.decode(latents).sample, lambda: ours.decode(latents))):
        peaks = []
        for run in (theirs, mine):
            mode = LiveBytes()
            with mode:
                run()
            peaks.append(mode.peak)
        assert peaks[1] <= peaks[0], (name, peaks)
