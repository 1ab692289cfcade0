"""Training: configs, data, the objectives, EMA, atomic checkpoints, exact resuming, the NaN stop, fine-tuning
and export, the VAE trainer, two-process DDP over gloo, and the smoke config through `accelerate launch`.

Everything runs on the CPU with tiny models (training/configs/smoke.yaml and vae_smoke.yaml)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from latentdiff import LatentDiffusionPipeline
from latentdiff.checkpoints import load_safetensors
from latentdiff.data.folder import BadSampleError, ImageFolderDataset, prepare_image
from latentdiff.data.shapes import write_image_folder
from latentdiff.schedulers import DDPMScheduler
from latentdiff.training import (EMA, BatchPlan, TextToImageConfig, TrainingDiverged, VAETrainConfig,
                                 checkpoint_problem, diffusion_loss, draw, find_resumable, high_noise_weights,
                                 latent_std, load_components, load_config, lr_multiplier, min_snr_weights,
                                 parse_command_line, train_text_to_image, train_vae)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
SMOKE = ROOT / "training" / "configs" / "smoke.yaml"
VAE_SMOKE = ROOT / "training" / "configs" / "vae_smoke.yaml"
ACCELERATE = Path(sys.executable).parent / "accelerate"


def smoke_config(tmp_path: Path, name: str = "run", cls=TextToImageConfig, path: Path = SMOKE, **overrides):
    return load_config(cls, path, {"output_dir": str(tmp_path / name), "validation_steps": 0, **overrides})


def launch_env() -> dict:
    """Environment for `accelerate launch` subprocesses: no GPU, one thread each, nothing from the network, and a
    private Accelerate config home (so a user's default_config.yaml cannot change what runs)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["HF_HOME"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "latentdiff-test-hf-home")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([str(ACCELERATE), "launch", *args], cwd=ROOT, env=launch_env(), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def read_ranks(out: Path, same: tuple[str, ...]) -> list[dict]:
    """The two DDP processes' reports (tests/_ddp_worker.py), once checked that both ran in a world of two and
    agree on the keys `same` (weights, averages, losses)."""
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    for key in same:
        assert ranks[0][key] == ranks[1][key], key
    return ranks


def pickled_files(output_dir: Path) -> list[Path]:
    return [p for p in output_dir.glob("checkpoint-*/**/*") if p.suffix in (".bin", ".pkl", ".pt", ".pth", ".ckpt")]


def forbid_unpickling(monkeypatch) -> None:
    """Make every way of unpickling a file fail, until monkeypatch.undo()."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                         (torch.serialization, "load")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """12 shapes images of 40x40 with metadata.jsonl: training crops 32x32 out of them."""
    folder = tmp_path_factory.mktemp("images")
    write_image_folder(folder, 12, size=40, seed=1)
    return folder


# ---- configs ----------------------------------------------------------------------------------------------------
def test_config_overrides_use_the_configs_own_keys():
    config = parse_command_line(TextToImageConfig, [
        "--config", str(SMOKE), "--output_dir", "out/x", "--max_train_steps", "7", "--learning_rate", "1e-4",
        "--shapes.num_samples", "16", "--resume=latest", "--snr_gamma", "5", "--validation_prompts", "[a, b]"])
    assert config.max_train_steps == 7 and config.learning_rate == 1e-4 and config.resume == "latest"
    assert config.shapes == {"num_samples": 16, "seed": 0}  # one entry of a dict-valued key changed
    assert config.snr_gamma == 5.0 and isinstance(config.snr_gamma, float)
    assert config.validation_prompts == ["a", "b"]
    # YAML reads an unquoted `no` as False; `--mixed_precision no` still means "no" (it was a type error)
    no = parse_command_line(TextToImageConfig, ["--config", str(SMOKE), "--output_dir", "o", "--mixed_precision", "no"])
    assert no.mixed_precision == "no"

    def fails(match: str, *args: str):
        with pytest.raises(ValueError, match=match):
            parse_command_line(TextToImageConfig, ["--config", str(SMOKE), "--output_dir", "o", *args])

    fails(r"unknown config key\(s\) \['max_steps'\].*valid keys: \[.*'max_train_steps'", "--max_steps", "3")
    fails(r"'train_batch_size' = 'eight' has the wrong type", "--train_batch_size", "eight")
    fails(r"'lr_scheduler' = 'step': choose one of", "--lr_scheduler", "step")
    fails(r"exactly one of 'pretrained'.*and 'unet'", "--pretrained", "some/folder")
    fails(r"cache_latents: true .* center_crop: true and random_flip: false", "--cache_latents", "true",
          "--random_flip", "true")
    fails(r"'export_scheduler' = 'plms': choose one of \['ddpm'", "--export_scheduler", "plms")
    fails(r"override --output_dir has no value", "--output_dir")
    fails(r"exactly one of 'text_encoder' .* and 'text_encoder_path'", "--text_encoder_path", "some/folder")
    fails(r"high_noise_weight caps a weight that is at least 1", "--high_noise_weight", "0.5")
    fails(r"token_embedding_std must be positive", "--token_embedding_std", "0")
    fails(r"data_dir='photos' is set but dataset is 'shapes' .* set dataset: folder", "--data_dir", "photos")
    with pytest.raises(ValueError, match="'output_dir' is required"):
        load_config(VAETrainConfig, None, {"vae": {"block_out_channels": [32]}})


@pytest.mark.parametrize("path", sorted((ROOT / "training" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    import yaml

    values = yaml.safe_load(path.read_text())
    cls = TextToImageConfig if ("unet" in values or "pretrained" in values) else VAETrainConfig
    assert load_config(cls, path).output_dir


def test_training_script_reports_config_errors_without_a_traceback(capsys):
    from latentdiff.training import run_script, train_text_to_image

    assert run_script(TextToImageConfig, train_text_to_image, ["--config", str(SMOKE), "--bogus", "1"]) == 2
    assert "unknown config key(s) ['bogus']" in capsys.readouterr().err


def test_a_new_unet_can_start_from_a_trained_text_encoder(tmp_path):
    from latentdiff.models.text import save_text_encoder

    trained = load_components(smoke_config(tmp_path, seed=5)).text_encoder
    save_text_encoder(trained, tmp_path / "text_encoder")
    config = smoke_config(tmp_path, text_encoder=None, text_encoder_path=str(tmp_path / "text_encoder"))
    loaded = load_components(config).text_encoder
    assert loaded.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())
    fresh = load_components(smoke_config(tmp_path)).text_encoder  # seed 0: different random weights
    assert not torch.equal(fresh.state_dict()["text_model.embeddings.token_embedding.weight"],
                           trained.state_dict()["text_model.embeddings.token_embedding.weight"])


def test_token_embedding_std_redraws_only_the_token_embeddings(tmp_path):
    plain = load_components(smoke_config(tmp_path)).text_encoder.state_dict()
    wide = load_components(smoke_config(tmp_path, token_embedding_std=1.0)).text_encoder.state_dict()
    key = "text_model.embeddings.token_embedding.weight"
    assert 0.95 < wide[key].std().item() < 1.05 and plain[key].std().item() < 0.05
    assert all(torch.equal(wide[k], v) for k, v in plain.items() if k != key)  # the rest: the same seeded draw
    with pytest.raises(ValueError, match="token_embedding_std initialises a new text encoder"):
        smoke_config(tmp_path, text_encoder=None, text_encoder_path="te", token_embedding_std=1.0)


def test_learning_rate_warms_up_then_follows_the_schedule():
    assert [lr_multiplier(s, 4, 10, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = [lr_multiplier(s, 2, 10, "cosine") for s in range(11)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[6] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))


@pytest.mark.parametrize("kind", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial"])
def test_learning_rate_schedules_follow_diffusers_get_scheduler(kind):
    """After the warmup, diffusers' factor for every step (3 cycles, power 2); during it, diffusers' factor one step
    later (ours starts at 1/warmup, diffusers' at 0)."""
    from diffusers.optimization import get_scheduler

    warmup, total, lr = 5, 40, 1e-3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    reference = get_scheduler(kind, optimizer, num_warmup_steps=warmup if kind != "constant" else 0,
                              num_training_steps=total, num_cycles=3, power=2.0).lr_lambdas[0]
    ours = [lr_multiplier(s, warmup, total, kind, num_cycles=3, power=2.0, base_lr=lr) for s in range(total + 1)]
    if kind == "constant":  # (diffusers' constant has no warmup; ours warms up first, as constant_with_warmup)
        assert ours[:warmup] == [(s + 1) / warmup for s in range(warmup)] and set(ours[warmup:]) == {1.0}
        return
    for step in range(total + 1):
        expected = reference(step + 1 if step < warmup else step)
        assert ours[step] == pytest.approx(expected, abs=1e-12), step
    assert len({round(f, 6) for f in ours[warmup:]}) > (1 if kind == "constant_with_warmup" else 30) - 1


def test_the_optimizer_is_torchs_fused_adamw_with_the_configs_settings(tmp_path):
    """make_optimizer takes torch's fused AdamW for floating-point CPU parameters (one kernel for all of them: 5x the
    default's tensor-by-tensor loop on the CPU, benchmarks/optimizer.py), with the config's learning rate, betas,
    weight decay and eps: its steps are the reference AdamW's to float rounding. Parameters it cannot take
    (complex ones) get the default AdamW."""
    from latentdiff.train.loop import make_optimizer

    config = smoke_config(tmp_path, learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.99, adam_weight_decay=0.1,
                          adam_epsilon=1e-3, lr_warmup_steps=0)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g).requires_grad_(), torch.randn(3, generator=g).requires_grad_()]
    copies = [p.detach().clone().requires_grad_() for p in params]
    start = params[0].detach().clone()
    optimizer, _ = make_optimizer([{"params": params}], config)
    assert optimizer.defaults["fused"] is True
    reference = torch.optim.AdamW(copies, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, eps=1e-3, foreach=False)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, c, grad in zip(params, copies, grads):
            p.grad, c.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(p, c, rtol=0, atol=1e-6)
    assert (params[0] - start).abs().min() > 1e-3  # (every entry moved: the comparison is not of unchanged weights)
    complex_param = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    assert not make_optimizer([{"params": [complex_param]}], config)[0].defaults["fused"]


def test_a_frozen_vae_encodes_by_a_packed_copy_of_its_encoding_half_on_the_cpu():
    """inference_encoder: on the CPU a copy of the VAE without its decoder, packed for inference (faster, the same
    posteriors to float rounding); the VAE itself stays as it was (validation decodes with it, the export saves
    it). On another device: the VAE itself."""
    from latentdiff.models.packed import is_packed
    from latentdiff.models.vae import AutoencoderKL, VAEConfig
    from latentdiff.train.data import inference_encoder

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    encoder = inference_encoder(vae)
    assert is_packed(encoder) and encoder.decoder is None and not is_packed(vae) and vae.decoder is not None
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected, got = vae.encode(images), encoder.encode(images)
    torch.testing.assert_close(got.mean, expected.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.std, expected.std, rtol=1e-5, atol=1e-5)
    assert inference_encoder(vae.to("meta")) is vae


def test_a_checkpoint_from_before_a_key_existed_differs_only_where_the_key_is_not_at_its_default(tmp_path):
    from latentdiff.train.checkpointing import MARKER, identity_defaults, identity_differences, run_identity

    config = smoke_config(tmp_path)
    identity, defaults = run_identity(config), identity_defaults(config)
    older = {k: v for k, v in identity.items() if k not in ("lr_num_cycles", "input_perturbation")}
    (tmp_path / MARKER).write_text(json.dumps({"run": older}))
    assert identity_differences(tmp_path, identity, defaults) == []
    changed = run_identity(smoke_config(tmp_path, input_perturbation=0.1))
    added = "not recorded there (a key added since)"
    assert identity_differences(tmp_path, changed, defaults) == [f"input_perturbation: {added}, 0.1 now"]
    assert identity_differences(tmp_path, identity) == [f"input_perturbation: {added}, 0.0 now",
                                                        f"lr_num_cycles: {added}, 1 now"]


def test_learning_rate_schedule_config_errors(tmp_path):
    with pytest.raises(ValueError, match="choose one of"):
        smoke_config(tmp_path, lr_scheduler="cosine_annealing")
    with pytest.raises(ValueError, match="lr_num_cycles must be at least 1"):
        smoke_config(tmp_path, lr_num_cycles=0)
    with pytest.raises(ValueError, match="polynomial decays to 1e-07"):
        smoke_config(tmp_path, lr_scheduler="polynomial", learning_rate=1e-8)


# ---- data -------------------------------------------------------------------------------------------------------
def test_image_folder_reports_bad_samples_by_file_name(tmp_path):
    write_image_folder(tmp_path, 3, size=32)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "a red circle"}) + "\n")
        f.write(json.dumps({"file_name": "00000.png"}) + "\n")  # no caption
        f.write(json.dumps({"file_name": "gone.png", "text": "a blue star"}) + "\n")
    with pytest.raises(BadSampleError, match=r"broken\.png cannot be decoded.*on_bad_sample: skip"):
        ImageFolderDataset(tmp_path, size=32)
    with pytest.warns(UserWarning) as caught:
        dataset = ImageFolderDataset(tmp_path, size=32, on_bad_sample="skip")
    messages = " | ".join(str(w.message) for w in caught)
    assert "broken.png" in messages and "'00000.png' has no caption" in messages and "gone.png" in messages
    assert len(dataset) == 3
    item = dataset[1]
    expected = json.loads((tmp_path / "metadata.jsonl").read_text().splitlines()[1])["text"]
    assert item["text"] == expected and item["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= item["pixel_values"].min() < item["pixel_values"].max() <= 1.0


def test_prepare_image_crops_and_flips_reproducibly():
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    array[:, :30] = 255  # left half white
    image = Image.fromarray(array)
    centre = prepare_image(image, 20)  # resized to 20x30, centre crop keeps columns 5..24
    assert centre.shape == (3, 20, 20) and centre[:, :, 0].mean() == 1.0 and centre[:, :, -1].mean() == -1.0

    def random(seed):
        return prepare_image(image, 20, np.random.default_rng(seed), random_crop=True, random_flip=True)

    assert torch.equal(random(3), random(3))
    outcomes = {tuple(random(seed)[0, 0, [0, -1]].tolist()) for seed in range(40)}
    assert {(1.0, -1.0), (-1.0, 1.0)} <= outcomes  # both orientations occur
    with pytest.raises(ValueError, match="need an rng"):
        prepare_image(image, 20, random_crop=True)


def test_batch_plan_shards_each_epoch_without_overlap():
    plans = [BatchPlan(10, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert plans[0].batches_per_epoch == 2  # 10 samples, global batch 4: the last 2 are dropped each epoch
    epochs = {}
    for micro_batch in range(6):
        keys = [plan.keys(micro_batch) for plan in plans]
        assert not {i for _, i in keys[0]} & {i for _, i in keys[1]}  # ranks never share a sample
        for epoch, index in keys[0] + keys[1]:
            assert epoch == micro_batch // 2
            epochs.setdefault(epoch, []).append(index)
    assert all(len(set(indices)) == 8 for indices in epochs.values())  # no repeats within an epoch
    assert epochs[0] != epochs[1]  # a new order each epoch
    resumed = iter(BatchPlan(10, 2, seed=3, rank=1, world_size=2, start=3))
    assert next(resumed) == plans[1].keys(3) and next(resumed) == plans[1].keys(4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchPlan(3, 2, seed=0, world_size=2)


# ---- objectives and EMA -------------------------------------------------------------------------------------------
def test_diffusion_loss_targets_and_min_snr_weights():
    abar = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)

    def zero(x, t, ctx):
        return torch.zeros_like(x)

    def oracle(x, t, ctx):  # recovers eps from z_t exactly, knowing z0
        return (x - a * z0) / s

    eps_mse = noise.pow(2).mean(dim=(1, 2, 3))
    v = a * noise - s * z0
    v_mse = v.pow(2).mean(dim=(1, 2, 3))
    assert diffusion_loss(zero, z0, None, t, noise, abar).item() == pytest.approx(eps_mse.mean().item(), rel=1e-6)
    assert diffusion_loss(zero, z0, None, t, noise, abar, "v_prediction").item() == pytest.approx(
        v_mse.mean().item(), rel=1e-5)
    assert diffusion_loss(oracle, z0, None, t, noise, abar).item() < 1e-8

    snr = abar[t] / (1 - abar[t])
    eps_w, v_w = min_snr_weights(snr, 5.0, "epsilon"), min_snr_weights(snr, 5.0, "v_prediction")
    assert torch.allclose(eps_w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert torch.allclose(v_w, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert eps_w[0] < 0.01 and eps_w[2] == 1.0  # t=0 (SNR ~ 1000) is down-weighted, t=999 untouched
    weighted = diffusion_loss(zero, z0, None, t, noise, abar, snr_gamma=5.0).item()
    assert weighted == pytest.approx((eps_w * eps_mse).mean().item(), rel=1e-5)

    # high-noise weighting: min(1 + 1/SNR, cap) on eps losses (EDM's weighting for eps), 1 for v losses
    high = high_noise_weights(snr, 20.0, "epsilon")
    assert torch.allclose(high, torch.clamp(1 + 1 / snr, max=20.0))
    assert high[0] == pytest.approx(1.0, abs=2e-3) and high[2] == 20.0 and 1.0 < high[1] < 20.0
    assert torch.equal(high_noise_weights(snr, 20.0, "v_prediction"), torch.ones(3))
    both = diffusion_loss(zero, z0, None, t, noise, abar, snr_gamma=5.0, high_noise_weight=20.0).item()
    assert both == pytest.approx((eps_w * high * eps_mse).mean().item(), rel=1e-5)
    # with min-SNR, eps and v losses weigh the x0 error of each timestep alike (eps error = x0 error x SNR, v error =
    # x0 error x (SNR + 1)): min(SNR, 5) x min(1 + 1/SNR, 20)
    x0_weight = torch.minimum(snr, torch.tensor(5.0)) * high
    for kind, per_x0 in (("epsilon", snr), ("v_prediction", snr + 1)):
        got = min_snr_weights(snr, 5.0, kind) * high_noise_weights(snr, 20.0, kind, after_min_snr=True) * per_x0
        assert torch.allclose(got, x0_weight, rtol=1e-5)


def test_draws_depend_on_each_samples_seed_only():
    one = draw(torch.tensor([11, 12]), (4, 8, 8), 1000)
    other = draw(torch.tensor([99, 12, 11]), (4, 8, 8), 1000)
    assert torch.equal(one.noise[0], other.noise[2]) and torch.equal(one.timesteps[1], other.timesteps[1])
    assert torch.equal(one.posterior_noise[1], other.posterior_noise[1])
    assert not torch.equal(one.noise[0], one.posterior_noise[0])
    offset = draw(torch.tensor([11]), (4, 8, 8), 1000, noise_offset=0.1)
    shift = offset.noise[0] - one.noise[0]  # a constant per channel
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift), atol=1e-6) and shift.abs().max() > 0.01


def test_timestep_bias_draws_a_portion_from_its_range():
    seeds = torch.arange(400)
    plain = draw(seeds, (4, 2, 2), 1000)
    assert plain.timesteps.min() < 100 and plain.timesteps.max() > 900
    only = draw(seeds, (4, 2, 2), 1000, timestep_bias=(600, 1000, 1.0))
    assert only.timesteps.min() >= 600 and only.timesteps.max() < 1000
    half = draw(seeds, (4, 2, 2), 1000, timestep_bias=(600, 1000, 0.5)).timesteps
    assert 0.6 < (half >= 600).float().mean() < 0.9  # 0.5 + 0.5 * 0.4 = 0.7 expected
    with pytest.raises(ValueError, match=r"timestep_bias_range must be \[begin, end\)"):
        parse_command_line(TextToImageConfig, ["--config", str(SMOKE), "--output_dir", "o",
                                               "--timestep_bias_range", "[900, 100]"])


def test_training_view_makes_the_same_draws_and_ids_as_the_training_process():
    from latentdiff.models.text import CLIPTokenizer
    from latentdiff.train.data import ShapesSource, TrainingView, collate
    from latentdiff.train.loss import DrawSpec

    tokenizer = CLIPTokenizer()
    spec = DrawSpec((4, 4, 4), 1000, noise_offset=0.05, timestep_bias=(600, 1000, 0.5))
    view = TrainingView(ShapesSource(32, {"num_samples": 8}), 32, seed=3, caption_dropout=0.5, draw_spec=spec,
                        tokenizer=tokenizer)
    batch = collate([view[(1, i)] for i in range(8)])
    expected = draw(batch["seed"], (4, 4, 4), 1000, 0.05, timestep_bias=(600, 1000, 0.5))
    assert torch.equal(batch["timesteps"], expected.timesteps) and torch.equal(batch["noise"], expected.noise)
    assert torch.equal(batch["posterior_noise"], expected.posterior_noise)
    assert torch.equal(batch["input_ids"], tokenizer(batch["text"])) and "" in batch["text"]  # dropout applied


def test_ema_decay_warms_up_and_averages():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        decay = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(decay)
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
        expected = decay * expected + (1 - decay) * value
        assert ema.shadow["weight"][0, 0].item() == pytest.approx(expected)
    copy = EMA(torch.nn.Linear(2, 1, bias=False), decay=0.9)
    copy.load_state_dict(ema.state_dict())
    assert copy.num_updates == 4 and torch.equal(copy.shadow["weight"], ema.shadow["weight"])
    assert ema.copy_to(torch.nn.Linear(2, 1, bias=False)).weight[0, 0].item() == pytest.approx(expected)


def test_checkpoint_state_is_json_and_safetensors_and_reads_back_exactly(tmp_path, monkeypatch):
    """state_io's trees (tuples, int keys, tensors of several dtypes, non-finite floats, numpy arrays) and
    save_checkpoint / load_checkpoint on prepared objects: what is loaded continues exactly as the saved run did,
    without unpickling anything."""
    import random

    from latentdiff.train.checkpointing import CheckpointContents, load_checkpoint, save_checkpoint
    from latentdiff.train.state_io import read_tree, rng_state, set_rng_state, write_tree
    from latentdiff.train.loop import TrainState, make_accelerator, make_optimizer

    tree = {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3).to(torch.bfloat16)}},
            "groups": [{"betas": (0.9, 0.999), "params": [0, 1], "foreach": None, "@odd": float("inf")}],
            "ids": torch.arange(4), "flags": torch.tensor([True, False]), "nan": float("nan"), "key": np.arange(3)}
    write_tree(tree, tmp_path, "tree")
    back = read_tree(tmp_path, "tree")
    assert set(back) == set(tree) and back["groups"][0]["betas"] == (0.9, 0.999) and list(back["state"]) == [0]
    assert back["groups"][0]["@odd"] == float("inf") and back["groups"][0]["params"] == [0, 1]
    for key in ("step", "m"):
        assert back["state"][0][key].dtype == tree["state"][0][key].dtype
        assert torch.equal(back["state"][0][key], tree["state"][0][key])
    assert torch.equal(back["ids"], tree["ids"]) and torch.equal(back["flags"], tree["flags"])
    assert back["nan"] != back["nan"] and back["key"].dtype == np.int64 and back["key"].tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match=r"cannot save groups/0: a object is neither a tensor nor a JSON value"):
        write_tree({"groups": [object()]}, tmp_path, "bad")

    def draws():
        return random.random(), np.random.rand(), torch.rand(()).item()

    write_tree(rng_state(), tmp_path, "rng")
    first = draws()
    set_rng_state(read_tree(tmp_path, "rng"))
    assert draws() == first

    accelerator = make_accelerator(smoke_config(tmp_path))
    config = smoke_config(tmp_path, lr_warmup_steps=3, max_train_steps=10, lr_scheduler="cosine")

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
        model, optimizer, scheduler = accelerator.prepare(model, *make_optimizer([{"params": model.parameters()}],
                                                                                 config))
        ema, state = EMA(model, 0.9), TrainState()
        return model, optimizer, scheduler, ema, state, CheckpointContents([model], optimizer, scheduler, [state, ema])

    def steps(parts, n):
        model, optimizer, scheduler, ema, state, _ = parts
        losses = []
        for _ in range(n):
            loss = model(torch.randn(4, 3)).square().mean()  # the global generator: restored with the checkpoint
            accelerator.backward(loss)
            optimizer.step(), scheduler.step(), optimizer.zero_grad()
            ema.update(model)
            state.step += 1
            losses.append(loss.item())
        return losses

    saved = build()
    steps(saved, 2)
    folder = save_checkpoint(accelerator, tmp_path / "out", 2, None, saved[-1])
    assert sorted(p.name for p in folder.iterdir()) == [
        "accelerator.json", "checkpoint_complete.json", "model.safetensors", "object_0_trainstate.json",
        "object_1_ema.json", "object_1_ema.safetensors", "optimizer.json", "optimizer.safetensors",
        "random_states_0.json", "random_states_0.safetensors", "scheduler.json"]
    expected = steps(saved, 3)

    resumed = build()
    forbid_unpickling(monkeypatch)
    load_checkpoint(accelerator, folder, resumed[-1])
    monkeypatch.undo()
    assert resumed[4].step == 2 and resumed[3].num_updates == 2
    assert steps(resumed, 3) == expected
    assert all(torch.equal(p, q) for p, q in zip(saved[0].parameters(), resumed[0].parameters()))
    assert all(torch.equal(saved[3].shadow[k], resumed[3].shadow[k]) for k in saved[3].shadow)

    model, optimizer, scheduler, ema, state, _ = build()
    with pytest.raises(ValueError, match=r"holds the state of \['object_0_trainstate', 'object_1_ema'\], this run "
                                         r"keeps \['object_0_trainstate'\].*use_ema"):
        load_checkpoint(accelerator, folder, CheckpointContents([model], optimizer, scheduler, [state]))
    with pytest.raises(ValueError, match=r"holds the weights of 1 model\(s\) \(model.safetensors\), this run trains 2"):
        load_checkpoint(accelerator, folder, CheckpointContents([model, model], optimizer, scheduler, [state, ema]))

    text = (folder / "scheduler.json").read_text()
    (folder / "scheduler.json").write_text("x" + text[1:])  # same size, no longer JSON
    assert "scheduler.json is not readable JSON" in checkpoint_problem(folder)
    marker = json.loads((folder / "checkpoint_complete.json").read_text())
    marker.pop("format")
    marker["files"] = {"optimizer.bin": 10}
    (folder / "checkpoint_complete.json").write_text(json.dumps(marker))
    assert "accelerate's pickle format (optimizer.bin)" in checkpoint_problem(folder)


# ---- training runs --------------------------------------------------------------------------------------------------
def test_a_tiny_model_overfits_a_handful_of_images(tmp_path):
    """The real path (shapes images -> tiny random VAE posterior -> U-Net) on 4 images with fixed captions. What is
    measured: the diffusion loss on 64 fixed (image, t, noise) draws, before training (the same seeded
    initialisation) and after 150 steps; it must fall at least 5x."""
    config = smoke_config(tmp_path, max_train_steps=150, shapes={"num_samples": 4, "seed": 0}, train_batch_size=4,
                          caption_dropout=0.0, learning_rate=2e-3, lr_scheduler="constant", lr_warmup_steps=0,
                          use_ema=False, checkpointing_steps=0)
    initial = load_components(config).unet.eval()
    result = train_text_to_image(config)
    task = result.task
    g = torch.Generator().manual_seed(123)
    images, texts = zip(*(task.view.source.load(i) for i in range(4)))
    with torch.no_grad():
        posterior = task.vae.encode(torch.stack([prepare_image(im, 32) for im in images]))
        context = task.text_encoder(task.c.tokenizer(list(texts))).last_hidden_state
        draws = []
        for _ in range(16):
            z0 = posterior.sample(g) * task.vae.config.scaling_factor
            draws.append((z0, torch.randint(0, 1000, (4,), generator=g), torch.randn(z0.shape, generator=g)))

        def eval_loss(unet):
            return sum(diffusion_loss(unet, z0, context, t, n, task.alphas_cumprod).item() for z0, t, n in draws) / 16

        before, after = eval_loss(initial), eval_loss(task._unet().eval())
    assert before > 0.8  # an untrained U-Net predicts ~0: the loss is about E[eps^2] = 1
    assert after < before / 5, f"evaluation loss fell only from {before:.3f} to {after:.3f}"


def test_resume_continues_exactly_and_skips_broken_checkpoints(tmp_path, image_folder, monkeypatch):
    """Three runs of one config (random crops and flips, caption dropout, gradient accumulation, EMA): A runs 6
    steps; B stops with a NaN at step 5; B is then given a truncated and a half-written checkpoint newer than its
    own and resumed with --resume latest, with pickle and torch.load made to fail. The resumed steps reproduce A's
    losses and weights exactly."""
    common = dict(dataset="folder", data_dir=str(image_folder), shapes={}, center_crop=False, random_flip=True,
                  caption_dropout=0.5, train_batch_size=3, gradient_accumulation_steps=2, max_train_steps=6,
                  checkpointing_steps=2, checkpoints_total_limit=2, use_ema=True, ema_decay=0.99)
    run_a = train_text_to_image(smoke_config(tmp_path, "a", **common))
    a, b = tmp_path / "a", tmp_path / "b"
    assert [p.name for p in sorted(a.glob("checkpoint-*"))] == ["checkpoint-4", "checkpoint-6"]  # limit 2
    assert [r["step"] for r in read_log(a)] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "steps_per_s"} <= set(r) for r in read_log(a))

    with pytest.raises(TrainingDiverged) as stop:
        train_text_to_image(smoke_config(tmp_path, "b", debug_nan_at_step=5, **common))
    message = str(stop.value)
    assert "the loss is nan at step 5" in message and "checkpoint-4" in message
    assert "lower learning_rate" in message and "fp32" in message
    assert sorted(p.name for p in b.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert checkpoint_problem(b / "checkpoint-4") is None and not (b / "pipeline").exists()
    assert not pickled_files(a) and not pickled_files(b)
    assert [r["loss"] for r in read_log(b)] == run_a.losses[:4]

    shutil.copytree(a / "checkpoint-6", b / "checkpoint-6")
    with open(b / "checkpoint-6" / "model.safetensors", "r+b") as f:
        f.truncate(1000)  # unreadable: cut short
    shutil.copytree(a / "checkpoint-6", b / "checkpoint-8")
    (b / "checkpoint-8" / "checkpoint_complete.json").unlink()  # half-written: no completion marker
    (b / ".tmp-checkpoint-10").mkdir()  # what a save interrupted before its rename leaves
    with pytest.warns(UserWarning) as caught:
        assert find_resumable(b) == b / "checkpoint-4"
    skipped = " | ".join(str(w.message) for w in caught)
    assert "checkpoint-8: no completion marker" in skipped
    assert "checkpoint-6: model.safetensors has 1000 bytes" in skipped

    forbid_unpickling(monkeypatch)
    with pytest.warns(UserWarning):
        run_c = train_text_to_image(smoke_config(tmp_path, "b", resume="latest", **common))
    monkeypatch.undo()
    assert run_c.resumed_from == b / "checkpoint-4"
    assert run_c.losses == run_a.losses[4:]  # exactly, step for step
    assert [r["loss"] for r in read_log(b)] == run_a.losses
    assert checkpoint_problem(b / "checkpoint-6") is None  # the broken one was replaced
    assert not (b / ".tmp-checkpoint-10").exists() and (b / "checkpoint-8").exists()  # leftovers pruned, not others
    weights_a, weights_c = (load_safetensors(d / "checkpoint-6" / "model.safetensors") for d in (a, b))
    assert all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    ema_a, ema_c = run_a.task.ema.shadow, run_c.task.ema.shadow
    assert all(torch.equal(ema_a[k], ema_c[k]) for k in ema_a)


def test_cached_latents_train_exactly_like_encoding_each_step(tmp_path):
    plain = train_text_to_image(smoke_config(tmp_path, "plain", max_train_steps=3, checkpointing_steps=0))
    cached = train_text_to_image(smoke_config(tmp_path, "cached", max_train_steps=3, checkpointing_steps=0,
                                              cache_latents=True))
    assert (tmp_path / "cached" / "latent_cache.safetensors").exists()
    assert np.allclose(plain.losses, cached.losses, rtol=1e-5, atol=0)


def test_latent_scale_trains_and_exports_with_the_multiplied_scaling_factor(tmp_path):
    """latent_scale 2 on a VAE with scaling_factor s trains exactly like latent_scale 1 on the same VAE with 2s,
    and the exported pipeline's VAE carries 2s (so samplers in latentdiff and diffusers undo the same scale)."""
    vae = yaml.safe_load(SMOKE.read_text())["vae"]
    s = 0.5
    runs = {name: train_text_to_image(smoke_config(tmp_path, name, max_train_steps=3, checkpointing_steps=0,
                                                   cache_latents=True, vae={**vae, "scaling_factor": factor},
                                                   latent_scale=scale))
            for name, factor, scale in (("scaled", s, 2.0), ("doubled", 2 * s, 1.0), ("plain", s, 1.0))}
    assert np.allclose(runs["scaled"].losses, runs["doubled"].losses, rtol=1e-5, atol=0)
    assert not np.allclose(runs["scaled"].losses, runs["plain"].losses, rtol=1e-3, atol=0)
    exported = {name: json.loads((tmp_path / name / "pipeline" / "vae" / "config.json").read_text())
                for name in runs}
    assert exported["scaled"]["scaling_factor"] == exported["doubled"]["scaling_factor"] == 2 * s
    assert exported["plain"]["scaling_factor"] == s
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="latent_scale must be a positive number"):
            smoke_config(tmp_path, latent_scale=bad)


def _tiny_pipeline_folder(folder: Path) -> dict:
    from latentdiff.models.text import CLIPTokenizer, build_text_encoder, text_config_tiny
    from latentdiff.models.unet import UNet2DConditionModel, UNetConfig
    from latentdiff.models.vae import AutoencoderKL, VAEConfig
    from latentdiff.pipeline import LatentDiffusionPipeline
    from latentdiff.schedulers import DDIMScheduler

    smoke = yaml.safe_load(SMOKE.read_text())
    torch.manual_seed(0)
    parts = dict(
        tokenizer=CLIPTokenizer(), text_encoder=build_text_encoder(text_config_tiny(), seed=0),
        unet=UNet2DConditionModel(UNetConfig.from_dict({**smoke["unet"], "sample_size": 8})),
        vae=AutoencoderKL(VAEConfig.from_dict(smoke["vae"])),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    )
    LatentDiffusionPipeline(**parts).save_pretrained(folder)
    return parts


def test_fine_tune_a_pipeline_folder_and_export_for_ours_and_diffusers(tmp_path, image_folder):
    from diffusers import StableDiffusionPipeline

    from latentdiff.pipeline import LatentDiffusionPipeline

    base = _tiny_pipeline_folder(tmp_path / "base")
    config = smoke_config(tmp_path, "tuned", pretrained=str(tmp_path / "base"), unet=None, text_encoder=None,
                          vae=None, scheduler=None, dataset="folder", data_dir=str(image_folder), shapes={},
                          max_train_steps=3, checkpointing_steps=0, train_text_encoder=True,
                          prediction_type="v_prediction", snr_gamma=5.0, noise_offset=0.05, ema_decay=0.9,
                          validation_steps=3, validation_prompts=["a red circle"], validation_inference_steps=2)
    result = train_text_to_image(config)
    exported = tmp_path / "tuned" / "pipeline"
    assert (tmp_path / "tuned" / "validation" / "step-0000003.png").exists()

    ours = LatentDiffusionPipeline.from_pretrained(exported)
    theirs = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
    assert type(ours.scheduler).__name__ == type(theirs.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert ours.scheduler.config.prediction_type == theirs.scheduler.config.prediction_type == "v_prediction"
    task = result.task
    ema_weights = task.ema.state_for(task._unet())
    tuned_unet = ours.unet.state_dict()
    assert all(torch.equal(tuned_unet[k], ema_weights[k]) for k in tuned_unet)  # exported with the EMA weights
    assert not all(torch.equal(tuned_unet[k], task._unet().state_dict()[k]) for k in tuned_unet)
    assert not all(torch.equal(tuned_unet[k], base["unet"].state_dict()[k]) for k in tuned_unet)
    theirs_unet = theirs.unet.state_dict()
    assert all(torch.equal(tuned_unet[k], theirs_unet[k]) for k in tuned_unet)
    base_text = base["text_encoder"].state_dict()
    assert not all(torch.equal(v, base_text[k]) for k, v in ours.text_encoder.state_dict().items())  # trained too
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")
    ours_image = ours("a red circle", generator=torch.Generator().manual_seed(0), progress=False, **kwargs).images
    theirs_image = theirs("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(ours_image - theirs_image).max() < 1e-4


def test_fine_tune_a_single_file_checkpoint(tmp_path, image_folder):
    from latentdiff.layout import save_single_file
    from latentdiff.pipeline import LatentDiffusionPipeline

    base = _tiny_pipeline_folder(tmp_path / "base")
    save_single_file(base, tmp_path / "tiny.safetensors")
    config = smoke_config(tmp_path, "tuned", pretrained=str(tmp_path / "tiny.safetensors"),
                          pretrained_config=str(tmp_path / "base"), unet=None, text_encoder=None, vae=None,
                          scheduler=None, dataset="folder", data_dir=str(image_folder), max_train_steps=1,
                          checkpointing_steps=0, use_ema=False)
    train_text_to_image(config)
    tuned = LatentDiffusionPipeline.from_pretrained(tmp_path / "tuned" / "pipeline")
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base["unet"].state_dict()[k])]
    assert len(changed) > 0.9 * len(base["unet"].state_dict())  # one AdamW step moves (nearly) every weight
    assert all(torch.equal(v, base["vae"].state_dict()[k]) for k, v in tuned.vae.state_dict().items())


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("vae-run")
    config = load_config(VAETrainConfig, VAE_SMOKE, {"output_dir": str(out)})
    return out, train_vae(config)


def test_vae_training_sets_the_scaling_factor_from_the_latents(trained_vae):
    from latentdiff.models.vae import AutoencoderKL
    from latentdiff.train.data import ShapesSource

    out, result = trained_vae
    log = read_log(out)
    assert len(log) == 10 and {"l1", "l2", "kl", "loss"} <= set(log[0])
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert (out / "validation" / "step-0000010.png").exists()
    vae = AutoencoderKL.from_pretrained(out / "vae")
    source = ShapesSource(32, {"num_samples": 48, "seed": 0})
    std = latent_std(vae, source, 32, 48, seed=7)  # other posterior draws than the export used
    assert vae.config.scaling_factor * std == pytest.approx(1.0, rel=0.02)
    assert vae.config.scaling_factor != pytest.approx(0.18215)


def test_smoke_config_end_to_end_through_accelerate_launch(tmp_path, trained_vae):
    """training/configs/smoke.yaml as a user runs it, on the VAE the VAE trainer just wrote."""
    from latentdiff.pipeline import LatentDiffusionPipeline

    out = tmp_path / "smoke"
    launch(["--config_file", "training/accelerate/single_cpu.yaml", "training/train_text_to_image.py",
            "--config", str(SMOKE), "--output_dir", str(out), "--vae", "null",
            "--vae_path", str(trained_vae[0] / "vae")])
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 11))
    assert all({"loss", "lr", "steps_per_s", "samples_per_s"} <= set(r) for r in log)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert all(checkpoint_problem(p) is None for p in out.glob("checkpoint-*"))
    assert (out / "validation" / "step-0000010.png").exists()
    pipe = LatentDiffusionPipeline.from_pretrained(out / "pipeline")
    assert pipe.vae.config.scaling_factor == pytest.approx(
        json.loads((trained_vae[0] / "vae" / "config.json").read_text())["scaling_factor"])


def test_two_processes_train_with_ddp_over_gloo(tmp_path, tiny_folders):
    """`accelerate launch` with two processes (training/accelerate/multi_cpu.yaml: torchrun, gloo on the CPU),
    training in turn a new model, a ControlNet for a pipeline and a DreamBooth fine-tune of it (one launch: each
    costs ~12 s of start-up and shutdown here; the other modes' DDP tests are `slow`)."""
    out = tmp_path / "ddp"
    launch(["--config_file", "training/accelerate/multi_cpu.yaml", "--main_process_port", str(free_port()),
            "tests/_ddp_worker.py", str(out), str(tiny_folders[1]), "scratch,controlnet,dreambooth"])
    check_ddp_from_scratch(tmp_path, out / "scratch")
    check_ddp_controlnet(out / "controlnet")
    check_ddp_dreambooth(tmp_path, tiny_folders[1], out / "dreambooth")


def check_ddp_from_scratch(tmp_path, out):
    """The U-Net and the text encoder trained with gradient accumulation, on latents the two processes cached
    together."""
    # identical weights on both ranks after training; the logged loss is the mean over both processes
    ranks = read_ranks(out, ("unet", "text_encoder", "ema", "losses"))
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    for seen0, seen1 in zip(ranks[0]["seen"], ranks[1]["seen"]):
        assert len(seen0) == len(seen1) == 8 and not set(seen0) & set(seen1)  # different samples each step
    checkpoint = out / "checkpoint-2"
    assert checkpoint_problem(checkpoint) is None
    assert (checkpoint / "random_states_0.json").exists() and (checkpoint / "random_states_1.json").exists()
    assert not pickled_files(out)
    assert (out / "pipeline" / "model_index.json").exists()  # exported once, by the main process
    cache = load_safetensors(out / "latent_cache.safetensors")
    assert cache["mean"].shape == (48, 4, 8, 8) and not list(out.glob("latent_cache.part*"))
    from latentdiff.train.data import ShapesSource

    vae = load_components(smoke_config(tmp_path)).vae  # the same seeded VAE the workers built
    source = ShapesSource(32, {"num_samples": 48, "seed": 0})
    with torch.no_grad():
        mean = vae.encode(torch.stack([prepare_image(source.load(i)[0], 32) for i in (0, 1, 46, 47)])).mean
    assert torch.allclose(cache["mean"][[0, 1, 46, 47]], mean, atol=1e-5)  # the shares were merged in order


# ---- LoRA ---------------------------------------------------------------------------------------------------------
def lora_config(tmp_path, pretrained, name="lora", **overrides):
    """LoRA fine-tuning of a pretrained tiny pipeline (64 px: its U-Net's sample_size 8 times the VAE's factor)."""
    settings = dict(pretrained=str(pretrained), unet=None, text_encoder=None, vae=None, scheduler=None, resolution=64,
                    shapes={"num_samples": 8, "seed": 0}, train_batch_size=4, max_train_steps=4, checkpointing_steps=0,
                    lora_rank=4, lora_alpha=8.0, lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
    return smoke_config(tmp_path, name, **{**settings, **overrides})


def test_lora_training_trains_only_the_adapters_and_exports_diffusers_lora(tmp_path, tiny_folders):
    """The U-Net's own weights stay as loaded, the adapters (and their EMA only) train; the exported file loads in
    diffusers and in latentdiff, giving the trained U-Net (with the averaged adapters) to float rounding."""
    import diffusers

    diffusers_folder, folder = tiny_folders
    result = train_text_to_image(lora_config(tmp_path, folder))
    task, out = result.task, tmp_path / "lora"
    unet = task._unet()
    pretrained = LatentDiffusionPipeline.from_pretrained(folder)
    base = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    assert base.keys() == pretrained.unet.state_dict().keys()
    assert all(torch.equal(v, pretrained.unet.state_dict()[k]) for k, v in base.items())  # frozen
    trained = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained) and set(task.ema.shadow) == set(
        trained)
    assert all(p.abs().max() > 0 for n, p in unet.named_parameters() if ".lora_B." in n)  # moved off zero
    assert not (out / "pipeline").exists() and (out / "lora" / "pytorch_lora_weights.safetensors").exists()

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), task._averaged():
        unet.eval()
        expected = unet(x, 500, ctx)
    pretrained.load_lora_weights(out / "lora")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_folder, safety_checker=None)
    reference.load_lora_weights(out / "lora")
    with torch.no_grad():
        ours_loaded = pretrained.unet(x, 500, ctx)
        theirs = reference.unet(x, 500, ctx).sample
    assert (ours_loaded - expected).abs().max() < 1e-5 and (theirs - expected).abs().max() < 1e-5
    with torch.no_grad():
        assert (ours_loaded - LatentDiffusionPipeline.from_pretrained(folder).unet(x, 500, ctx)).abs().max() > 1e-3


def test_lora_training_of_the_text_encoder_too(tmp_path, tiny_folders):
    """With train_text_encoder, the text encoder's attention projections get adapters too (its own weights stay),
    exported under text_encoder.; loaded back, the text encoder gives the trained one's output."""
    folder = tiny_folders[1]
    result = train_text_to_image(lora_config(tmp_path, folder, train_text_encoder=True, use_ema=False))
    trained = result.task.accelerator.unwrap_model(result.task.text_encoder).eval()
    pretrained = LatentDiffusionPipeline.from_pretrained(folder)
    base = {k.replace(".base_layer", ""): v for k, v in trained.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(v, pretrained.text_encoder.state_dict()[k]) for k, v in base.items())
    state = load_safetensors(tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors")
    assert sum(k.startswith("text_encoder.") for k in state) == 2 * 4 * 2  # A and B, 4 projections, 2 layers
    ids = pretrained.tokenizer("a red circle")
    with torch.no_grad():
        expected = trained(ids).last_hidden_state
        before = pretrained.text_encoder(ids).last_hidden_state
        pretrained.load_lora_weights(tmp_path / "lora" / "lora")
        got = pretrained.text_encoder(ids).last_hidden_state
    assert (got - expected).abs().max() < 1e-5 and (got - before).abs().max() > 1e-4


def resumes_exactly(tmp_path, make_config, exported: str) -> None:
    """A run stopped after 2 steps and resumed from its checkpoint ends as one run of 4 steps: the same losses and
    the same exported file. make_config(name, **overrides) -> a config writing to tmp_path / name."""
    common = dict(checkpointing_steps=2, lr_scheduler="constant", lr_warmup_steps=0, max_train_steps=4)
    run_a = train_text_to_image(make_config("a", **common))
    train_text_to_image(make_config("b", **{**common, "max_train_steps": 2}))
    run_b = train_text_to_image(make_config("b", resume="latest", **common))
    assert run_b.resumed_from == tmp_path / "b" / "checkpoint-2" and run_b.losses == run_a.losses[2:]
    files = [load_safetensors(tmp_path / run / exported) for run in "ab"]
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_lora_training_resumes_exactly(tmp_path, tiny_folders):
    """The checkpoint holds the wrapped U-Net, the adapters' optimizer state and EMA."""
    resumes_exactly(tmp_path, lambda name, **o: lora_config(tmp_path, tiny_folders[1], name, **o),
                    "lora/pytorch_lora_weights.safetensors")


def test_lora_config_errors(tmp_path):
    with pytest.raises(ValueError, match="lora_rank fine-tunes a pretrained pipeline"):
        smoke_config(tmp_path, lora_rank=4)
    with pytest.raises(ValueError, match="lora_alpha is given without lora_rank"):
        smoke_config(tmp_path, lora_alpha=4.0)
    with pytest.raises(ValueError, match="positive integer"):
        smoke_config(tmp_path, pretrained="x", unet=None, text_encoder=None, vae=None, lora_rank=0)


@pytest.mark.slow  # (~31 s of two processes on a 2-core CPU; the single-process runs of this mode and the other
# DDP tests stay in the default run; make test-slow)
def test_two_processes_train_lora_adapters_with_ddp(tmp_path, tiny_folders):
    """LoRA under DDP (two processes over gloo): both end with the same weights and averages,
    and the main process alone exports the LoRA file, which latentdiff loads."""
    out = tmp_path / "ddp-lora"
    launch(["--config_file", "training/accelerate/multi_cpu.yaml", "--main_process_port", str(free_port()),
            "tests/_ddp_worker.py", str(out), str(tiny_folders[1])])
    ranks = read_ranks(out, ("unet", "ema", "losses"))
    for seen0, seen1 in zip(ranks[0]["seen"], ranks[1]["seen"]):
        assert not set(seen0) & set(seen1)
    state = load_safetensors(out / "lora" / "pytorch_lora_weights.safetensors")
    assert state and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in state)
    assert not (out / "pipeline").exists() and not pickled_files(out)
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_folders[1])
    pipe.load_lora_weights(out / "lora")
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}


# ---- latent consistency distillation -------------------------------------------------------------------------------
def test_consistency_distillation_loss_is_small_for_a_model_that_knows_the_data():
    """A model whose eps prediction is exact for one latent z0 (so its x0 estimate is z0 everywhere, guided or not):
    the student's consistency function at t and its target at t - k both come out at (nearly) z0, so the loss is
    tiny next to a model that predicts nothing; the teacher is called on [uncond; cond] with the sample shared."""
    from latentdiff.schedules import alphas_cumprod, scaled_linear_betas
    from latentdiff.training import consistency_distillation_loss

    abar = alphas_cumprod(scaled_linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 8, 8, generator=g)
    draws = draw(torch.tensor([1, 2, 3]), (4, 8, 8), 1000)

    def oracle(x, t, ctx):
        a = abar[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * z0) / (1 - a).sqrt()
        return eps.repeat(ctx.shape[0] // x.shape[0], 1, 1, 1)

    def nothing(x, t, ctx):
        return torch.zeros(ctx.shape[0], *x.shape[1:])

    ctx, uncond = torch.randn(3, 77, 32, generator=g), torch.zeros(3, 77, 32)
    good = consistency_distillation_loss(oracle, oracle, z0, ctx, uncond, draws, abar)
    bad = consistency_distillation_loss(nothing, oracle, z0, ctx, uncond, draws, abar)
    assert good.item() < 0.02 * bad.item()
    l2 = consistency_distillation_loss(nothing, oracle, z0, ctx, uncond, draws, abar, huber_c=None)
    assert l2.item() > bad.item()  # (the pseudo-Huber distance grows like |d| where the squared error grows like d^2)


def lcm_config(tmp_path, pretrained, name="lcm", **overrides):
    return lora_config(tmp_path, pretrained, name, lcm_distill=True, caption_dropout=0.0, export_scheduler="lcm",
                       lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1",
                                            "conv2", "time_emb_proj"],
                       **overrides)


def test_lcm_distillation_trains_adapters_that_load_for_few_step_sampling(tmp_path, tiny_folders):
    """lcm_distill: the adapters train (the U-Net's own weights stay), the loss is finite, and the exported LoRA
    file loads in a pipeline that samples with the LCMScheduler in 2 steps."""
    from latentdiff.schedulers import LCMScheduler

    folder = tiny_folders[1]
    result = train_text_to_image(lcm_config(tmp_path, folder, validation_steps=4, validation_prompts=["a red star"],
                                            validation_inference_steps=2, validation_guidance_scale=1.0))
    assert len(result.losses) == 4 and np.isfinite(result.losses).all()
    unet = result.task._unet()
    assert all(p.abs().max() > 0 for n, p in unet.named_parameters() if ".lora_B." in n)
    assert (tmp_path / "lcm" / "validation" / "step-0000004.png").exists()
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(tmp_path / "lcm" / "lora")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    images = pipe("a red star", num_inference_steps=2, guidance_scale=1.0, output_type="np", progress=False).images
    assert np.isfinite(images).all()


def test_lcm_distillation_resumes_exactly(tmp_path, tiny_folders):
    resumes_exactly(tmp_path, lambda name, **o: lcm_config(tmp_path, tiny_folders[1], name, **o),
                    "lora/pytorch_lora_weights.safetensors")


def test_lcm_distillation_config_errors(tmp_path, tiny_folders):
    with pytest.raises(ValueError, match="lcm_distill: true distils a pretrained pipeline into LoRA adapters"):
        smoke_config(tmp_path, lcm_distill=True)
    with pytest.raises(ValueError, match="consistency distillation has its own"):
        lcm_config(tmp_path, tiny_folders[1], snr_gamma=5.0)
    with pytest.raises(ValueError, match=r"lcm_guidance_range must be \[low, high\]"):
        lcm_config(tmp_path, tiny_folders[1], lcm_guidance_range=[8.0, 2.0])
    with pytest.raises(ValueError, match="lcm_huber_c must be positive"):
        lcm_config(tmp_path, tiny_folders[1], lcm_huber_c=0.0)


@pytest.mark.slow  # (~38 s of two processes on a 2-core CPU; the single-process runs of this mode and the other
# DDP tests stay in the default run; make test-slow)
def test_two_processes_distil_lcm_adapters_with_ddp(tmp_path, tiny_folders):
    """Consistency distillation under DDP: the same adapters and losses on both processes."""
    out = tmp_path / "ddp-lcm"
    launch(["--config_file", "training/accelerate/multi_cpu.yaml", "--main_process_port", str(free_port()),
            "tests/_ddp_worker.py", str(out), str(tiny_folders[1]), "lcm"])
    ranks = read_ranks(out, ("unet", "losses"))
    assert np.isfinite(ranks[0]["losses"]).all()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()


# ---- ControlNet ---------------------------------------------------------------------------------------------------
def controlnet_config(tmp_path, pretrained, name="controlnet", **overrides):
    """A ControlNet for a pretrained tiny pipeline (its VAE downsamples by 2: control-image convs of widths 16, 32)."""
    settings = dict(pretrained=str(pretrained), unet=None, text_encoder=None, vae=None, scheduler=None, resolution=16,
                    shapes={"num_samples": 8, "seed": 0}, train_batch_size=4, max_train_steps=3, checkpointing_steps=0,
                    controlnet=True)
    return smoke_config(tmp_path, name, **{**settings, **overrides})


def test_controlnet_training_steers_the_frozen_unet_and_exports_a_controlnet(tmp_path, tiny_folders):
    """The U-Net stays as loaded, the ControlNet (and its EMA) trains; its loss is the one diffusers' U-Net and
    ControlNet give on the same batch; the exported folder loads in both as the averaged ControlNet; validation rows
    start with their control images."""
    import diffusers

    from latentdiff import ControlNetModel
    from latentdiff.schedules import q_sample
    from latentdiff.train.data import collate

    diffusers_folder, folder = tiny_folders
    config = controlnet_config(tmp_path, folder, validation_steps=3, validation_prompts=["a red circle"],
                               validation_seeds=[0])
    result = train_text_to_image(config)
    task, out = result.task, tmp_path / "controlnet"
    pretrained = LatentDiffusionPipeline.from_pretrained(folder)
    assert all(torch.equal(v, pretrained.unet.state_dict()[k]) for k, v in task._unet().state_dict().items())
    trained = task._trained()
    assert isinstance(trained, ControlNetModel) and trained.config.conditioning_embedding_out_channels == (16, 32)
    assert set(task.ema.shadow) == {name for name, _ in trained.named_parameters()}
    assert trained.controlnet_mid_block.weight.abs().max() > 0  # the zero convolutions moved
    assert Image.open(out / "validation" / "step-0000003.png").size == (32, 16)  # control image, image
    assert not (out / "pipeline").exists()
    averaged = task._sampling_copy("cpu").state_dict()
    for loaded in (ControlNetModel.from_pretrained(out / "controlnet"),
                   diffusers.ControlNetModel.from_pretrained(out / "controlnet")):
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in averaged.items())

    batch = collate([task.view[(0, i)] for i in range(4)])
    assert batch["conditioning_pixel_values"].shape == (4, 3, 16, 16)
    with torch.no_grad():
        loss, _ = task.loss(batch)
        posterior = task.vae.encode(batch["pixel_values"])
        z0 = (posterior.mean + posterior.std * batch["posterior_noise"]) * task.vae.config.scaling_factor
        context = task.text_encoder(batch["input_ids"]).last_hidden_state
        z_t = q_sample(z0, batch["noise"], batch["timesteps"], task.alphas_cumprod)
        unet = diffusers.UNet2DConditionModel.from_pretrained(diffusers_folder / "unet").eval()
        net = diffusers.ControlNetModel(**{k: v for k, v in trained.config.to_dict().items() if k[0] != "_"})
        net.load_state_dict(trained.state_dict())
        down, mid = net.eval()(z_t, batch["timesteps"], context, batch["conditioning_pixel_values"],
                               return_dict=False)
        prediction = unet(z_t, batch["timesteps"], context, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(prediction, batch["noise"]).item(), rel=1e-5)


def test_controlnet_training_resumes_exactly(tmp_path, tiny_folders):
    resumes_exactly(tmp_path, lambda name, **o: controlnet_config(tmp_path, tiny_folders[1], name, **o),
                    "controlnet/diffusion_pytorch_model.safetensors")


def test_control_images_follow_the_images_crops_and_flips(tmp_path):
    """A folder whose control image of each entry is the image itself: with random crops and flips, the control
    image (in [0, 1]) is the image (in [-1, 1]) of every sample; a missing control image is reported by name."""
    from latentdiff.train.data import TrainingView, build_source

    folder = tmp_path / "data"
    write_image_folder(folder, 6, size=40, seed=2)
    lines = [{**json.loads(line), "hint": json.loads(line)["file_name"]}
             for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = controlnet_config(tmp_path, "unused", dataset="folder", data_dir=str(folder), conditioning_column="hint",
                               resolution=32, random_flip=True, center_crop=False)
    view = TrainingView(build_source(config), 32, 0, random_crop=True, random_flip=True, conditioning=True)
    for epoch in range(3):
        for index in range(6):
            item = view[(epoch, index)]
            assert torch.allclose(item["conditioning_pixel_values"] * 2 - 1, item["pixel_values"], atol=1e-6)
    lines[2]["hint"] = "missing.png"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))
    with pytest.raises(BadSampleError, match=r"metadata.jsonl:3: image '00002.png' has no control image \(file "
                                             r"not found.*conditioning_column 'hint'"):
        build_source(config)


def check_ddp_controlnet(out):
    """ControlNet training under DDP (test_two_processes_train_with_ddp_over_gloo): both processes end with the same
    ControlNet, averages and losses, the U-Net untouched, and the main process alone exports the ControlNet."""
    from latentdiff import ControlNetModel

    ranks = read_ranks(out, ("trained", "unet", "ema", "losses"))
    for seen0, seen1 in zip(ranks[0]["seen"], ranks[1]["seen"]):
        assert not set(seen0) & set(seen1)
    assert not (out / "pipeline").exists() and not pickled_files(out)
    controlnet = ControlNetModel.from_pretrained(out / "controlnet")
    assert controlnet.controlnet_mid_block.weight.abs().max() > 0


def test_controlnet_config_errors(tmp_path):
    with pytest.raises(ValueError, match="trains a ControlNet for a pretrained U-Net"):
        smoke_config(tmp_path, controlnet=True)
    pretrained = dict(pretrained="x", unet=None, text_encoder=None, vae=None)
    with pytest.raises(ValueError, match="drop lora_rank and train_text_encoder"):
        smoke_config(tmp_path, controlnet=True, lora_rank=4, **pretrained)
    with pytest.raises(ValueError, match="validation_images has 1 control images for 2 validation_prompts"):
        smoke_config(tmp_path, controlnet=True, validation_images=["a.png"], **pretrained)
    with pytest.raises(ValueError, match="set controlnet: true"):
        smoke_config(tmp_path, controlnet_path="cn", **pretrained)


# ---- textual inversion --------------------------------------------------------------------------------------------
def inversion_config(tmp_path, pretrained, name="inversion", **overrides):
    """A two-vector word <shape> for a pretrained tiny pipeline, started from "star"."""
    settings = dict(pretrained=str(pretrained), unet=None, text_encoder=None, vae=None, scheduler=None, resolution=16,
                    shapes={"num_samples": 8, "seed": 0}, train_batch_size=4, max_train_steps=3, checkpointing_steps=0,
                    placeholder_token="<shape>", initializer_token="star", num_vectors=2, use_ema=False,
                    learning_rate=5e-2)
    return smoke_config(tmp_path, name, **{**settings, **overrides})


def test_textual_inversion_learns_only_the_new_word_and_exports_it_for_ours_and_diffusers(tmp_path, tiny_folders):
    """Only the new word's two rows of the token table move (from "star"'s); the U-Net, the VAE and the rest of the
    text encoder stay as loaded; captions are the templates with the word; the exported file loaded into the
    pretrained pipeline (ours, and diffusers') gives the trained encoder's prompt embeddings."""
    import diffusers

    diffusers_folder, folder = tiny_folders
    result = train_text_to_image(inversion_config(tmp_path, folder, validation_steps=3,
                                                  validation_prompts=["a red <shape>"], validation_seeds=[0]))
    task, out = result.task, tmp_path / "inversion"
    pretrained = LatentDiffusionPipeline.from_pretrained(folder)
    assert all(torch.equal(v, pretrained.unet.state_dict()[k]) for k, v in task._unet().state_dict().items())
    assert all(torch.equal(v, pretrained.vae.state_dict()[k]) for k, v in task.vae.state_dict().items())
    encoder = task._trained()
    table_key = "text_model.embeddings.token_embedding.weight"
    before = pretrained.text_encoder.state_dict()
    for key, value in encoder.state_dict().items():
        if key != table_key:
            assert torch.equal(value, before[key]), key
    table, old = encoder.state_dict()[table_key], before[table_key]
    assert table.shape[0] == old.shape[0] + 2 and torch.equal(table[:old.shape[0]], old)
    star = pretrained.tokenizer.encode("star")[0]
    assert all((table[i] - old[star]).abs().max() > 1e-3 for i in task.new_ids)  # moved off "star"
    assert task.view[(0, 0)]["text"] in [t.format("<shape> <shape>_1") for t in task.config.caption_templates]
    assert (out / "validation" / "step-0000003.png").exists() and not (out / "pipeline").exists()

    learned = load_safetensors(out / "learned_embeds.safetensors")
    assert list(learned) == ["<shape>"] and learned["<shape>"].shape == (2, 32)
    ids = task.c.tokenizer(["a red <shape> <shape>_1"])  # (what loaders make of "<shape>": both its vectors)
    with torch.no_grad():
        expected = encoder.eval()(ids).last_hidden_state
        pretrained.load_textual_inversion(out / "learned_embeds.safetensors")
        ours = pretrained.encode_prompt("a red <shape>", do_classifier_free_guidance=False)[0]
        reference = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_folder, safety_checker=None)
        reference.load_textual_inversion(str(out / "learned_embeds.safetensors"))
        theirs = reference.encode_prompt("a red <shape>", "cpu", 1, False)[0]
    assert (ours - expected).abs().max() < 1e-5 and (theirs - expected).abs().max() < 1e-5


def test_textual_inversion_resumes_exactly(tmp_path, tiny_folders):
    resumes_exactly(tmp_path, lambda name, **o: inversion_config(tmp_path, tiny_folders[1], name, **o),
                    "learned_embeds.safetensors")


@pytest.mark.slow  # (~18 s of two processes on a 2-core CPU; the single-process runs of this mode and the other
# DDP tests stay in the default run; make test-slow)
def test_two_processes_learn_a_word_with_ddp(tmp_path, tiny_folders):
    """Textual inversion under DDP (two processes over gloo): the same token table and losses on both ranks, the
    main process alone exports the word."""
    out = tmp_path / "ddp-inversion"
    launch(["--config_file", "training/accelerate/multi_cpu.yaml", "--main_process_port", str(free_port()),
            "tests/_ddp_worker.py", str(out), str(tiny_folders[1]), "inversion"])
    read_ranks(out, ("trained", "unet", "losses"))
    assert list(load_safetensors(out / "learned_embeds.safetensors")) == ["<shape>"] and not pickled_files(out)


def test_textual_inversion_config_errors(tmp_path, tiny_folders):
    with pytest.raises(ValueError, match="learns a word for a pretrained pipeline"):
        smoke_config(tmp_path, placeholder_token="<x>", initializer_token="cat")
    with pytest.raises(ValueError, match="set use_ema: false"):
        inversion_config(tmp_path, tiny_folders[1], use_ema=True)
    with pytest.raises(ValueError, match="needs initializer_token"):
        inversion_config(tmp_path, tiny_folders[1], initializer_token=None)
    with pytest.raises(ValueError, match="caption_templates must be captions with {}"):
        inversion_config(tmp_path, tiny_folders[1], caption_templates=["a photo"])
    with pytest.raises(ValueError, match="initializer_token 'red circle' is 2 tokens"):
        train_text_to_image(inversion_config(tmp_path, tiny_folders[1], initializer_token="red circle"))
    with pytest.raises(ValueError, match=r"\['star'\] already in the vocabulary"):
        train_text_to_image(inversion_config(tmp_path, tiny_folders[1], placeholder_token="star", num_vectors=1))


def test_zero_terminal_snr_training_with_v_prediction(tmp_path):
    """A schedule rescaled to zero terminal SNR (Lin et al. 2024) trains with v-prediction (finite losses, the last
    timestep included), and the exported pipeline samples that schedule from pure noise ("trailing" spacing);
    epsilon-prediction, and a sampler that cannot take the schedule, are refused before training starts."""
    schedule = {**yaml.safe_load(SMOKE.read_text())["scheduler"], "rescale_betas_zero_snr": True,
                "timestep_spacing": "trailing"}
    run = train_text_to_image(smoke_config(tmp_path, "zsnr", max_train_steps=3, checkpointing_steps=0,
                                           scheduler=schedule, prediction_type="v_prediction", snr_gamma=5.0,
                                           timestep_bias_range=[990, 1000], timestep_bias_portion=1.0))
    assert len(run.losses) == 3 and np.isfinite(run.losses).all()
    saved = json.loads((tmp_path / "zsnr" / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["rescale_betas_zero_snr"] is True and saved["prediction_type"] == "v_prediction"
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "zsnr" / "pipeline")
    assert pipe.scheduler.alphas_cumprod[-1] == 2.0**-24 and pipe.scheduler.timesteps is not None
    images = pipe("a red circle", num_inference_steps=3, output_type="np", progress=False).images
    assert np.isfinite(images).all()
    with pytest.raises(ValueError, match="zero terminal SNR .* set prediction_type: v_prediction"):
        train_text_to_image(smoke_config(tmp_path, "eps", max_train_steps=1, scheduler=schedule,
                                         prediction_type="epsilon"))
    with pytest.raises(ValueError, match="export_scheduler 'heun' cannot sample this noise schedule"):
        train_text_to_image(smoke_config(tmp_path, "heun", max_train_steps=1, scheduler=schedule,
                                         prediction_type="v_prediction", export_scheduler="heun"))


# ---- DreamBooth ----------------------------------------------------------------------------------------------------
def dreambooth_config(tmp_path, pretrained, name="dreambooth", **overrides):
    """DreamBooth on 3 shapes images captioned "a sks shape", with prior preservation: 5 class images of "a shape"
    (generated in 2 steps into <name>-class), prior_loss_weight 0.5."""
    settings = dict(pretrained=str(pretrained), unet=None, text_encoder=None, vae=None, scheduler=None, resolution=16,
                    shapes={"num_samples": 3, "seed": 0}, train_batch_size=2, max_train_steps=3, checkpointing_steps=0,
                    instance_prompt="a sks shape", with_prior_preservation=True, class_prompt="a shape",
                    class_data_dir=str(tmp_path / f"{name}-class"), num_class_images=5, class_generation_steps=2,
                    sample_batch_size=2, caption_dropout=0.0, prior_loss_weight=0.5)
    return smoke_config(tmp_path, name, **{**settings, **overrides})


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_dreambooth_generates_the_missing_class_images_with_the_pretrained_pipeline(tmp_path, tiny_folders):
    """class_data_dir is filled up to num_class_images, at free names, the user's images kept; image n is what the
    pretrained pipeline (export_scheduler's sampler) makes of class_prompt from class_image_seed(seed, n), in any
    batch size; a folder that is full is left alone."""
    from latentdiff.schedulers import scheduler_from_name
    from latentdiff.train.dreambooth import class_image_seed, ensure_class_images
    from latentdiff.train.loop import make_accelerator

    folder = tiny_folders[1]
    config = dreambooth_config(tmp_path, folder, sample_batch_size=2)
    classes = Path(config.class_data_dir)
    classes.mkdir()
    Image.new("RGB", (16, 16), "red").save(classes / "class-00001.png")
    Image.new("RGB", (16, 16), "blue").save(classes / "mine.JPG")
    (classes / "notes.txt").write_text("not an image")
    ensure_class_images(config, load_components(config), make_accelerator(config))
    names = sorted(p.name for p in classes.iterdir())
    assert names == ["class-00000.png", "class-00001.png", "class-00002.png", "class-00003.png", "mine.JPG",
                     "notes.txt"]
    assert (pixels(classes / "class-00001.png") == [255, 0, 0]).all()  # the user's red image, untouched
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = scheduler_from_name(config.export_scheduler, pipe.scheduler.config)
    for n in (0, 3):
        expected = pipe("a shape", num_inference_steps=2, guidance_scale=7.5, progress=False,
                        generator=torch.Generator().manual_seed(class_image_seed(config.seed, n))).images[0]
        assert np.abs(pixels(classes / f"class-{n:05d}.png") - np.asarray(expected, dtype=np.int16)).max() <= 1
    stamps = {p.name: p.stat().st_mtime_ns for p in classes.iterdir()}
    ensure_class_images(config, load_components(config), make_accelerator(config))
    assert {p.name: p.stat().st_mtime_ns for p in classes.iterdir()} == stamps  # full: nothing generated

    # in bf16 (prior_generation_precision): copies of the models generate; the models to train stay as loaded
    config = dreambooth_config(tmp_path, folder, class_data_dir=str(tmp_path / "bf16"), num_class_images=4,
                               prior_generation_precision="bf16")
    components = load_components(config)
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    ensure_class_images(config, components, make_accelerator(config))
    assert all(torch.equal(v, before[k]) for k, v in components.unet.state_dict().items())
    for n in (0, 3):
        difference = np.abs(pixels(tmp_path / "bf16" / f"class-{n:05d}.png") - pixels(classes / f"class-{n:05d}.png"))
        assert 0 < difference.mean() < 8, difference.mean()


def reference_models(folder: Path):
    """diffusers' U-Net, VAE and DDPM schedule and transformers' text encoder of a pipeline folder, in eval mode."""
    import diffusers
    from transformers import CLIPTextModel

    return (diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval(),
            CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
            diffusers.DDPMScheduler.from_pretrained(folder / "scheduler"))


def reference_inputs(vae, text, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, z0) of a training batch through diffusers' VAE and transformers' text encoder: the caption's
    hidden states and the posterior sample made with the batch's own posterior noise, scaled."""
    posterior = vae.encode(batch["pixel_values"]).latent_dist
    z0 = (posterior.mean + posterior.std * batch["posterior_noise"]) * vae.config.scaling_factor
    return text(batch["input_ids"])[0], z0


def test_dreambooth_loss_is_the_instance_loss_plus_the_weighted_prior_loss_as_diffusers_models_give_it(
        tmp_path, tiny_folders):
    """A batch holds the instance samples (instance_prompt) then as many class samples (class_prompt), pair i of
    instance image i mod 3 and class image i mod 5; the loss equals diffusers' U-Net, VAE and transformers' text
    encoder on the same batch: MSE of the instance half + prior_loss_weight x MSE of the class half."""
    import torch.nn.functional as F

    from latentdiff.train.data import ShapesSource
    from latentdiff.train.dreambooth import PriorPreservationView
    from latentdiff.training import TextToImageTask, make_accelerator

    diffusers_folder, folder = tiny_folders
    config = dreambooth_config(tmp_path, folder)
    task = TextToImageTask(config, make_accelerator(config), load_components(config))
    assert len(task.view) == 5
    batch = PriorPreservationView.collate([task.view[(0, i)] for i in (1, 4)])
    assert batch["text"] == ["a sks shape"] * 2 + ["a shape"] * 2 and batch["prior"].tolist() == [0, 0, 1, 1]
    assert batch["index"].tolist() == [1, 4]
    source = ShapesSource(16, {"num_samples": 3, "seed": 0})
    assert torch.equal(batch["pixel_values"][1], prepare_image(source.load(4 % 3)[0], 16))
    class_files = sorted(Path(config.class_data_dir).iterdir())
    assert torch.equal(batch["pixel_values"][3], prepare_image(Image.open(class_files[4]), 16))
    assert not torch.equal(batch["noise"][0], batch["noise"][2])  # the class view draws its own noise
    with torch.no_grad():
        loss, extras = task.loss(batch)

        unet, vae, text, schedule = reference_models(diffusers_folder)
        context, z0 = reference_inputs(vae, text, batch)
        noisy = schedule.add_noise(z0, batch["noise"], batch["timesteps"])
        prediction, prior_prediction = unet(noisy, batch["timesteps"], context).sample.chunk(2)
        target, prior_target = batch["noise"].chunk(2)
        instance, prior = F.mse_loss(prediction, target), F.mse_loss(prior_prediction, prior_target)
    assert abs(extras["instance_loss"].item() - instance.item()) < 1e-5 * instance.item()
    assert abs(extras["prior_loss"].item() - prior.item()) < 1e-5 * prior.item()
    assert abs(loss.item() - (instance + 0.5 * prior).item()) < 1e-5 * loss.item()


def test_input_perturbation_noises_the_input_with_its_own_draw_and_keeps_the_target(tmp_path, tiny_folders):
    """diffusers' --input_perturbation: the U-Net sees z_t made from eps + gamma * xi, its target is eps (diffusers'
    U-Net, VAE and text encoder on the same batch give the same loss); xi is the sample's own draw, made after the
    others, which stay as they were."""
    import torch.nn.functional as F

    from latentdiff.train.data import collate
    from latentdiff.training import TextToImageTask, make_accelerator

    diffusers_folder, folder = tiny_folders
    plain = draw(torch.tensor([5, 6]), (4, 2, 2), 1000, noise_offset=0.1)
    perturbed = draw(torch.tensor([5, 6]), (4, 2, 2), 1000, noise_offset=0.1, input_perturbation=0.1)
    for key in ("timesteps", "noise", "posterior_noise", "uniform"):
        assert torch.equal(getattr(plain, key), getattr(perturbed, key))
    assert plain.input_noise is None
    xi = (perturbed.input_noise - perturbed.noise) / 0.1
    assert 0.7 < xi.std() < 1.3 and (perturbed.input_noise - perturbed.noise).abs().max() > 0.01

    config = dreambooth_config(tmp_path, folder, with_prior_preservation=False, class_prompt=None,
                               class_data_dir=None, input_perturbation=0.1)
    task = TextToImageTask(config, make_accelerator(config), load_components(config))
    batch = collate([task.view[(0, i)] for i in range(2)])
    expected = draw(batch["seed"], (4, 8, 8), 1000, input_perturbation=0.1)
    assert torch.equal(batch["input_noise"], expected.input_noise) and torch.equal(batch["noise"], expected.noise)
    with torch.no_grad():
        loss, _ = task.loss(batch)
        unet, vae, text, schedule = reference_models(diffusers_folder)
        context, z0 = reference_inputs(vae, text, batch)
        noisy = schedule.add_noise(z0, batch["input_noise"], batch["timesteps"])
        expected = F.mse_loss(unet(noisy, batch["timesteps"], context).sample, batch["noise"])
        unperturbed = F.mse_loss(unet(schedule.add_noise(z0, batch["noise"], batch["timesteps"]), batch["timesteps"],
                                      context).sample, batch["noise"])
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()
    assert abs(loss.item() - unperturbed.item()) > 1e-4 * expected.item()  # (the perturbation mattered)
    for bad in (-0.1, float("inf")):
        with pytest.raises(ValueError, match="input_perturbation must be a finite number >= 0"):
            smoke_config(tmp_path, input_perturbation=bad)
    with pytest.raises(ValueError, match="noise_offset must be a finite number >= 0"):
        smoke_config(tmp_path, noise_offset=-1.0)
    with pytest.raises(ValueError, match="input_perturbation and dream_training change"):
        lcm_config(tmp_path, folder, input_perturbation=0.1)


def test_dream_training_moves_input_and_target_by_the_models_own_error_as_diffusers(tmp_path, tiny_folders):
    """dream_training: the loss equals diffusers' U-Net trained on the (input, target) that diffusers'
    compute_dream_and_update_latents makes from it, for two detail_preservation values; v prediction is refused."""
    import torch.nn.functional as F
    from diffusers.training_utils import compute_dream_and_update_latents

    from latentdiff.train.data import collate
    from latentdiff.training import TextToImageTask, make_accelerator

    diffusers_folder, folder = tiny_folders
    unet, vae, text, schedule = reference_models(diffusers_folder)
    losses = []
    for p in (1.0, 0.5):
        config = dreambooth_config(tmp_path, folder, with_prior_preservation=False, class_prompt=None,
                                   class_data_dir=None, dream_training=True, dream_detail_preservation=p)
        task = TextToImageTask(config, make_accelerator(config), load_components(config))
        batch = collate([task.view[(0, i)] for i in range(2)])
        with torch.no_grad():
            loss, _ = task.loss(batch)
            context, z0 = reference_inputs(vae, text, batch)
            noisy = schedule.add_noise(z0, batch["noise"], batch["timesteps"])
            noisy, target = compute_dream_and_update_latents(unet, schedule, batch["timesteps"], batch["noise"], noisy,
                                                             batch["noise"], context, p)
            expected = F.mse_loss(unet(noisy, batch["timesteps"], context).sample, target)
        assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) > 1e-4 * losses[0]  # (p matters)
    with pytest.raises(ValueError, match="dream_training: DREAM is defined for eps prediction"):
        config = dreambooth_config(tmp_path, folder, with_prior_preservation=False, class_prompt=None,
                                   class_data_dir=None, dream_training=True, prediction_type="v_prediction")
        TextToImageTask(config, make_accelerator(config), load_components(config))


def test_dreambooth_with_lora_logs_both_losses_and_resumes_exactly(tmp_path, tiny_folders):
    """DreamBooth-LoRA (diffusers' train_dreambooth_lora.py): the log carries instance_loss and prior_loss; a run
    stopped and resumed ends as one run (its class images generated once, the same in both runs)."""
    make = lambda name, **o: dreambooth_config(tmp_path, tiny_folders[1], name, lora_rank=2, **o)  # noqa: E731
    resumes_exactly(tmp_path, make, "lora/pytorch_lora_weights.safetensors")
    log = read_log(tmp_path / "a")
    assert len(log) == 4 and all(r["loss"] == pytest.approx(r["instance_loss"] + 0.5 * r["prior_loss"]) for r in log)
    for n in range(5):
        assert np.array_equal(pixels(tmp_path / "a-class" / f"class-{n:05d}.png"),
                              pixels(tmp_path / "b-class" / f"class-{n:05d}.png"))


def test_dreambooth_instance_images_from_a_plain_folder(tmp_path, tiny_folders):
    """With instance_prompt, data_dir is a plain folder of images (no metadata.jsonl; other files ignored) and
    every caption is the prompt; full fine-tuning without prior preservation exports a pipeline. Without
    instance_prompt, that folder is refused with the fix."""
    data = tmp_path / "subject"
    data.mkdir()
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (24, 20), colour).save(data / f"{i}.png")
    (data / "README.md").write_text("three photos")
    (data / "._0.png").write_bytes(b"macOS metadata")  # (hidden: left out)
    dataset = ImageFolderDataset(data, size=16, caption="a sks shape")
    assert [dataset.file_name(i) for i in range(3)] == ["0.png", "1.png", "2.png"]
    assert dataset.load(1)[1] == "a sks shape"
    result = train_text_to_image(dreambooth_config(tmp_path, tiny_folders[1], "plain", with_prior_preservation=False,
                                                   class_prompt=None, class_data_dir=None, dataset="folder",
                                                   data_dir=str(data), shapes={}))
    assert result.task.view[(0, 2)]["text"] == "a sks shape" and len(result.losses) == 3
    assert (tmp_path / "plain" / "pipeline" / "model_index.json").exists()
    with pytest.raises(FileNotFoundError, match="set instance_prompt"):
        ImageFolderDataset(data)
    (data / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BadSampleError, match="broken.png cannot be decoded"):
        ImageFolderDataset(data, caption="a sks shape")


def test_dreambooth_config_errors(tmp_path, tiny_folders):
    folder = tiny_folders[1]
    with pytest.raises(ValueError, match="needs pretrained"):
        smoke_config(tmp_path, instance_prompt="a sks shape", with_prior_preservation=True, class_prompt="a shape",
                     class_data_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="needs class_prompt"):
        dreambooth_config(tmp_path, folder, class_prompt=None)
    with pytest.raises(ValueError, match="class_prompt and class_data_dir are for DreamBooth's prior preservation"):
        dreambooth_config(tmp_path, folder, with_prior_preservation=False)
    with pytest.raises(ValueError, match="drop lcm_distill and cache_latents"):
        dreambooth_config(tmp_path, folder, cache_latents=True)
    with pytest.raises(ValueError, match="num_class_images must be a positive integer"):
        dreambooth_config(tmp_path, folder, num_class_images=0)
    with pytest.raises(ValueError, match="prior_loss_weight must be a number >= 0"):
        dreambooth_config(tmp_path, folder, prior_loss_weight=-1.0)
    with pytest.raises(ValueError, match="drop placeholder_token"):
        dreambooth_config(tmp_path, folder, placeholder_token="<x>", initializer_token="star", use_ema=False)
    with pytest.raises(ValueError, match="instance_prompt must be a caption"):
        dreambooth_config(tmp_path, folder, instance_prompt=" ")
    with pytest.raises(ValueError, match="prior_generation_precision.*choose one of"):
        dreambooth_config(tmp_path, folder, prior_generation_precision="fp8")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="class_data_dir .*file.png is a file: give a folder"):
        train_text_to_image(dreambooth_config(tmp_path, folder, class_data_dir=str(tmp_path / "file.png")))


def check_ddp_dreambooth(tmp_path, pretrained, out):
    """DreamBooth with prior preservation under DDP (test_two_processes_train_with_ddp_over_gloo): the processes
    share the class images' generation (the same images one process makes), then train to the same weights and
    losses."""
    from latentdiff.train.dreambooth import ensure_class_images
    from latentdiff.train.loop import make_accelerator

    read_ranks(out, ("unet", "ema", "losses"))
    config = dreambooth_config(tmp_path, pretrained, "single", class_data_dir=str(tmp_path / "single-class"))
    ensure_class_images(config, load_components(config), make_accelerator(config))
    generated = sorted(p.name for p in (out / "class").iterdir())
    assert generated == [f"class-{n:05d}.png" for n in range(5)]
    for name in generated:
        assert np.abs(pixels(out / "class" / name) - pixels(tmp_path / "single-class" / name)).max() <= 1


def test_half_mixed_precision_on_a_cpu_without_its_kernels_warns(monkeypatch):
    """bf16/fp16 autocast on a CPU without oneDNN's kernels for it (AVX2-only; forced here) runs PyTorch's slow
    fallbacks: make_accelerator says so and names the fix; with the kernels, on a GPU, or in fp32 it says nothing."""
    import warnings
    from types import SimpleNamespace

    from latentdiff.train.loop import warn_if_mixed_precision_is_slow

    def said(precision, device="cpu", supported=False):
        for name in ("_is_mkldnn_bf16_supported", "_is_mkldnn_fp16_supported"):
            monkeypatch.setattr(torch.ops.mkldnn, name, lambda: supported)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_if_mixed_precision_is_slow(SimpleNamespace(mixed_precision=precision, device=torch.device(device)))
        return [str(w.message) for w in caught]

    for precision in ("bf16", "fp16"):
        (message,) = said(precision)
        assert f"mixed_precision {precision} on a CPU without oneDNN" in message and "mixed_precision: no" in message
        assert said(precision, supported=True) == [] and said(precision, device="cuda") == []
    assert said("no") == []
