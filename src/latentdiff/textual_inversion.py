"""Textual inversion (Gal et al. 2022): new words whose embeddings were learned for a frozen text encoder. A file
gives one embedding [D] or several [n, D] (a "multi-vector" word); loading adds the token (and token_1 ... token_n-1)
to the tokenizer and their rows to the text encoder's token table, as diffusers' load_textual_inversion does, and
a prompt naming the token gets all n of them."""
from __future__ import annotations

import re

import torch

from .checkpoints import CheckpointError, load_safetensors, require_path, weights_file

WEIGHT_NAME = "learned_embeds.safetensors"  # diffusers' file name in a textual-inversion folder


def word_tokens(word: str, vectors: int) -> list[str]:
    """The tokens of a word of n vectors: word, word_1, ..., word_{n-1} (diffusers' names)."""
    return [word] + [f"{word}_{i}" for i in range(1, vectors)]


def add_words(tokenizer, text_encoder, words: list[str], rows) -> list[int]:
    """Add new tokens to the tokenizer and their rows (each a [D] tensor) to the text encoder's token table; returns
    their ids."""
    table = text_encoder.get_input_embeddings()
    table = text_encoder.resize_token_embeddings(table.num_embeddings + len(words))
    tokenizer.add_tokens(words)
    ids = [tokenizer.convert_tokens_to_ids(word) for word in words]
    with torch.no_grad():
        for index, row in zip(ids, rows):
            table.weight[index] = row.to(table.weight)
    return ids


def read_embedding(source, token: str | None, weight_name: str | None = None) -> tuple[str, torch.Tensor, str]:
    """(token, embeddings [n, D], a name for messages) from a .safetensors file, a folder holding one, a state dict
    (diffusers' {token: tensor}, A1111's {"emb_params": tensor} or {"string_to_param": {"*": tensor}, "name": ...})
    or a tensor. `token`, when given, names the word instead of the file."""
    if isinstance(source, torch.Tensor):
        state, where = source, "the given tensor"
    elif isinstance(source, dict):
        state, where = source, "the given state dict"
    else:
        path = weights_file(require_path(source, "textual inversion file or folder"), weight_name, WEIGHT_NAME,
                            "textual inversion file")
        state, where = load_safetensors(path), str(path)
    loaded_token = None
    if isinstance(state, dict):
        if "clip_l" in state or "clip_g" in state:
            raise ValueError(f"{where} holds clip_l / clip_g embeddings: an SDXL textual inversion; latentdiff runs "
                             "Stable Diffusion 1.x / 2.x (one text encoder)")
        if "string_to_param" in state:  # A1111's .pt layout, as a dict already loaded by the caller
            loaded_token, state = state.get("name"), state["string_to_param"]["*"]
        elif len(state) == 1:
            loaded_token, state = next(iter(state.items()))
        else:
            raise ValueError(f"{where} holds {len(state)} tensors ({sorted(state)[:4]}); a textual inversion file "
                             "holds one embedding (diffusers: {token: tensor}; A1111: {'emb_params': tensor})")
    token = token or loaded_token
    if token is None:
        raise ValueError(f"{where} does not name its token: pass token='<my-word>'")
    if not isinstance(state, torch.Tensor) or state.dim() not in (1, 2) or 0 in state.shape:
        raise ValueError(f"{where}: the embedding must be a tensor [D] or [n, D]; got "
                         f"{tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__}")
    return token, state.reshape(-1, state.shape[-1]), where


class TextualInversionLoaderMixin:
    """diffusers' textual-inversion methods for a pipeline with `tokenizer` and `text_encoder`."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | list[str] | None = None,
                               tokenizer=None, text_encoder=None, weight_name: str | None = None,
                               local_files_only: bool | None = None, use_safetensors: bool | None = None) -> None:
        """Add the word(s) of one or several embeddings (a list of sources, with a list of tokens). A file of n
        vectors adds token, token_1, ..., token_{n-1}; prompts naming the token use all n."""
        if use_safetensors is False:
            raise CheckpointError("use_safetensors=False: latentdiff reads embeddings only from .safetensors files "
                                  "(pickle formats such as A1111's .pt are never loaded); convert the file")
        tokenizer, text_encoder = tokenizer or self.tokenizer, text_encoder or self.text_encoder
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) else [
            pretrained_model_name_or_path]
        tokens = token if isinstance(token, list) else [token] * len(sources)
        if len(sources) == 1 and len(tokens) > 1 and isinstance(sources[0], torch.Tensor):
            sources = list(sources[0])  # one tensor of len(tokens) embeddings, one per token
        if len(tokens) != len(sources):
            raise ValueError(f"{len(sources)} embeddings but {len(tokens)} tokens: give one token per embedding")
        words, rows = [], []
        width = text_encoder.get_input_embeddings().embedding_dim
        vocabulary = tokenizer.get_vocab()
        for source, name in zip(sources, tokens):
            name, vectors, where = read_embedding(source, name, weight_name)
            if vectors.shape[-1] != width:
                raise ValueError(f"{where}: embeddings of width {vectors.shape[-1]} for a text encoder of width "
                                 f"{width}: the embedding was made for another model (SD 2.x: 1024, SD 1.x: 768)")
            names = word_tokens(name, vectors.shape[0])
            clashes = [n for n in names if n in vocabulary or n in words]
            if clashes:
                raise ValueError(f"token(s) {clashes} are already in the tokenizer's vocabulary: pass another "
                                 "token=, or unload_textual_inversion() the one loaded before")
            words += names
            rows += list(vectors)
        add_words(tokenizer, text_encoder, words, rows)

    def unload_textual_inversion(self, tokens: str | list[str] | None = None, tokenizer=None,
                                 text_encoder=None) -> None:
        """Remove added words (all of them by default; a multi-vector word with its _1, _2, ... tokens) and their
        rows of the token table."""
        tokenizer, text_encoder = tokenizer or self.tokenizer, text_encoder or self.text_encoder
        added = tokenizer.added_tokens_encoder
        if not added:
            raise ValueError("no textual inversion tokens are loaded")
        names = list(added) if tokens is None else [tokens] if isinstance(tokens, str) else list(tokens)
        gone = {t for name in names for t in added if t == name or re.fullmatch(re.escape(name) + r"_\d+", t)}
        unknown = [n for n in names if n not in added]
        if unknown:
            raise ValueError(f"tokens {unknown} were not loaded (loaded: {sorted(added)})")
        removed = {added[t] for t in gone}
        keep = [i for i in range(text_encoder.get_input_embeddings().num_embeddings) if i not in removed]
        rows = text_encoder.get_input_embeddings().weight.detach()[keep].clone()
        tokenizer.remove_tokens(gone)
        table = text_encoder.resize_token_embeddings(len(keep))
        with torch.no_grad():
            table.weight.copy_(rows)

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer=None) -> str | list[str]:
        """A prompt naming a multi-vector word with all its tokens ("<w>" -> "<w> <w>_1 <w>_2"), as diffusers'
        pipelines rewrite prompts before tokenizing them."""
        if not isinstance(prompt, str):
            return [self.maybe_convert_prompt(p, tokenizer) for p in prompt]
        added = (tokenizer or self.tokenizer).added_tokens_encoder
        for token in added:
            if f"{token}_1" in added:
                count = 1
                while f"{token}_{count}" in added:
                    count += 1
                spelled = " ".join([token] + [f"{token}_{i}" for i in range(1, count)])
                prompt = re.sub(re.escape(token) + r"(?!_\d)", lambda _: spelled, prompt)
        return prompt
