"""Signal-level quality: DNSMOS, silence ratio, clipping, speaking rate.

DNSMOS (Microsoft's DNS-Challenge non-intrusive MOS predictor, P.835 variant) comes from `speechmos`, whose ONNX
models ship inside its wheel and run on onnxruntime: nothing is downloaded. It needs 16 kHz input in [-1, 1], so
:func:`dnsmos` resamples and clamps. It scores 9.01 s windows with a 1 s hop; a shorter clip is repeated up to
9.01 s (speechmos's own rule), so a 2 s clip costs as much as a 9 s one (~0.3-1 s on one CPU core).

SIG rates the speech signal, BAK the background (higher = less noise), OVRL the whole; all on the 1-5 MOS scale.

The silence ratio, clipping fraction and speaking rate are plain numpy on the generated waveform:

* a 20 ms frame is *silent* when its RMS level is below ``silence_dbfs`` (default -40 dBFS, absolute: generated
  speech is loud, and a relative threshold would call an all-noise clip "speech");
* a sample is *clipped* at magnitude >= :data:`higgs_lora.data.audio.CLIP_LEVEL` (0.999, the data checks' level);
* speaking rate is letters per second of non-silent audio; the *expected* duration of a generated clip is its
  target text's letters divided by the speaker's own rate measured on the reference recording (falling back to
  :data:`DEFAULT_LETTERS_PER_SECOND` when there is none). ``duration_ratio`` = generated speech seconds / expected
  seconds: ~1 is a natural pace, well above 1 means babbling or long pauses, well below 1 means words were dropped.
"""

from __future__ import annotations

import numpy as np

from higgs_lora.data.audio import CLIP_LEVEL, resample

DNSMOS_RATE = 16000
"""speechmos's required sample rate (Hz)."""
DNSMOS_WINDOW_SECONDS = 9.01
"""One DNSMOS scoring window."""
FRAME_SECONDS = 0.02
"""Frame length of the silence measurement."""
SILENCE_DBFS = -40.0
"""A frame quieter than this (RMS, dB relative to full scale) is silent."""
DEFAULT_LETTERS_PER_SECOND = 12.0
"""Fallback speaking rate (letters per second of speech) when no reference recording is readable; a rough figure
for read Modern Standard Arabic. The reference's own rate is always preferred."""
MIN_DNSMOS_SECONDS = 0.1


def dnsmos(samples: np.ndarray, sample_rate: int, max_seconds: float | None = None) -> dict[str, float]:
    """DNSMOS ``{"sig", "bak", "ovrl", "p808"}`` (1-5 scale) of a mono signal.

    ``max_seconds`` scores only the start of the clip (one 9.01 s window is the cheapest setting; training uses it).
    """
    from speechmos import dnsmos as speechmos_dnsmos

    if len(samples) < MIN_DNSMOS_SECONDS * sample_rate:
        # speechmos repeats a short clip until it is 9.01 s long; an empty one would never get there.
        seconds = len(samples) / sample_rate
        raise ValueError(f"{seconds:.3f} s of audio is too short for DNSMOS (< {MIN_DNSMOS_SECONDS} s)")
    if not np.isfinite(samples).all():
        raise ValueError("audio has NaN or infinite samples")
    if max_seconds is not None:
        samples = samples[: int(max_seconds * sample_rate)]
    audio = np.clip(resample(np.asarray(samples, dtype=np.float32), sample_rate, DNSMOS_RATE), -1.0, 1.0)
    scores = speechmos_dnsmos.run(audio, DNSMOS_RATE)
    return {
        "sig": float(scores["sig_mos"]),
        "bak": float(scores["bak_mos"]),
        "ovrl": float(scores["ovrl_mos"]),
        "p808": float(scores["p808_mos"]),
    }


def frame_levels_dbfs(samples: np.ndarray, sample_rate: int, frame_seconds: float = FRAME_SECONDS) -> np.ndarray:
    """RMS level (dBFS) of each whole, non-overlapping frame; a trailing partial frame is ignored."""
    frame = max(1, int(round(frame_seconds * sample_rate)))
    num_frames = len(samples) // frame
    if num_frames == 0:
        return np.zeros(0)
    frames = np.asarray(samples[: num_frames * frame], dtype=np.float64).reshape(num_frames, frame)
    rms = np.sqrt(np.mean(np.square(frames), axis=1))
    with np.errstate(divide="ignore"):
        return 20 * np.log10(rms)


def silence_ratio(samples: np.ndarray, sample_rate: int, silence_dbfs: float = SILENCE_DBFS) -> float:
    """Fraction (0-1) of 20 ms frames whose RMS is below ``silence_dbfs``; 1.0 for audio shorter than a frame."""
    levels = frame_levels_dbfs(samples, sample_rate)
    if len(levels) == 0:
        return 1.0
    return float(np.mean(levels < silence_dbfs))


def speech_seconds(samples: np.ndarray, sample_rate: int, silence_dbfs: float = SILENCE_DBFS) -> float:
    """Seconds of non-silent 20 ms frames."""
    levels = frame_levels_dbfs(samples, sample_rate)
    return float(np.sum(levels >= silence_dbfs)) * FRAME_SECONDS


def clipped_fraction(samples: np.ndarray) -> float:
    """Fraction (0-1) of samples at or above the clipping level in magnitude; 0.0 for empty audio."""
    if len(samples) == 0:
        return 0.0
    return float(np.mean(np.abs(samples) >= CLIP_LEVEL))


def count_letters(text: str) -> int:
    """Letters and digits in ``text`` (what takes time to say); spaces and punctuation do not count."""
    return sum(ch.isalnum() for ch in text)
