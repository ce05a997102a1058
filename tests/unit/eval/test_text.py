"""Scoring normalisation as CER/WER see it, and the edit-count arithmetic (values worked out by hand)."""

from __future__ import annotations

import jiwer
import pytest

from higgs_lora.eval.text import EmptyReferenceError, ErrorCounts, corpus_rates, error_counts, scoring_text

# (id, text, scoring form): one row per rule the issue names, on the text an ASR and a target would differ in.
SCORING_TABLE = [
    ("diacritics stripped", "ذَهَبَ الوَلَدُ", "ذهب الولد"),
    ("shadda and tanween stripped", "مُحَمَّدٌ", "محمد"),
    ("alef with hamza above folded", "أحمد", "احمد"),
    ("alef with hamza below folded", "إسلام", "اسلام"),
    ("alef with maddah folded", "آمال", "امال"),
    ("alef wasla folded", "ٱلكتاب", "الكتاب"),
    ("alef maksura folded to yaa", "على", "علي"),
    ("ta marbuta folded to haa", "مدرسة", "مدرسه"),
    ("hamza on waw and yaa folded", "مؤمن سائل", "مومن سايل"),
    ("arabic punctuation removed", "نعم، لا؛ لماذا؟", "نعم لا لماذا"),
    ("latin punctuation removed", "مرحبا! (كيف) الحال.", "مرحبا كيف الحال"),
    ("guillemets and quotes removed", '«قال» "نعم"', "قال نعم"),
    ("eastern arabic digits unified", "٢٠٢٤", "2024"),
    ("persian digits unified", "۲۰۲۴", "2024"),
    ("tatweel removed", "كـــتاب", "كتاب"),
    ("whitespace collapsed", "  كتب \t  قرأ\n", "كتب قرا"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in SCORING_TABLE], ids=[c[0] for c in SCORING_TABLE])
def test_scoring_text_table(text, expected):
    assert scoring_text(text) == expected


# (id, reference, hypothesis, char_edits, ref_chars, word_edits, ref_words), counted by hand on the normalised forms.
ERROR_TABLE = [
    ("identical", "كتب الولد", "كتب الولد", 0, 9, 0, 2),
    ("spelling only", "ذَهَبَ أحمدُ إلى المدرسةِ.", "ذهب احمد الي المدرسه", 0, 20, 0, 4),
    ("digits in either alphabet agree", "عام ٢٠٢٤", "عام 2024", 0, 8, 0, 2),
    ("one letter substituted", "كتب", "كتف", 1, 3, 1, 1),
    ("one word dropped", "كتب الولد الدرس", "كتب الدرس", 6, 15, 1, 3),
    ("one word inserted", "كتب الدرس", "كتب الولد الدرس", 6, 9, 1, 2),
    ("empty transcript: everything deleted", "كتب الولد", "", 9, 9, 2, 2),
    ("punctuation-only transcript counts as empty", "كتب", "؟!", 3, 3, 1, 1),
]


@pytest.mark.parametrize(
    ("reference", "hypothesis", "char_edits", "ref_chars", "word_edits", "ref_words"),
    [c[1:] for c in ERROR_TABLE],
    ids=[c[0] for c in ERROR_TABLE],
)
def test_error_counts_table(reference, hypothesis, char_edits, ref_chars, word_edits, ref_words):
    counts = error_counts(reference, hypothesis)
    assert counts == ErrorCounts(char_edits, ref_chars, word_edits, ref_words)
    assert counts.cer == pytest.approx(char_edits / ref_chars)
    assert counts.wer == pytest.approx(word_edits / ref_words)
    if scoring_text(hypothesis):  # agrees with jiwer on the normalised strings
        assert counts.cer == pytest.approx(jiwer.cer(scoring_text(reference), scoring_text(hypothesis)))
        assert counts.wer == pytest.approx(jiwer.wer(scoring_text(reference), scoring_text(hypothesis)))


def test_empty_reference_is_an_error_not_a_score():
    with pytest.raises(EmptyReferenceError, match="empty after scoring normalisation"):
        error_counts("؟ ، .", "كتب")


def test_corpus_rates_weight_samples_by_length():
    short = ErrorCounts(char_edits=1, num_ref_chars=2, word_edits=1, num_ref_words=1)  # CER 0.5
    long = ErrorCounts(char_edits=0, num_ref_chars=18, word_edits=0, num_ref_words=4)  # CER 0
    assert corpus_rates([short, long]) == {"cer": 1 / 20, "wer": 1 / 5}  # not the per-sample mean 0.25 / 0.5
    assert corpus_rates([]) is None
