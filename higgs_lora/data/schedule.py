"""The training schedule a prepared cache gives, from its metadata alone: what training builds and planning checks.

`cache_samplers` holds out the evaluation speakers and builds the epoch samplers (train/data.py uses it with the
tokenizer's exact counts and the template's overhead); `check_one_step` is the planning-time check that the
corpus gives at least one optimizer step, run before any model is loaded. Imports the cache reader, the sampler
and (lazily) `tokenizers`; no torch. See docs/training.md (What one step does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from higgs_lora.config import RunConfig
from higgs_lora.constants import FRAMES_PER_SECOND
from higgs_lora.data.cache import read_pairs
from higgs_lora.data.sampler import DataError, EpochSampler, UtteranceInfo, split_speakers

TOKENS_PER_LETTER_ESTIMATE = 0.5
"""Text tokens per letter when the model directory has no tokenizer.json (a deliberately high guess)."""


@dataclass
class CacheSamplers:
    """The utterances of a cache, its held-out speakers and the samplers built on them."""

    utterances: list[UtteranceInfo]
    held_out: set[str]
    train: EpochSampler
    eval: EpochSampler | None


def cache_metadata(cache) -> dict:
    """source_id, speaker, num_frames and text_normalized of every row (no codes read)."""
    return cache.select_columns(["source_id", "speaker", "num_frames", "text_normalized"]).to_dict()


def text_token_counts(model_path: str | Path, texts: list[str]) -> list[int]:
    """Tokens of each text with the model's tokenizer (tokenizer.json, no special tokens); an upper estimate from
    the letter count where there is none."""
    tokenizer_file = Path(model_path).expanduser() / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return [int(TOKENS_PER_LETTER_ESTIMATE * len(t)) + 1 for t in texts]


def cache_samplers(
    cfg: RunConfig,
    meta: dict,
    token_counts: list[int],
    prompt_overhead: int,
    micro_batch_tokens: int,
    world_size: int,
    accumulation: int,
    cache_dir: str | Path,
) -> CacheSamplers:
    """Hold out the evaluation speakers and build the training (and evaluation) epoch samplers of a cache."""
    utterances = [UtteranceInfo(s, n, t) for s, n, t in zip(meta["speaker"], meta["num_frames"], token_counts)]
    held_out = split_speakers(meta["speaker"], cfg.data.eval_speakers, cfg.data.num_eval_speakers, cfg.seed)
    index_of = {source_id: i for i, source_id in enumerate(meta["source_id"])}
    fixed = {}
    if (Path(cache_dir) / "pairs.jsonl").is_file():
        fixed = {index_of[t]: index_of[r] for r, t in read_pairs(cache_dir) if r in index_of and t in index_of}
    frames = (
        round(cfg.data.reference_min_seconds * FRAMES_PER_SECOND),
        round(cfg.data.reference_max_seconds * FRAMES_PER_SECOND),
    )

    def sampler_for(targets: list[int], world: int, accumulate: int) -> EpochSampler:
        return EpochSampler(
            utterances=utterances,
            targets=targets,
            prompt_overhead=prompt_overhead,
            micro_batch_tokens=micro_batch_tokens,
            reference_frames=frames,
            seed=cfg.seed,
            world_size=world,
            accumulation=accumulate,
            fixed_references=fixed,
        )

    train_targets = [i for i, u in enumerate(utterances) if u.speaker not in held_out]
    eval_targets = [i for i, u in enumerate(utterances) if u.speaker in held_out]
    return CacheSamplers(
        utterances=utterances,
        held_out=held_out,
        train=sampler_for(train_targets, world_size, accumulation),
        eval=sampler_for(eval_targets, 1, 1) if eval_targets else None,
    )


def one_step_problem(
    micro_batches: int, world_size: int, accumulation: int, micro_batch_tokens: int, global_batch_tokens: int
) -> str | None:
    """Why `micro_batches` micro-batches per epoch give no optimizer step, with the knob to turn; None if they do."""
    per_step = world_size * accumulation
    if micro_batches >= per_step:
        return None
    what = (
        f"the training data gives {micro_batches} micro-batches of <= {micro_batch_tokens:,} positions per epoch, "
        f"but one optimizer step takes {per_step} ({world_size} ranks x {accumulation} accumulation"
    )
    if global_batch_tokens:
        what += f", for train.global_batch_tokens={global_batch_tokens:,})"
    else:
        what += ")"
    if micro_batches >= world_size:
        fits = micro_batch_tokens * world_size * (micro_batches // world_size)
        return f"{what}: lower train.global_batch_tokens to {fits:,} or less (or 0 to plan it), or add data"
    return f"{what}: add data, or use fewer ranks (fewer than {world_size} micro-batches for {world_size} ranks)"


def check_one_step(
    cfg: RunConfig,
    cache_dir: str | Path,
    micro_batch_tokens: int,
    world_size: int,
    accumulation: int,
    prompt_overhead: int,
) -> None:
    """Raise DataError when the prepared cache gives no optimizer step for this plan (nothing to check without a
    cache: planning before `prepare` is allowed). Reads the cache's metadata and the tokenizer only."""
    from higgs_lora.data.cache import load_cache

    try:
        cache = load_cache(cache_dir)
    except Exception:  # no (complete) cache yet: training says so when it reads it
        return
    if len(cache) == 0:
        raise DataError(f"the cache {cache_dir} has no utterances: run `python -m higgs_lora.prepare` first")
    meta = cache_metadata(cache)
    counts = text_token_counts(cfg.model.path, meta["text_normalized"])
    samplers = cache_samplers(
        cfg, meta, counts, prompt_overhead, micro_batch_tokens, world_size, accumulation, cache_dir
    )
    one_per_step = cache_samplers(cfg, meta, counts, prompt_overhead, micro_batch_tokens, 1, 1, cache_dir).train
    problem = one_step_problem(
        len(one_per_step.plan(0).steps), world_size, accumulation, micro_batch_tokens, cfg.train.global_batch_tokens
    )
    if problem is not None and not samplers.train.plan(0).steps:
        raise DataError(f"{problem} (cache {cache_dir}: {len(samplers.train.targets)} training targets)")
