"""The torch-free CLIP tokenizer against reference ids.

Every expected id below was produced by a real reference tokenizer, never by jprompt, in a
throwaway virtualenv that is not part of this project:

    python3 -m venv /tmp/tokref
    /tmp/tokref/bin/pip install --no-deps torch==2.13.0 open_clip_torch==3.3.0 ftfy regex
    /tmp/tokref/bin/pip install numpy wcwidth typing_extensions filelock sympy networkx jinja2

(that is torch 2.13.0+cpu, ftfy 6.3.1, regex 2026.11.15, and what ``import torch`` needs),

then ``open_clip/tokenizer.py`` of open_clip_torch 3.3.0 was loaded by file path with
``importlib.util.spec_from_file_location`` (``import open_clip`` needs torchvision) and
``tokenize([text])[0]`` (context length 77, int64) was printed for each text in ``CASES``; the
non-zero prefix of that row, without its leading SOT and trailing EOT, is what ``CASES`` holds,
and ``_tokenizer.decode(_tokenizer.encode(text))`` gave ``DECODED``. The texts were also checked
to give the same ids with OpenAI's own ``clip/simple_tokenizer.py`` from the openai-clip 1.0.1
sdist (also loaded by path; ``SimpleTokenizer().encode(text)``), which alone produced
``SPECIAL_TOKENS_IN_TEXT``: open_clip renamed the special tokens and splits OpenAI's literally.
"""

import importlib.resources

import numpy as np
import pytest

from jprompt.models import clip_tokenizer
from jprompt.models.clip_tokenizer import CONTEXT_LENGTH, EOT, SOT

CASES = [
    ("This is a photo of a dog.", [589, 533, 320, 1125, 539, 320, 1929, 269]),
    ("a photo of a golden retriever.", [320, 1125, 539, 320, 3878, 28394, 269]),
    ("itap of a hot air balloon.", [529, 2728, 539, 320, 2069, 1922, 13634, 269]),
    ("a bad photo of the sea_lion.", [320, 2103, 1125, 539, 518, 2102, 318, 5567, 269]),
    ("A PHOTO OF A Tiger Shark", [320, 1125, 539, 320, 6531, 7980]),
    (
        "it's a dog, isn't it? Don't worry: we'll see; I'm sure they'd've known!!!",
        [585, 568, 320, 1929, 267, 2923, 713, 585, 286, 847, 713, 7534, 281, 649, 1342, 862]
        + [282, 328, 880, 1650, 889, 1896, 1200, 3102, 995],
    ),
    ("3 objects", [274, 13770]),
    ("2024", [273, 271, 273, 275]),
    (
        "there are 12 apples and 3.5 pears (approx. 100%)",
        [997, 631, 272, 273, 14032, 537, 274, 269, 276, 39565, 263, 18266, 269, 272, 271, 271]
        + [16063],
    ),
    ("  a\tphoto\n\nof   a  cat  \n", [320, 1125, 539, 320, 2368]),
    ("\xa0a\u3000b\u200bc", [320, 321, 9844, 322]),
    ("cats &amp; dogs", [3989, 261, 3255]),
    ("Tom &amp;amp; Jerry &lt;3 &quot;quoted&quot;", [2435, 261, 9164, 283, 274, 257, 27706, 257]),
    (
        "café crème brûlée, naïve résumé",
        [15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 267, 1097, 35689, 563, 29106, 7054]
        + [4166],
    ),
    ("cafÃ© mojibake", [15304, 617, 3252, 11878]),  # ftfy repairs the mojibake to "café"
    (
        "日本語のテキスト 一只猫的照片",
        [39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486, 19759, 222, 34517]
        + [103, 163, 234, 104, 163, 248, 226, 163, 227, 100, 163, 231, 485],
    ),
    ("фото собаки", [38981, 23669, 20978, 109, 16912, 27152, 140, 372]),
    ("a photo of a 🐶 and a 🐱!", [320, 1125, 539, 320, 10631, 537, 320, 35710, 256]),
    ("Straße ÜBER", [1894, 127, 253, 324, 6522, 1516]),
    ("", []),
    ("   \n ", []),
]

DECODED = {
    "hello, world!": "hello , world ! ",
    "a photo of a dog.": "a photo of a dog . ",
    "it's 2024": "it 's 2 0 2 4 ",
}

LONG_TEXT = "a photo of a dog " * 20  # 100 tokens
# open_clip's row for LONG_TEXT: SOT, the first 75 tokens, EOT in place of the 76th.
LONG_ROW = [SOT, *[320, 1125, 539, 320, 1929] * 15, EOT]

SPECIAL_TOKENS_IN_TEXT = ("<|endoftext|> a <|startoftext|>", [49407, 320, 49406])


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer.load_default()


def test_constants(tok):
    assert (SOT, EOT, CONTEXT_LENGTH) == (49406, 49407, 77)
    assert tok.vocab_size == 49408
    assert clip_tokenizer.load_default() is tok


@pytest.mark.parametrize(("text", "ids"), CASES, ids=range(len(CASES)))
def test_matches_reference(tok, text, ids):
    assert tok.encode(text) == ids
    row = tok(text)
    assert row.shape == (1, CONTEXT_LENGTH) and row.dtype == np.int32
    np.testing.assert_array_equal(row[0, : len(ids) + 2], [SOT, *ids, EOT])
    assert not row[0, len(ids) + 2 :].any()


def test_long_text_is_truncated_with_eot_last(tok):
    assert len(tok.encode(LONG_TEXT)) == 100
    np.testing.assert_array_equal(tok(LONG_TEXT)[0], LONG_ROW)


def test_special_tokens_written_in_text(tok):
    text, ids = SPECIAL_TOKENS_IN_TEXT
    assert tok.encode(text) == ids


@pytest.mark.parametrize("text", sorted(DECODED))
def test_decode_matches_reference(tok, text):
    assert tok.decode(tok.encode(text)) == DECODED[text]


@pytest.mark.parametrize("text", ["a photo of a dog", "hello world", "café crème 日本 🐶"])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text + " "
    assert tok.decode(np.asarray(ids)) == text + " "


def test_batch_and_context_length(tok):
    batch = tok(["a photo of a dog", "hi"], context_length=8)
    assert batch.shape == (2, 8) and batch.dtype == np.int32
    # open_clip tokenize(..., context_length=8), (..., 4) and (..., 1) for these texts:
    np.testing.assert_array_equal(
        batch, [[49406, 320, 1125, 539, 320, 1929, 49407, 0], [49406, 1883, 49407, 0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(tok("a photo of a dog", 4), [[49406, 320, 1125, 49407]])
    np.testing.assert_array_equal(tok("a photo of a dog", 1), [[49407]])
    assert tok([], context_length=5).shape == (0, 5)
    with pytest.raises(ValueError):
        tok("a", context_length=0)


def test_from_file_matches_default(tok):
    path = importlib.resources.files("jprompt") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    custom = clip_tokenizer.Tokenizer.from_file(path)
    assert custom.encode(CASES[0][0]) == CASES[0][1]
