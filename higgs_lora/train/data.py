"""What the training loop reads: the codec-token cache (read only: the codec never runs here), the held-out
speakers and the epoch sampler, and the collation of one micro-batch.

Imports the data stage (cache, sampler, collate) and torch; no DeepSpeed. See docs/training.md (What one step does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from higgs_lora.config import RunConfig
from higgs_lora.data.cache import load_cache
from higgs_lora.data.collate import build_example, collate, prompt_overhead_tokens
from higgs_lora.data.sampler import DataError, EpochSampler, Pair, UtteranceInfo, eval_micro_batches
from higgs_lora.data.schedule import cache_metadata, cache_samplers
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
        raise DataError(f"the cache {cache_dir} has no utterances: run `python -m higgs_lora.prepare` first")
    meta = cache_metadata(cache)
    texts = meta["text_normalized"]
    token_counts = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    overhead = prompt_overhead_tokens(processor, cfg.data.scene)
    samplers = cache_samplers(
        cfg, meta, token_counts, overhead, plan.micro_batch_tokens, plan.world_size, plan.accumulation, cache_dir
    )
    codes = cache.with_format("numpy", columns=["codes"])
    return TrainData(
        cache=codes,
        texts=texts,
        source_ids=meta["source_id"],
        utterances=samplers.utterances,
        sampler=samplers.train,
        eval_batches=eval_micro_batches(samplers.eval) if samplers.eval is not None else [],
        eval_speakers=sorted(samplers.held_out),
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
