"""CLIP's byte-level BPE text tokenizer, in plain Python and NumPy.

A CLIP text tower only works on the exact token ids it was trained with, so this re-implements
OpenAI CLIP's ``SimpleTokenizer`` (github.com/openai/CLIP, ``clip/simple_tokenizer.py``) without
torch: the same text cleaning, pre-tokenizing regex, byte-to-character table, BPE merges and ids.
The vocabulary ships as ``jprompt/assets/bpe_simple_vocab_16e6.txt.gz`` (MIT, OpenAI; see
``CLIP_TOKENIZER_LICENSE.txt`` beside it). ``tests/test_clip_tokenizer.py`` pins the ids to
open_clip's tokenizer.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import itertools
import math
import os
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

CONTEXT_LENGTH = 77
SOT = 49406  # <|startoftext|>
EOT = 49407  # <|endoftext|>
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_NUM_MERGES = 49152 - 256 - 2  # 48894: the vocabulary file holds more merges than CLIP used.
_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"

# Special tokens, English contractions, runs of letters, single digits, runs of other symbols.
_TOKEN_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """A reversible byte -> printable character table, so BPE never sees spaces or controls.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP,
    soft hyphen) get the characters from U+0100 on, in byte order. The table's insertion order
    (printable bytes first) is the order of token ids 0..255.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    """CLIP tokenizer built from the text of a ``bpe_simple_vocab_16e6.txt`` merges file."""

    def __init__(self, merges_text: str):
        lines = merges_text.split("\n")[1 : _NUM_MERGES + 1]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines]
        chars = list(bytes_to_unicode().values())
        vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges)]
        vocab += _SPECIAL_TOKENS
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._decoder = {i: token for token, i in self._encoder.items()}
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._cache: dict[str, tuple[str, ...]] = {t: (t,) for t in _SPECIAL_TOKENS}
        if len(self._encoder) != EOT + 1:
            raise ValueError(f"expected {_NUM_MERGES} distinct merges, got {len(merges)}")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads a gzipped (``.gz``) or plain merges file."""
        with open(path, "rb") as f:
            data = f.read()
        if str(path).endswith(".gz"):
            data = gzip.decompress(data)
        return cls(data.decode("utf-8"))

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Splits one pre-token into vocabulary entries by applying merges, lowest rank first."""
        if word in self._cache:
            return self._cache[word]
        parts = (*word[:-1], word[-1] + "</w>")  # "</w>" marks the end of a word
        while len(parts) > 1:
            best = min(itertools.pairwise(parts), key=lambda pair: self._ranks.get(pair, math.inf))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the start and end tokens."""
        ids = []
        for piece in _TOKEN_PATTERN.findall(_clean(text)):
            word = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self._encoder[part] for part in self._bpe(word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; each end of word becomes a space, so the result ends with one."""
        chars = "".join(self._decoder[int(i)] for i in ids)
        data = bytes(self._byte_decoder[c] for c in chars)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(
        self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH
    ) -> np.ndarray:
        """int32 array (len(texts), context_length): SOT, ids, EOT, then zeros.

        A text that does not fit is truncated to ``context_length`` tokens whose last one is
        replaced by EOT, as open_clip does (OpenAI's ``clip.tokenize`` raises instead unless
        ``truncate=True``, which then does the same).
        """
        if context_length < 1:
            raise ValueError(f"context_length must be positive, got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in zip(out, texts, strict=True):
            ids = [SOT, *self.encode(text), EOT][:context_length]
            ids[-1] = EOT
            row[: len(ids)] = ids
        return out


@functools.cache
def load_default() -> Tokenizer:
    """The tokenizer of every OpenAI CLIP model, from the vocabulary shipped with jprompt."""
    data = (importlib.resources.files("jprompt") / "assets" / _VOCAB_FILE).read_bytes()
    return Tokenizer(gzip.decompress(data).decode("utf-8"))
