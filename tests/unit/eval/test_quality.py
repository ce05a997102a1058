"""Signal metrics on constructed signals with known answers, DNSMOS on real speech, and the training scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from higgs_lora.data.audio import load_audio
from higgs_lora.eval import quality
from higgs_lora.eval.scoring import GeneratedPair, score_generated

RATE = 24000


def tone(seconds: float, amplitude: float = 0.5, rate: int = RATE, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_silence_ratio_of_a_signal_with_known_silence():
    # 1 s tone, 1 s digital silence, 0.5 s tone, 0.5 s of -60 dBFS hiss (below the -40 dBFS threshold): 1.5/3 silent
    hiss = np.random.default_rng(0).normal(0, 10 ** (-60 / 20), int(0.5 * RATE)).astype(np.float32)
    signal = np.concatenate([tone(1.0), np.zeros(RATE, np.float32), tone(0.5), hiss])
    assert quality.silence_ratio(signal, RATE) == pytest.approx(0.5)
    assert quality.speech_seconds(signal, RATE) == pytest.approx(1.5)
    assert quality.silence_ratio(tone(1.0), RATE) == 0.0
    assert quality.silence_ratio(np.zeros(100, np.float32), RATE) == 1.0  # shorter than one frame


def test_silence_threshold_is_absolute_dbfs():
    quiet_tone = tone(1.0, amplitude=10 ** (-50 / 20))  # peak -50 dBFS: RMS ~ -53 dBFS
    assert quality.silence_ratio(quiet_tone, RATE) == 1.0
    assert quality.silence_ratio(quiet_tone, RATE, silence_dbfs=-60.0) == 0.0


def test_clipped_fraction_of_a_constructed_clipped_signal():
    signal = np.clip(tone(1.0, amplitude=2.0), -1.0, 1.0)  # sin(x)*2 >= 0.999 where |sin| >= 0.4995: 2/3 of the time
    expected = 1 - 2 * math.asin(0.999 / 2) / math.pi
    assert quality.clipped_fraction(signal) == pytest.approx(expected, abs=2e-3)
    assert quality.clipped_fraction(tone(1.0, amplitude=0.9)) == 0.0
    square = np.array([1.0, -1.0, 0.5, 0.0], np.float32)
    assert quality.clipped_fraction(square) == 0.5
    assert quality.clipped_fraction(np.zeros(0, np.float32)) == 0.0


def test_count_letters_ignores_spaces_punctuation_and_diacritics():
    assert quality.count_letters("كَتَبَ، الولدُ 25!") == len("كتب") + len("الولد") + 2


def test_dnsmos_on_demo_speech_is_in_range(demo_rows):
    audio = load_audio(demo_rows[0]["audio"], 22050)
    scores = quality.dnsmos(audio, 22050)
    assert set(scores) == {"sig", "bak", "ovrl", "p808"}
    for value in scores.values():
        assert math.isfinite(value) and 1.0 <= value <= 5.0
    # speech scores higher overall than white noise of the same length
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, len(audio)).astype(np.float32)
    assert quality.dnsmos(noise, 22050)["ovrl"] < scores["ovrl"]


def test_dnsmos_refuses_audio_it_cannot_score():
    with pytest.raises(ValueError, match="too short"):
        quality.dnsmos(np.zeros(10, np.float32), RATE)
    with pytest.raises(ValueError, match="NaN"):
        quality.dnsmos(np.full(RATE, np.nan, np.float32), RATE)


def test_score_generated_in_memory(demo_rows):
    """The training-time scorer: same-speaker pair scores higher similarity than a cross-speaker pair; broken
    clips are counted, not raised."""
    f1 = [r for r in demo_rows if r["speaker"] == "spk_f1"]
    m2 = [r for r in demo_rows if r["speaker"] == "spk_m2"]
    reference = load_audio(f1[0]["audio"], 16000)
    same = load_audio(f1[1]["audio"], RATE)
    other = load_audio(m2[1]["audio"], RATE)
    same_scores = score_generated([GeneratedPair(reference, 16000, same, RATE)])
    cross_scores = score_generated([(reference, 16000, other, RATE), (reference, 16000, np.zeros(5), RATE)])
    assert same_scores["num_scored"] == 1 and same_scores["num_failed"] == 0
    assert cross_scores["num_scored"] == 1 and cross_scores["num_failed"] == 1
    assert same_scores["similarity"] > cross_scores["similarity"]
    for scores in (same_scores, cross_scores):
        assert 1.0 <= scores["dnsmos_ovrl"] <= 5.0 and 1.0 <= scores["dnsmos_sig"] <= 5.0
    assert score_generated([]) == {"num_scored": 0.0, "num_failed": 0.0, "num_silent": 0.0}  # no NaN means to log
    without_dnsmos = score_generated([GeneratedPair(reference, 16000, same, RATE)], dnsmos=False)
    assert without_dnsmos == {
        "num_scored": 1.0,
        "num_failed": 0.0,
        "num_silent": 0.0,
        "similarity": same_scores["similarity"],
    }
