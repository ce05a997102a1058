"""What one optimizer step (or one evaluation) adds up on each rank, summed over ranks in one all-reduce.

Named fields instead of a packed tensor indexed by position; `to_tensor`/`from_tensor` are the one place that
knows the packing. May import torch, distributed.py and train/loss.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from higgs_lora.distributed import all_reduce_sum
from higgs_lora.train.loss import LossSums


@dataclass
class StepTotals:
    """What one optimizer step (or one evaluation) adds up over this rank's micro-batches; `reduced` sums it over
    all ranks in one all-reduce of `to_tensor()` (K audio sums, K audio counts, then the scalars in field order)."""

    audio_sums: torch.Tensor
    """(K,) float64: summed cross-entropy per codebook."""
    audio_counts: torch.Tensor
    """(K,) float64: labelled positions per codebook."""
    text_sum: float = 0.0
    text_count: float = 0.0
    nonfinite_ranks: float = 0.0
    """Ranks whose loss sums are not finite (on one rank 0 or 1: `mark_finiteness`)."""
    positions: float = 0.0
    """Real (not padding) model positions."""
    target_frames: float = 0.0
    flops: float = 0.0

    @classmethod
    def zeros(cls, num_codebooks: int) -> StepTotals:
        return cls(torch.zeros(num_codebooks, dtype=torch.float64), torch.zeros(num_codebooks, dtype=torch.float64))

    def add_loss(self, sums: LossSums) -> None:
        self.audio_sums += sums.audio.detach().double().cpu()
        self.audio_counts += sums.audio_counts.double()
        self.text_sum += float(sums.text.detach())
        self.text_count += float(sums.text_count)

    def add_work(self, positions: float, target_frames: float, flops: float) -> None:
        self.positions += positions
        self.target_frames += target_frames
        self.flops += flops

    def mark_finiteness(self) -> None:
        self.nonfinite_ranks = float(not torch.isfinite(self.audio_sums).all() or not math.isfinite(self.text_sum))

    def to_tensor(self) -> torch.Tensor:
        scalars = [getattr(self, f.name) for f in fields(self)[2:]]
        return torch.cat([self.audio_sums, self.audio_counts, torch.tensor(scalars, dtype=torch.float64)])

    @classmethod
    def from_tensor(cls, values, num_codebooks: int) -> StepTotals:
        """The inverse of `to_tensor` (`values`: a tensor or a list of floats)."""
        values = torch.as_tensor(values, dtype=torch.float64)
        k = num_codebooks
        return cls(values[:k].clone(), values[k : 2 * k].clone(), *values[2 * k :].tolist())

    def reduced(self, device) -> StepTotals:
        """These totals summed over all ranks (one collective: every rank must call it)."""
        return StepTotals.from_tensor(all_reduce_sum(self.to_tensor().tolist(), device), len(self.audio_sums))

    def loss(self) -> float:
        """Audio cross-entropy per labelled target position, summed over the codebooks (each labels every
        position once)."""
        return sum(self.audio_sums.tolist()) / (self.audio_counts.tolist()[0] or 1.0)

    def per_codebook_loss(self) -> list[float]:
        return [s / max(c, 1.0) for s, c in zip(self.audio_sums.tolist(), self.audio_counts.tolist())]

    def text_loss(self) -> float:
        return self.text_sum / max(self.text_count, 1.0)
