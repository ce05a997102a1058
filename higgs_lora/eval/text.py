"""Scoring normalisation and character/word error counts.

CER and WER compare what was *said*, not how it was spelt, so both the target text and the ASR transcript go
through the same scoring normalisation first (:func:`scoring_text`): diacritics stripped, alef/hamza forms, alef
maksura and ta marbuta folded, punctuation removed, digits unified to ASCII (not spelled out), whitespace collapsed.
The rules themselves live in :func:`higgs_lora.text.arabic.normalize_for_scoring`, next to the training normaliser,
so the two can never drift apart; this module adds what scoring needs on top: edit counts that add up over a corpus.

Corpus CER/WER are ``sum(edits) / sum(reference length)`` (each sample weighted by its length, as ASR benchmarks
report them), not the mean of per-sample rates, which would let a two-word sample weigh as much as a paragraph.
CER counts the space between words as a character (jiwer's default), after normalisation has collapsed runs of
spaces to one.
"""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass

from higgs_lora.text.arabic import normalize_for_scoring


def scoring_text(text: str, language: str = "ar") -> str:
    """The form of ``text`` that CER/WER compare.

    Arabic (``language`` "ar"): :func:`higgs_lora.text.arabic.normalize_for_scoring`. Any other language (a replay
    corpus in English, say) gets only the language-neutral part, so no Arabic letter folding touches it: NFC,
    punctuation to spaces, lowercase, whitespace collapsed.
    """
    if language == "ar":
        return normalize_for_scoring(text)
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if ch in string.punctuation or unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class ErrorCounts:
    """Edit counts of one transcript against its reference, after scoring normalisation of both."""

    char_edits: int
    """Character substitutions + deletions + insertions."""
    num_ref_chars: int
    """Characters in the normalised reference (spaces included)."""
    word_edits: int
    """Word substitutions + deletions + insertions."""
    num_ref_words: int
    """Words in the normalised reference."""

    @property
    def cer(self) -> float:
        return self.char_edits / self.num_ref_chars

    @property
    def wer(self) -> float:
        return self.word_edits / self.num_ref_words


class EmptyReferenceError(ValueError):
    """The reference text has nothing left to score against after normalisation."""


def error_counts(reference: str, hypothesis: str, language: str = "ar") -> ErrorCounts:
    """Character and word edit counts of ``hypothesis`` against ``reference``, both scoring-normalised.

    Raises EmptyReferenceError when the reference normalises to nothing (e.g. only punctuation): a rate against
    zero reference characters is undefined, and silently scoring it 0 or 1 would bias the corpus numbers.
    """
    import jiwer

    ref, hyp = scoring_text(reference, language), scoring_text(hypothesis, language)
    if not ref:
        raise EmptyReferenceError(f"reference text {reference!r} is empty after scoring normalisation")
    if hyp:
        chars = jiwer.process_characters(ref, hyp)
        words = jiwer.process_words(ref, hyp)
        char_edits = chars.substitutions + chars.deletions + chars.insertions
        word_edits = words.substitutions + words.deletions + words.insertions
    else:  # nothing recognised: every reference character and word is a deletion
        char_edits, word_edits = len(ref), len(ref.split())
    return ErrorCounts(char_edits, len(ref), word_edits, len(ref.split()))


def corpus_rates(counts: list[ErrorCounts]) -> dict[str, float] | None:
    """Corpus CER and WER: total edits over total reference characters/words; None for an empty list."""
    if not counts:
        return None
    return {
        "cer": sum(c.char_edits for c in counts) / sum(c.num_ref_chars for c in counts),
        "wer": sum(c.word_edits for c in counts) / sum(c.num_ref_words for c in counts),
    }
