"""What the training loop reads: the codec-token cache (read only: the codec never runs here), the held-out
speakers and the epoch sampler, and the collation of one micro-batch.

Imports the data stage (cache, sampler, collate) and torch; no DeepSpeed. See docs/training.md (What one step does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from higgs_lora.config import RunConfig
from higgs_lora.constants import FRAMES_PER_SECOND
from higgs_lora.data.cache import load_cache, read_pairs
from higgs_lora.data.collate import build_example, collate, prompt_overhead_tokens
from higgs_lora.data.sampler import EpochSampler, Pair, UtteranceInfo, eval_micro_batches, split_speakers
from higgs_lora.plan import Plan


@dataclass
class TrainData:
    """The cache and the schedules built from it."""

    cache: object
    """The cache as a datasets.Dataset (numpy format, codes only)."""
    texts: list[str]
    source_ids: list[str]
    utterances: list[UtteranceInfo]
    sampler: EpochSampler
    eval_batches: list[list[Pair]]
    eval_speakers: list[str]
    processor: object
    scene: str

    def collate(self, samples: list[Pair]) -> dict:
        """Model inputs and loss targets of one micro-batch (codes read from the memory-mapped cache)."""
        examples = []
        for sample in samples:
            reference = torch.from_numpy(self.cache[sample.reference]["codes"])
            target = torch.from_numpy(self.cache[sample.target]["codes"])
            examples.append(
                build_example(
                    self.processor,
                    self.texts[sample.reference],
                    reference,
                    self.texts[sample.target],
                    target,
                    self.scene,
                )
            )
        tokenizer = self.processor.tokenizer
        return collate(examples, tokenizer.pad_token_id, self.processor.audio_stream_eos_id)


def build_data(cfg: RunConfig, processor, plan: Plan, cache_dir: Path) -> TrainData:
    """Read the cache's metadata, hold out evaluation speakers, and set up the epoch sampler."""
    cache = load_cache(cache_dir)
    if len(cache) == 0:
        raise ValueError(f"the cache {cache_dir} has no utterances: run `python -m higgs_lora.prepare` first")
    meta = cache.select_columns(["source_id", "speaker", "num_frames", "text_normalized"]).to_dict()
    texts = meta["text_normalized"]
    token_counts = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    utterances = [UtteranceInfo(s, n, t) for s, n, t in zip(meta["speaker"], meta["num_frames"], token_counts)]
    held_out = split_speakers(meta["speaker"], cfg.data.eval_speakers, cfg.data.num_eval_speakers, cfg.seed)
    index_of = {source_id: i for i, source_id in enumerate(meta["source_id"])}
    pairs_file = Path(cache_dir) / "pairs.jsonl"
    fixed = {}
    if pairs_file.is_file():
        fixed = {index_of[t]: index_of[r] for r, t in read_pairs(cache_dir) if r in index_of and t in index_of}
    frames = (
        round(cfg.data.reference_min_seconds * FRAMES_PER_SECOND),
        round(cfg.data.reference_max_seconds * FRAMES_PER_SECOND),
    )
    overhead = prompt_overhead_tokens(processor, cfg.data.scene)

    def sampler_for(targets: list[int], world_size: int, accumulation: int) -> EpochSampler:
        return EpochSampler(
            utterances=utterances,
            targets=targets,
            prompt_overhead=overhead,
            micro_batch_tokens=plan.micro_batch_tokens,
            reference_frames=frames,
            seed=cfg.seed,
            world_size=world_size,
            accumulation=accumulation,
            fixed_references=fixed,
        )

    train_targets = [i for i, u in enumerate(utterances) if u.speaker not in held_out]
    eval_targets = [i for i, u in enumerate(utterances) if u.speaker in held_out]
    eval_batches = eval_micro_batches(sampler_for(eval_targets, 1, 1)) if eval_targets else []
    codes = cache.with_format("numpy", columns=["codes"])
    return TrainData(
        cache=codes,
        texts=texts,
        source_ids=meta["source_id"],
        utterances=utterances,
        sampler=sampler_for(train_targets, plan.world_size, plan.accumulation),
        eval_batches=eval_batches,
        eval_speakers=sorted(held_out),
        processor=processor,
        scene=cfg.data.scene,
    )


def describe(data: TrainData) -> str:
    """The data summary rank 0 logs before training: utterances, held-out speakers, the first epoch."""
    first = data.sampler.plan(0)
    return (
        f"data: {len(data.utterances)} utterances, {len(data.sampler.targets)} training targets, "
        f"held-out speakers: {', '.join(data.eval_speakers) or 'none'} ({len(data.eval_batches)} eval micro-batches); "
        f"epoch 0: {len(first.steps)} steps, padding {first.padding_fraction:.1%}, "
        f"{first.num_without_reference} targets without a reference, {first.num_dropped} samples past the last step"
    )
