"""Optional automatic Arabic diacritisation (`data.diacritize: auto`), the same for training transcripts (prepare)
and target texts (inference), through `normalize_arabic(..., diacritize=...)`.

The model is text2tashkeel's bundled `rawi-ensemble` (Apache-2.0, one 4.9 MB INT8 ONNX file inside the wheel, run
by onnxruntime: no pickle, nothing downloaded); it is imported only when 'auto' is used (`pip install
higgs-lora[arabic]`). Only models whose weights ship in the wheel are accepted, so nothing is fetched at run time.
Pure text in, text out; imports only the standard library here. Trade-off and measurements: docs/arabic.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from higgs_lora.errors import UserError

MODES = ("none", "auto")
MODEL = "rawi-ensemble"
"""text2tashkeel's bundled model (its default; best of its bundled ones in our measurement, docs/benchmarks.md)."""

_MARKS = re.compile("[\u064b-\u0652\u0670]")
_WORD = re.compile(r"\S+")

_override: Callable[[str], str] | None = None


class DiacritizerMissing(UserError):
    """data.diacritize=auto without the optional package."""


def use_diacritizer(function: Callable[[str], str] | None) -> None:
    """Replace the model with `function` (text -> diacritised text); None restores it. For tests and experiments."""
    global _override
    _override = function


@lru_cache(maxsize=1)
def _model() -> Callable[[str], str]:
    try:
        import text2tashkeel
    except ImportError:
        raise DiacritizerMissing(
            "data.diacritize=auto needs the optional diacritiser: pip install 'higgs-lora[arabic]' "
            "(or set data.diacritize=none)"
        ) from None
    if MODEL not in text2tashkeel.BUNDLED:
        raise DiacritizerMissing(f"text2tashkeel {text2tashkeel.__version__} does not bundle {MODEL!r}")
    return text2tashkeel.Diacritizer(MODEL).diacritize


def has_marks(word: str) -> bool:
    return bool(_MARKS.search(word))


def diacritize(text: str, mode: str) -> str:
    """`text` with tashkeel added to every word that has none ('auto'), or unchanged ('none').

    The model sees the whole text (context decides the vowels) and returns the same base letters with marks; a word
    the writer already diacritised keeps the writer's marks. When the model's words do not line up with the input
    (it changed a base letter or the spacing), the input is kept as it is rather than guessed at.
    """
    if mode == "none" or not text:
        return text
    if mode != "auto":
        raise ValueError(f"diacritize mode {mode!r}: expected one of {MODES}")
    predicted = (_override or _model())(text)
    words, guesses = _WORD.findall(text), _WORD.findall(predicted)
    if len(words) != len(guesses) or any(_MARKS.sub("", w) != _MARKS.sub("", g) for w, g in zip(words, guesses)):
        return text
    pieces = iter(w if has_marks(w) else g for w, g in zip(words, guesses))
    return _WORD.sub(lambda _: next(pieces), text)
