"""What the inference core takes and gives: a cloning request, its result, the audio chunks of a stream, and the
error of a request that cannot be served as given.

May import numpy and the sampling settings only; the faces (batch CLI, server) build and read these. See
docs/inference.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from higgs_lora.errors import UserError
from higgs_lora.infer.sampling import SamplingParams


class InferenceError(UserError, ValueError):
    """A request that cannot be served as given; the message says why."""


@dataclass
class CloneRequest:
    """One cloning request: whose voice (reference recording and its transcript), and what to say."""

    reference_audio: np.ndarray
    """Mono float32 samples of the reference recording at `reference_rate` Hz."""
    reference_rate: int
    reference_text: str
    target_text: str
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    """Name of a loaded adapter, or None for the model as loaded (the base, or a merged model)."""
    scene: str | None = None
    """The prompt's scene (`data.scene` values: text, '' or 'none'); None: the one recorded with the adapter or model
    (`VoiceCloner.scene`)."""


@dataclass
class CloneResult:
    """The generated speech of one request, and how it was made."""

    waveform: np.ndarray
    """Mono float32 at 24 kHz."""
    sample_rate: int
    seconds_taken: float
    """Wall time from the start of the batch to the last sample of this request."""
    first_audio_seconds: float | None
    """Wall time to this request's first audio chunk (streaming only)."""
    frames: int
    stops: list[str]
    """Per piece of text: 'eos' (the model ended it), 'max_seconds' (cut at the length limit) or 'budget' (not
    spoken: the request's `max_total_seconds` was spent)."""
    pieces: list[str]
    seed: int
    repaired_codes: int = 0
    """Stray BOS/EOS ids inside the audio that had to be replaced (see generation.columns_to_codes)."""
    context_pieces: list[int] = field(default_factory=list)
    """Per piece of text: how many earlier pieces its prompt held as context (`SamplingParams.context_pieces`)."""
    prompt_positions: list[int] = field(default_factory=list)
    """Per piece of text: positions of its prompt (reference, context, its text)."""

    @property
    def duration(self) -> float:
        return len(self.waveform) / self.sample_rate

    @property
    def real_time_factor(self) -> float:
        """Seconds taken per second of audio (below 1: faster than real time)."""
        return self.seconds_taken / self.duration if self.duration else float("inf")


@dataclass
class Chunk:
    """Audio of request `index`, in order; `final` chunks close the request and carry its result."""

    index: int
    samples: np.ndarray
    result: CloneResult | None = None
