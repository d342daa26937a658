"""SigLIP's text tokenization: the user's SentencePiece model, cut and padded as big_vision does.

The released SigLIP models were trained on ids of big_vision's "c4_en" SentencePiece model
(``gs://t5-data/vocabs/cc_en.32000/sentencepiece.model``; "mc4" for the i18n ones), which is not
shipped here: pass its file. big_vision's SigLIP demo tokenizes with ``tokenize(max_len=L,
eos="sticky", pad_value=1)`` (``pp/ops_text.py``): the text is lowercased, encoded, the EOS id
appended; a sequence of L or more ids keeps its first L - 1 and the EOS, a shorter one is padded.
The demo pads with 1, c4_en's (and mc4's) EOS id; we pad with the model's EOS id, the same for
those models, so that the last token the text tower reads is always an EOS.
"""

import os
from collections.abc import Sequence

import numpy as np

from jprompt.errors import InputError, MissingFileError


class Tokenizer:
    """``tokenizer(texts) -> (T, context_length)`` int32 ids for ``siglip.TextTower``."""

    def __init__(self, path, context_length: int):
        import sentencepiece  # an optional dependency, needed by SigLIP's text tower only

        path = os.path.expanduser(os.fspath(path))
        if not os.path.isfile(path):
            raise MissingFileError(
                f"there is no SentencePiece model {path}: fetch the one the SigLIP model was "
                "trained with (c4_en: gsutil cp gs://t5-data/vocabs/cc_en.32000/"
                "sentencepiece.model ~/jprompt_models/) and pass its path"
            )
        self._model = sentencepiece.SentencePieceProcessor()
        try:
            self._model.Load(path)
        except (OSError, RuntimeError) as error:
            reason = " ".join(str(error).splitlines()[:1])
            raise InputError(f"cannot read {path} as a SentencePiece model: {reason}") from None
        if self._model.eos_id() < 0:
            raise InputError(f"the SentencePiece model {path} has no EOS token, which SigLIP reads")
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        length, eos = self.context_length, self._model.eos_id()
        ids = np.full((len(texts), length), eos, np.int32)
        for row, text in enumerate(texts):
            tokens = [*self._model.EncodeAsIds(text.lower()), eos]
            if len(tokens) >= length:  # "sticky": cut, but keep the final EOS
                tokens = [*tokens[: length - 1], eos]
            ids[row, : len(tokens)] = tokens
        return ids
