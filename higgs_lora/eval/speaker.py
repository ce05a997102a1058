"""Speaker similarity: cosine between resemblyzer speaker embeddings (GE2E d-vectors, 256 values).

resemblyzer's weights (`pretrained.pt`, 17 MB) ship inside its wheel, so nothing is downloaded. Its encoder works on
16 kHz audio; :meth:`SpeakerEmbedder.embed` resamples with the project's own resampler, then applies resemblyzer's
preprocessing (volume normalisation, webrtcvad removal of long pauses) so pauses do not dilute the voice.

A recording in which the VAD finds under 0.5 s of speech (noise, or a broken generation) is embedded untrimmed
rather than refused: the score is then low, which is the honest answer for "does this sound like the speaker?".
Only audio too short to embed at all (under 0.1 s) is an error.

Embeddings are L2-normalised and non-negative (a ReLU before the norm), so cosine similarity lies in [0, 1]; in
practice different voices score about 0.5-0.8 and recordings of the same voice 0.8-0.95 (measured on the demo
corpus in docs/evaluation.md). The number is a relative measure for comparing models, not a verification threshold.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict

import numpy as np

from higgs_lora.data.audio import resample

EMBED_RATE = 16000
"""resemblyzer's sample rate (Hz)."""
MIN_SECONDS = 0.1
"""Shorter audio than this cannot be embedded (an error)."""
MIN_SPEECH_SECONDS = 0.5
"""Below this much VAD-detected speech, the untrimmed audio is embedded instead."""


def _resemblyzer():
    """The resemblyzer module, imported quietly: 0.1.4 imports scipy.ndimage.morphology, which warns of its removal
    in SciPy 2.0 on every import; the pin in constraints.txt keeps a SciPy where it works."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="resemblyzer")
        import resemblyzer
    return resemblyzer


class SpeakerEmbedder:
    """resemblyzer's VoiceEncoder, loaded on first use and kept (loading costs ~2 s; embedding ~50 ms/s of audio)."""

    def __init__(self, device: str = "cpu", cache_size: int = 512):
        self.device = device
        self._encoder = None
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def _load(self):
        if self._encoder is None:
            self._encoder = _resemblyzer().VoiceEncoder(device=self.device, verbose=False)
        return self._encoder

    def embed(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Unit-norm speaker embedding (float32, shape (256,)) of a mono float signal at ``sample_rate`` Hz.

        Results are remembered by a hash of the samples (the last ``cache_size`` signals): the same reference
        recordings come back at every training evaluation step and in every folder of a --compare, and hashing
        100 KB costs microseconds where embedding costs tens of milliseconds.
        """
        samples = np.ascontiguousarray(samples, dtype=np.float32)
        key = (sample_rate, len(samples), hashlib.blake2b(samples.tobytes(), digest_size=16).digest())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key].copy()
        embedding = self._embed(samples, sample_rate)
        self._cache[key] = embedding
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return embedding.copy()

    def _embed(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        if len(samples) < MIN_SECONDS * sample_rate:
            raise ValueError(f"{len(samples) / sample_rate:.3f} s of audio is too short to embed (< {MIN_SECONDS} s)")
        if not np.isfinite(samples).all():
            raise ValueError("audio has NaN or infinite samples")
        audio = resample(np.asarray(samples, dtype=np.float32), sample_rate, EMBED_RATE)
        if not np.any(audio):
            raise ValueError("audio is digital silence; there is no voice to embed")
        trimmed = _resemblyzer().preprocess_wav(audio)
        if len(trimmed) < MIN_SPEECH_SECONDS * EMBED_RATE:
            trimmed = audio  # too little speech found: embed everything (see the module docstring)
        encoder = self._load()
        with _one_torch_thread():
            embedding = encoder.embed_utterance(np.asarray(trimmed, dtype=np.float32))
        if not np.isfinite(embedding).all():
            raise ValueError("the speaker encoder returned a non-finite embedding")
        return embedding.astype(np.float32)


@contextlib.contextmanager
def _one_torch_thread():
    """Run torch ops on one intra-op thread, restoring the previous count afterwards.

    The encoder is a 3-layer LSTM over 160 frames x 40 mels: too small to gain from intra-op threads, and on a busy
    CPU the threads wait for each other. Measured on the shared 2-core machine: 20-28 ms per forward on one thread,
    12 ms to 2.7 s on two.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (1.0 for the same direction)."""
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    if denominator == 0.0:
        raise ValueError("cosine of a zero vector is undefined")
    return float(np.dot(a, b) / denominator)
