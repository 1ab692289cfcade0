"""LoRA adapters against diffusers + peft (the oracle): files written by diffusers' own save_lora_weights, kohya-ss
files built by hand (with alphas, conv layers, text-encoder MLPs), the older diffusers spellings; set_adapters,
call-time scales, fuse / unfuse / unload; and the errors."""
import warnings

import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.checkpoints import CheckpointError, save_safetensors
from latentdiff.lora import LoRAError

pytestmark = pytest.mark.usefixtures("one_thread")
peft = pytest.importorskip("peft")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def folders(tiny_folders):
    return tiny_folders


def reference(folder):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def ours(folder):
    return LatentDiffusionPipeline.from_pretrained(folder)


X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
CTX = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])


@torch.no_grad()
def unet_out(pipe, **kwargs):
    unet = pipe.unet
    out = unet(X, 500, CTX, return_dict=False, **kwargs)[0]
    return out


@torch.no_grad()
def text_out(pipe):
    return pipe.text_encoder(IDS)[0]


def close(a, b, tol=1e-4):
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


def saved_by_diffusers(folder, tmp_path, unet_rank=4, unet_alpha=8, text_rank=2, text_alpha=6, seed=0):
    """A LoRA written by diffusers' save_lora_weights (with its adapter metadata) in two files, U-Net and text
    encoder (`lora{seed}/pytorch_lora_weights.safetensors`) and U-Net only (`unet{seed}/...`: the peft here is too
    old for transformers' text-encoder adapters, through which diffusers loads those), and the diffusers pipeline
    running the adapters unmerged (the U-Net's added by diffusers, the text encoder's by peft)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = reference(folder)
    unet_config = LoraConfig(r=unet_rank, lora_alpha=unet_alpha, target_modules=UNET_TARGETS + ["proj_in", "conv1"],
                             init_lora_weights=False)
    text_config = LoraConfig(r=text_rank, lora_alpha=text_alpha, target_modules=TEXT_TARGETS + ["fc1"],
                             init_lora_weights=False)
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    unet_layers = get_peft_model_state_dict(pipe.unet)
    text_layers = get_peft_model_state_dict(pipe.text_encoder, adapter_name="default")
    pipe.save_lora_weights(tmp_path / f"lora{seed}", unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
                           unet_lora_adapter_metadata=unet_config.to_dict(),
                           text_encoder_lora_adapter_metadata=text_config.to_dict())
    pipe.save_lora_weights(tmp_path / f"unet{seed}", unet_lora_layers=unet_layers,
                           unet_lora_adapter_metadata=unet_config.to_dict())
    return tmp_path / f"lora{seed}", tmp_path / f"unet{seed}", pipe


def test_diffusers_file_matches_diffusers(folders, tmp_path):
    folder, _ = folders
    path, unet_only, ref = saved_by_diffusers(folder, tmp_path)
    pipe = ours(folder)
    plain_unet, plain_text = unet_out(pipe), text_out(pipe)
    pipe.load_lora_weights(path)
    assert pipe.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    close(unet_out(pipe), unet_out(ref))
    close(text_out(pipe), text_out(ref))
    assert (unet_out(pipe) - plain_unet).abs().max() > 1e-2  # the adapter does something
    assert (text_out(pipe) - plain_text).abs().max() > 1e-2
    # diffusers loading the file agrees too (the file read, not only the adapter written)
    other = reference(folder)
    other.load_lora_weights(unet_only)
    close(unet_out(pipe), unet_out(other))
    # unloading restores the weights bit for bit
    pipe.unload_lora_weights()
    assert torch.equal(unet_out(pipe), plain_unet) and torch.equal(text_out(pipe), plain_text)
    assert pipe.get_list_adapters() == {} and not hasattr(pipe.unet, "_lora")


def test_rank_stabilized_metadata(folders, tmp_path):
    """peft's use_rslora (scale alpha / sqrt(r)) read from diffusers' metadata."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder, _ = folders
    ref = reference(folder)
    config = LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=UNET_TARGETS, init_lora_weights=False)
    ref.unet.add_adapter(config)
    ref.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref.unet),
                          unet_lora_adapter_metadata=config.to_dict())
    pipe = ours(folder)
    pipe.load_lora_weights(tmp_path)
    close(unet_out(pipe), unet_out(ref))


def test_dora_file_matches_diffusers(folders, tmp_path):
    """A DoRA adapter (peft's use_dora: lora_magnitude_vector per layer, linear and conv layers) written by diffusers'
    save_lora_weights, at weight 1 and through set_adapters at 0.6 (which DoRA's norm sees), as diffusers runs it;
    unloading restores the weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder, _ = folders
    torch.manual_seed(3)
    ref = reference(folder)
    config = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=UNET_TARGETS + ["conv1"],
                        init_lora_weights=False)
    ref.unet.add_adapter(config)
    with torch.no_grad():  # magnitudes away from the weights' own norms, so that they matter
        for name, param in ref.unet.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand(param.shape))
    state = get_peft_model_state_dict(ref.unet)
    assert any("lora_magnitude_vector" in k for k in state)
    ref.save_lora_weights(tmp_path, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict())
    pipe = ours(folder)
    plain = unet_out(pipe)
    pipe.load_lora_weights(tmp_path)
    close(unet_out(pipe), unet_out(ref))
    assert (unet_out(pipe) - plain).abs().max() > 1e-2
    other = reference(folder)  # diffusers reading the file
    other.load_lora_weights(tmp_path, adapter_name="d")
    close(unet_out(pipe), unet_out(other))
    other.set_adapters("d", 0.6)
    pipe.set_adapters("default_0", 0.6)
    close(unet_out(pipe), unet_out(other))
    pipe.unload_lora_weights()
    assert torch.equal(unet_out(pipe), plain)
    with pytest.raises(LoRAError, match="4 values for its 32 output channels"):
        pipe.load_lora_weights({**{k: v for k, v in state.items() if "magnitude" not in k},
                                **{f"unet.{k}": v[:4] for k, v in state.items() if "magnitude" in k}})


def test_pipeline_images_and_call_scale_match_diffusers(folders, tmp_path):
    folder, _ = folders
    path, _, ref = saved_by_diffusers(folder, tmp_path)
    pipe = ours(folder)
    pipe.load_lora_weights(path)
    for kwargs in (None, {"scale": 0.4}):
        args = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", cross_attention_kwargs=kwargs)
        a = ref("a red circle", generator=torch.Generator().manual_seed(0), **args).images
        b = pipe("a red circle", generator=torch.Generator().manual_seed(0), progress=False, **args).images
        close(torch.from_numpy(a), torch.from_numpy(b), 2e-4)
    # the call's scale is undone afterwards; the U-Net takes it per call too
    close(unet_out(pipe), unet_out(ref))
    close(unet_out(pipe, cross_attention_kwargs={"scale": 0.3}), unet_out(ref, cross_attention_kwargs={"scale": 0.3}))
    close(unet_out(pipe), unet_out(ref))
    embeds = [p.encode_prompt("a red circle", "cpu", 1, False, lora_scale=0.5)[0] for p in (ref, pipe)]
    close(*embeds)
    close(text_out(pipe), text_out(ref))


def kohya_state(pipe, seed=0, rank=3, mixed_alphas=False):
    """kohya-ss / A1111 keys over the attention layers, a 1x1 conv (proj_in), a 3x3 conv (LoCon), a feed-forward
    layer and the text encoder's attention and MLP; alpha 1 in the U-Net (or alphas that differ between its
    layers), 2 * rank in the text encoder."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    unet_layers = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                   "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                   "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",
                   "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
                   "down_blocks.0.attentions.1.proj_in", "down_blocks.1.resnets.0.conv1"]
    text_layers = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.out_proj",
                   "text_model.encoder.layers.1.mlp.fc1"]
    for prefix, model, layers in (("lora_unet_", pipe.unet, unet_layers), ("lora_te_", pipe.text_encoder,
                                                                         text_layers)):
        for i, path in enumerate(layers):
            weight = model.get_submodule(path).weight
            name = prefix + path.replace(".", "_")
            kernel = weight.shape[2:]
            state[f"{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], *kernel, generator=g) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], rank, *([1] * len(kernel)),
                                                          generator=g) * 0.3
            state[f"{name}.alpha"] = torch.tensor(float(
                2 * rank if prefix == "lora_te_" else 1 + i % 3 if mixed_alphas else 1))
    return state


def peft_text_encoder(text_encoder, state, rank=3, alpha=6.0):
    """The reference text encoder with peft LoRA layers holding the lora_te_ factors of `state` (uniform alpha)."""
    from peft import LoraConfig, inject_adapter_in_model

    layers = {k[len("lora_te_"):-len(".lora_down.weight")]: k[:-len(".lora_down.weight")] for k in state
              if k.startswith("lora_te_") and k.endswith(".lora_down.weight")}
    paths = {path.replace(".", "_").removeprefix("text_model_"): path for path, _ in text_encoder.named_modules()}
    targets = {paths[flat.removeprefix("text_model_")]: name for flat, name in layers.items()}
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)), text_encoder)
    with torch.no_grad():
        for path, name in targets.items():
            layer = text_encoder.get_submodule(path)
            layer.lora_A["default"].weight.copy_(state[f"{name}.lora_down.weight"])
            layer.lora_B["default"].weight.copy_(state[f"{name}.lora_up.weight"])
    return text_encoder


def test_kohya_file_matches_diffusers(folders, tmp_path):
    folder, _ = folders
    ref, pipe = reference(folder), ours(folder)
    state = kohya_state(pipe)
    path = tmp_path / "kohya.safetensors"
    save_safetensors(state, path)
    ref.load_lora_weights({k: v.clone() for k, v in state.items() if k.startswith("lora_unet_")})
    peft_text_encoder(ref.text_encoder, state)
    pipe.load_lora_weights(path)
    assert len(pipe.unet._lora.layers["default_0"]) == 6 and len(pipe.text_encoder._lora.layers["default_0"]) == 3
    close(unet_out(pipe), unet_out(ref))
    close(text_out(pipe), text_out(ref))


def test_kohya_alphas_per_layer(folders):
    """Each layer's own alpha scales it (kohya's alpha / rank): the same as a file whose up matrices carry that
    scale and whose alphas all equal the rank, as diffusers loads it. (diffusers itself drops the alphas of
    attention layers that differ from the most common one: its alpha_pattern keeps their processor names, which
    match no layer.)"""
    folder, _ = folders
    ref, pipe = reference(folder), ours(folder)
    state = kohya_state(pipe, mixed_alphas=True)
    state = {k: v for k, v in state.items() if k.startswith("lora_unet_")}
    baked = dict(state)
    for key in state:
        if key.endswith(".alpha"):
            name = key[: -len(".alpha")]
            baked[f"{name}.lora_up.weight"] = state[f"{name}.lora_up.weight"] * state[key] / 3
            baked[key] = torch.tensor(3.0)
    assert len({float(v) for k, v in state.items() if k.endswith(".alpha")}) == 3
    ref.load_lora_weights(baked)
    pipe.load_lora_weights(state)
    close(unet_out(pipe), unet_out(ref))


def test_kohya_original_ldm_names_and_old_diffusers_spellings(folders, tmp_path):
    """The same layers named as the LDM U-Net names them (input_blocks_1_1_...), and diffusers' pre-peft
    spellings (attn1.processor.to_q_lora.down.weight, .lora.down.weight, text encoder to_q_lora), give the same
    weights as the canonical names."""
    folder, _ = folders
    canonical, renamed = ours(folder), ours(folder)
    g = torch.Generator().manual_seed(3)
    weights = {}
    for key, path in (("input_blocks_1_1_proj_in", "down_blocks.0.attentions.0.proj_in"),
                      ("output_blocks_5_1_transformer_blocks_0_attn2_to_v",
                       "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v")):
        w = canonical.unet.get_submodule(path).weight
        down, up = torch.randn(2, w.shape[1], *w.shape[2:], generator=g), torch.randn(w.shape[0], 2, *w.shape[2:],
                                                                                       generator=g)
        weights[key] = (path, down, up)
    canonical.load_lora_weights({f"lora_unet_{p.replace('.', '_')}.{r}.weight": t for _, (p, d, u) in weights.items()
                                 for r, t in (("lora_down", d), ("lora_up", u))})
    renamed.load_lora_weights({f"lora_unet_{k}.{r}.weight": t for k, (_, d, u) in weights.items()
                               for r, t in (("lora_down", d), ("lora_up", u))})
    assert torch.equal(unet_out(canonical), unet_out(renamed))

    path, _, _ = saved_by_diffusers(folder, tmp_path)
    from safetensors.torch import load_file

    peft_state = load_file(path / "pytorch_lora_weights.safetensors")
    peft_state = {k: v for k, v in peft_state.items() if "proj_in" not in k and "conv1" not in k and "fc1" not in k}
    new, old = ours(folder), ours(folder)
    new.load_lora_weights(peft_state)
    spelled = {}
    for key, value in peft_state.items():
        key = key.replace("lora_A", "lora.down").replace("lora_B", "lora.up")
        if key.startswith("text_encoder."):
            for proj, name in (("q_proj", "to_q_lora"), ("k_proj", "to_k_lora"), ("v_proj", "to_v_lora"),
                               ("out_proj", "to_out_lora")):
                key = key.replace(f"{proj}.lora.", f"{name}.")
        elif "attn1.to_q" in key:
            key = key.replace("attn1.to_q.lora.", "attn1.processor.to_q_lora.")
        spelled[key] = value
    old.load_lora_weights(spelled)
    assert torch.equal(unet_out(new), unet_out(old)) and torch.equal(text_out(new), text_out(old))


def test_adapters_weights_fuse_unfuse_match_diffusers(folders, tmp_path):
    folder, _ = folders
    path_a, unet_a, ref_a = saved_by_diffusers(folder, tmp_path, seed=1)
    _, unet_b, _ = saved_by_diffusers(folder, tmp_path, unet_rank=2, unet_alpha=2, seed=2)
    ref, pipe = reference(folder), ours(folder)
    plain = unet_out(pipe)
    for p in (ref, pipe):
        p.load_lora_weights(unet_a, adapter_name="a")
        p.load_lora_weights(unet_b, adapter_name="b")
    assert pipe.get_active_adapters() == ref.get_active_adapters() == ["b"]  # the newest only, as diffusers
    close(unet_out(pipe), unet_out(ref))
    for p in (ref, pipe):
        p.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])
    close(unet_out(pipe), unet_out(ref))
    for p in (ref, pipe):
        p.disable_lora()
    close(unet_out(pipe), plain, 1e-6)
    for p in (ref, pipe):
        p.enable_lora()
        p.fuse_lora(lora_scale=0.7)
    close(unet_out(pipe), unet_out(ref))
    fused = unet_out(pipe)
    close(unet_out(pipe, cross_attention_kwargs={"scale": 0.2}), fused, 1e-6)  # a fused LoRA ignores call scales
    for p in (ref, pipe):
        p.unload_lora_weights()  # keeps what is fused
    close(unet_out(pipe), unet_out(ref))
    close(unet_out(pipe), fused, 1e-5)

    pipe, ref = ours(folder), reference(folder)
    for p in (ref, pipe):
        p.load_lora_weights(unet_a, adapter_name="a")
        p.fuse_lora()
        p.unfuse_lora()
    close(unet_out(pipe), unet_out(ref))
    pipe.delete_adapters("a")
    assert torch.equal(unet_out(pipe), plain) and pipe.get_list_adapters() == {}

    # per-component weights: the text encoder's adapter at 0.3 is peft's layers scaled by 0.3
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = ours(folder)
    pipe.load_lora_weights(path_a, adapter_name="a")
    pipe.set_adapters("a", {"unet": 1.0, "text_encoder": 0.3})
    for module in ref_a.text_encoder.modules():
        if isinstance(module, BaseTunerLayer):
            module.scale_layer(0.3)
    close(text_out(pipe), text_out(ref_a))
    close(unet_out(pipe), unet_out(ref_a))


def test_cast_after_loading(folders, tmp_path):
    """A pipeline cast after loading (its weight tensors replaced) unloads to its own weights in the new dtype."""
    folder, _ = folders
    path, _, _ = saved_by_diffusers(folder, tmp_path)
    pipe, plain = ours(folder), ours(folder).to(torch.bfloat16)
    pipe.load_lora_weights(path)
    pipe.to(torch.bfloat16)
    pipe.set_adapters("default_0", 0.5)
    pipe.unload_lora_weights()
    for a, b in zip(pipe.unet.parameters(), plain.unet.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_unfuse_returns_to_the_state_before_fusing(folders, tmp_path):
    """diffusers' unfuse_lora leaves fuse_lora's lora_scale in the adapters' scaling (afterwards they run
    lora_scale times); ours returns to where it was."""
    folder, _ = folders
    path, _, _ = saved_by_diffusers(folder, tmp_path)
    pipe = ours(folder)
    pipe.load_lora_weights(path)
    before = unet_out(pipe)
    pipe.fuse_lora(lora_scale=0.5)
    assert (unet_out(pipe) - before).abs().max() > 1e-3
    pipe.unfuse_lora()
    close(unet_out(pipe), before, 1e-6)


def test_lora_with_compile_cache_and_from_pipe(folders, tmp_path):
    """What is derived from the weights follows the adapters: the prompt-embedding cache, fused projections; a
    pipeline made with from_pipe shares the adapters with its source."""
    folder, _ = folders
    path, _, _ = saved_by_diffusers(folder, tmp_path)
    pipe = ours(folder)
    pipe.unet.fuse_qkv_projections()
    plain = pipe.embed_prompts(["a red circle"])
    plain_unet = unet_out(pipe)
    pipe.load_lora_weights(path)
    assert (pipe.embed_prompts(["a red circle"]) - plain).abs().max() > 1e-3
    with torch.no_grad():
        assert (pipe.unet(X, 500, CTX) - plain_unet).abs().max() > 1e-3
    other = LatentDiffusionPipeline.from_pipe(pipe)
    assert other.get_list_adapters() == pipe.get_list_adapters()
    other.unload_lora_weights()
    close(pipe.embed_prompts(["a red circle"]), plain, 0)
    with torch.no_grad():
        close(pipe.unet(X, 500, CTX), plain_unet, 0)


def attention_lora(pipe) -> dict[str, torch.Tensor]:
    """A random rank-2 LoRA of some of the U-Net's attention projections, as a state dict."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for path, layer in pipe.unet.named_modules():
        if path.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_q")):
            state[f"unet.{path}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g)
            state[f"unet.{path}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g)
    return state


def two_steps(pipe) -> torch.Tensor:
    return pipe("a red circle", num_inference_steps=2, output_type="pt", progress=False,
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow  # (two torch.compile graphs of ~30 s each on a 2-core CPU; make test-slow)
def test_compiled_unet_follows_the_adapters(folders):
    """A compiled U-Net freezes its weights into the graph: a LoRA change compiles it again (dynamo's cache would
    otherwise hand back the old graph), and it gives the eager images with the LoRA."""
    folder, _ = folders
    pipe = ours(folder)
    pipe.load_lora_weights(attention_lora(pipe))
    pipe.set_adapters("default_0", 0.0)
    plain = two_steps(pipe)
    pipe.compile(max_autotune=False)
    close(two_steps(pipe), plain, 1e-4)
    pipe.set_adapters("default_0", 0.5)
    compiled = two_steps(pipe)
    pipe.disable_compile()
    eager = two_steps(pipe)
    assert (eager - plain).abs().max() > 1e-2
    close(compiled, eager, 1e-4)


@pytest.mark.slow  # (two AOTInductor compiles of ~100 s each on a 2-core CPU; make test-slow)
def test_compile_cache_keeps_a_package_per_adapter_setting(folders, tmp_path):
    """compile(cache_dir=): a LoRA scale gets a package of its own, with the eager images of that scale; back to an
    earlier scale, its package is loaded again, not compiled."""
    folder, _ = folders
    pipe = ours(folder)
    pipe.load_lora_weights(attention_lora(pipe))
    eager = {}
    for scale in (0.0, 0.5):
        pipe.set_adapters("default_0", scale)
        eager[scale] = two_steps(pipe)
    assert (eager[0.5] - eager[0.0]).abs().max() > 1e-2
    pipe.compile(max_autotune=False, cache_dir=tmp_path / "compiled")
    for scale, compiled, loaded in [(0.0, 1, 0), (0.5, 1, 0), (0.0, 0, 1), (0.5, 0, 1)]:
        pipe.set_adapters("default_0", scale)
        close(two_steps(pipe), eager[scale], 1e-4)
        model = pipe._compiled[1]
        assert (len(model.compiled_packages), len(model.loaded_packages)) == (compiled, loaded), scale
    assert len(list((tmp_path / "compiled").glob("*.pt2"))) == 2


def test_errors(folders, tmp_path):
    folder, _ = folders
    pipe = ours(folder)
    unet_layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w = pipe.unet.get_submodule(unet_layer).weight
    good = {f"unet.{unet_layer}.lora_A.weight": torch.randn(2, w.shape[1]),
            f"unet.{unet_layer}.lora_B.weight": torch.randn(w.shape[0], 2)}
    with pytest.raises(FileNotFoundError, match="LoRA file or folder"):
        pipe.load_lora_weights(tmp_path / "missing.safetensors")
    (tmp_path / "lora.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle|safetensors"):
        pipe.load_lora_weights(tmp_path / "lora.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no pytorch_lora_weights.safetensors"):
        pipe.load_lora_weights(tmp_path / "empty")
    with pytest.raises(LoRAError, match="SDXL"):
        pipe.load_lora_weights({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": w})
    with pytest.raises(LoRAError, match="another model"):
        pipe.load_lora_weights({k: torch.randn(v.shape[0] + 1, v.shape[1]) if "lora_B" in k else v
                                for k, v in good.items()})
    with pytest.raises(LoRAError, match="incomplete"):
        pipe.load_lora_weights({k: v for k, v in good.items() if "lora_A" in k})
    with pytest.raises(LoRAError, match="names no layer"):
        pipe.load_lora_weights({"unet.transformer_blocks.0.attn.to_q.lora_A.weight": w})
    with pytest.raises(LoRAError, match="kohya-ss / LyCORIS form"):
        pipe.load_lora_weights({f"lora_unet_{unet_layer.replace('.', '_')}.dora_scale": w})
    with pytest.raises(LoRAError, match="LyCORIS"):
        pipe.load_lora_weights({f"lora_unet_{unet_layer.replace('.', '_')}.hada_w1_a": w})
    assert pipe.get_list_adapters() == {}  # nothing half-loaded
    pipe.load_lora_weights(good, adapter_name="x")
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(good, adapter_name="x")
    with pytest.raises(ValueError, match=r"\['y'\] are not loaded"):
        pipe.set_adapters(["x", "y"])
    with pytest.raises(ValueError, match="only 'scale' .* and 'ip_adapter_masks'"):
        pipe("a", num_inference_steps=1, cross_attention_kwargs={"foo": 1}, progress=False)
    layer = pipe.unet.get_submodule(unet_layer)
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer step, say: recomputing the weight would undo it
    with pytest.raises(LoRAError, match="changed in place since LoRA adapters were merged"):
        pipe.set_adapters("x", 0.5)
    with torch.no_grad():
        layer.weight.sub_(1.0)
    pipe.optimize_for_inference()
    with pytest.raises(LoRAError, match="before optimize_for_inference"):
        pipe.set_adapters("x", 0.5)
    fresh = ours(folder).optimize_for_inference()
    with pytest.raises(LoRAError, match="before optimize_for_inference"):
        fresh.load_lora_weights(good)
