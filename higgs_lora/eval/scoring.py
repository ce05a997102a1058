"""Per-sample metrics, their summaries, --compare deltas, and the cheap in-memory scorer used during training.

One row per generated sample (:data:`COLUMNS`, the CSV's columns). A metric that cannot be computed for a sample
(no reference recording, no ASR, audio too short...) is None in its row and the reason is added to the row's
``notes``; a generated wav that cannot be read sets ``error`` and no audio metric, and never stops the run.

Summaries give, per metric, mean/median/p10/p90/min/max over the samples that have it and one headline ``value``:
the mean, except CER/WER (corpus rates: total edits / total reference length) and RTF (total generation seconds /
total generated audio seconds, i.e. what a user waiting for the whole batch sees).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from higgs_lora.data.audio import AudioError, read_audio
from higgs_lora.eval import quality
from higgs_lora.eval.predictions import Prediction, PredictionFolder
from higgs_lora.eval.speaker import SpeakerEmbedder, cosine
from higgs_lora.eval.text import EmptyReferenceError, ErrorCounts, corpus_rates, error_counts, scoring_text

COLUMNS = [
    "index",
    "id",
    "speaker",
    "wav",
    "reference_audio",
    "target_audio",
    "target_text",
    "asr_text",
    "similarity_reference",
    "similarity_target",
    "cer",
    "wer",
    "char_edits",
    "num_ref_chars",
    "word_edits",
    "num_ref_words",
    "dnsmos_sig",
    "dnsmos_bak",
    "dnsmos_ovrl",
    "audio_seconds",
    "speech_seconds",
    "expected_seconds",
    "duration_ratio",
    "silence_ratio",
    "clipped_fraction",
    "duration_s",
    "seconds",
    "rtf",
    "first_audio_s",
    "stop",
    "eval_seconds",
    "error",
    "notes",
]
"""Per-sample fields, in CSV column order."""

MEAN_METRICS = [
    "similarity_reference",
    "similarity_target",
    "dnsmos_sig",
    "dnsmos_bak",
    "dnsmos_ovrl",
    "duration_ratio",
    "silence_ratio",
    "clipped_fraction",
    "audio_seconds",
    "seconds",
    "first_audio_s",
]
"""Metrics whose headline value is the mean over samples."""
SUMMARY_METRICS = [*MEAN_METRICS[:5], "cer", "wer", *MEAN_METRICS[5:], "rtf"]
"""Every summarised metric, in report order."""
HIGHER_IS_BETTER = {"similarity_reference", "similarity_target", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"}
LOWER_IS_BETTER = {"cer", "wer", "silence_ratio", "clipped_fraction", "rtf", "seconds", "first_audio_s"}


@dataclass
class Scorers:
    """What scores a sample; built once per run (each model loads on first use)."""

    speaker: SpeakerEmbedder
    transcriber: object | None = None
    """An :class:`higgs_lora.eval.asr.Transcriber`, or None to skip CER/WER."""
    use_dnsmos: bool = True


# ------------------------------------------------------------------------------------------------ per sample


class _Row(dict):
    """A sample's row; ``note`` records why a metric is missing."""

    def note(self, message: str) -> None:
        self["notes"] = f"{self['notes']}; {message}" if self.get("notes") else message


def _reference(path: Path, scorers: Scorers, cache: dict) -> dict:
    """What a recording's samples are needed for, computed once per path and kept instead of the audio (a corpus
    of references would otherwise stay in memory): its speaker embedding and its seconds of speech.

    An unreadable or unembeddable recording is remembered as its error, re-raised at every use.
    """
    key = str(path)
    if key not in cache:
        try:
            samples, rate = read_audio(key)
            cache[key] = {"speech_seconds": quality.speech_seconds(samples, rate)}
            cache[key]["embedding"] = scorers.speaker.embed(samples, rate)
        except (AudioError, ValueError) as err:
            cache.setdefault(key, {})["error"] = err
    if "error" in cache[key]:
        raise cache[key]["error"]
    return cache[key]


def score_prediction(
    prediction: Prediction, folder: Path, scorers: Scorers, reference_cache: dict | None = None
) -> dict:
    """All metrics of one sample as a row keyed by :data:`COLUMNS`.

    ``reference_cache`` (a dict shared across samples) lets samples that share a reference or target recording
    read and embed it once.
    """
    started = time.perf_counter()
    reference_cache = {} if reference_cache is None else reference_cache
    p = prediction
    row = _Row.fromkeys(COLUMNS)
    row.update(
        index=p.index,
        id=p.id,
        speaker=p.speaker,
        wav=_display(p.wav, folder),
        reference_audio=_display(p.reference_audio, folder),
        target_audio=_display(p.target_audio, folder),
        target_text=p.target_text,
        duration_s=p.duration_s,
        seconds=p.seconds,
        first_audio_s=p.first_audio_s,
        stop=p.stop,
        rtf=p.rtf if p.rtf is not None else _ratio(p.seconds, p.duration_s),
    )
    try:
        generated, rate = read_audio(str(p.wav))
    except AudioError as err:
        row["error"] = f"generated audio: {err}"
        row["eval_seconds"] = round(time.perf_counter() - started, 3)
        return dict(row)
    row["audio_seconds"] = len(generated) / rate
    _speaker_metrics(row, p, generated, rate, scorers, reference_cache)
    _intelligibility(row, p, generated, rate, scorers)
    _signal_metrics(row, p, generated, rate, scorers, reference_cache)
    row["eval_seconds"] = round(time.perf_counter() - started, 3)
    return dict(row)


def _display(path: Path | None, folder: Path) -> str | None:
    """A path as written to the report: relative to the prediction folder when inside it, else absolute."""
    if path is None:
        return None
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _speaker_metrics(row, p, generated, rate, scorers, reference_cache) -> None:
    try:
        generated_embedding = scorers.speaker.embed(generated, rate)
    except ValueError as err:
        row.note(f"speaker similarity: {err}")
        return
    for column, path, what in (
        ("similarity_reference", p.reference_audio, "reference"),
        ("similarity_target", p.target_audio, "target"),
    ):
        if path is None:
            continue  # no such recording for this sample: not a problem worth a note
        try:
            row[column] = cosine(generated_embedding, _reference(path, scorers, reference_cache)["embedding"])
        except (AudioError, ValueError) as err:
            row.note(f"{what} audio: {err}")


def _intelligibility(row, p, generated, rate, scorers) -> None:
    if scorers.transcriber is None:
        return
    try:
        row["asr_text"] = scorers.transcriber.transcribe(generated, rate)
        counts = error_counts(p.target_text, row["asr_text"])
    except EmptyReferenceError as err:
        row.note(str(err))
        return
    row.update(
        cer=counts.cer,
        wer=counts.wer,
        char_edits=counts.char_edits,
        num_ref_chars=counts.num_ref_chars,
        word_edits=counts.word_edits,
        num_ref_words=counts.num_ref_words,
    )


def _signal_metrics(row, p, generated, rate, scorers, reference_cache) -> None:
    if scorers.use_dnsmos:
        try:
            scores = quality.dnsmos(generated, rate)
            row.update(dnsmos_sig=scores["sig"], dnsmos_bak=scores["bak"], dnsmos_ovrl=scores["ovrl"])
        except ValueError as err:
            row.note(f"DNSMOS: {err}")
    row["silence_ratio"] = quality.silence_ratio(generated, rate)
    row["clipped_fraction"] = quality.clipped_fraction(generated)
    row["speech_seconds"] = quality.speech_seconds(generated, rate)
    letters_per_second = quality.DEFAULT_LETTERS_PER_SECOND
    if p.reference_audio is not None and p.reference_text:
        try:
            reference_speech = _reference(p.reference_audio, scorers, reference_cache)["speech_seconds"]
            reference_letters = quality.count_letters(scoring_text(p.reference_text))
            if reference_speech > 0 and reference_letters > 0:
                letters_per_second = reference_letters / reference_speech
        except (AudioError, ValueError) as err:
            row.note(f"speaking rate: reference unusable ({err}); assumed {letters_per_second:g} letters/s")
    target_letters = quality.count_letters(scoring_text(p.target_text))
    if target_letters:
        row["expected_seconds"] = target_letters / letters_per_second
        row["duration_ratio"] = row["speech_seconds"] / row["expected_seconds"]


def score_folder(
    folder: PredictionFolder, scorers: Scorers, progress: Callable[[int, int, dict], None] | None = None
) -> list[dict]:
    """Rows for every prediction of a folder, in manifest order; ``progress(done, total, row)`` after each."""
    reference_cache: dict = {}
    rows = []
    for done, prediction in enumerate(folder.predictions, start=1):
        rows.append(score_prediction(prediction, folder.path, scorers, reference_cache))
        if progress is not None:
            progress(done, len(folder.predictions), rows[-1])
    return rows


# ------------------------------------------------------------------------------------------------ summaries


def _stats(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "p10": float(np.percentile(array, 10)),
        "p90": float(np.percentile(array, 90)),
        "min": float(array.min()),
        "max": float(array.max()),
        "n": len(values),
    }


def _values(rows: Iterable[dict], column: str) -> list[float]:
    return [float(r[column]) for r in rows if r.get(column) is not None and np.isfinite(r[column])]


def _counts(rows: Iterable[dict]) -> list[ErrorCounts]:
    return [
        ErrorCounts(r["char_edits"], r["num_ref_chars"], r["word_edits"], r["num_ref_words"])
        for r in rows
        if r.get("char_edits") is not None
    ]


def summarise(rows: Sequence[dict]) -> dict[str, dict]:
    """Per metric: stats over the samples that have it plus a headline ``value`` (see the module docstring).

    Metrics no sample has are left out.
    """
    summary: dict[str, dict] = {}
    rates = corpus_rates(_counts(rows))
    timed = [r for r in rows if r.get("seconds") is not None and r.get("duration_s")]
    for metric in SUMMARY_METRICS:
        values = _values(rows, metric)
        if not values:
            continue
        summary[metric] = {"value": float(np.mean(values)), **_stats(values)}
        if metric in ("cer", "wer") and rates is not None:
            summary[metric]["value"] = rates[metric]
        if metric == "rtf" and timed:
            summary[metric]["value"] = sum(r["seconds"] for r in timed) / sum(r["duration_s"] for r in timed)
    return summary


def per_speaker(rows: Sequence[dict]) -> dict[str, dict]:
    """Headline values per speaker; samples whose manifest entry names no speaker are left out of this view."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("speaker"):
            groups.setdefault(row["speaker"], []).append(row)
    out = {}
    for speaker in sorted(groups):
        summary = summarise(groups[speaker])
        out[speaker] = {"n": len(groups[speaker]), **{m: s["value"] for m, s in summary.items()}}
    return out


def compare(rows: Sequence[dict], base_rows: Sequence[dict]) -> dict:
    """Side-by-side of two folders' rows for the same samples, matched by ``id``.

    Both summaries are computed over the ids the two folders share (so the deltas compare like with like), and
    ``delta`` = this folder's headline value - the base's, per metric both have. Per-sample deltas likewise.
    """
    base_by_id = {r["id"]: r for r in base_rows}
    common = [r for r in rows if r["id"] in base_by_id]
    common_ids = {r["id"] for r in common}
    base_common = [base_by_id[r["id"]] for r in common]
    summary, base_summary = summarise(common), summarise(base_common)
    delta = {m: summary[m]["value"] - base_summary[m]["value"] for m in summary if m in base_summary}
    per_sample = []
    for row, base in zip(common, base_common):
        entry = {"id": row["id"], "base_wav": base.get("wav")}
        for metric in SUMMARY_METRICS:
            if row.get(metric) is not None and base.get(metric) is not None:
                entry[metric] = row[metric] - base[metric]
        per_sample.append(entry)
    return {
        "num_common": len(common),
        "only_in_pred": sorted(r["id"] for r in rows if r["id"] not in common_ids),
        "only_in_base": sorted(i for i in base_by_id if i not in common_ids),
        "summary": {m: s["value"] for m, s in summary.items()},
        "base_summary": {m: s["value"] for m, s in base_summary.items()},
        "delta": delta,
        "per_sample": per_sample,
    }


# ------------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class GeneratedPair:
    """A reference recording and a clip generated to clone its voice, in memory (mono float, any rates)."""

    reference: np.ndarray
    reference_rate: int
    generated: np.ndarray
    generated_rate: int


@cache
def default_embedder(device: str = "cpu") -> SpeakerEmbedder:
    """One speaker embedder per device and process: repeated evaluations load resemblyzer once and reuse the
    embeddings of audio they have already seen (the same references, step after step)."""
    return SpeakerEmbedder(device)


MIN_SPEECH_SECONDS = 0.3
"""A generated clip or reference with less non-silent audio than this (quality.speech_seconds) is not scored for
similarity during training: it is flagged as silent instead."""


def score_generated(
    pairs: Iterable[GeneratedPair | tuple],
    *,
    embedder: SpeakerEmbedder | None = None,
    dnsmos: bool = True,
    dnsmos_seconds: float | None = quality.DNSMOS_WINDOW_SECONDS,
) -> dict[str, float]:
    """Cheap similarity and DNSMOS of a few generated clips, for TensorBoard at evaluation steps. No file I/O.

    ``pairs`` are :class:`GeneratedPair` or ``(reference, reference_rate, generated, generated_rate)`` tuples.
    Returns the means ``similarity`` (generated vs reference), ``dnsmos_sig``, ``dnsmos_bak``, ``dnsmos_ovrl``
    over the pairs that could be scored, plus ``num_scored`` and ``num_failed`` (clips too short or silent to
    score; ``num_silent`` of them had less than MIN_SPEECH_SECONDS above the silence threshold, in the clip or its
    reference, and get no similarity: near silence against near silence would otherwise score ~1.0).
    A mean no pair could produce is left out rather than logged as NaN. Cheap: DNSMOS scores only the first
    ``dnsmos_seconds`` (one 9.01 s window; ``dnsmos=False`` skips it, most of the cost), and the embedder is loaded
    once per process and remembers the references it has embedded.
    """
    embedder = embedder or default_embedder()
    similarities, scores, failed, silent = [], [], 0, 0
    for pair in pairs:
        if not isinstance(pair, GeneratedPair):
            pair = GeneratedPair(*pair)
        if (
            min(
                quality.speech_seconds(pair.generated, pair.generated_rate),
                quality.speech_seconds(pair.reference, pair.reference_rate),
            )
            < MIN_SPEECH_SECONDS
        ):
            # Near silence embeds as one same "voice": silence against silence would score ~1.0, a perfect clone.
            silent += 1
            continue
        try:
            generated = embedder.embed(pair.generated, pair.generated_rate)
            similarity = cosine(generated, embedder.embed(pair.reference, pair.reference_rate))
            score = quality.dnsmos(pair.generated, pair.generated_rate, max_seconds=dnsmos_seconds) if dnsmos else None
        except ValueError:  # too short, silent or non-finite: counted, never fatal to a training run
            failed += 1
            continue
        similarities.append(similarity)
        if score is not None:
            scores.append(score)
    out: dict[str, float] = {
        "num_scored": float(len(similarities)),
        "num_failed": float(failed + silent),
        "num_silent": float(silent),
    }
    if similarities:
        out["similarity"] = float(np.mean(similarities))
    if scores:
        for key in ("sig", "bak", "ovrl"):
            out[f"dnsmos_{key}"] = float(np.mean([s[key] for s in scores]))
    return out
