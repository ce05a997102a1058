"""Atomic writes and audio loading."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from higgs_lora.data.audio import AudioError, load_audio
from higgs_lora.files import atomic_write_json, atomic_write_text, replace_directory


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b.txt", "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["b.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_json(tmp_path / "report.json", {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"not serialisable": object()})
    assert path.read_text() == '{\n  "ok": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_json_keeps_arabic_readable(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"text": "مرحبا"})
    assert "مرحبا" in path.read_text(encoding="utf-8")


def test_replace_directory(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    replace_directory(staging, target)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_load_audio_downmixes_and_resamples(tmp_path):
    rate = 22050
    t = np.arange(rate) / rate
    left, right = 0.5 * np.sin(2 * np.pi * 220 * t), 0.1 * np.sin(2 * np.pi * 220 * t)
    sf.write(tmp_path / "stereo.flac", np.stack([left, right], axis=1), rate)
    samples = load_audio(tmp_path / "stereo.flac", 24000)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) - 24000) <= 1
    assert np.abs(samples).max() == pytest.approx(0.3, abs=0.01)  # mean of the two channels


def test_load_audio_reports_corrupt_files(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav file")
    with pytest.raises(AudioError, match="bad.wav: cannot read audio"):
        load_audio(bad)
