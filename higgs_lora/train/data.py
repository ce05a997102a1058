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
from higgs_lora.data.sampler import DataError, EpochSampler, Pair, UtteranceInfo, eval_micro_batches, split_speakers
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
    languages: list[str] | None = None
    """Language of each utterance (the cache's records carry it); None: all data.language."""
    replay_eval_batches: list[list[Pair]] | None = None
    """The fixed evaluation set of the replay corpus's held-out speakers (None without data.replay)."""
    replay_eval_speakers: list[str] | None = None

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


def _read_meta(cache_dir: Path, prefix: str = "") -> tuple[object, dict]:
    cache = load_cache(cache_dir)
    if len(cache) == 0:
        raise DataError(f"the cache {cache_dir} has no utterances: run `python -m higgs_lora.prepare` first")
    meta = cache.select_columns(["source_id", "speaker", "num_frames", "text_normalized", "language"]).to_dict()
    if prefix:
        meta["source_id"] = [prefix + s for s in meta["source_id"]]
        meta["speaker"] = [prefix + s for s in meta["speaker"]]
    return cache, meta


def build_data(cfg: RunConfig, processor, plan: Plan, cache_dir: Path) -> TrainData:
    """Read the cache's metadata, hold out evaluation speakers, and set up the epoch sampler.

    With `data.replay_fraction` > 0 the replay corpus's cache (<cache_dir>/replay) follows the main one: its
    speakers and source ids carry the `replay:` prefix, its own speakers are held out the same way, and the sampler
    mixes its training targets into every step."""
    from datasets import concatenate_datasets

    from higgs_lora.data.cache import REPLAY, REPLAY_PREFIX

    cache, meta = _read_meta(cache_dir)
    num_main = len(cache)
    replaying = cfg.data.replay_fraction > 0
    if replaying:
        replay_dir = Path(cache_dir) / REPLAY
        if not (replay_dir / "plan.json").is_file():
            raise DataError(
                f"data.replay_fraction={cfg.data.replay_fraction} but {replay_dir} holds no cache: run "
                "`python -m higgs_lora.prepare` with data.replay set (it prepares the replay corpus too)"
            )
        replay_cache, replay_meta = _read_meta(replay_dir, REPLAY_PREFIX)
        cache = concatenate_datasets([cache, replay_cache])
        meta = {key: meta[key] + replay_meta[key] for key in meta}
    texts = meta["text_normalized"]
    token_counts = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    utterances = [UtteranceInfo(s, n, t) for s, n, t in zip(meta["speaker"], meta["num_frames"], token_counts)]
    held_out = split_speakers(meta["speaker"][:num_main], cfg.data.eval_speakers, cfg.data.num_eval_speakers, cfg.seed)
    replay_held_out = (
        split_speakers(meta["speaker"][num_main:], [], cfg.data.num_eval_speakers, cfg.seed) if replaying else set()
    )
    index_of = {source_id: i for i, source_id in enumerate(meta["source_id"])}
    fixed = {}
    for folder, prefix in [(Path(cache_dir), "")] + ([(Path(cache_dir) / REPLAY, REPLAY_PREFIX)] if replaying else []):
        if (folder / "pairs.jsonl").is_file():
            for r, t in read_pairs(folder):
                if prefix + r in index_of and prefix + t in index_of:
                    fixed[index_of[prefix + t]] = index_of[prefix + r]
    frames = (
        round(cfg.data.reference_min_seconds * FRAMES_PER_SECOND),
        round(cfg.data.reference_max_seconds * FRAMES_PER_SECOND),
    )
    overhead = prompt_overhead_tokens(processor, cfg.data.scene)
    main_range, replay_range = range(num_main), range(num_main, len(utterances))
    replay_targets = [i for i in replay_range if utterances[i].speaker not in replay_held_out]

    def sampler_for(targets: list[int], world_size: int, accumulation: int, replay: bool = False) -> EpochSampler:
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
            replay_targets=replay_targets if replay else [],
            replay_fraction=cfg.data.replay_fraction if replay else 0.0,
        )

    train_targets = [i for i in main_range if utterances[i].speaker not in held_out]
    eval_targets = [i for i in main_range if utterances[i].speaker in held_out]
    replay_eval_targets = [i for i in replay_range if utterances[i].speaker in replay_held_out]
    eval_batches = eval_micro_batches(sampler_for(eval_targets, 1, 1)) if eval_targets else []
    codes = cache.with_format("numpy", columns=["codes"])
    return TrainData(
        cache=codes,
        texts=texts,
        source_ids=meta["source_id"],
        utterances=utterances,
        sampler=sampler_for(train_targets, plan.world_size, plan.accumulation, replay=replaying),
        eval_batches=eval_batches,
        eval_speakers=sorted(held_out),
        processor=processor,
        scene=cfg.data.scene,
        languages=meta["language"],
        replay_eval_batches=(eval_micro_batches(sampler_for(replay_eval_targets, 1, 1)) if replay_eval_targets else [])
        if replaying
        else None,
        replay_eval_speakers=sorted(replay_held_out) if replaying else None,
    )


def describe(data: TrainData) -> str:
    """The data summary rank 0 logs before training: utterances, held-out speakers, the first epoch."""
    first = data.sampler.plan(0)
    replay = ""
    if data.sampler.replay_fraction:
        replay = (
            f"replay: {len(data.sampler.replay_targets)} training targets at {data.sampler.replay_fraction:.0%} of "
            f"every step, held-out speakers {', '.join(data.replay_eval_speakers or []) or 'none'}; "
        )
    return (
        f"data: {len(data.utterances)} utterances, {len(data.sampler.targets)} training targets, {replay}"
        f"held-out speakers: {', '.join(data.eval_speakers) or 'none'} ({len(data.eval_batches)} eval micro-batches); "
        f"epoch 0: {len(first.steps)} steps, padding {first.padding_fraction:.1%}, "
        f"{first.num_without_reference} targets without a reference, {first.num_dropped} samples past the last step"
    )
