"""CLIP's byte-level BPE tokenizer: a prompt becomes 77 ids (start, BPE tokens, end, padding).

CLIP (Radford et al. 2021, sec. 2.4) encodes text with lower-cased byte-pair encoding (Sennrich et al. 2016)
over UTF-8 bytes (the GPT-2 scheme, Radford et al. 2019, sec. 2.2), so every string has an encoding and no id is
ever "unknown". The 48,894 merges come from the vocabulary file that open_clip_torch ships; the file is found
by path, because importing open_clip costs seconds.

Two text cleanings are offered, because the two reference tokenizers disagree on a few inputs:
- "transformers" (default): what transformers' CLIPTokenizer does, hence what diffusers' StableDiffusionPipeline
  feeds the text encoder: NFC, whitespace runs -> one space, lower case. A folder written by `save_pretrained`
  reproduces exactly this when transformers loads it.
- "open_clip": what open_clip.tokenize (OpenAI's CLIP code) does: ftfy.fix_text (mojibake, curly quotes,
  full-width letters, ligatures), HTML entities unescaped (twice), whitespace collapsed, lower case.
They differ only where cleaning changes the text ("&amp;", "it’s", "ＡＢＣ", "ﬁ", "cafÃ©", a word-final
capital sigma) and on the literal control strings each recognises inside a prompt.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import html
import importlib.util
import json
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import regex
import torch

from ..checkpoints import read_json, require_path, write_json

START, END = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"  # BPE marks the last symbol of each word, so "cat" alone and "cat" in "cats" differ
MAX_LENGTH = 77  # CLIP's context: start + 75 tokens + end
CACHE_SIZE = 1 << 16  # words whose BPE is remembered; prompts repeat words, so each is merged once
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes, 256 word-final bytes, merges, two specials

# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of anything else; whitespace is dropped.
_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


@functools.lru_cache(maxsize=None)
def byte_to_char() -> dict[int, str]:
    """The GPT-2 map from the 256 bytes to printable characters: printable Latin-1 bytes map to themselves, the
    others (controls, space) to code points 256 and up, so that a BPE symbol is always a visible string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


@functools.lru_cache(maxsize=None)
def char_to_byte() -> dict[str, int]:
    """The inverse of byte_to_char, for decoding."""
    return {c: b for b, c in byte_to_char().items()}


def default_bpe_path() -> Path:
    """open_clip's `bpe_simple_vocab_16e6.txt.gz`, located without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the CLIP BPE vocabulary comes with open_clip_torch, which is not installed: pip install open_clip_torch"
        )
    return require_path(Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz", "BPE vocabulary")


@functools.lru_cache(maxsize=4)
def clip_vocabulary(bpe_path: str | None = None) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of CLIP, built as OpenAI's code does: bytes, word-final bytes, one entry per merge, and the
    start and end tokens (ids 49406 and 49407)."""
    with gzip.open(Path(bpe_path) if bpe_path else default_bpe_path()) as file:
        lines = file.read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])  # line 0 is a header
    symbols = list(byte_to_char().values())
    symbols += [s + WORD_END for s in symbols] + ["".join(m) for m in merges] + [START, END]
    return {s: i for i, s in enumerate(symbols)}, merges


def clean_transformers(text: str) -> str:
    """transformers' CLIPTokenizer normaliser: NFC, whitespace runs to one space, lower case per character."""
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text))
    # str.lower() turns a word-final capital sigma into "ς"; transformers lowers character by character ("σ").
    return text.replace("Σ", "σ").lower()


def clean_open_clip(text: str) -> str:
    """open_clip's `_clean_lower`: ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
    import ftfy  # only this cleaning needs it

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


@dataclasses.dataclass(frozen=True)
class Cleaning:
    """How one reference tokenizer turns a prompt into words.

    `raw_specials` are cut out of the prompt before cleaning (transformers matches its special tokens that way);
    `word_specials` are words that map straight to an id after cleaning (open_clip's own spelling of the two)."""

    clean: Callable[[str], str]
    words: regex.Pattern
    raw_specials: tuple[str, ...] = ()
    word_specials: tuple[tuple[str, str], ...] = ()  # (word, special token)


CLEANINGS = {
    # transformers' pattern also lists "<|endoftext|>", but its byte-level step re-splits that word GPT-2 style
    # ("<|", "endoftext", "|>"), exactly as _WORDS alone splits it; only the exact, raw spelling is special.
    "transformers": Cleaning(clean_transformers, regex.compile(_WORDS), raw_specials=(START, END)),
    "open_clip": Cleaning(
        clean_open_clip,
        regex.compile(r"<start_of_text>|<end_of_text>|" + _WORDS, regex.IGNORECASE),
        word_specials=(("<start_of_text>", START), ("<end_of_text>", END)),
    ),
}


class Encoding(dict):
    """A transformers-style tokenizer result: a dict whose keys (input_ids, attention_mask) read as attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"this encoding has no {name!r}; it holds {list(self)}") from None


class CLIPTokenizer:
    """Prompts -> LongTensor[B, 77]: start id, BPE ids (at most 75), end id, then padding.

    SD 1.x pads with the end token; SD 2.x pads with "!" (id 0): pass `pad_token="!"`."""

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        pad_token: str = END,
        model_max_length: int = MAX_LENGTH,
        normalization: str = "transformers",
        added_tokens: dict[str, int] | None = None,
    ):
        """added_tokens: {token: id} beyond the vocabulary (textual inversion), as transformers' add_tokens makes
        them: matched in the cleaned (lower-cased) prompt before it is split into words, wherever they occur."""
        if (vocab is None) != (merges is None):
            raise ValueError("give both vocab and merges, or neither (then CLIP's own vocabulary is used)")
        if vocab is None:
            vocab, merges = clip_vocabulary()
        if normalization not in CLEANINGS:
            raise ValueError(f"normalization={normalization!r} is unknown; use one of {sorted(CLEANINGS)}")
        for token in (START, END, pad_token):
            if token not in vocab:
                raise ValueError(f"token {token!r} is not in the vocabulary (a CLIP vocabulary has it)")
        if not isinstance(model_max_length, int) or not 3 <= model_max_length <= 4096:
            raise ValueError(f"model_max_length={model_max_length!r}: expected an int in [3, 4096] (CLIP uses 77)")
        self.encoder = dict(vocab)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.merges = tuple(tuple(m) for m in merges)
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.pad_token, self.model_max_length, self.normalization = pad_token, model_max_length, normalization
        self.bos_token_id, self.eos_token_id, self.pad_token_id = vocab[START], vocab[END], vocab[pad_token]
        self.cleaning = CLEANINGS[normalization]
        self._word_specials = {word: self.encoder[token] for word, token in self.cleaning.word_specials}
        specials = "|".join(map(regex.escape, self.cleaning.raw_specials))
        self._raw_split = regex.compile(f"({specials})") if specials else None
        self._cache: dict[str, tuple[str, ...]] = {}  # a plain dict, so that the tokenizer pickles (DataLoader)
        self.added_tokens_encoder: dict[str, int] = {}
        self._added_split, self._added_ids = None, {}
        self._add(sorted((added_tokens or {}).items(), key=lambda item: item[1]))

    # ---- added tokens (textual inversion) ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.encoder)

    def add_tokens(self, tokens: str | Sequence[str]) -> int:
        """Add tokens with the next free ids (transformers' add_tokens); ones already known are skipped. Returns
        how many were added."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        new = [t for t in dict.fromkeys(tokens) if t not in self.encoder]
        first = max(self.decoder) + 1
        self._add([(token, first + i) for i, token in enumerate(new)])
        return len(new)

    def remove_tokens(self, tokens: Iterable[str]) -> None:
        """Drop added tokens; the ids of those added after them move down to close the gap (as diffusers'
        unload_textual_inversion renumbers them)."""
        gone = set(tokens)
        unknown = sorted(gone - set(self.added_tokens_encoder))
        if unknown:
            raise ValueError(f"tokens {unknown} were not added to this tokenizer (added: "
                             f"{sorted(self.added_tokens_encoder)})")
        kept = [t for t, _ in sorted(self.added_tokens_encoder.items(), key=lambda item: item[1]) if t not in gone]
        first = min(self.added_tokens_encoder.values())
        for token in list(self.added_tokens_encoder):
            del self.decoder[self.encoder.pop(token)]
        self.added_tokens_encoder = {}
        self._add([(token, first + i) for i, token in enumerate(kept)])

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.encoder[tokens]
        return [self.encoder[t] for t in tokens]

    def _add(self, pairs: Iterable[tuple[str, int]]) -> None:
        """Register (token, id) pairs, then match the added tokens anew (also those registered before an error)."""
        try:
            for token, index in pairs:
                if not isinstance(token, str) or not token.strip():
                    raise ValueError(f"an added token must be a non-empty string, got {token!r}")
                if token in self.encoder:
                    raise ValueError(f"token {token!r} is already in the vocabulary (id {self.encoder[token]}): "
                                     "choose another token")
                if index in self.decoder:
                    raise ValueError(f"added token {token!r}: its id {index} is already {self.decoder[index]!r}")
                self.encoder[token], self.decoder[index] = index, token
                self.added_tokens_encoder[token] = index
        finally:
            # matched in the cleaned prompt, so in lower case (transformers normalises added tokens' matching too);
            # longest first, so that "<emb>_1" is not read as "<emb>" and "_1"
            ordered = sorted({t.lower() for t in self.added_tokens_encoder}, key=len, reverse=True)
            self._added_split = regex.compile("(" + "|".join(map(regex.escape, ordered)) + ")") if ordered else None
            self._added_ids = {t.lower(): i for t, i in self.added_tokens_encoder.items()}

    # ---- BPE ------------------------------------------------------------------------------------------------
    def bpe(self, word: str) -> tuple[str, ...]:
        """The BPE symbols of one word (its bytes as characters), remembered for the next time."""
        symbols = self._cache.get(word)
        if symbols is None:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            symbols = self._cache[word] = self._merge(word)
        return symbols

    def _merge(self, word: str) -> tuple[str, ...]:
        """Merge adjacent symbols of one word, always the pair learned earliest, until no learned pair is left
        (Sennrich et al. 2016, sec. 3.2: a new word is split by applying the learned merges in their order)."""
        symbols = [*word[:-1], word[-1] + WORD_END]
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    # ---- text -> ids ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The content ids of one prompt (no start/end token, no truncation)."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}: {text!r}")
        to_char = byte_to_char()
        ids = []
        pieces = self._raw_split.split(text) if self._raw_split else [text]
        for piece in pieces:
            if piece in self.cleaning.raw_specials:
                ids.append(self.encoder[piece])
                continue
            cleaned = self.cleaning.clean(piece)
            for part in self._added_split.split(cleaned) if self._added_split else [cleaned]:
                if part in self._added_ids:
                    ids.append(self._added_ids[part])
                    continue
                for word in self.cleaning.words.findall(part):
                    if word in self._word_specials:
                        ids.append(self._word_specials[word])
                        continue
                    ids.extend(self.encoder[s] for s in self.bpe("".join(to_char[b] for b in word.encode("utf-8"))))
        return ids

    def __call__(self, prompts: str | Sequence[str], padding: bool | str | None = None,
                 truncation: bool | str | None = None, max_length: int | None = None,
                 return_tensors: str | None = None, **options) -> torch.LongTensor | Encoding:
        """LongTensor[B, model_max_length]. Over-long prompts keep their first 75 tokens (and the end token); a
        warning shows what was dropped, since a silently shortened prompt is a confusing image.

        Given any of transformers' arguments (padding, truncation, max_length, return_tensors, add_special_tokens,
        return_attention_mask), the call is transformers' CLIPTokenizer's instead: an `Encoding` (input_ids,
        attention_mask) with the same values, so that diffusers' `tokenizer(prompt, padding="max_length",
        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids` reads the same."""
        if padding is not None or truncation is not None or max_length is not None or return_tensors or options:
            return self._call_like_transformers(prompts, padding, truncation, max_length, return_tensors, **options)
        prompts = self._prompt_list(prompts)
        room = self.model_max_length - 2
        rows, dropped = [], []
        for prompt in prompts:
            ids = self.encode(prompt)
            if len(ids) > room:
                dropped.append(self.decode(ids[room:]))
                ids = ids[:room]
            rows.append([self.bos_token_id, *ids, self.eos_token_id] + [self.pad_token_id] * (room - len(ids)))
        if dropped:
            warnings.warn(
                f"The following part of your input was truncated because CLIP can only handle sequences up to "
                f"{self.model_max_length} tokens: {dropped}",
                stacklevel=2,
            )
        return torch.tensor(rows, dtype=torch.long)

    @staticmethod
    def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"prompts must be a str or a non-empty list of str, got {prompts!r}")
        return list(prompts)

    def _call_like_transformers(self, prompts, padding, truncation, max_length, return_tensors,
                                add_special_tokens: bool = True, return_attention_mask: bool = True) -> Encoding:
        """transformers' rules: padding True/"longest" pads to the longest prompt, "max_length" to max_length,
        False/"do_not_pad" not at all; truncation True/"longest_first" (also when neither it nor padding is given
        but max_length is) cuts to max_length keeping the end token; max_length defaults to model_max_length."""
        paddings = {None: None, False: None, "do_not_pad": None, True: "longest", "longest": "longest",
                    "max_length": "max_length"}
        truncations = {None: None, False: False, "do_not_truncate": False, True: True, "longest_first": True,
                       "only_first": True}
        if padding not in paddings:
            raise ValueError(f"padding={padding!r}: use True/'longest', 'max_length' or False/'do_not_pad'")
        if truncation not in truncations:
            raise ValueError(f"truncation={truncation!r}: use True/'longest_first' or False/'do_not_truncate'")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: latentdiff gives 'pt' (torch tensors) or None "
                             "(lists)")
        if max_length is not None and (type(max_length) is not int or max_length < 1 + 2 * add_special_tokens):
            raise ValueError(f"max_length={max_length!r}: expected an int of at least {1 + 2 * add_special_tokens}")
        pad_to, truncate = paddings[padding], truncations[truncation]
        if truncate is None:  # transformers: a max_length without padding or truncation asked for truncates
            truncate = max_length is not None and padding in (None, False)
        limit = max_length or self.model_max_length
        single = isinstance(prompts, str)
        specials = 2 if add_special_tokens else 0
        rows = []
        for prompt in self._prompt_list(prompts):
            ids = self.encode(prompt)
            if truncate:
                ids = ids[:limit - specials]
            elif len(ids) + specials > self.model_max_length:
                warnings.warn(f"a prompt of {len(ids) + specials} tokens is longer than CLIP's "
                              f"{self.model_max_length} (pass truncation=True to cut it): {prompt!r}", stacklevel=3)
            rows.append([self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids)
        width = {None: 0, "longest": max(map(len, rows)), "max_length": limit}[pad_to]
        masks = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        if return_tensors and len({len(r) for r in rows}) > 1:
            raise ValueError(f"prompts of {sorted({len(r) for r in rows})} tokens do not stack into one tensor: pass "
                             "padding=True (or 'max_length') and truncation=True")
        encoding = Encoding(input_ids=rows, attention_mask=masks) if return_attention_mask else Encoding(
            input_ids=rows)
        for key, value in encoding.items():
            if return_tensors == "pt":
                encoding[key] = torch.tensor(value, dtype=torch.long)
            elif single:
                encoding[key] = value[0]
        return encoding

    # ---- ids -> text ----------------------------------------------------------------------------------------
    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a 1-D id sequence. With skip_special_tokens, the start token is dropped and the text stops at
        the first end token (what follows it is padding, whichever token pads)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence of ids; decode the rows of a batch one by one")
        if skip_special_tokens:
            ids = ids[1:] if ids[:1] == [self.bos_token_id] else ids
            ids = ids[: ids.index(self.eos_token_id)] if self.eos_token_id in ids else ids
        unknown = [i for i in ids if i not in self.decoder]
        if unknown:
            raise ValueError(f"ids {unknown[:5]} are outside the vocabulary (size {len(self.decoder)})")
        to_byte = char_to_byte()
        text, run = [], []
        for i in ids + [None]:  # runs of BPE symbols as bytes; an added token as itself, spaced
            if i is not None and self.decoder[i] not in self.added_tokens_encoder:
                run.append(self.decoder[i])
                continue
            text.append(bytes(to_byte[c] for c in "".join(run)).decode("utf-8", errors="replace"))
            run = []
            if i is not None:
                text.append(f" {self.decoder[i]}{WORD_END}")
        return "".join(text).replace(WORD_END, " ").strip().replace("  ", " ")

    # ---- folders --------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json: the folder layout
        that transformers' CLIPTokenizer.from_pretrained and diffusers' pipelines load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        specials = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": self.pad_token}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length, **specials}
        if self.added_tokens_encoder:  # transformers reads added_tokens_decoder; added_tokens.json as v4 wrote it
            config["added_tokens_decoder"] = {
                str(i): {"content": t, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
                         "special": False} for t, i in self.added_tokens_encoder.items()}
            write_json(self.added_tokens_encoder, folder / "added_tokens.json")
        else:
            (folder / "added_tokens.json").unlink(missing_ok=True)
        write_json(config, folder / "tokenizer_config.json")
        write_json(specials, folder / "special_tokens_map.json")

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, subfolder: str | None = None, normalization: str = "transformers"
    ) -> "CLIPTokenizer":
        """Read a tokenizer folder: vocab.json + merges.txt (transformers 4, the hub's SD folders, ours) or
        tokenizer.json (what transformers 5 writes); tokenizer_config.json and special_tokens_map.json give the
        padding token and the length."""
        folder = require_path(Path(folder) / subfolder if subfolder else folder, "tokenizer folder")
        vocab, merges, added = _read_bpe(folder)
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
        specials_map = folder / "special_tokens_map.json"
        config = {**config, **(read_json(specials_map) if specials_map.exists() else {})}
        for key, expected in (("bos_token", START), ("eos_token", END)):
            if _content(config.get(key, expected)) != expected:
                raise ValueError(f"{folder}: {key}={config[key]!r}, but a CLIP tokenizer uses {expected!r}")
        pad_token = _content(config.get("pad_token", END))
        added.update({_content(t): int(i) for i, t in config.get("added_tokens_decoder", {}).items()})
        if (folder / "added_tokens.json").exists():
            added.update(read_json(folder / "added_tokens.json"))
        added = {t: i for t, i in added.items() if vocab.get(t) != i}  # (the specials are listed there too)
        length = config.get("model_max_length", MAX_LENGTH)
        if not isinstance(length, int) or length > 4096:  # unset, transformers writes a huge sentinel
            raise ValueError(f"{folder}: model_max_length={length!r} in tokenizer_config.json; CLIP uses 77, set it")
        try:
            return cls(vocab, merges, pad_token=pad_token, model_max_length=length, normalization=normalization,
                       added_tokens=added)
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab={len(self.encoder)}, model_max_length={self.model_max_length}, "
            f"pad_token={self.pad_token!r}, normalization={self.normalization!r})"
        )


def _content(token) -> str:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    return token["content"] if isinstance(token, dict) else token


def _read_bpe(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int]]:
    """(vocab, merges, added tokens {token: id}) from vocab.json + merges.txt, or else from tokenizer.json."""
    vocab_file, merges_file, joint_file = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    if vocab_file.exists() and merges_file.exists():
        vocab = read_json(vocab_file)
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        bad = [" ".join(m) for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{merges_file}: lines {bad[:3]} are not 'a b' merge pairs")
        return vocab, merges, {}
    if joint_file.exists():
        data = read_json(joint_file)
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{joint_file}: model type {model.get('type')!r}; a CLIP tokenizer is BPE")
        # tokenizers writes merges as "a b" strings (older) or [a, b] pairs (newer).
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return model["vocab"], merges, {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    raise FileNotFoundError(
        f"{folder}: no tokenizer files; expected vocab.json and merges.txt (or tokenizer.json) in {folder}"
    )
