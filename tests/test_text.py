"""The text side: our CLIP tokenizer against transformers and open_clip, and the CLIP text encoder's I/O + clip-skip.

Oracles: transformers' CLIPTokenizer loaded from the folder our tokenizer writes, open_clip.tokenize, and
transformers' CLIPTextModel with random weights (no hub, no network).
"""
import copy
import itertools
import dataclasses
import json
import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from latentdiff.checkpoints import CheckpointError, save_safetensors
from latentdiff.models.text import (
    CLIPTextModel,
    CLIPTokenizer,
    _core,
    build_text_encoder,
    build_text_encoder_from_folder,
    encode_prompt_ids,
    load_text_encoder,
    load_text_encoder_state_dict,
    save_text_encoder,
    text_config_sd15,
    text_config_tiny,
    text_encoder_state_dict,
)
from latentdiff.models.tokenizer import clean_open_clip

SPECIAL_STRINGS = ("<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>")


def read_corpus() -> list[str]:
    """tests/prompts_corpus.txt: '#' lines are comments, lines starting with '"' are JSON strings."""
    lines = (Path(__file__).parent / "prompts_corpus.txt").read_text(encoding="utf-8").split("\n")
    return [json.loads(line) if line.startswith('"') else line for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def corpus():
    return read_corpus()


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def hf_folder(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_tok(hf_folder):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    return HFCLIPTokenizer.from_pretrained(hf_folder)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    from open_clip import tokenizer

    return tokenizer


def hf_ids(hf_tok, prompts):
    return hf_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def quiet(tokenizer, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tokenizer(prompts)


# ---- tokenizer ----------------------------------------------------------------------------------------------


def test_corpus_covers_what_the_brief_asks(corpus, tok):
    assert len(corpus) >= 200 and "" in corpus
    assert sum(len(tok.encode(p)) > 75 for p in corpus) >= 5  # over-long prompts are truncated
    for needle in ("&amp;", "東京", "🐱", "é", "\t", "\u3000", "ΣΑΣ", "’"):
        assert any(needle in p for p in corpus), needle


def test_known_ids_and_layout(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (49406, 49407, 49407, 77)
    assert len(tok.encoder) == 49408
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]  # ids of the published CLIP vocabulary
    ids = tok(["a photo of a cat", ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and (ids[0, 7:] == 49407).all()
    assert ids[1, 0] == 49406 and (ids[1, 1:] == 49407).all()
    assert torch.equal(tok("a photo of a cat")[0], ids[0])


def test_matches_transformers_on_corpus(corpus, tok, hf_tok):
    """Every prompt, padded and truncated as diffusers asks transformers to, gives the same 77 ids."""
    ours, ref = quiet(tok, corpus), hf_ids(hf_tok, corpus)
    mismatched = [p for p, a, b in zip(corpus, ours, ref) if not torch.equal(a, b)]
    assert not mismatched, mismatched
    for prompt in corpus:  # untruncated content ids too
        assert tok.encode(prompt) == hf_tok(prompt, add_special_tokens=False).input_ids, prompt


def test_matches_open_clip_on_corpus(corpus, open_clip_tokenizer):
    """normalization="open_clip" with "!" (id 0) padding reproduces open_clip.tokenize exactly, truncation
    included (open_clip pads with zeros and keeps the end token when it cuts)."""
    ours = quiet(CLIPTokenizer(normalization="open_clip", pad_token="!"), corpus)
    ref = open_clip_tokenizer.tokenize(corpus)
    mismatched = [p for p, a, b in zip(corpus, ours, ref) if not torch.equal(a, b)]
    assert not mismatched, mismatched


def test_transformers_and_open_clip_differ_only_by_cleaning(corpus, tok, open_clip_tokenizer):
    """Where the two references disagree, and why; we follow transformers by default.

    open_clip (OpenAI's CLIP code) cleans text with ftfy.fix_text (mojibake, curly quotes, full-width forms,
    ligatures), unescapes HTML twice, and splits whitespace with str.split (which also counts \\x1c-\\x1f, \\x0b,
    \\x0c, \\x85 as spaces); str.lower() turns a word-final "Σ" into "ς". transformers' CLIPTokenizer (the only one
    transformers 5 has) only applies NFC, \\s+ -> " " and a per-character lower case. Each also treats a different
    literal as a control token inside a prompt: transformers "<|endoftext|>", open_clip "<end_of_text>".
    We follow transformers by default because diffusers' StableDiffusionPipeline tokenizes with it, so the same
    prompt gives the same ids and the same image in both, and because the folder we save reproduces it when
    transformers loads it; normalization="open_clip" is there for the OpenAI behaviour (test above).
    """
    reference = open_clip_tokenizer._tokenizer
    differ = [p for p in corpus if tok.encode(p) != reference.encode(p)]
    expected = {"fish &amp; chips", "it’s a dog’s life", "ﬁsh ﬂower ﬀ ligatures", "ΟΔΟΣ ΣΑΣ and ΣΟΦΟΣ ΛΟΓΟΣ"}
    assert expected <= set(differ)
    for prompt in differ:
        if any(s in prompt for s in SPECIAL_STRINGS):
            continue
        # the cleaning alone explains the difference: clean as open_clip does, then tokenize as transformers does
        assert tok.encode(clean_open_clip(prompt)) == reference.encode(prompt), prompt
    assert len(differ) < len(corpus) // 4  # ordinary prompts agree


def test_overlong_prompt_warns_with_the_dropped_text(tok):
    words = " ".join(["cat"] * 75)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 75 tokens fit exactly: no warning
        ids = tok(words)
    assert ids[0, 75] == tok.encoder["cat</w>"] and ids[0, 76] == tok.eos_token_id
    with pytest.warns(UserWarning, match=r"truncated.*77 tokens.*\['zebra giraffe'\]"):
        ids = tok([words + " zebra giraffe", "a dog"])
    assert ids[0, 76] == tok.eos_token_id and ids[0, 75] == tok.encoder["cat</w>"]
    assert ids[1, :4].tolist() == [49406, 320, 1929, 49407]


def test_transformers_call_conventions(tok, hf_tok):
    """Called with transformers' arguments (as diffusers' code calls its tokenizer), the same input_ids and
    attention_mask as transformers' CLIPTokenizer, in the same containers, over its padding / truncation /
    max_length rules; prompts that cannot stack into one tensor are an error in both."""
    prompts = ["a small red circle", "a large blue star in the top right corner on a black background " * 6, "", "x"]
    grid = itertools.product([None, False, True, "longest", "max_length", "do_not_pad"],
                             [None, False, True, "longest_first"], [None, 5, 77], [None, "pt"], [True, False])
    for inp, (padding, truncation, max_length, tensors, specials) in itertools.product(
            [prompts[0], prompts[1], prompts], grid):
        kwargs = {k: v for k, v in dict(padding=padding, truncation=truncation, max_length=max_length,
                                        return_tensors=tensors, add_special_tokens=specials).items() if v is not None}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = hf_tok(inp, **kwargs)
        except ValueError:
            with pytest.raises(ValueError, match="do not stack into one tensor"):
                tok(inp, **kwargs)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = tok(inp, **kwargs)
        for key in ("input_ids", "attention_mask"):
            want, have = ref[key], getattr(got, key)
            assert type(have) is type(want), (kwargs, key)
            assert (have.tolist() if tensors else have) == (want.tolist() if tensors else want), (inp, kwargs, key)
    ids = tok(prompts[0], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    assert torch.equal(ids, tok(prompts[0]))  # diffusers' call: our 77 ids
    with pytest.warns(UserWarning, match="a prompt of 80 tokens is longer than CLIP's 77"):
        tok(prompts[1], padding=True)
    with pytest.raises(ValueError, match="return_tensors='np'"):
        tok(prompts[0], return_tensors="np")
    with pytest.raises(TypeError, match="unexpected keyword argument 'return_offsets'"):
        tok(prompts[0], return_offsets=True)


def test_sd2_padding_with_exclamation_mark(tmp_path, corpus):
    sd2 = CLIPTokenizer(pad_token="!")
    ids = sd2("a cat")[0]
    assert sd2.pad_token_id == 0 and ids[:4].tolist() == [49406, 320, 2368, 49407] and (ids[4:] == 0).all()
    assert sd2.decode(ids) == "a cat"  # decoding stops at the end token, whatever pads
    sd2.save_pretrained(tmp_path)
    assert CLIPTokenizer.from_pretrained(tmp_path).pad_token_id == 0
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    hf = HFCLIPTokenizer.from_pretrained(tmp_path)
    assert hf.pad_token_id == 0
    assert torch.equal(quiet(sd2, corpus[:60]), hf_ids(hf, corpus[:60]))


def test_saved_folder_layout(hf_folder, hf_tok):
    assert {p.name for p in hf_folder.iterdir()} == {
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"
    }  # fmt: skip
    config = json.loads((hf_folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["tokenizer_class"] == "CLIPTokenizer"
    assert (hf_tok.model_max_length, hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        77, 49406, 49407, 49407
    )  # fmt: skip


def test_reads_transformers5_folder_with_tokenizer_json(tmp_path, corpus, tok, hf_tok):
    hf_tok.save_pretrained(tmp_path)  # transformers 5 writes tokenizer.json (+ tokenizer_config.json) only
    assert (tmp_path / "tokenizer.json").exists()
    (tmp_path / "vocab.json").unlink(missing_ok=True)
    back = CLIPTokenizer.from_pretrained(tmp_path)
    assert back.encoder == tok.encoder and back.merges == tok.merges
    assert torch.equal(quiet(back, corpus), quiet(tok, corpus))


def test_reads_hub_style_config(tmp_path, tok):
    """The SD 2 hub folders spell special tokens as AddedToken dicts and pad with "!"."""
    tok.save_pretrained(tmp_path)
    added = {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": True}
    config = {
        "bos_token": {**added, "content": "<|startoftext|>"}, "eos_token": added, "unk_token": added,
        "pad_token": "<|endoftext|>", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
    }  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!", "eos_token": added}))
    back = CLIPTokenizer.from_pretrained(tmp_path)
    assert (back.pad_token_id, back.eos_token_id, back.model_max_length) == (0, 49407, 77)


def test_errors_name_the_problem(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CLIPTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        CLIPTokenizer.from_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"49408": {"content": "<cat-toy>", "special": False}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert CLIPTokenizer.from_pretrained(tmp_path)("<cat-toy>", padding=False).input_ids == [49406, 49408, 49407]
    config["added_tokens_decoder"] = {"49000": {"content": "<cat-toy>", "special": False}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="<cat-toy>.*id 49000 is already"):  # (textual inversion: see its tests)
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="normalization='ftfy' is unknown"):
        CLIPTokenizer(normalization="ftfy")
    with pytest.raises(ValueError, match="'<pad>' is not in the vocabulary"):
        CLIPTokenizer(pad_token="<pad>")
    with pytest.raises(TypeError, match="must be a str, got int"):
        tok(["a cat", 3])
    with pytest.raises(TypeError, match="non-empty list"):
        tok([])


def test_decode_cache_and_pickle(tok):
    text = "a photo of a cat, café 東京 🐱"
    assert tok.decode(tok(text)[0]) == "a photo of a cat , café 東京 🐱"  # CLIP's decoding spaces punctuation
    assert tok.decode(tok(text)[0], skip_special_tokens=False).startswith("<|startoftext|>a photo")
    fresh = CLIPTokenizer()
    fresh.encode("zebra zebra")
    assert list(fresh._cache) == ["zebra"]  # merged once, then remembered
    clone = pickle.loads(pickle.dumps(fresh))  # DataLoader workers receive the tokenizer pickled
    assert torch.equal(clone(text), tok(text))


# ---- text encoder ---------------------------------------------------------------------------------------------


def hf_config(config):
    from transformers import CLIPTextConfig as HFCLIPTextConfig

    return HFCLIPTextConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})


@pytest.fixture(scope="module")
def reference():
    """The oracle: transformers' CLIPTextModel with random weights."""
    from transformers import CLIPTextModel as HFCLIPTextModel

    torch.manual_seed(0)
    return HFCLIPTextModel(hf_config(text_config_tiny(num_hidden_layers=3))).eval()


@pytest.fixture(scope="module")
def tiny(reference):
    """Ours, holding the reference's weights."""
    return load_text_encoder_state_dict(text_config_tiny(num_hidden_layers=3), dict(reference.state_dict()))


@pytest.fixture(scope="module")
def ids(tok):
    return tok(["a photo of a cat", "a small red circle on a white background", ""])


def test_matches_transformers(tiny, reference, ids):
    """Outputs, hidden states, the pooled end-of-text state, a padding mask, and the pre-2023 eos_token_id=2
    configs (the hub's SD 1.x folders) whose pooling takes the highest id."""
    mask = (torch.arange(77) < torch.tensor([[6], [12], [2]])).long()
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            ours, theirs = tiny(ids, output_hidden_states=True, **kwargs), reference(ids, output_hidden_states=True,
                                                                                    **kwargs)
            torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=0, atol=1e-6)
            torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=0, atol=1e-6)
            assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
            for a, b in zip(ours.hidden_states, theirs.hidden_states):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            assert ours[0] is ours.last_hidden_state and ours[-1] is ours.hidden_states  # as transformers indexes
        old = dataclasses.replace(tiny.config, eos_token_id=2, bos_token_id=0, pad_token_id=1)
        legacy = load_text_encoder_state_dict(old, text_encoder_state_dict(tiny))
        torch.testing.assert_close(legacy(ids).pooler_output, reference(ids).pooler_output, rtol=0, atol=1e-6)


def test_gradients_match_transformers_with_checkpointing(tiny, reference, ids):
    ours = load_text_encoder_state_dict(tiny.config, {k: v.clone() for k, v in text_encoder_state_dict(tiny).items()})
    ours.train().gradient_checkpointing_enable()
    ours(ids).last_hidden_state.square().mean().backward()
    theirs = copy.deepcopy(reference).train()
    theirs(ids).last_hidden_state.square().mean().backward()
    grads = {name: p.grad for name, p in _core(theirs).named_parameters()}
    for name, p in ours.text_model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-7)


def test_initialisation_follows_transformers():
    """A new encoder is drawn as transformers draws CLIP's (the training recipes were tuned on that): the same
    mean and spread per tensor."""
    from transformers import CLIPTextModel as HFCLIPTextModel

    config = text_config_tiny(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4)
    ours = build_text_encoder(config, seed=1)
    torch.manual_seed(1)
    theirs = dict(_core(HFCLIPTextModel(hf_config(config))).named_parameters())
    for name, p in ours.text_model.named_parameters():
        q = theirs[name]
        assert abs(p.std().item() - q.std().item()) <= 0.05 * q.std().item() + 1e-7, name
        assert abs(p.mean().item() - q.mean().item()) <= 0.1 * q.std().item() + 1e-7, name


def test_sd15_preset_has_123060480_parameters():
    config = text_config_sd15()
    with torch.device("meta"):
        model = CLIPTextModel(config)
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.hidden_act) == (
        768, 12, 12, "quick_gelu"
    )  # fmt: skip


def test_loads_what_transformers_saves(tmp_path, reference, ids):
    reference.save_pretrained(tmp_path)  # transformers 5: keys without the "text_model." prefix, no position_ids
    ours = load_text_encoder(tmp_path)
    assert isinstance(ours, CLIPTextModel)
    torch.testing.assert_close(ours(ids).last_hidden_state, reference(ids).last_hidden_state, rtol=0, atol=1e-6)


def test_loads_prefixed_state_dict_with_position_ids(tmp_path, reference, ids):
    """SD checkpoints and transformers-4 folders: "text_model." keys, sometimes with the position_ids buffer."""
    reference.save_pretrained(tmp_path)
    weights = {"text_model." + k: v for k, v in reference.state_dict().items()}
    weights["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_safetensors(weights, tmp_path / "model.safetensors")
    ours = load_text_encoder(tmp_path)
    torch.testing.assert_close(ours(ids).last_hidden_state, reference(ids).last_hidden_state, rtol=0, atol=1e-6)


def test_transformers_loads_what_we_save(tmp_path, tiny, ids):
    from safetensors import safe_open
    from transformers import CLIPTextModel as HFCLIPTextModel

    save_text_encoder(tiny, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    model, info = HFCLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(model(ids).last_hidden_state, tiny(ids).last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(load_text_encoder(tmp_path)(ids).last_hidden_state, tiny(ids).last_hidden_state)


def test_build_from_folder_config_and_separate_weights(tmp_path, tiny, ids):
    """layout.load_single_file: the architecture from a pipeline folder, the weights from a converted checkpoint."""
    save_text_encoder(tiny, tmp_path)
    weights = {k: v.clone() for k, v in text_encoder_state_dict(tiny).items()}
    model = build_text_encoder_from_folder(tmp_path, weights, source="ckpt (cond_stage_model)")
    torch.testing.assert_close(model(ids).last_hidden_state, tiny(ids).last_hidden_state, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match=r"(?s)ckpt \(cond_stage_model\).*missing keys \(52\)"):
        build_text_encoder_from_folder(tmp_path, {}, source="ckpt (cond_stage_model)")


def test_torch_dtype(tmp_path, tiny):
    save_text_encoder(tiny, tmp_path)
    half = load_text_encoder(tmp_path, torch_dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert half.dtype == torch.float16 and half.config == tiny.config


def test_strict_loading_errors(tmp_path, tiny):
    save_text_encoder(tiny, tmp_path)
    good = text_encoder_state_dict(tiny)
    weights = tmp_path / "model.safetensors"
    save_safetensors({k: v for k, v in good.items() if "final_layer_norm.bias" not in k}, weights)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): final_layer_norm.bias"):
        load_text_encoder(tmp_path)
    save_safetensors({**good, "text_model.text_projection.weight": torch.zeros(32, 32)}, weights)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): text_projection.weight"):
        load_text_encoder(tmp_path)
    mixed = {k.removeprefix("text_model.") if "layers.0." in k else k: v for k, v in good.items()}
    save_safetensors(mixed, weights)
    with pytest.raises(CheckpointError, match="mix"):
        load_text_encoder(tmp_path)
    weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"never opened")
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin.*refused"):
        load_text_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        load_text_encoder(tmp_path / "elsewhere")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="model_type 'clip'"):
        load_text_encoder(tmp_path)


class TransformersFourLayout:
    """diffusers 0.42's clip-skip branch reads `text_encoder.text_model.final_layer_norm`, transformers 4's layout;
    transformers 5's CLIPTextModel has no `.text_model` (AttributeError). This shim restores the attribute so that
    diffusers' own encode_prompt can serve as the oracle."""

    def __init__(self, model):
        self.model, self.text_model, self.config, self.dtype = model, model, model.config, model.dtype

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def test_encode_matches_diffusers_encode_prompt(hf_tok, tok, tiny, reference):
    """diffusers' StableDiffusionPipeline.encode_prompt, run with transformers' tokenizer loaded from our folder and
    transformers' text model, gives the context our tokenizer + text model + encode_prompt_ids give: prompts,
    negative prompts and clip_skip. diffusers' encode_prompt also runs on our text model as it is."""
    from diffusers import StableDiffusionPipeline

    pipe = SimpleNamespace(tokenizer=hf_tok, text_encoder=TransformersFourLayout(reference))
    on_ours = SimpleNamespace(tokenizer=hf_tok, text_encoder=tiny)
    prompts = ["a photo of a cat, &amp; “quoted”", " ".join(["cat"] * 80) + " zebra"]
    negatives = ["blurry", ""]
    with torch.no_grad():
        for skip in (None, 1, 2):
            cond, uncond = StableDiffusionPipeline.encode_prompt(
                pipe, prompts, "cpu", 1, True, negative_prompt=negatives, clip_skip=skip
            )
            ours = encode_prompt_ids(tiny, quiet(tok, prompts), clip_skip=skip)
            torch.testing.assert_close(ours, cond, rtol=0, atol=1e-6)
            torch.testing.assert_close(StableDiffusionPipeline.encode_prompt(
                on_ours, prompts, "cpu", 1, False, clip_skip=skip)[0], ours, rtol=0, atol=0)
            # diffusers applies clip_skip to the prompt only; the negative prompt always uses the last layer
            torch.testing.assert_close(encode_prompt_ids(tiny, tok(negatives)), uncond, rtol=0, atol=1e-6)
        ids = quiet(tok, prompts)
        assert torch.equal(encode_prompt_ids(tiny, ids, clip_skip=0), encode_prompt_ids(tiny, ids))


def test_clip_skip_is_dropping_the_last_layers(tiny, ids):
    """Independent of diffusers' indexing: skipping k layers equals an encoder built without its last k layers."""
    shallow = load_text_encoder_state_dict(text_config_tiny(num_hidden_layers=2),
                                           {k: v for k, v in tiny.state_dict().items() if "layers.2." not in k})
    with torch.no_grad():
        torch.testing.assert_close(
            encode_prompt_ids(tiny, ids, clip_skip=1), shallow(ids).last_hidden_state, rtol=1e-5, atol=1e-6
        )
    assert encode_prompt_ids(tiny, ids).shape == (3, 77, 32)


def test_encode_prompt_ids_errors(tiny, ids):
    with pytest.raises(ValueError, match=r"clip_skip=3: expected None or an int in \[0, 2\]"):
        encode_prompt_ids(tiny, ids, clip_skip=3)
    with pytest.raises(ValueError, match="LongTensor"):
        encode_prompt_ids(tiny, ids.float())
    with pytest.raises(ValueError, match="length 78 but the text encoder has 77 positions"):
        encode_prompt_ids(tiny, torch.zeros(1, 78, dtype=torch.long))
