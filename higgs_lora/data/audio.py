"""Audio I/O, conditioning and checks.

soundfile (libsndfile: wav, flac, ogg, mp3) reads; torchaudio.functional resamples and measures loudness
(torchaudio 2.9+ hands file loading to torchcodec + FFmpeg, which we do not depend on). Everything returns 1-D
float32 mono arrays; lengths are in samples unless a name says seconds.
"""

from __future__ import annotations

import errno
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from higgs_lora.errors import UserError

HF_AUDIO_PREFIX = "hf-dataset://"
CLIP_LEVEL = 0.999
"""A sample at or above this magnitude counts as clipped."""


class AudioError(UserError, ValueError):
    """An audio file that cannot be used; `reason` is a short machine-readable tag."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


@functools.lru_cache(maxsize=4)
def _hf_dataset(location: str):
    from datasets import Audio, load_from_disk

    dataset = load_from_disk(location)
    audio_column = next(c for c, f in dataset.features.items() if isinstance(f, Audio))
    return dataset.cast_column(audio_column, Audio(decode=False)), audio_column


def _open(ref: str):
    """A file-like object or path soundfile can read, for a path or an `hf-dataset://<dir>#<row>` reference."""
    if not ref.startswith(HF_AUDIO_PREFIX):
        return ref
    location, _, row = ref[len(HF_AUDIO_PREFIX) :].rpartition("#")
    dataset, column = _hf_dataset(location)
    item = dataset[int(row)][column]
    if item.get("bytes"):
        return io.BytesIO(item["bytes"])
    return item["path"]


def audio_seconds(ref: str) -> float:
    """Duration of an audio file from its header, in seconds, without decoding it."""
    import soundfile as sf

    try:
        info = sf.info(_open(ref))
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"{ref}: cannot read audio header ({err})") from None
    if info.samplerate <= 0:
        raise AudioError(f"{ref}: header gives sample rate {info.samplerate}")
    return info.frames / info.samplerate


def _not_a_file(ref: str) -> AudioError:
    """Why `ref` is not a readable file: a symlink loop, something that is not a regular file, or missing."""
    try:
        os.stat(ref)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return AudioError(f"{ref}: symlink loop ({err.strerror})", reason="symlink_loop")
        return AudioError(f"{ref}: file not found", reason="missing")
    except ValueError as err:  # a name the file system cannot encode
        return AudioError(f"{ref}: unusable file name ({err})", reason="missing")
    return AudioError(f"{ref}: not a regular file", reason="unreadable")


def read_audio(ref: str) -> tuple[np.ndarray, int]:
    """(samples, rate) of a file as float32 mono (channels averaged), at its own sample rate."""
    import soundfile as sf

    if not ref.startswith(HF_AUDIO_PREFIX) and not Path(ref).is_file():
        raise _not_a_file(ref)
    try:
        samples, rate = sf.read(_open(ref), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"{ref}: cannot read audio ({err})") from None
    return samples.mean(axis=1), int(rate)


def load_audio(path: str | Path, sample_rate: int = 24000) -> np.ndarray:
    """Samples of `path` as a 1-D float32 array, downmixed to mono and resampled to `sample_rate` Hz."""
    samples, rate = read_audio(str(path))
    return resample(samples, rate, sample_rate)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample a 1-D float32 signal from `source_rate` to `target_rate` Hz (band-limited sinc interpolation)."""
    if source_rate == target_rate:
        return np.ascontiguousarray(samples, dtype=np.float32)
    import torch
    import torchaudio.functional as AF

    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return AF.resample(tensor, source_rate, target_rate).numpy()


def loudness_lufs(samples: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness (ITU-R BS.1770-4, gated) in LUFS; -inf for silence or clips under 400 ms."""
    import torch
    import torchaudio.functional as AF

    if len(samples) < int(0.4 * sample_rate):  # one gating block needs 400 ms
        return float("-inf")
    value = AF.loudness(torch.from_numpy(samples)[None], sample_rate).item()
    return value if np.isfinite(value) else float("-inf")


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale; -inf for digital silence."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    return 20 * np.log10(rms) if rms > 0 else float("-inf")


def trim_silence(samples: np.ndarray, sample_rate: int, threshold_db: float, pad_seconds: float) -> np.ndarray:
    """Cut leading/trailing 10 ms frames quieter than (loudest frame - threshold_db), keeping `pad_seconds`."""
    frame = max(1, sample_rate // 100)
    num_frames = len(samples) // frame
    if num_frames == 0:
        return samples
    energy = np.square(samples[: num_frames * frame].reshape(num_frames, frame), dtype=np.float64).mean(axis=1)
    level = 10 * np.log10(np.maximum(energy, 1e-20))
    loud = np.nonzero(level > level.max() - threshold_db)[0]
    pad = int(pad_seconds * sample_rate)
    start = max(0, loud[0] * frame - pad)
    end = min(len(samples), (loud[-1] + 1) * frame + pad)
    return samples[start:end]


@dataclass(frozen=True)
class Conditioned:
    """Audio ready for the codec, and what was measured on the way."""

    samples: np.ndarray
    """Mono float32 at the codec rate, a whole number of codec frames long (zero-padded at the end)."""
    seconds: float
    """Duration after trimming, before the frame padding, in seconds."""
    source_rate: int
    loudness_lufs: float
    """Loudness before normalisation."""


def condition(
    samples: np.ndarray,
    source_rate: int,
    *,
    sample_rate: int,
    hop_samples: int,
    target_lufs: float,
    trim: bool,
    trim_db: float,
    trim_pad_seconds: float,
    silence_dbfs: float,
    max_clipped_fraction: float,
    min_seconds: float,
    max_seconds: float,
) -> Conditioned:
    """Check and condition a mono recording for the codec; raises AudioError with a reason tag.

    Order: finite check, clipping (on the original samples), resample, trim, silence and duration checks,
    loudness normalisation (peak-limited so it never creates clipping), zero-pad to whole codec frames.
    """
    if len(samples) == 0:
        raise AudioError("no samples", reason="empty_audio")
    if not np.isfinite(samples).all():
        raise AudioError("NaN or infinite samples", reason="non_finite")
    clipped = float(np.mean(np.abs(samples) >= CLIP_LEVEL))
    if clipped > max_clipped_fraction:
        raise AudioError(f"{clipped:.2%} of samples clipped (limit {max_clipped_fraction:.2%})", reason="clipped")
    audio = resample(samples, source_rate, sample_rate)
    if rms_dbfs(audio) < silence_dbfs:
        raise AudioError(f"RMS {rms_dbfs(audio):.1f} dBFS is below {silence_dbfs} dBFS", reason="silent")
    if trim:
        audio = trim_silence(audio, sample_rate, trim_db, trim_pad_seconds)
    seconds = len(audio) / sample_rate
    if seconds < min_seconds:
        raise AudioError(f"{seconds:.2f} s after trimming is shorter than {min_seconds} s", reason="too_short")
    if seconds > max_seconds:
        raise AudioError(f"{seconds:.2f} s is longer than {max_seconds} s", reason="too_long")
    measured = loudness_lufs(audio, sample_rate)
    if target_lufs and np.isfinite(measured):
        gain = 10 ** ((target_lufs - measured) / 20)
        peak = float(np.abs(audio).max())
        gain = min(gain, 0.99 / peak) if peak > 0 else gain
        audio = (audio * gain).astype(np.float32)
    padded = -(-len(audio) // hop_samples) * hop_samples
    audio = np.pad(audio, (0, padded - len(audio))).astype(np.float32)
    return Conditioned(samples=audio, seconds=seconds, source_rate=source_rate, loudness_lufs=measured)


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A mono 16-bit PCM WAV file's bytes (what the inference CLI writes and the server returns)."""
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()
