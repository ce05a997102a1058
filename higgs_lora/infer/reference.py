"""A reference voice prepared as training prepared its corpus: the recording conditioned (mono 24 kHz, silence
trimmed, loudness normalised, by the run config's audio settings) and encoded by the codec once, its transcript
normalised as the run normalised its transcripts; cached by content, so a voice used again costs nothing.

May import config, text normalisation and data.audio; nothing of the faces. See docs/inference.md.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from higgs_lora.config import AudioConfig, DataConfig, RunConfig
from higgs_lora.constants import HOP_SAMPLES, SAMPLE_RATE
from higgs_lora.infer.requests import InferenceError
from higgs_lora.text.arabic import normalize_arabic

CACHE_SIZE = 64
"""Encoded references kept (least recently used dropped first)."""


@dataclass(frozen=True)
class Reference:
    """A conditioned, encoded reference recording and its normalised transcript."""

    codes: torch.Tensor
    """(K, T) codec codes."""
    text: str
    seconds: float


def normalize_text(text: str, data: DataConfig) -> str:
    """`text` normalised as a training run with these data settings normalised its transcripts."""
    if data.language != "ar":
        return " ".join(text.split())
    return normalize_arabic(
        text,
        strip_diacritics=data.strip_diacritics,
        fold_letters=data.fold_letters,
        numbers_to_words=data.numbers_to_words,
        diacritize=data.diacritize,
    )


class ReferenceCache:
    """Conditioned, encoded references by content (samples, rate and transcript), for one codec and run config."""

    def __init__(self, codec, run_config: RunConfig, size: int = CACHE_SIZE):
        self.codec, self.run_config, self.size = codec, run_config, size
        self._entries: OrderedDict[str, Reference] = OrderedDict()
        self._lock = threading.Lock()
        """Guards `_entries`: a server encodes references on helper threads while its worker reads them."""

    def get(self, samples: np.ndarray, rate: int, text: str) -> Reference:
        """The prepared reference; InferenceError when the recording or its transcript cannot be used."""
        from higgs_lora.data.audio import AudioError, condition

        key = hashlib.sha1(np.ascontiguousarray(samples, dtype=np.float32).tobytes() + f"{rate}|{text}".encode())
        digest = key.hexdigest()
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return self._entries[digest]
        audio: AudioConfig = self.run_config.audio
        data: DataConfig = self.run_config.data
        try:
            conditioned = condition(
                np.asarray(samples, dtype=np.float32),
                rate,
                sample_rate=SAMPLE_RATE,
                hop_samples=HOP_SAMPLES,
                target_lufs=audio.target_lufs,
                trim=audio.trim_silence,
                trim_db=audio.trim_db,
                trim_pad_seconds=audio.trim_pad_seconds,
                silence_dbfs=audio.silence_dbfs,
                max_clipped_fraction=1.0,
                min_seconds=0.5,
                max_seconds=max(data.reference_max_seconds, 30.0),
            )
        except AudioError as err:
            raise InferenceError(f"reference audio: {err}") from None
        text = normalize_text(text, data)
        if not text:
            raise InferenceError("reference text is empty after normalisation")
        device = next(self.codec.parameters()).device
        with torch.inference_mode():
            codes = self.codec.encode(torch.from_numpy(conditioned.samples)[None, None].to(device)).audio_codes[0]
        reference = Reference(codes=codes.cpu(), text=text, seconds=conditioned.seconds)
        with self._lock:
            self._entries[digest] = reference
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return reference
