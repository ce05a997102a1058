"""Incremental codec decoding: audio chunks while frames are still being generated, with no seams to hear.

The codec's decoder is convolutional and not causal: the samples of frame f depend on a few frames before and after
f. Decoding each new chunk of frames on its own would give different samples at every chunk edge (a click). So each
chunk is decoded inside a window that adds `left_context` frames before it and waits for `lookahead` frames after it,
and only the chunk's own samples are kept; the first `crossfade` samples of a chunk are blended linearly with the
previous window's decode of the same samples, which hides what difference is left.

Measured with the released codec's architecture (random weights, `bench/infer_speed.py --codec-seams`): with 8
frames of context on both sides, the streamed chunks joined differ from decoding the whole stream at once by at
most 4.1e-5 (0.13% of the peak); with 4 frames 1.1e-3 (3.5%); with no context 1.1e-2 (35%, a click). The streamed
chunks joined therefore equal the non-streamed waveform to within that tolerance; a test checks it on the tiny
codec. The lookahead is the latency streaming pays: 8 frames = 0.32 s of audio must exist beyond a chunk before the
chunk is sent. The end of a stream needs no lookahead: the last window is decoded as the whole decode ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from higgs_lora.constants import HOP_SAMPLES


@dataclass(frozen=True)
class StreamSettings:
    """How streamed audio is cut into chunks."""

    first_chunk_frames: int = 10
    """Frames in the first chunk (0.4 s): small, so the first audio leaves early."""
    chunk_frames: int = 25
    """Frames in each later chunk (1 s)."""
    left_context: int = 8
    """Frames decoded before a chunk and thrown away, so the chunk's first samples are right."""
    lookahead: int = 8
    """Frames that must exist after a chunk before it is decoded, so its last samples are right."""
    crossfade: int = 240
    """Samples (10 ms) over which a chunk's start is blended with the previous window's decode of it."""


def decode_codes(codec, codes: torch.Tensor) -> np.ndarray:
    """(K, T) codes -> float32 waveform of T * 960 samples (the whole stream at once)."""
    if codes.shape[1] == 0:
        return np.zeros(0, dtype=np.float32)
    device = next(codec.parameters()).device
    with torch.inference_mode():
        audio = codec.decode(codes[None].to(device)).audio_values
    return audio.reshape(-1).float().cpu().numpy()[: codes.shape[1] * HOP_SAMPLES]


class StreamingCodec:
    """Turns a growing (K, T) code sequence into consecutive waveform chunks."""

    def __init__(self, codec, settings: StreamSettings = StreamSettings()):
        self.codec, self.settings = codec, settings
        self.emitted_frames = 0
        """Frames whose samples have been handed out (apart from a held-back crossfade tail)."""
        self._tail: np.ndarray | None = None
        """The previous window's decode of the first `crossfade` samples after its last emitted frame."""

    def push(self, codes: torch.Tensor) -> list[np.ndarray]:
        """Give all codes known so far (K, T); returns the chunks that can now be sent (possibly none)."""
        chunks = []
        while True:
            size = self.settings.first_chunk_frames if self.emitted_frames == 0 else self.settings.chunk_frames
            end = self.emitted_frames + size
            if codes.shape[1] < end + self.settings.lookahead:
                return chunks
            chunks.append(self._decode(codes, end, end + self.settings.lookahead))

    def finish(self, codes: torch.Tensor) -> np.ndarray:
        """The samples of every frame not sent yet, once the code sequence (K, T) is complete."""
        if codes.shape[1] <= self.emitted_frames:
            return np.zeros(0, dtype=np.float32)
        return self._decode(codes, codes.shape[1], codes.shape[1])

    def _decode(self, codes: torch.Tensor, end: int, window_end: int) -> np.ndarray:
        start = self.emitted_frames
        window_start = max(0, start - self.settings.left_context)
        audio = decode_codes(self.codec, codes[:, window_start:window_end])
        offset = (start - window_start) * HOP_SAMPLES
        chunk = audio[offset : offset + (end - start) * HOP_SAMPLES].copy()
        if self._tail is not None:
            fade = min(len(self._tail), len(chunk))
            ramp = np.linspace(0.0, 1.0, fade + 2, dtype=np.float32)[1:-1]
            chunk[:fade] = self._tail[:fade] * (1 - ramp) + chunk[:fade] * ramp
        after = offset + (end - start) * HOP_SAMPLES
        self._tail = audio[after : after + self.settings.crossfade].copy() if self.settings.crossfade else None
        self.emitted_frames = end
        return chunk
