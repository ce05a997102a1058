"""Checks on the bundled Arabic demo corpus in ``examples/demo_corpus``.

The corpus is committed output of ``examples/make_demo_corpus.py``; these
tests guard against it being hand-edited, regenerated badly or growing too
large, without needing espeak-ng.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile

CORPUS_DIR = Path(__file__).resolve().parents[3] / "examples" / "demo_corpus"
MANIFEST_PATH = CORPUS_DIR / "manifest.jsonl"

MANIFEST_KEYS = {"audio", "text", "speaker", "language", "duration"}
MIN_SPEAKERS = 4
MIN_UTTERANCES_PER_SPEAKER = 8
MIN_DURATION_SECONDS = 1.0
MAX_DURATION_SECONDS = 4.0
DURATION_TOLERANCE_SECONDS = 0.01
MAX_CORPUS_BYTES = 5 * 1024 * 1024
# Clips are peak-normalised to about -3 dBFS (0.71 full scale), so a peak at
# full scale means clipping, and speech RMS sits far above -40 dBFS.
CLIPPING_PEAK = 0.99
MIN_RMS = 0.01

ARABIC_LETTER = re.compile(r"[\u0621-\u064A]")
DIACRITIC = re.compile(r"[\u064B-\u0652]")


def load_manifest() -> list[dict]:
    """Return the manifest records in file order."""
    with MANIFEST_PATH.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


RECORDS = load_manifest() if MANIFEST_PATH.is_file() else []


def record_id(record: dict) -> str:
    """Readable pytest id for a manifest record."""
    return record.get("audio", "?")


def test_manifest_exists_and_is_well_formed() -> None:
    assert MANIFEST_PATH.is_file(), f"missing {MANIFEST_PATH}"
    assert RECORDS, "manifest is empty"
    for record in RECORDS:
        assert set(record) == MANIFEST_KEYS, record
        assert record["language"] == "ar"
        assert isinstance(record["duration"], float)
        assert round(record["duration"], 3) == record["duration"]
        audio = Path(record["audio"])
        assert not audio.is_absolute() and ".." not in audio.parts, record["audio"]


def test_manifest_sorted_by_audio_path() -> None:
    paths = [record["audio"] for record in RECORDS]
    assert paths == sorted(paths)
    assert len(set(paths)) == len(paths), "duplicate audio paths"


def test_speaker_and_utterance_counts() -> None:
    per_speaker = Counter(record["speaker"] for record in RECORDS)
    assert len(per_speaker) >= MIN_SPEAKERS, per_speaker
    for speaker, count in per_speaker.items():
        assert count >= MIN_UTTERANCES_PER_SPEAKER, (speaker, count)


def test_audio_lives_in_its_speaker_directory() -> None:
    for record in RECORDS:
        assert Path(record["audio"]).parts[0] == record["speaker"], record


@pytest.mark.parametrize("record", RECORDS, ids=record_id)
def test_audio_file(record: dict) -> None:
    path = CORPUS_DIR / record["audio"]
    assert path.is_file(), f"missing {path}"

    info = soundfile.info(str(path))
    assert info.format == "FLAC"
    assert info.subtype == "PCM_16"
    assert info.channels == 1

    duration_seconds = info.frames / info.samplerate
    assert MIN_DURATION_SECONDS <= duration_seconds <= MAX_DURATION_SECONDS
    assert abs(duration_seconds - record["duration"]) <= DURATION_TOLERANCE_SECONDS

    samples, _ = soundfile.read(str(path), dtype="float64")
    rms = float(np.sqrt(np.mean(samples**2)))
    peak = float(np.max(np.abs(samples)))
    assert rms > MIN_RMS, f"near-silent clip (RMS {rms:.4f})"
    assert peak < CLIPPING_PEAK, f"clipped clip (peak {peak:.4f})"


def test_texts_are_arabic_and_distinct() -> None:
    texts = [record["text"] for record in RECORDS]
    for text in texts:
        assert ARABIC_LETTER.search(text), text
        assert text == text.strip() and text, repr(text)
    assert len(set(texts)) == len(texts), "duplicate transcripts"


def test_texts_mix_diacritised_and_plain() -> None:
    with_diacritics = [r["text"] for r in RECORDS if DIACRITIC.search(r["text"])]
    without_diacritics = [r["text"] for r in RECORDS if not DIACRITIC.search(r["text"])]
    assert with_diacritics, "no transcript carries tashkeel"
    assert without_diacritics, "every transcript carries tashkeel"


def test_corpus_size_limit() -> None:
    total_bytes = sum(p.stat().st_size for p in CORPUS_DIR.rglob("*") if p.is_file())
    assert total_bytes <= MAX_CORPUS_BYTES, f"{total_bytes / 1e6:.2f} MB"
