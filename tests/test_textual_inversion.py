"""Textual inversion against diffusers (load_textual_inversion with transformers' tokenizer and CLIPTextModel):
single- and multi-vector embeddings in diffusers' and A1111's layouts, prompts and images, saving a pipeline both
ways, unloading; the tokenizer's added tokens against transformers'; and the errors."""
import warnings

import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.checkpoints import CheckpointError, save_safetensors
from latentdiff.models.text import CLIPTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(0)
    save_safetensors({"<cat-toy>": torch.randn(32, generator=g)}, root / "cat.safetensors")  # diffusers
    (root / "folder").mkdir()
    save_safetensors({"<dog>": torch.randn(1, 32, generator=g)}, root / "folder" / "learned_embeds.safetensors")
    save_safetensors({"emb_params": torch.randn(3, 32, generator=g)}, root / "neg.safetensors")  # A1111
    return root


def reference(folder):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def embeds(pipe, prompt):
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


PROMPTS = ["a <cat-toy> on a table", "A <CAT-TOY>s and a<dog>", "<neg>, blurry", "<neg>_1 alone", "plain words"]


def load_all(pipe, files):
    pipe.load_textual_inversion(files / "cat.safetensors")
    pipe.load_textual_inversion(str(files / "folder"))
    pipe.load_textual_inversion(files / "neg.safetensors", token="<neg>")


def test_embeddings_match_diffusers(tiny_folders, files, tmp_path):
    folder = tiny_folders[0]
    ref, pipe = reference(folder), LatentDiffusionPipeline.from_pretrained(folder)
    plain = embeds(pipe, "a <cat-toy> on a table")
    for p in (ref, pipe):
        load_all(p, files)
    assert pipe.tokenizer.added_tokens_encoder == {"<cat-toy>": 49408, "<dog>": 49409, "<neg>": 49410,
                                                   "<neg>_1": 49411, "<neg>_2": 49412}
    for prompt in PROMPTS:
        torch.testing.assert_close(embeds(pipe, prompt), embeds(ref, prompt), rtol=0, atol=1e-5)
    assert (embeds(pipe, PROMPTS[0]) - plain).abs().max() > 1e-2
    args = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", negative_prompt="<neg>")
    a = ref("a <cat-toy>", generator=torch.Generator().manual_seed(0), **args).images
    b = pipe("a <cat-toy>", generator=torch.Generator().manual_seed(0), progress=False, **args).images
    torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), rtol=0, atol=2e-4)

    # saved pipelines carry the words, both ways
    pipe.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "theirs")
    theirs_of_ours = reference(tmp_path / "ours")
    ours_of_theirs = LatentDiffusionPipeline.from_pretrained(tmp_path / "theirs")
    for prompt in PROMPTS:
        torch.testing.assert_close(embeds(ours_of_theirs, prompt), embeds(theirs_of_ours, prompt), rtol=0,
                                   atol=1e-5)

    # unloading one word renumbers the later ones, as diffusers does; unloading all restores the model
    for p in (ref, pipe):
        p.unload_textual_inversion("<cat-toy>")
    assert pipe.tokenizer.added_tokens_encoder == {"<dog>": 49408, "<neg>": 49409, "<neg>_1": 49410,
                                                   "<neg>_2": 49411}
    for prompt in PROMPTS:
        torch.testing.assert_close(embeds(pipe, prompt), embeds(ref, prompt), rtol=0, atol=1e-5)
    pipe.unload_textual_inversion()
    assert pipe.tokenizer.added_tokens_encoder == {} and pipe.text_encoder.config.vocab_size == 49408
    torch.testing.assert_close(embeds(pipe, "a <cat-toy> on a table"), plain, rtol=0, atol=0)


def test_added_tokens_split_as_transformers_does(tiny_folders):
    """Matched in the lower-cased prompt, anywhere (no word boundary needed), longest first."""
    from transformers import CLIPTokenizer as Reference

    folder = tiny_folders[0] / "tokenizer"
    ref, ours = Reference.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)
    for tokenizer in (ref, ours):
        assert tokenizer.add_tokens(["<cat-toy>", "<Big>", "<emb>", "<emb>_1", "ünï"]) == 5
        assert tokenizer.add_tokens(["<cat-toy>"]) == 0
    for text in ["a <cat-toy> photo", "a <Cat-Toy> photo", "a<cat-toy>photo", "x <big> y", "an <emb>_1 and <emb>",
                 "ÜNÏ ünïcorn", "<|endoftext|> <cat-toy>s"]:
        assert ours(text, padding=False).input_ids == ref(text).input_ids, text
    assert ours.decode(ours("a <cat-toy> photo", padding=False).input_ids) == "a <cat-toy> photo"


def test_errors(tiny_folders, files, tmp_path):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_folders[1])
    with pytest.raises(FileNotFoundError, match="textual inversion file or folder"):
        pipe.load_textual_inversion(tmp_path / "nowhere.safetensors")
    (tmp_path / "emb.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle|safetensors"):
        pipe.load_textual_inversion(tmp_path / "emb.pt")
    with pytest.raises(ValueError, match="width 768 for a text encoder of width 32"):
        pipe.load_textual_inversion({"<w>": torch.zeros(768)})
    with pytest.raises(ValueError, match="SDXL"):
        pipe.load_textual_inversion({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})
    with pytest.raises(ValueError, match="pass token="):
        pipe.load_textual_inversion(torch.zeros(32))
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        pipe.load_textual_inversion({"cat": torch.zeros(32)})  # a word of CLIP's own vocabulary
    assert pipe.tokenizer.added_tokens_encoder == {}  # nothing half-added
    pipe.load_textual_inversion(files / "cat.safetensors")
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        pipe.load_textual_inversion(files / "cat.safetensors")
    with pytest.raises(ValueError, match=r"\['<nope>'\] were not loaded"):
        pipe.unload_textual_inversion("<nope>")
    with pytest.raises(ValueError, match="2 embeddings but 1 tokens"):
        pipe.load_textual_inversion([files / "neg.safetensors", files / "cat.safetensors"], token=["<a>"])
