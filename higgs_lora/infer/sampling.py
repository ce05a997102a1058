"""Choosing the next audio frame: delay-pattern constraints, per-codebook sampling, repetition-aware sampling.

Pure tensor functions and a small per-batch state; no model. The rules are those of transformers'
`HiggsAudioV2DelayPatternLogitsProcessor` (so greedy decoding here equals transformers' `generate` frame for frame,
a test checks it), with sampling as Boson's engine does it:

- **BOS phase.** At decode step s (0-based) codebook k is forced to the stream BOS while s <= k: the delay pattern
  starts codebook k one frame after codebook k - 1.
- **EOS phase.** The first step at which any codebook emits the stream EOS starts a countdown: j steps later the
  codebooks 0 .. j-1 are forced to EOS. When all codebooks emit EOS in one step the stream is finished.
- **Sampling per codebook.** Each of the K codebooks is its own distribution over codebook_size ids: temperature,
  then top-k, then top-p, applied to each codebook's row separately (a top-k over all K x 1026 logits together
  would starve whole codebooks). Temperature 0 is greedy (argmax).
- **Repetition-aware sampling (RAS).** When a sampled code already occurs `ras_max_repeats` times among the last
  `ras_window` generated codes of its codebook, it is re-drawn from the model's untempered distribution (still
  under the delay constraints). Boson uses window 7, at most 2 repeats: low temperatures otherwise loop on a
  frame. RAS applies to sampling only; greedy stays a pure argmax, so it is reproducible and comparable.

Each request owns a `torch.Generator` seeded from its `seed`, so a request's draws do not depend on which other
requests share its batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from higgs_lora.constants import DELAY_POSITIONS, FRAMES_PER_SECOND


@dataclass(frozen=True)
class SamplingParams:
    """How one request's audio codes are drawn, and what each piece of a long text sees. Defaults follow Boson's
    advice for voice cloning."""

    temperature: float = 0.3
    """Softmax temperature per codebook; 0 means greedy (argmax). Boson recommends 0.3 for cloning."""
    top_k: int = 50
    """Keep the k most likely codes of each codebook before sampling; 0 disables it."""
    top_p: float = 0.95
    """Keep the smallest set of codes whose probability reaches p, per codebook; 1 disables it."""
    seed: int | None = None
    """Seed of this request's random draws; None draws one (reported back so the result can be reproduced)."""
    max_seconds: float = 30.0
    """Longest audio generated for one piece of text, in seconds (25 frames each); the stream is cut there."""
    max_total_seconds: float | None = None
    """Audio budget of the whole request across the pieces of a long text, in seconds; each piece gets at most what
    is left, and pieces after the budget is spent are not spoken (stop 'budget'). None: no budget."""
    ras_window: int = 7
    """Repetition-aware sampling: how many recent frames of a codebook to look back at; 0 disables RAS."""
    ras_max_repeats: int = 2
    """Repetition-aware sampling: re-draw a code that already occurs this many times in the window."""
    context_pieces: int = 2
    """Long texts: how many of the pieces spoken before (their text and generated audio) each piece sees after the
    reference, so voice and prosody carry on from one sentence to the next; 0 = the reference alone. 2 is what Boson
    AI's long-form example uses (`--generation_chunk_buffer_size 2`). docs/inference.md#long-texts."""
    context_positions: int = 4096
    """Long texts: most positions a piece's prompt may take (reference, earlier pieces, its text); the oldest
    earlier pieces are dropped first to fit, the reference never. 4096 keeps 2 pieces of up to 30 s (759
    positions each) after a 30 s reference, and a prompt this long plus a 30 s piece stays inside 8192 positions,
    the largest KV cache Boson's serving engine sets up."""

    def problems(self) -> list[str]:
        """What is wrong with these settings, one sentence each (empty when they are valid)."""
        found = []
        if not 0 <= self.temperature <= 5:
            found.append(f"temperature={self.temperature} must be within [0, 5] (0 = greedy)")
        if self.top_k < 0:
            found.append(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p={self.top_p} must be within (0, 1]")
        if not 0 < self.max_seconds <= 600:
            found.append(f"max_seconds={self.max_seconds} must be within (0, 600]")
        if self.max_total_seconds is not None and not 0 < self.max_total_seconds <= 3600:
            found.append(f"max_total_seconds={self.max_total_seconds} must be within (0, 3600]")
        if self.ras_window < 0 or self.ras_max_repeats < 1:
            found.append("ras_window must be >= 0 and ras_max_repeats >= 1")
        if self.context_pieces < 0 or self.context_positions < 0:
            found.append(
                f"context_pieces={self.context_pieces} and context_positions={self.context_positions} must be >= 0 "
                "(0 pieces = each piece sees the reference alone)"
            )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            found.append(f"seed={self.seed} must be within [0, 2**63)")
        return found

    def max_columns(self) -> int:
        """Decode steps allowed: the frames of `max_seconds` plus the delay pattern's K + 1 = 9 extra columns."""
        return int(round(self.max_seconds * FRAMES_PER_SECOND)) + DELAY_POSITIONS

    def to_dict(self) -> dict:
        return asdict(self)


class DelayConstraints:
    """The delay-pattern state of a batch of streams: which codebooks are forced to BOS or EOS at each step."""

    def __init__(self, batch_size: int, num_codebooks: int, bos_id: int, eos_id: int, device: torch.device):
        self.num_codebooks, self.bos_id, self.eos_id = num_codebooks, bos_id, eos_id
        self.step = 0
        self.eos_started = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        """Per stream, the step at which the first EOS was emitted (-1: not yet)."""
        self._codebook = torch.arange(num_codebooks, device=device)

    def forced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) boolean masks of the codebooks forced to BOS and to EOS at the current step."""
        bos = (self._codebook >= self.step).expand(len(self.eos_started), -1)
        since = self.step - self.eos_started
        eos = (self.eos_started >= 0)[:, None] & (self._codebook[None, :] < since[:, None])
        return bos, eos

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K, V) logits with every id but BOS (resp. EOS) at -inf where BOS (resp. EOS) is forced."""
        bos, eos = self.forced()
        logits = logits.clone()
        vocab = torch.arange(logits.shape[-1], device=logits.device)
        minus_inf = torch.finfo(logits.dtype).min
        logits.masked_fill_(bos[..., None] & (vocab != self.bos_id), minus_inf)
        logits.masked_fill_(eos[..., None] & (vocab != self.eos_id), minus_inf)
        return logits

    def advance(self, codes: torch.Tensor) -> torch.Tensor:
        """Record the (B, K) codes chosen at this step; returns (B,) True for streams that are now finished."""
        any_eos = (codes == self.eos_id).any(dim=-1)
        self.eos_started = torch.where((self.eos_started < 0) & any_eos, self.step, self.eos_started)
        self.step += 1
        return (codes == self.eos_id).all(dim=-1)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(K, V) logits of one stream scaled by temperature and cut to its top-k / top-p set, per codebook row."""
    scores = logits / temperature
    minus_inf = torch.finfo(scores.dtype).min
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, minus_inf)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop a code when the codes before it already reach top_p; the most likely code always stays.
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, minus_inf)
    return scores


def choose_codes(
    logits: torch.Tensor,
    constraints: DelayConstraints,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    history: torch.Tensor | None,
) -> torch.Tensor:
    """The (B, K) codes of the next frame from (B, K, V) float32 logits.

    `history` (B, W, K) holds the codes generated so far (most recent last), for repetition-aware sampling.
    """
    constrained = constraints.apply(logits)
    greedy = constrained.argmax(dim=-1)
    if all(p.temperature == 0 for p in params):
        return greedy
    codes = greedy.clone()
    bos_forced, eos_forced = constraints.forced()
    for row, (p, generator) in enumerate(zip(params, generators)):
        if p.temperature == 0:
            continue
        scores = filter_logits(constrained[row], p.temperature, p.top_k, p.top_p)
        drawn = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)
        if p.ras_window > 0 and history is not None and history.shape[1] > 0:
            recent = history[row, -p.ras_window :]
            counted = (recent != constraints.bos_id) & (recent != constraints.eos_id)
            repeats = ((recent == drawn[None, :]) & counted).sum(dim=0)
            redraw = (repeats >= p.ras_max_repeats) & ~bos_forced[row] & ~eos_forced[row]
            if redraw.any():
                plain = torch.multinomial(constrained[row][redraw].softmax(dim=-1), 1, generator=generator)
                drawn[redraw] = plain.squeeze(-1)
        codes[row] = drawn
    return codes


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded with `seed` (one per request)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
