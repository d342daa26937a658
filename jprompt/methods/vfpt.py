"""VFPT: visual Fourier prompt tuning (Zeng et al., NeurIPS 2024; official code runtsang/VFPT,
``src/models/vit_prompt/vit_fourier.py``).

VPT's prompt tokens (``jprompt.methods.vpt``: the same parameters, init, projection, dropout,
placement after the CLS token without position embedding, deep overwriting, head) of which the
first ``m = floor(num_tokens * fourier_fraction)`` of every inserted set go through a 2D discrete
Fourier transform, of which the real part enters the backbone:

    prompts[..., :m, :] -> Re(FFT_seq(FFT_hidden(prompts[..., :m, :])))

over the m Fourier tokens (sequence) and the width D (hidden), per example, after the projection
and the prompt dropout, as the official ``FNetBlock`` (``torch.fft.fft(torch.fft.fft(x, dim=-1),
dim=-2).real``). Shallow transforms the one set; deep transforms each layer's own set, layer 0's
included (the official ``FOURIER_FIRST_LAYER=True``). ``fourier_fraction=0`` is VPT;
``fourier_dims`` is the official ``FOURIER_DIMENSION``: ``all`` (the default, both axes),
``sequence`` or ``hidden`` (one axis). The transform adds no parameter: the count is VPT's.

Where the official options are not offered: ``FOURIER_LOCATION`` ``prepend`` (the default, the
Fourier tokens first) and ``append`` give the same outputs, since prompt tokens carry no position
embedding and attention treats them as a set; ``random`` (which stored tokens are transformed
redrawn by Python's ``random`` at every forward pass), ``FOURIER_TYPE`` ``linear``,
``FOURIER_ADDITION``, ``FOURIER_HALF`` and ``MIXED`` are the paper's ablations and are left out.
A fraction that leaves 0 of ``num_tokens`` Fourier tokens (the official code then fails in the
FFT of an empty axis) is refused.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from jprompt.methods.vpt import VisualPromptTuning

# The official FOURIER_DIMENSION: the axes of (..., m, D) the FFT runs over.
FOURIER_AXES = {"all": (-2, -1), "sequence": (-2,), "hidden": (-1,)}


def fourier_prompts(tokens: jax.Array, axes: tuple[int, ...] = FOURIER_AXES["all"]) -> jax.Array:
    """The real part of the discrete Fourier transform of ``tokens`` over ``axes``."""
    return jnp.fft.fftn(tokens, axes=axes).real.astype(tokens.dtype)


@dataclasses.dataclass(frozen=True)
class VisualFourierPromptTuning(VisualPromptTuning):
    fourier_fraction: float = 0.5
    fourier_dims: str = "all"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.fourier_fraction <= 1.0:
            raise ValueError(f"fourier_fraction must be in [0, 1], got {self.fourier_fraction}")
        if self.fourier_dims not in FOURIER_AXES:
            raise ValueError(
                f"unknown fourier_dims {self.fourier_dims!r}; valid choices: {list(FOURIER_AXES)}"
            )
        if self.fourier_fraction > 0 and self.num_fourier == 0:
            raise ValueError(
                f"fourier_fraction={self.fourier_fraction} of num_tokens={self.num_tokens} is 0 "
                f"Fourier tokens: use at least {1 / self.num_tokens:g}, or 0 for plain VPT"
            )

    @property
    def num_fourier(self) -> int:
        """How many of each set's tokens are transformed: the first ``floor(p * fraction)``."""
        return math.floor(self.num_tokens * self.fourier_fraction)

    def prompts(self, prompter: dict, batch: int, *, rng, train: bool) -> jax.Array:
        tokens = super().prompts(prompter, batch, rng=rng, train=train)
        m = self.num_fourier
        if m == 0:
            return tokens
        fourier = fourier_prompts(tokens[..., :m, :], FOURIER_AXES[self.fourier_dims])
        return jnp.concatenate([fourier, tokens[..., m:, :]], axis=-2)
