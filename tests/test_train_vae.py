"""The VAE export (train/vae.py): the deterministic encoder, scaling_factor from the latents, and the
analyzer's check of the reconstructions (evaluation.evaluate_vae)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from latentdiff.train.config import VAETrainConfig, load_config
from latentdiff.train.vae import LOGVAR_FLOOR, latent_std, make_deterministic, train_vae

ROOT = Path(__file__).resolve().parents[1]


def tiny_vae(seed: int = 0):
    from latentdiff.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    return AutoencoderKL(VAEConfig.tiny()).eval()


@torch.no_grad()
def test_deterministic_encoder_samples_its_mean_in_ours_and_in_diffusers():
    import diffusers

    vae = make_deterministic(tiny_vae())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    posterior = vae.encode(images)
    assert posterior.std.max() < 1e-6
    torch.testing.assert_close(posterior.sample(torch.Generator().manual_seed(0)), posterior.mean, rtol=0, atol=1e-5)
    # the same weights in diffusers: its posterior is a point mass too (the pinning is in the weights, not our code)
    kwargs = {k: v for k, v in vae.config.to_dict().items() if not k.startswith("_")}
    reference = diffusers.AutoencoderKL(**kwargs).eval()
    reference.load_state_dict(vae.state_dict())
    dist = reference.encode(images).latent_dist
    assert dist.std.max() < 1e-6
    torch.testing.assert_close(dist.mean, posterior.mean, rtol=0, atol=1e-5)


class _Source:
    def __init__(self, n=24, size=32, seed=3):
        from latentdiff.data.shapes import ShapesDataset

        self.data = ShapesDataset(n, size=size, seed=seed)

    def __len__(self):
        return len(self.data)

    def load(self, i):
        _, image, text = self.data.item(i)
        return image, text


@torch.no_grad()
def test_latent_std_of_samples_and_of_means():
    vae, source = tiny_vae(), _Source()
    means = torch.cat([vae.encode(torch.stack([_pixels(source, i) for i in range(s, s + 8)])).mean
                       for s in range(0, 24, 8)]).double()
    assert latent_std(vae, source, 32, 24, of="means") == pytest.approx(means.std(unbiased=False).item(), rel=1e-6)
    with torch.no_grad():  # a runaway posterior variance shows in the samples, not in the means
        vae.quant_conv.bias[vae.config.latent_channels:] = 8.0
    assert latent_std(vae, source, 32, 24) > 20 * latent_std(vae, source, 32, 24, of="means")
    with pytest.raises(ValueError, match="'samples' or 'means'"):
        latent_std(vae, source, 32, 24, of="median")


def _pixels(source, i):
    from latentdiff.data.folder import prepare_image

    return prepare_image(source.load(i)[0], 32)


@pytest.mark.parametrize("export_resolution", [None, 64])
def test_exported_vae_is_deterministic_and_its_reconstructions_are_scored(tmp_path, export_resolution, monkeypatch):
    config = load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml",
                         {"output_dir": str(tmp_path / "vae"), "max_train_steps": 2, "checkpointing_steps": 0,
                          "validation_steps": 0, "deterministic_encoder": True, "check_reconstructions": 10,
                          "export_resolution": export_resolution})
    from latentdiff import evaluation

    checked = []  # the image size of the reconstruction check
    evaluate = evaluation.evaluate_vae
    monkeypatch.setattr(evaluation, "evaluate_vae", lambda vae, n, size: checked.append(size) or evaluate(vae, n, size))
    train_vae(config)
    size = export_resolution or 32  # vae_smoke.yaml trains at 32 px
    assert checked == [size]
    from latentdiff.models.vae import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "vae")
    c = vae.config.latent_channels
    assert torch.all(vae.quant_conv.bias[c:] == LOGVAR_FLOOR) and torch.all(vae.quant_conv.weight[c:] == 0)
    source = _Source(48, size=size, seed=0)  # vae_smoke.yaml's data: shapes seed 0, 48 images
    expected = 1.0 / latent_std(vae, source, size, 48, of="means")
    assert vae.config.scaling_factor == pytest.approx(expected, rel=1e-3)
    scores = json.loads((tmp_path / "vae" / "reconstruction.json").read_text())
    assert set(scores) == {"background", "colour", "shape", "size", "position", "all", "colour_separation_min",
                           "colour_separation_mean"}
    from latentdiff.evaluation import colour_separation

    assert scores["colour_separation_min"] == pytest.approx(colour_separation(vae, size)["min"], rel=1e-5)


def test_runaway_posterior_variance_is_reported(tmp_path):
    config = load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml",
                         {"output_dir": str(tmp_path / "vae"), "max_train_steps": 1, "checkpointing_steps": 0,
                          "validation_steps": 0, "check_reconstructions": 0, "learning_rate": 1e-12})
    from latentdiff.train import vae as vae_module

    original = vae_module.load_vae

    def runaway(config):
        vae = original(config)
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels:] = 12.0  # posterior std e^6 ~ 400
        return vae

    vae_module.load_vae = runaway
    try:
        with pytest.warns(UserWarning, match="deterministic_encoder: true or a larger kl_weight"):
            train_vae(config)
    finally:
        vae_module.load_vae = original


class _IdentityVAE(torch.nn.Module):
    """encode -> the image itself as the 'mean', decode -> identity: a perfect autoencoder."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return type("Posterior", (), {"mean": x})()

    def decode(self, z):
        return z


def test_evaluate_vae_scores_a_perfect_autoencoder_at_100_percent():
    from latentdiff.evaluation import evaluate_vae

    scores = evaluate_vae(_IdentityVAE(), num_images=40)
    assert scores == {k: 1.0 for k in ("background", "colour", "shape", "size", "position", "all")}
    with pytest.raises(ValueError, match="num_images"):
        evaluate_vae(_IdentityVAE(), num_images=0)


def test_patch_size_trains_on_random_patches_of_the_whole_images(tmp_path, monkeypatch):
    from latentdiff.data.folder import prepare_image
    from latentdiff.train.data import ShapesSource, TrainingView

    source = ShapesSource(32, {"num_samples": 4, "seed": 0})
    view = TrainingView(source, 32, seed=0, patch_size=16)
    offsets = set()
    for epoch in range(6):
        patch = view[epoch, 1]["pixel_values"]
        assert patch.shape == (3, 16, 16) and torch.equal(patch, view[epoch, 1]["pixel_values"])  # reproducible
        whole = prepare_image(source.load(1)[0], 32)
        found = [(y, x) for y in range(17) for x in range(17) if torch.equal(whole[:, y:y + 16, x:x + 16], patch)]
        assert found  # a window of the whole image, not a resized copy
        offsets.update(found)
    assert len(offsets) > 1  # drawn afresh each epoch

    base = {"output_dir": str(tmp_path / "vae"), "max_train_steps": 1, "checkpointing_steps": 0,
            "validation_steps": 0, "check_reconstructions": 0, "deterministic_encoder": True}
    for bad in (12, 48):  # not a multiple of 8; larger than resolution (32)
        with pytest.raises(ValueError, match="patch_size"):
            load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml", {**base, "patch_size": bad})
    from latentdiff.train import vae as vae_module

    shapes = []  # what the objective is given: 16 px patches, with 16 / 4 = 4 px posterior noise
    forward = vae_module.VAEObjective.forward
    monkeypatch.setattr(vae_module.VAEObjective, "forward",
                        lambda self, pixels, noise: shapes.append((pixels.shape[-1], noise.shape[-1]))
                        or forward(self, pixels, noise))
    train_vae(load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml",
                          {**base, "patch_size": 16}))
    assert shapes == [(16, 4)]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    """--resume latest continues only the run that wrote the checkpoint: other settings, or other weights at an
    input path (a VAE retrained in place), are named and refused; more steps and other bookkeeping are fine; an
    explicitly named checkpoint is resumed with a warning."""
    import shutil

    smoke = ROOT / "training" / "configs" / "vae_smoke.yaml"
    base = {"validation_steps": 0, "check_reconstructions": 0, "deterministic_encoder": True,
            "checkpointing_steps": 1}
    train_vae(load_config(VAETrainConfig, smoke, {**base, "output_dir": str(tmp_path / "source"),
                                                 "max_train_steps": 1}))
    start = tmp_path / "start"
    shutil.copytree(tmp_path / "source" / "vae", start)
    run = {**base, "output_dir": str(tmp_path / "run"), "vae": None, "pretrained_vae": str(start)}
    train_vae(load_config(VAETrainConfig, smoke, {**run, "max_train_steps": 2}))

    with pytest.raises(ValueError, match=r"different run \(learning_rate: 0.001 there, 0.0005 now\)") as refused:
        train_vae(load_config(VAETrainConfig, smoke, {**run, "max_train_steps": 3, "resume": "latest",
                                                     "learning_rate": 5e-4}))
    assert "new output_dir" in str(refused.value)
    weights = start / "diffusion_pytorch_model.safetensors"
    kept = weights.read_bytes()
    weights.write_bytes(kept[:-4] + bytes(b ^ 0xFF for b in kept[-4:]))  # the input changes at the same path
    with pytest.raises(ValueError, match="pretrained_vae: the files there have changed since"):
        train_vae(load_config(VAETrainConfig, smoke, {**run, "max_train_steps": 3, "resume": "latest"}))
    with pytest.warns(UserWarning, match="continuing from it as asked"):
        explicit = train_vae(load_config(VAETrainConfig, smoke, {**run, "max_train_steps": 3,
                                                                "resume": str(tmp_path / "run" / "checkpoint-2")}))
    assert explicit.resumed_from == tmp_path / "run" / "checkpoint-2"
    # checkpoint-3 records the run as it went on (with the changed file), so --resume latest continues from it
    resumed = train_vae(load_config(VAETrainConfig, smoke, {**run, "max_train_steps": 4, "resume": "latest",
                                                           "checkpointing_steps": 2, "scale_samples": 16}))
    assert resumed.resumed_from == tmp_path / "run" / "checkpoint-3" and len(resumed.losses) == 1


def test_colour_separation_is_the_closest_colour_pair_in_scaled_latents():
    from latentdiff.data.shapes import COLOURS
    from latentdiff.evaluation import colour_separation

    identity = _IdentityVAE()  # latents = pixels in [-1, 1]
    # palette distances, as pixels: the closest pair of the 8 colours, over the area of the circle
    separation = colour_separation(identity, size=32, scaling_factor=2.0)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float64) / 127.5
    closest = min((palette[i] - palette[j]).norm().item() for i in range(8) for j in range(i))
    assert 0 < separation["min"] <= separation["mean"]
    assert separation["min"] == pytest.approx(colour_separation(identity, size=32, scaling_factor=1.0)["min"] * 2)
    assert separation["min"] > closest  # many pixels differ by at least the closest pair's distance

    class Blind(_IdentityVAE):  # latents that do not depend on colour
        def encode(self, x):
            return type("Posterior", (), {"mean": x.mean(dim=1, keepdim=True) * 0})()

    assert colour_separation(Blind(), size=32, scaling_factor=1.0) == {"min": 0.0, "mean": 0.0}


def test_vae_trains_under_bf16_mixed_precision(tmp_path):
    """Autocast hands the decoder bf16 latents while its weights stay fp32: the VAE's input check must let that
    through (it refused it, so `mixed_precision: bf16`, the single_gpu.yaml default, failed at the first step)."""
    config = load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml",
                         {"output_dir": str(tmp_path / "vae"), "max_train_steps": 2, "checkpointing_steps": 0,
                          "validation_steps": 0, "check_reconstructions": 0, "mixed_precision": "bf16"})
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    try:
        train_vae(config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    log = [json.loads(line) for line in (tmp_path / "vae" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all(torch.isfinite(torch.tensor(row["loss"])) for row in log)


def test_vae_still_refuses_latents_of_another_dtype_outside_autocast():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="bfloat16 on cpu but the VAE is torch.float32"):
        vae.decode(torch.zeros(1, vae.config.latent_channels, 4, 4, dtype=torch.bfloat16))


@torch.no_grad()
def test_a_folded_latent_map_moves_the_latents_and_keeps_the_reconstructions():
    from latentdiff.train.vae import fold_latent_map

    vae = make_deterministic(tiny_vae())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    before = vae.encode(images).mean
    reconstruction = vae.decode(before)
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(4, 4, generator=generator, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    offset = torch.randn(4, generator=generator, dtype=torch.float64)
    fold_latent_map(vae, matrix, offset)
    after = vae.encode(images)
    expected = torch.einsum("ij,njhw->nihw", matrix.float(), before) + offset.float()[:, None, None]
    torch.testing.assert_close(after.mean, expected, rtol=0, atol=1e-4)
    assert after.std.max() < 1e-6  # still a point mass
    torch.testing.assert_close(vae.decode(after.mean), reconstruction, rtol=0, atol=1e-4)
    assert (vae.decode(before) - reconstruction).abs().max() > 1e-2  # the old latents no longer decode alike


def test_a_latent_map_needs_a_deterministic_encoder_and_a_square_matrix():
    from latentdiff.train.vae import fold_latent_map

    with pytest.raises(ValueError, match="deterministic_encoder: true"):
        fold_latent_map(tiny_vae(), torch.eye(4), torch.zeros(4))
    with pytest.raises(ValueError, match="4x4 matrix and 4 offsets"):
        fold_latent_map(make_deterministic(tiny_vae()), torch.eye(3), torch.zeros(3))


@torch.no_grad()
def _pixel_covariance(latents: torch.Tensor) -> torch.Tensor:
    """The channels' covariance over all latent pixels of [N, C, h, w] latents."""
    return torch.cov(latents.double().movedim(1, -1).reshape(-1, latents.shape[1]).T)


def test_colour_discriminant_map_centres_whitens_and_spreads_the_palette():
    from latentdiff.data.shapes import ShapesDataset, to_tensor
    from latentdiff.evaluation import colour_separation
    from latentdiff.train.vae import colour_discriminant_map, fold_latent_map

    vae = make_deterministic(tiny_vae())
    data = ShapesDataset(32, size=32, seed=0)
    pixels = torch.stack([to_tensor(data.item(i)[1]) for i in range(32)])
    means = vae.encode(pixels).mean
    matrix, offset = colour_discriminant_map(vae, means, size=32)
    mapped = torch.einsum("ij,njhw->nihw", matrix.float(), means) + offset.float()[:, None, None]
    assert mapped.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # centred channels
    covariance = _pixel_covariance(mapped)
    assert covariance.diag().max() <= 1 + 1e-6  # whitened, then no direction gained more than 1
    before = colour_separation(vae, 32, scaling_factor=1 / means.std().item())["min"]
    fold_latent_map(vae, matrix, offset)
    after = colour_separation(vae, 32, scaling_factor=1 / mapped.std().item())["min"]
    assert after > before


def _exported_means(folder):
    """The exported VAE and its posterior means of vae_smoke.yaml's 48 training images."""
    from latentdiff.models.vae import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder)
    source = _Source(48, size=32, seed=0)  # vae_smoke.yaml's data
    with torch.no_grad():
        return vae, torch.cat([vae.encode(torch.stack([_pixels(source, i) for i in range(s, s + 16)])).mean
                               for s in range(0, 48, 16)])


def test_export_with_the_colour_latent_map(tmp_path):
    overrides = {"output_dir": str(tmp_path / "vae"), "max_train_steps": 2, "checkpointing_steps": 0,
                 "validation_steps": 0, "deterministic_encoder": True, "check_reconstructions": 0}
    config = load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml",
                         {**overrides, "latent_map": "colours"})
    train_vae(config)
    vae, means = _exported_means(tmp_path / "vae" / "vae")
    assert means.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # the map centred every channel
    assert vae.config.scaling_factor == pytest.approx(1.0 / means.double().std().item(), rel=1e-3)
    with pytest.raises(ValueError, match="needs deterministic_encoder: true"):
        load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml",
                    {**overrides, "latent_map": "colours", "deterministic_encoder": False})
    with pytest.raises(ValueError, match="choose 'colours', 'balanced' or null"):
        load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml", {**overrides, "latent_map": "x"})


def test_anchor_term_pulls_the_first_latent_channels_towards_the_block_averaged_image():
    from latentdiff.models.vae import AutoencoderKL, VAEConfig
    from latentdiff.train.loss import VAEObjective

    vae = tiny_vae()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    plain, logs = VAEObjective(vae)(images, noise)
    assert "anchor" not in logs
    anchored, logs = VAEObjective(vae, anchor_weight=0.5)(images, noise)
    f = vae.vae_scale_factor
    block_means = images.reshape(2, 3, 32 // f, f, 32 // f, f).mean(dim=(3, 5))
    expected = (vae.encode(images).mean[:, :3] - block_means).pow(2).mean()
    torch.testing.assert_close(logs["anchor"], expected)
    torch.testing.assert_close(anchored, plain + 0.5 * expected)
    assert expected > 1e-3  # a random encoder's latents are not the averaged image

    with pytest.raises(ValueError, match="latent channels as image channels"):
        VAEObjective(AutoencoderKL(VAEConfig.tiny().replace(latent_channels=2)), anchor_weight=1.0)
    with pytest.raises(ValueError, match="anchor_weight must be >= 0"):
        load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml",
                    {"output_dir": "out/x", "anchor_weight": -1.0})


def test_balancing_map_evens_out_the_latent_directions(tmp_path):
    from latentdiff.train.vae import balancing_map

    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(4, 4, generator=g, dtype=torch.float64)
    scales = torch.tensor([10.0, 1.0, 0.1, 0.01], dtype=torch.float64)
    means = torch.einsum("ij,njhw->nihw", mixing, scales[None, :, None, None]
                         * torch.randn(64, 4, 8, 8, generator=g, dtype=torch.float64)) + 3.0
    before = torch.linalg.eigvalsh(_pixel_covariance(means))
    for power, expected in ((0.25, before.sqrt()), (0.5, torch.ones(4, dtype=torch.float64))):
        matrix, offset = balancing_map(means, power)
        mapped = torch.einsum("ij,njhw->nihw", matrix, means) + offset[:, None, None]
        assert mapped.mean(dim=(0, 2, 3)).abs().max() < 1e-9  # centred
        after = torch.linalg.eigvalsh(_pixel_covariance(mapped))
        torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-9)  # each variance v becomes v^(1 - 2 power)

    # the export, with a power other than the default so that the option is seen to reach it
    overrides = {"output_dir": str(tmp_path / "vae"), "max_train_steps": 2, "checkpointing_steps": 0,
                 "validation_steps": 0, "deterministic_encoder": True, "check_reconstructions": 0,
                 "latent_map": "balanced", "latent_map_power": 0.5}
    train_vae(load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml", overrides))
    _, exported = _exported_means(tmp_path / "vae" / "vae")
    assert exported.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # the map centred every channel
    torch.testing.assert_close(_pixel_covariance(exported), torch.eye(4, dtype=torch.float64),
                               atol=1e-3, rtol=0)  # and whitened them
    with pytest.raises(ValueError, match="balanced needs deterministic_encoder"):
        load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml",
                    {**overrides, "deterministic_encoder": False})
    with pytest.raises(ValueError, match=r"latent_map_power=0.7 must lie in \[0, 0.5\]"):
        load_config(VAETrainConfig, ROOT / "training" / "configs" / "vae_smoke.yaml",
                    {**overrides, "latent_map_power": 0.7})
