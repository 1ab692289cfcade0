"""Full-size Stable Diffusion 1.5, marked slow (`make test-slow`, a few minutes): the whole text-to-image pipeline
with the real architecture (U-Net 859M, VAE 84M, CLIP ViT-L/14 text model 123M parameters) and random weights
against diffusers' StableDiffusionPipeline running transformers' CLIPTextModel over the very same tensors.
The default suite checks each full-size model alone at small inputs (test_unet, test_vae) and every part of the
pipeline on tiny models."""
from __future__ import annotations

import copy

import pytest
import torch
from test_unet import gaussian_weights

from latentdiff import LatentDiffusionPipeline
from latentdiff.layout import SD15_CONFIG
from latentdiff.models import amx, fma, packed
from latentdiff.models.attention import Attention
from latentdiff.models.text import CLIPTextModel, CLIPTokenizer, text_config_sd15
from latentdiff.models.unet import UNet2DConditionModel, UNetConfig
from latentdiff.models.vae import AutoencoderKL, VAEConfig
from latentdiff.pipeline import to_diffusers
from latentdiff.schedulers import DPMSolverMultistepScheduler

pytestmark = pytest.mark.slow

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
PROMPTS = ["a photograph of an astronaut riding a horse on the moon", ""]


@pytest.fixture(scope="module")
def pipelines():
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(UNetConfig.sd15()), AutoencoderKL(VAEConfig.sd15())
        text_encoder = CLIPTextModel(text_config_sd15())
    unet, vae, text_encoder = (gaussian_weights(m.to_empty(device="cpu"), seed).eval()
                               for seed, m in enumerate((unet, vae, text_encoder)))
    ours = LatentDiffusionPipeline(CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer"), text_encoder, unet, vae,
                                   DPMSolverMultistepScheduler(**SCHEDULER))
    return ours, to_diffusers(ours)


@torch.no_grad()
def test_sd15_text_model_matches_transformers(pipelines):
    ours, ref = pipelines
    ids = ours.tokenizer(PROMPTS)
    mine, theirs = ours.text_encoder(ids), ref.text_encoder(ids)
    scale = theirs.last_hidden_state.abs().max()
    assert scale > 0.1
    assert (mine.last_hidden_state - theirs.last_hidden_state).abs().max() <= 1e-5 * scale
    assert (mine.pooler_output - theirs.pooler_output).abs().max() <= 1e-5 * scale


@torch.no_grad()
def test_sd15_pipeline_matches_diffusers(pipelines):
    """256x256 (32x32 latents), 2 DPM-Solver++ steps, guidance 7.5, the same initial latents."""
    ours, ref = pipelines
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=256, width=256, num_inference_steps=2, guidance_scale=7.5, latents=latents,
                  output_type="pt")
    expected = ref(PROMPTS[0], **kwargs).images
    got = ours(PROMPTS[0], progress=False, **kwargs).images
    assert got.shape == expected.shape == (1, 3, 256, 256)
    assert expected.std() > 0.05  # not a flat image
    assert (got - expected).abs().max() <= 1e-3  # observed 1.1e-5; another prompt: 0.31


@torch.no_grad()
def test_sd15_unet_optimized_in_bf16_errs_no_more_than_diffusers_in_bf16(pipelines):
    """SD 1.5's U-Net at 512x512 (64x64 latents, a guided batch of 2) in bfloat16: ours after
    optimize_for_inference() (packed layers, fused epilogues, phase-filter upsamplers and our attention kernel: the
    AMX or AVX512-BF16 one, or on an AVX2-only CPU the AVX2 one in float32) is as close to the float32 result as
    diffusers' bf16 U-Net is. On a CPU where oneDNN has no bf16 kernels (AVX2 only), diffusers' U-Net runs in
    channels-last, where PyTorch's fallback convolutions take ~1.5 minutes a forward (in NCHW about half an hour)."""
    ours, ref = pipelines
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500, 500])
    exact = ref.unet(sample, t, context).sample
    theirs = copy.deepcopy(ref.unet).to(torch.bfloat16)
    if not packed.half_supported(torch.bfloat16):
        theirs.to(memory_format=torch.channels_last)
    theirs = theirs(sample.bfloat16(), t, context.bfloat16()).sample.float()
    fast = copy.deepcopy(ours.unet).to(torch.bfloat16).optimize_for_inference()
    layers = [m for m in fast.modules() if isinstance(m, Attention)]
    if amx.runs_attention(torch.bfloat16):
        assert all(m.attend is amx.attention for m in layers)
    elif fma.available():
        assert all(m.attend is fma.attention for m in layers)
    mine = fast(sample.bfloat16(), t, context.bfloat16()).float()
    errors = {name: ((y - exact).abs().mean().item(), (y - exact).abs().max().item())
              for name, y in (("ours", mine), ("diffusers", theirs))}
    assert exact.abs().mean() > 0.1
    assert errors["ours"][0] <= 1.2 * errors["diffusers"][0], errors  # mean absolute error
    assert errors["ours"][1] <= 1.5 * errors["diffusers"][1], errors  # largest error


@torch.no_grad()
def test_sd15_unet_optimized_in_fp32_errs_no_more_with_the_amx_attention(pipelines):
    """SD 1.5's U-Net at 512x512 in float32 after optimize_for_inference(): with our AMX attention kernel (on a CPU
    with AMX; the AVX2 one on a CPU with AVX2 but no AVX-512; elsewhere both runs are PyTorch's) it is as close to
    diffusers' float32 U-Net as with PyTorch's attention kernel, and both within float32 rounding."""
    ours, ref = pipelines
    g = torch.Generator().manual_seed(1)
    sample, context = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([300, 300])
    exact = ref.unet(sample, t, context).sample
    fast = copy.deepcopy(ours.unet).optimize_for_inference()
    layers = [m for m in fast.modules() if isinstance(m, Attention)]
    if amx.available():
        assert all(m.attend is amx.attention for m in layers)
    elif fma.available():  # (a CPU with AVX2 but no AVX-512: our AVX2 kernel)
        assert all(m.attend is fma.attention for m in layers)
    mine = fast(sample, t, context)
    for layer in layers:
        layer.__dict__.pop("attend", None)  # back to F.scaled_dot_product_attention
    pytorchs = fast(sample, t, context)
    error, their_error = ((y - exact).abs().max().item() for y in (mine, pytorchs))
    assert exact.abs().mean() > 0.1
    assert error <= 1.25 * their_error and error <= 1e-4 * exact.abs().max(), (error, their_error)


@torch.no_grad()
def test_sd15_vae_decode_optimized_in_fp32_matches_diffusers(pipelines):
    """SD's VAE decoding 64x64 latents (512x512) in float32 after pack_for_inference(): Winograd 3x3 convs, the
    upsamplers' convs by Winograd on the upsampled map (on CPUs where the compiled transforms build) and the compiled
    GroupNorm, within float32 rounding of diffusers' decoder."""
    from latentdiff.models.packed import WinogradUpsampleConv, pack_for_inference
    from latentdiff.models.winograd import transforms

    ours, ref = pipelines
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    exact = ref.vae.decode(latents).sample
    fast = pack_for_inference(copy.deepcopy(ours.vae))
    if transforms() is not None:
        assert sum(type(m) is WinogradUpsampleConv for m in fast.modules()) == 3
    got = fast.decode(latents)
    got = getattr(got, "sample", got)
    assert got.shape == exact.shape == (1, 3, 512, 512) and exact.std() > 0.05
    error = (got - exact).abs().max()
    assert error <= 1e-4 * exact.abs().max(), (error, exact.abs().max())  # observed 1.8e-5 of 4.0


@torch.no_grad()
def test_sd15_controlnet_pipeline_matches_diffusers(pipelines):
    """A full-size SD 1.5 ControlNet (random weights) in our ControlNet pipeline against diffusers'
    StableDiffusionControlNetPipeline over the same tensors: 256x256, 2 steps, guidance 7.5, the same latents."""
    import diffusers

    from latentdiff import ControlNetModel, LatentDiffusionControlNetPipeline
    from latentdiff.models.controlnet import ControlNetConfig

    ours, ref = pipelines
    with torch.device("meta"):
        net = ControlNetModel(ControlNetConfig.from_unet(UNetConfig.sd15()))
    net = gaussian_weights(net.to_empty(device="cpu"), 7).eval()
    with torch.device("meta"):
        ref_net = diffusers.ControlNetModel(**{k: v for k, v in net.config.to_dict().items() if k[0] != "_"})
    ref_net.load_state_dict(net.state_dict(), assign=True)
    controlled = LatentDiffusionControlNetPipeline.from_pipe(ours, controlnet=net)
    controlled_ref = diffusers.StableDiffusionControlNetPipeline(
        **{k: v for k, v in ref.components.items() if k != "image_encoder"}, controlnet=ref_net.eval())
    controlled_ref.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    control = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    kwargs = dict(image=control, num_inference_steps=2, guidance_scale=7.5, latents=latents, output_type="pt",
                  controlnet_conditioning_scale=0.8)
    got = controlled(PROMPTS[0], progress=False, **kwargs).images
    expected = controlled_ref(PROMPTS[0], **kwargs).images
    assert expected.std() > 0.05  # not a flat image
    assert (got - expected).abs().max() <= 1e-3  # observed 5.2e-6


def test_sd21_single_file_reads_as_diffusers_reads_it(tmp_path):
    """A full-size SD 2.1 single file (random weights, fp16) as published: OpenCLIP's text tower with all 24 blocks
    and its contrastive head. diffusers' from_single_file (with pipelines/sd-v2-1 as its config) and ours (without
    config=, SD 2.x found in the file) read the same weights, and encode a prompt alike (23 blocks: the penultimate
    block's output)."""
    import diffusers
    from safetensors.torch import save_file

    from latentdiff.convert import diffusers_to_original
    from latentdiff.layout import SD21_CONFIG
    from latentdiff.models.text import text_config_sd2

    deeper = text_config_sd2()
    deeper.num_hidden_layers = 24
    with torch.device("meta"):
        unet, vae, text = UNet2DConditionModel(UNetConfig.sd2()), AutoencoderKL(VAEConfig.sd15()), CLIPTextModel(deeper)
    parts = [gaussian_weights(m.to_empty(device="cpu"), seed).half().state_dict()
             for seed, m in enumerate((unet, vae, text))]
    del unet, vae, text
    original = diffusers_to_original(*parts, openclip=True)
    original.update({"cond_stage_model.model.text_projection": torch.randn(1024, 1024).half(),
                     "cond_stage_model.model.logit_scale": torch.tensor(4.6052)})
    save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "sd21.safetensors")
    del original
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        str(tmp_path / "sd21.safetensors"), config=str(SD21_CONFIG), local_files_only=True, torch_dtype=torch.float16)
    with pytest.warns(UserWarning, match="768 px v-prediction"):
        ours = LatentDiffusionPipeline.from_single_file(tmp_path / "sd21.safetensors", torch_dtype=torch.float16)
    expected = dict(zip(("unet", "vae", "text_encoder"), parts))
    expected["text_encoder"] = {k: v for k, v in expected["text_encoder"].items() if ".layers.23." not in k}
    for name, sd in expected.items():
        for pipe in (ours, theirs):
            got = {k.removeprefix("text_model."): v for k, v in getattr(pipe, name).state_dict().items()}
            want = {k.removeprefix("text_model."): v for k, v in sd.items()}
            got.pop("embeddings.position_ids", None), want.pop("embeddings.position_ids", None)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (name, type(pipe))
    assert ours.scheduler.config.prediction_type == theirs.scheduler.config.prediction_type == "v_prediction"
    assert ours.unet.config.sample_size == theirs.unet.config.sample_size == 96
    ids = ours.tokenizer(PROMPTS)
    with torch.no_grad():
        mine = ours.text_encoder.float()(ids).last_hidden_state
        reference = theirs.text_encoder.float()(ids).last_hidden_state
    assert (mine - reference).abs().max() <= 1e-5 * reference.abs().max()


@torch.no_grad()
def test_x4_upscaler_unet_matches_diffusers():
    """The structure of stabilityai/stable-diffusion-x4-upscaler's U-Net (7 input channels, 1000 noise-level
    classes, cross-attention-only stages; random weights) against diffusers' with the same tensors, at a 32x32
    input with guidance's two contexts."""
    import diffusers

    config = dict(block_out_channels=(256, 512, 512, 1024), layers_per_block=2, in_channels=7, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=1024, attention_head_dim=8, num_class_embeds=1000,
                  only_cross_attention=(True, True, True, False), use_linear_projection=True, sample_size=128)
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig(**config))
        ref = diffusers.UNet2DConditionModel(**config)
    ours = gaussian_weights(ours.to_empty(device="cpu"), 3).eval()
    ref.load_state_dict(ours.state_dict(), assign=True)
    ref.eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 7, 32, 32, generator=g), torch.randn(2, 77, 1024, generator=g)
    expected = ref(torch.cat([x, x]), 500, ctx, class_labels=torch.tensor([20, 20])).sample
    got = ours(x, 500, ctx, class_labels=torch.tensor([20]))
    assert expected.std() > 0.1
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
