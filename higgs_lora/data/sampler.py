"""Which (target, reference) pairs train together, in which micro-batch, on which rank, at which step.

Pure functions of the cache's metadata, the seed, the epoch and the world size: every rank computes the same
schedule with no communication, and a resumed run recomputes it and skips to the saved position.

- **Pairs**: every target utterance gets a reference: another utterance of the same speaker whose duration is
  within [data.reference_min_seconds, data.reference_max_seconds], drawn anew each epoch (seeded by seed and epoch),
  so the model sees each voice with many different prompts. Pairs given by the data (ChatML) are kept as given.
  A target whose speaker has no other utterance in bounds is left out for that epoch (counted in `EpochPlan`).
- **Micro-batches under a token budget**: a micro-batch's cost is its samples times its longest sample (positions,
  padding included), and must not exceed `micro_batch_tokens`. Samples are shuffled, sorted by length within pools
  of `pool_size`, packed greedily, and the micro-batches shuffled again: little padding, a fresh mix each epoch.
- **Steps**: an optimizer step takes `world_size x accumulation` micro-batches; rank r trains micro-batches
  r*accumulation .. (r+1)*accumulation-1 of each step, so every rank runs the same number of forward/backward passes
  (ZeRO's collectives need that). The micro-batches left over at the end of an epoch (fewer than one step) are
  dropped; the next epoch's reshuffle puts different samples there.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from higgs_lora.constants import DELAY_POSITIONS
from higgs_lora.errors import UserError


class DataError(UserError, ValueError):
    """The corpus cannot be scheduled as configured; the message says which setting to change."""


@dataclass(frozen=True)
class UtteranceInfo:
    """What the sampler needs to know about one cached utterance."""

    speaker: str
    num_frames: int
    """Codec frames (25 per second)."""
    num_text_tokens: int
    """Tokens of its normalised transcript."""


@dataclass(frozen=True)
class Pair:
    """A training sample: indices of the target and reference utterances in the cache, and its length."""

    target: int
    reference: int
    num_positions: int
    """Model positions of the rendered sample (prompt text + reference audio + target text + target audio)."""


@dataclass
class EpochPlan:
    """One epoch's schedule: `steps[s][m]` is micro-batch m (of world_size x accumulation) of optimizer step s."""

    steps: list[list[list[Pair]]]
    num_samples: int
    """Samples placed in this epoch's steps."""
    num_without_reference: int = 0
    """Targets left out because their speaker has no other utterance within the reference bounds."""
    num_dropped: int = 0
    """Samples in the micro-batches left over after the last full step."""
    padding_fraction: float = 0.0
    """Padding positions / budgeted positions (len x longest) over the scheduled micro-batches."""

    def rank_micro_batches(self, step: int, rank: int, accumulation: int) -> list[list[Pair]]:
        """The micro-batches rank `rank` trains in step `step`."""
        return self.steps[step][rank * accumulation : (rank + 1) * accumulation]


@dataclass
class SamplerState:
    """Where training is in the data: resumable with `EpochSampler.plan(state.epoch)` and `state.step`."""

    epoch: int = 0
    step: int = 0
    """Next optimizer step within the epoch."""
    world_size: int = 1
    accumulation: int = 1
    micro_batch_tokens: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> SamplerState:
        return cls(**data)


def sample_positions(target: UtteranceInfo, reference: UtteranceInfo, prompt_overhead: int) -> int:
    """Model positions of a zero-shot sample: template tokens, both transcripts, both delayed audio segments."""
    return (
        prompt_overhead
        + reference.num_text_tokens
        + target.num_text_tokens
        + reference.num_frames
        + DELAY_POSITIONS
        + target.num_frames
        + DELAY_POSITIONS
    )


def draw_pairs(
    utterances: list[UtteranceInfo],
    targets: list[int],
    fixed_references: dict[int, int],
    reference_frames: tuple[int, int],
    seed: int,
    epoch: int,
    stream: str = "references",
) -> tuple[list[tuple[int, int]], int]:
    """(target, reference) index pairs for `targets` in this epoch, and how many targets got no reference.

    The reference is drawn uniformly among the other utterances of the same speaker whose frame count is within
    `reference_frames` (inclusive); `fixed_references` (target -> reference) override the draw.
    """
    low, high = reference_frames
    candidates: dict[str, list[int]] = defaultdict(list)
    position: dict[int, int] = {}  # utterance index -> its place in its speaker's candidate list
    for index, utterance in enumerate(utterances):
        if low <= utterance.num_frames <= high:
            position[index] = len(candidates[utterance.speaker])
            candidates[utterance.speaker].append(index)
    rng = random.Random(f"{stream}/{seed}/{epoch}")
    pairs, missing = [], 0
    for target in targets:
        if target in fixed_references:
            pairs.append((target, fixed_references[target]))
            continue
        pool = candidates.get(utterances[target].speaker, [])
        own = position.get(target)  # the target is not its own reference: draw among the others
        choices = len(pool) - (own is not None)
        if choices <= 0:
            missing += 1
            continue
        pick = rng.randrange(choices)
        if own is not None and pick >= own:
            pick += 1
        pairs.append((target, pool[pick]))
    return pairs, missing


def _check_budget(samples: list[Pair], budget: int) -> None:
    """DataError naming the longest sample when any sample alone is longer than `budget` positions."""
    too_long = [s for s in samples if s.num_positions > budget]
    if too_long:
        worst = max(too_long, key=lambda s: s.num_positions)
        raise DataError(
            f"{len(too_long)} samples are longer than train.micro_batch_tokens={budget} "
            f"(longest: {worst.num_positions} "
            f"positions, target #{worst.target} with reference #{worst.reference}); raise train.micro_batch_tokens "
            "or lower data.max_seconds / data.reference_max_seconds"
        )


def pack_micro_batches(samples: list[Pair], budget: int, rng: random.Random, pool_size: int = 1024) -> list[list[Pair]]:
    """Group `samples` into micro-batches whose len x longest sample is <= `budget`, in shuffled order.

    Raises DataError naming the sample when one sample alone is longer than the budget.
    """
    _check_budget(samples, budget)
    order = list(samples)
    rng.shuffle(order)
    micro_batches: list[list[Pair]] = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start : start + pool_size], key=lambda s: s.num_positions)
        current: list[Pair] = []
        for sample in pool:  # ascending: the newcomer is the longest of its micro-batch
            if current and (len(current) + 1) * sample.num_positions > budget:
                micro_batches.append(current)
                current = []
            current.append(sample)
        if current:
            micro_batches.append(current)
    rng.shuffle(micro_batches)
    return micro_batches


@dataclass
class EpochSampler:
    """Builds each epoch's schedule for a fixed corpus, budget and world size."""

    utterances: list[UtteranceInfo]
    targets: list[int]
    """Indices of the utterances trained as targets (held-out speakers excluded)."""
    prompt_overhead: int
    """Template tokens of a sample besides transcripts and audio (`collate.prompt_overhead_tokens`)."""
    micro_batch_tokens: int
    reference_frames: tuple[int, int]
    seed: int
    world_size: int = 1
    accumulation: int = 1
    fixed_references: dict[int, int] = field(default_factory=dict)
    pool_size: int = 1024
    replay_targets: list[int] = field(default_factory=list)
    """Indices of the replay corpus's training targets (`data.replay`); they take references of their own speakers."""
    replay_fraction: float = 0.0
    """Share of every step's samples drawn from `replay_targets` (`data.replay_fraction`); 0: off."""
    _cached: tuple[int, EpochPlan] | None = field(default=None, init=False, repr=False, compare=False)

    def plan(self, epoch: int) -> EpochPlan:
        """The schedule of `epoch` (the last one computed is kept: callers ask for the current epoch repeatedly)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._compute(epoch))
        return self._cached[1]

    def _samples(self, pairs: list[tuple[int, int]]) -> list[Pair]:
        return [
            Pair(t, r, sample_positions(self.utterances[t], self.utterances[r], self.prompt_overhead)) for t, r in pairs
        ]

    def _compute(self, epoch: int) -> EpochPlan:
        pairs, missing = draw_pairs(
            self.utterances, self.targets, self.fixed_references, self.reference_frames, self.seed, epoch
        )
        samples = self._samples(pairs)
        rng = random.Random(f"batches/{self.seed}/{epoch}")
        per_step = self.world_size * self.accumulation
        if self.replay_fraction > 0 and self.replay_targets and samples:
            replay, replay_missing = draw_pairs(
                self.utterances,
                replay_schedule(self.replay_targets, len(samples), self.replay_fraction, self.seed, epoch),
                self.fixed_references,
                self.reference_frames,
                self.seed,
                epoch,
                stream="replay-references",
            )
            steps, num_dropped = pack_mixed_steps(
                samples, self._samples(replay), self.micro_batch_tokens, per_step, rng, self.pool_size
            )
            return self._epoch_plan(steps, missing + replay_missing, num_dropped)
        micro_batches = pack_micro_batches(samples, self.micro_batch_tokens, rng, self.pool_size)
        num_steps = len(micro_batches) // per_step
        kept = micro_batches[: num_steps * per_step]
        steps = [kept[s * per_step : (s + 1) * per_step] for s in range(num_steps)]
        return self._epoch_plan(steps, missing, sum(len(mb) for mb in micro_batches[num_steps * per_step :]))

    @staticmethod
    def _epoch_plan(steps: list[list[list[Pair]]], missing: int, num_dropped: int) -> EpochPlan:
        kept = [mb for step in steps for mb in step]
        budgeted = sum(len(mb) * max(s.num_positions for s in mb) for mb in kept)
        used = sum(s.num_positions for mb in kept for s in mb)
        return EpochPlan(
            steps=steps,
            num_samples=sum(len(mb) for mb in kept),
            num_without_reference=missing,
            num_dropped=num_dropped,
            padding_fraction=(1 - used / budgeted) if budgeted else 0.0,
        )


# ------------------------------------------------------------------------------------------------ replay


def replay_schedule(replay_targets: list[int], num_main: int, fraction: float, seed: int, epoch: int) -> list[int]:
    """The replay targets of one epoch: as many as make `fraction` of the epoch's samples beside `num_main` main
    ones, walking a seeded shuffle of the replay corpus epoch after epoch (so a large replay corpus is covered over
    the epochs, a small one repeats)."""
    count = round(num_main * fraction / (1 - fraction))
    order = list(replay_targets)
    random.Random(f"replay/{seed}").shuffle(order)
    start = epoch * count
    return [order[(start + k) % len(order)] for k in range(count)]


def _length_sorted_pools(samples: list[Pair], num_pools: int, rng: random.Random) -> list[Pair]:
    """`samples` shuffled, cut into `num_pools` consecutive pools of (nearly) equal size, each sorted by length."""
    order = list(samples)
    rng.shuffle(order)
    size, extra = divmod(len(order), num_pools)
    pools, start = [], 0
    for k in range(num_pools):
        end = start + size + (k < extra)
        pools.extend(sorted(order[start:end], key=lambda s: s.num_positions))
        start = end
    return pools


def _greedy_pack(ascending: list[Pair], budget: int) -> list[list[Pair]]:
    """Micro-batches of `ascending` (sorted by length) whose len x longest is <= `budget`, filled in order."""
    micro_batches: list[list[Pair]] = []
    current: list[Pair] = []
    for sample in ascending:
        if current and (len(current) + 1) * sample.num_positions > budget:
            micro_batches.append(current)
            current = []
        current.append(sample)
    if current:
        micro_batches.append(current)
    return micro_batches


def pack_mixed_steps(
    main: list[Pair], replay: list[Pair], budget: int, per_step: int, rng: random.Random, pool_size: int = 1024
) -> tuple[list[list[list[Pair]]], int]:
    """(steps of exactly `per_step` micro-batches each, samples left over) with the replay share of every step
    equal to that of the whole epoch, to within about one sample.

    Both streams are shuffled and sorted by length within pools that cover the same share of each stream, then
    merged by relative position (main sample i at (i + 1/2)/len(main), replay sample j at (j + 1/2)/len(replay)),
    so that any stretch of the merged stream holds the epoch's share of replay samples and similar lengths. Each
    step takes the longest stretch that packs into `per_step` micro-batches under `budget` (a micro-batch is split
    when there are fewer); the steps are then shuffled. Raises DataError when one sample exceeds `budget`.
    """
    _check_budget(main + replay, budget)
    num_pools = max(1, -(-len(main) // pool_size))
    keyed = [((i + 0.5) / len(main), 0, s) for i, s in enumerate(_length_sorted_pools(main, num_pools, rng))]
    if replay:
        pooled = _length_sorted_pools(replay, num_pools, rng)
        keyed += [((j + 0.5) / len(replay), 1, s) for j, s in enumerate(pooled)]
    stream = [s for _, _, s in sorted(keyed, key=lambda k: (k[0], k[1]))]

    def packed(window: list[Pair]) -> list[list[Pair]]:
        return _greedy_pack(sorted(window, key=lambda s: s.num_positions), budget)

    # No step holds more than per_step micro-batches of the most samples of the shortest length.
    most = per_step * (budget // min(s.num_positions for s in stream)) if stream else 0
    steps, start = [], 0
    while len(stream) - start >= per_step:
        low, high = per_step, min(most, len(stream) - start)  # `low` samples always fit: one per micro-batch
        while low < high:
            middle = (low + high + 1) // 2
            if len(packed(stream[start : start + middle])) <= per_step:
                low = middle
            else:
                high = middle - 1
        micro_batches = packed(stream[start : start + low])
        while len(micro_batches) < per_step:  # split the fullest: never costs more than the budget
            fullest = max(range(len(micro_batches)), key=lambda k: len(micro_batches[k]))
            batch = micro_batches.pop(fullest)
            micro_batches[fullest:fullest] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        rng.shuffle(micro_batches)
        steps.append(micro_batches)
        start += low
    rng.shuffle(steps)
    return steps, len(stream) - start


def split_speakers(speakers: list[str], eval_speakers: list[str], num_eval_speakers: int, seed: int) -> set[str]:
    """The held-out speakers: those named, else `num_eval_speakers` drawn with `seed` (none if fewer than 3 speakers).

    Raises DataError when a named speaker is not in the corpus, or when no speaker would be left to train on.
    """
    distinct = sorted(set(speakers))
    if eval_speakers:
        unknown = sorted(set(eval_speakers) - set(distinct))
        if unknown:
            raise DataError(f"data.eval_speakers {unknown} are not speakers of the corpus (it has {len(distinct)})")
        if set(eval_speakers) >= set(distinct):
            raise DataError("data.eval_speakers holds out every speaker of the corpus; leave some to train on")
        return set(eval_speakers)
    if len(distinct) < 3 or num_eval_speakers == 0:
        return set()
    count = min(num_eval_speakers, len(distinct) - 2)
    return set(random.Random(f"eval-speakers/{seed}").sample(distinct, count))


def eval_micro_batches(sampler: EpochSampler) -> list[list[Pair]]:
    """The fixed evaluation set of `sampler`'s targets: epoch-0 reference draws, packed, nothing dropped."""
    plan_sampler = EpochSampler(
        utterances=sampler.utterances,
        targets=sampler.targets,
        prompt_overhead=sampler.prompt_overhead,
        micro_batch_tokens=sampler.micro_batch_tokens,
        reference_frames=sampler.reference_frames,
        seed=sampler.seed,
        world_size=1,
        accumulation=1,
        fixed_references=sampler.fixed_references,
    )
    micro_batches = [step[0] for step in plan_sampler.plan(0).steps]
    return micro_batches


def eval_assignment(num_micro_batches: int, world_size: int, rank: int) -> list[tuple[int, bool]]:
    """(micro-batch index, counts) for `rank`: round-robin, padded so every rank gets the same number.

    Every rank must run the same number of forward passes (ZeRO-3 gathers weights collectively), so a rank short
    of work repeats a micro-batch with counts=False: its losses are left out of the sums.
    """
    per_rank = -(-num_micro_batches // world_size) if num_micro_batches else 0
    assignment = []
    for i in range(per_rank):
        index = i * world_size + rank
        assignment.append((index, True) if index < num_micro_batches else (index % num_micro_batches, False))
    return assignment
