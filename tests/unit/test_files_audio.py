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


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_umask_mode_not_0600(tmp_path, umask):
    import os

    from higgs_lora.files import atomic_write_bytes, staged_directory

    previous = os.umask(umask)
    try:
        written = atomic_write_bytes(tmp_path / "adapter_model.safetensors", b"x")
        atomic_write_json(tmp_path / "run.json", {"a": 1})
        with staged_directory(tmp_path / "merged") as staging:
            (staging / "sub").mkdir()
            atomic_write_text(staging / "sub" / "config.json", "{}")
    finally:
        os.umask(previous)
    expected_file, expected_dir = 0o666 & ~umask, 0o777 & ~umask
    assert (written.stat().st_mode & 0o777) == expected_file
    assert ((tmp_path / "run.json").stat().st_mode & 0o777) == expected_file
    assert ((tmp_path / "merged" / "sub" / "config.json").stat().st_mode & 0o777) == expected_file
    assert ((tmp_path / "merged").stat().st_mode & 0o777) == expected_dir
    assert ((tmp_path / "merged" / "sub").stat().st_mode & 0o777) == expected_dir
