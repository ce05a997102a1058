"""Audio I/O: read any file libsndfile can (wav, flac, ogg, mp3) as mono float32 at the codec's rate.

soundfile reads; torchaudio.functional resamples (torchaudio 2.9+ hands file loading to torchcodec + FFmpeg,
which we do not depend on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class AudioError(ValueError):
    """An audio file that cannot be used, with the reason."""


def load_audio(path: str | Path, sample_rate: int = 24000) -> np.ndarray:
    """Samples of `path` as a 1-D float32 array in [-1, 1], downmixed to mono and resampled to `sample_rate` Hz."""
    import soundfile as sf

    try:
        samples, source_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: cannot read audio ({err})") from None
    mono = samples.mean(axis=1)
    return resample(mono, source_rate, sample_rate)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample a 1-D float32 signal from `source_rate` to `target_rate` Hz (band-limited sinc interpolation)."""
    if source_rate == target_rate:
        return np.ascontiguousarray(samples, dtype=np.float32)
    import torch
    import torchaudio.functional as AF

    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return AF.resample(tensor, source_rate, target_rate).numpy()
