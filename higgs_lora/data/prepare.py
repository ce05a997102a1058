"""`higgs-lora prepare`: any corpus -> checked, normalised, codec-token cache, with a report.

The codec runs here, once; training only reads the cache. The run:

1. Read the corpus (`sources.py`) into utterances; find duplicates (same file, or same bytes).
2. Split the utterances, in corpus order, into shards of `prepare.shard_size`. A shard is the unit of work and of
   resumption: it is written to a staging directory and renamed into place when complete, so a killed run leaves
   whole shards or none, and a re-run skips the finished ones. `--num-shards N --shard-index i` lets N array-job
   tasks share the shards (task i takes shards i, i+N, ...).
3. Per shard, worker threads read, check and condition audio (mono, 24 kHz, trimmed, loudness-normalised) and
   normalise text; the codec encodes clips of equal frame count together; rows go to a `datasets` Arrow shard.
   Every rejected utterance is recorded with its reason; nothing is fatal but a broken configuration.
4. `join` (automatic at the end of a single-process run, `--join` after an array job) checks that every shard is
   there and writes `report.json`: items in, kept, rejected by reason with examples, hours, per-speaker counts,
   a duration histogram, and speakers that have a single utterance (they cannot be their own reference).

The cache's layout and how training reads it: `higgs_lora.data.cache`; docs/data.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from higgs_lora import startup
from higgs_lora.config import ConfigError, RunConfig, add_config_arguments, config_from_args
from higgs_lora.constants import FRAMES_PER_SECOND, HOP_SAMPLES
from higgs_lora.data.audio import AudioError, Conditioned, audio_seconds, condition, read_audio
from higgs_lora.data.cache import (
    CacheError,
    cache_dir_of,
    cache_features,
    cache_settings,
    replay_config,
    shard_dirs,
    shard_name,
)
from higgs_lora.data.sources import CorpusFormatError, Utterance, printable, read_corpus, unicode_problem
from higgs_lora.files import atomic_write_json, atomic_write_text, writable_dir_problem
from higgs_lora.logs import get_logger, progress_bars_wanted
from higgs_lora.text.arabic import has_arabic_letters, normalize_arabic

EXAMPLES_PER_REASON = 5
log = get_logger("prepare")


@dataclass
class Item:
    """An utterance scheduled for a shard, with its position in the corpus and a duplicate mark."""

    index: int
    utterance: Utterance
    duplicate_of: str | None = None


@dataclass
class Outcome:
    """What preparing one item gave: a cache row (without codes yet) or a rejection."""

    item: Item
    row: dict | None = None
    samples: Any = None
    reason: str | None = None
    detail: str = ""


# ------------------------------------------------------------------------------------------------- planning


def find_duplicates(utterances: list[Utterance]) -> dict[int, str]:
    """Index -> source_id of the first utterance with the same audio (same path, or same bytes).

    Only files of equal size are hashed, so this costs one stat per file plus a read of the rare collisions.
    """
    duplicates: dict[int, str] = {}
    first_by_path: dict[str, str] = {}
    by_size: dict[int, list[int]] = defaultdict(list)
    for index, utterance in enumerate(utterances):
        if utterance.audio in first_by_path:
            duplicates[index] = first_by_path[utterance.audio]
            continue
        first_by_path[utterance.audio] = utterance.source_id
        path = Path(utterance.audio)
        if path.is_file():
            by_size[path.stat().st_size].append(index)
    for indices in by_size.values():
        if len(indices) < 2:
            continue
        first_by_hash: dict[str, str] = {}
        for index in indices:
            try:
                digest = hashlib.sha1(Path(utterances[index].audio).read_bytes()).hexdigest()
            except OSError:  # unreadable: the audio reader rejects it with its reason
                continue
            if digest in first_by_hash:
                duplicates[index] = first_by_hash[digest]
            else:
                first_by_hash[digest] = utterances[index].source_id
    return duplicates


def plan_cache(cfg: RunConfig, codec_path: str) -> tuple[list[list[Item]], dict]:
    """Read the corpus, mark duplicates, split into shards; write or verify `plan.json` and `pairs.jsonl`."""
    try:
        corpus = read_corpus(cfg.data.corpus, cfg.data.format, cfg.data.language)
    except CorpusFormatError as err:
        raise CacheError(str(err)) from None
    duplicates = find_duplicates(corpus.utterances)
    items = [Item(i, u, duplicates.get(i)) for i, u in enumerate(corpus.utterances)]
    size = cfg.prepare.shard_size
    shards = [items[start : start + size] for start in range(0, len(items), size)]
    settings = cache_settings(cfg, codec_path)
    plan = {
        "settings": settings,
        "num_items": len(items),
        "num_shards": len(shards),
        "source_ids_sha1": hashlib.sha1("\n".join(u.source_id for u in corpus.utterances).encode()).hexdigest(),
        "source_problems": [asdict(p) for p in corpus.problems],
    }
    cache_dir = cache_dir_of(cfg)
    plan_file = cache_dir / "plan.json"
    if plan_file.is_file():
        existing = json.loads(plan_file.read_text(encoding="utf-8"))
        if existing != plan:
            changed = sorted(k for k in plan if existing.get(k) != plan[k])
            changed += sorted(f"settings.{k}" for k in settings if existing.get("settings", {}).get(k) != settings[k])
            raise CacheError(
                f"{cache_dir} holds a cache made from another corpus or with other settings ({', '.join(changed)}); "
                "set data.cache_dir to a new directory, or delete this one to rebuild it"
            )
    else:
        atomic_write_json(plan_file, plan)
        atomic_write_text(
            cache_dir / "pairs.jsonl",
            "".join(json.dumps({"reference": r, "target": t}, ensure_ascii=False) + "\n" for r, t in corpus.pairs),
        )
    return shards, plan


# ---------------------------------------------------------------------------------------------- one item


def letters(text: str) -> int:
    """Letters in `text` (Arabic diacritics, digits, spaces and punctuation not counted)."""
    return sum(ch.isalpha() for ch in text)


def condition_for_codec(samples, rate: int, cfg: RunConfig) -> Conditioned:
    """Check and condition decoded mono audio as `cfg` says (raises AudioError with a reason tag)."""
    data, audio = cfg.data, cfg.audio
    return condition(
        samples,
        rate,
        sample_rate=data.sample_rate,
        hop_samples=HOP_SAMPLES,
        target_lufs=audio.target_lufs,
        trim=audio.trim_silence,
        trim_db=audio.trim_db,
        trim_pad_seconds=audio.trim_pad_seconds,
        silence_dbfs=audio.silence_dbfs,
        max_clipped_fraction=audio.max_clipped_fraction,
        min_seconds=data.min_seconds,
        max_seconds=data.max_seconds,
    )


def prepare_item(item: Item, cfg: RunConfig) -> Outcome:
    """Check and condition one utterance (text and audio); never raises for bad data."""
    utterance, data = item.utterance, cfg.data
    if item.duplicate_of is not None:
        return Outcome(item, reason="duplicate", detail=f"same audio as {item.duplicate_of}")
    bad = next(
        (
            f"{name}: {why}"
            for name in ("text", "speaker", "language")
            if (why := unicode_problem(getattr(utterance, name)))
        ),
        None,
    )
    if bad is not None:  # checked before any audio work: such a row could never be written to the shard
        return Outcome(item, reason="bad_text", detail=bad)
    text = (
        normalize_arabic(
            utterance.text,
            strip_diacritics=data.strip_diacritics,
            fold_letters=data.fold_letters,
            numbers_to_words=data.numbers_to_words,
            diacritize=data.diacritize,
        )
        if utterance.language == "ar"
        else " ".join(utterance.text.split())
    )
    if not text:
        return Outcome(item, reason="empty_text", detail="transcript is empty")
    if utterance.language == "ar" and data.require_arabic_letters and not has_arabic_letters(text):
        return Outcome(item, reason="no_arabic_letters", detail=f"transcript {text[:60]!r} has no Arabic letter")
    try:
        # A header check first, so an hour-long file is rejected without decoding it.
        header_seconds = audio_seconds(utterance.audio) if Path(utterance.audio).is_file() else None
        if header_seconds is not None and header_seconds > max(2 * data.max_seconds, data.max_seconds + 30):
            raise AudioError(f"{header_seconds:.1f} s is longer than {data.max_seconds} s", reason="too_long")
        conditioned = condition_for_codec(*read_audio(utterance.audio), cfg)
    except AudioError as err:
        return Outcome(item, reason=err.reason, detail=str(err))
    rate_letters = letters(text) / conditioned.seconds
    if rate_letters > data.max_letters_per_second:
        return Outcome(
            item,
            reason="text_too_long_for_audio",
            detail=f"{rate_letters:.1f} letters/s over {conditioned.seconds:.2f} s "
            f"(limit {data.max_letters_per_second})",
        )
    row = {
        "source_id": utterance.source_id,
        "audio": utterance.audio,
        "speaker": utterance.speaker,
        "language": utterance.language,
        "text": utterance.text,
        "text_normalized": text,
        "duration": round(conditioned.seconds, 4),
        "num_frames": len(conditioned.samples) // HOP_SAMPLES,
        "source_sample_rate": conditioned.source_rate,
        "loudness_lufs": round(conditioned.loudness_lufs, 2) if conditioned.loudness_lufs > -1e9 else None,
    }
    return Outcome(item, row=row, samples=conditioned.samples)


# ------------------------------------------------------------------------------------------------ a shard


def encode_outcomes(outcomes: list[Outcome], codec, batch_size: int, device) -> None:
    """Encode every kept outcome's samples, batching only clips of equal length (so codes equal single calls)."""
    import numpy as np
    import torch

    by_length: dict[int, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        if outcome.row is not None:
            by_length[len(outcome.samples)].append(outcome)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            audio = torch.from_numpy(np.stack([o.samples for o in batch]))[:, None].to(device)
            with torch.no_grad():
                codes = codec.encode(audio).audio_codes.cpu()
            for outcome, item_codes in zip(batch, codes):
                outcome.row["codes"] = item_codes.to(torch.int16).numpy()
                outcome.row["num_frames"] = int(item_codes.shape[-1])
                outcome.samples = None  # free the audio as soon as it is encoded


def _table(rows: list[dict]):
    from datasets import Dataset

    columns = {key: [row[key] for row in rows] for key in cache_features()}
    return Dataset.from_dict(columns, features=cache_features())


def _table_error(rows: list[dict]) -> Exception | None:
    """Why `rows` cannot be stored as a cache table (None when they can)."""
    try:
        _table(rows)
    except Exception as err:  # noqa: BLE001 - any failure of a row is that row's rejection reason
        return err
    return None


def _reject_unwritable(outcomes: list[Outcome]) -> None:
    """Turn every kept outcome whose row cannot be stored into a rejection (`unserialisable`), keeping the rest.

    The common case costs one table for the shard; only when that fails is each row tried alone, so one bad record
    never loses the codec work of the others."""
    kept = [o for o in outcomes if o.row is not None]
    if not kept:
        return
    for outcome in kept:
        missing = [key for key in cache_features() if key not in outcome.row]
        strings = [key for key, value in outcome.row.items() if isinstance(value, str) and unicode_problem(value)]
        if missing or strings:
            detail = (
                f"no {', '.join(missing)}" if missing else f"{strings[0]}: {unicode_problem(outcome.row[strings[0]])}"
            )
            outcome.row, outcome.reason, outcome.detail = None, "unserialisable", detail
    if _table_error([o.row for o in outcomes if o.row is not None]) is None:
        return
    for outcome in (o for o in outcomes if o.row is not None):  # find the row(s) at fault
        err = _table_error([outcome.row])
        if err is not None:
            outcome.row, outcome.reason = None, "unserialisable"
            outcome.detail = f"{type(err).__name__}: {err}"[:300]


def write_shard(cache_dir: Path, name: str, outcomes: list[Outcome]) -> Path:
    """Write a shard to a staging directory, then rename it into place (whole or not at all).

    A row that cannot be stored is rejected (`unserialisable`) and the others are written."""
    shards_dir = cache_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    staging = shards_dir / f".{name}.staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    _reject_unwritable(outcomes)
    rows = [o.row for o in outcomes if o.row is not None]
    if rows:
        _table(rows).save_to_disk(str(staging))
    else:  # every utterance rejected: no Arrow table (datasets cannot reload an empty one), only the records
        staging.mkdir()
    rejected = [
        {
            "source_id": printable(o.item.utterance.source_id),
            "audio": printable(o.item.utterance.audio),
            "reason": o.reason,
            "detail": printable(o.detail),
        }
        for o in outcomes
        if o.row is None
    ]
    (staging / "rejected.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected), encoding="utf-8"
    )
    summary = {
        "items": len(outcomes),
        "kept": len(rows),
        "speakers": dict(Counter(row["speaker"] for row in rows)),
        "durations": [(row["speaker"], row["duration"]) for row in rows],
    }
    (staging / "summary.json").write_text(json.dumps(summary, ensure_ascii=False), encoding="utf-8")
    final = shards_dir / name
    os.replace(staging, final)
    return final


def _prepare_item_guarded(item: Item, cfg: RunConfig) -> Outcome:
    """`prepare_item`, with anything unexpected it raises for one record turned into that record's rejection."""
    try:
        return prepare_item(item, cfg)
    except Exception as err:  # noqa: BLE001 - one record must not end a corpus-wide run; the reason is recorded
        log.warning(f"{printable(item.utterance.source_id)}: rejected after an unexpected {type(err).__name__}: {err}")
        return Outcome(item, reason="internal_error", detail=f"{type(err).__name__}: {err}"[:300])


def process_shard(items: list[Item], cfg: RunConfig, codec, device, progress=None) -> list[Outcome]:
    """Prepare (in worker threads) and encode the items of one shard; outcomes in corpus order."""
    with ThreadPoolExecutor(max_workers=cfg.prepare.num_workers) as pool:
        outcomes = []
        for outcome in pool.map(lambda item: _prepare_item_guarded(item, cfg), items):
            outcomes.append(outcome)
            if progress is not None:
                progress.update(1)
    encode_outcomes(outcomes, codec, cfg.prepare.codec_batch_size, device)
    return outcomes


# ------------------------------------------------------------------------------------------------ the run


def my_shards(num_shards: int, array_size: int, array_index: int) -> list[int]:
    """Shards that array task `array_index` of `array_size` owns: index, index + size, ..."""
    return list(range(array_index, num_shards, array_size))


def run_prepare(cfg: RunConfig, array_size: int = 1, array_index: int = 0, quiet: bool = False) -> dict:
    """Build (or finish) this task's shards of the cache; returns counts of shards done and skipped.

    The progress bar is off when `quiet` or when logging is quiet (`--quiet`)."""
    import torch
    from tqdm import tqdm

    from higgs_lora.model.loading import load_codec, resolve_codec_path

    if not 0 <= array_index < array_size:
        raise CacheError(f"--shard-index {array_index} is outside 0..{array_size - 1}")
    codec_path = str(resolve_codec_path(cfg.model))
    shards, _ = plan_cache(cfg, codec_path)
    cache_dir = cache_dir_of(cfg)
    shards_dir = cache_dir / "shards"
    names = [shard_name(k, len(shards)) for k in range(len(shards))]
    todo = [k for k in my_shards(len(shards), array_size, array_index) if not (shards_dir / names[k]).is_dir()]
    skipped = len(my_shards(len(shards), array_size, array_index)) - len(todo)
    for k in my_shards(len(shards), array_size, array_index):  # leftovers of a killed run of these shards
        for stale in shards_dir.glob(f".{names[k]}.staging-*") if shards_dir.is_dir() else ():
            shutil.rmtree(stale)
    if not todo:
        return {"done": 0, "skipped": skipped}
    device = cfg.prepare.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    codec = load_codec(codec_path, device=device)
    if codec.config.sample_rate != cfg.data.sample_rate:
        raise CacheError(f"the codec expects {codec.config.sample_rate} Hz but data.sample_rate={cfg.data.sample_rate}")
    total = sum(len(shards[k]) for k in todo)
    # A bar on a terminal; in a log file (no terminal) one line per shard instead of `\r`-spliced redraws.
    bar_off = quiet or not progress_bars_wanted()
    started, done = time.perf_counter(), 0
    with tqdm(total=total, unit="utt", desc=f"prepare ({len(todo)} shards)", disable=bar_off, file=sys.stderr) as bar:
        for number, k in enumerate(todo, start=1):
            outcomes = process_shard(shards[k], cfg, codec, device, progress=bar)
            write_shard(cache_dir, names[k], outcomes)
            done += len(shards[k])
            if bar_off and not quiet:
                log.info(
                    f"shard {number}/{len(todo)} written: {done}/{total} utterances "
                    f"({time.perf_counter() - started:.0f} s)"
                )
    return {"done": len(todo), "skipped": skipped}


def join(cfg: RunConfig) -> dict:
    """Check every shard is present and write `report.json`; returns the report."""
    cache_dir = cache_dir_of(cfg)
    dirs, plan = shard_dirs(cache_dir)
    rejected: dict[str, list[dict]] = defaultdict(list)
    for problem in plan["source_problems"]:
        rejected[problem["reason"]].append({"source_id": problem["source_id"], "detail": problem["detail"]})
    per_speaker_seconds: dict[str, float] = defaultdict(float)
    per_speaker_count: Counter = Counter()
    durations = []
    for shard in dirs:
        for line in (shard / "rejected.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            rejected[record.pop("reason")].append(record)
        summary = json.loads((shard / "summary.json").read_text(encoding="utf-8"))
        for speaker, seconds in summary["durations"]:
            per_speaker_seconds[speaker] += seconds
            per_speaker_count[speaker] += 1
            durations.append(seconds)
    kept = len(durations)
    max_bin = max([int(cfg.data.max_seconds) + 1] + [int(d) + 1 for d in durations])
    histogram = Counter(int(d) for d in durations)
    pairs = [json.loads(line) for line in (cache_dir / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    report = {
        "cache_dir": str(cache_dir.resolve()),
        "items_in": plan["num_items"] + len(plan["source_problems"]),
        "kept": kept,
        "rejected_total": sum(len(v) for v in rejected.values()),
        "rejected": {
            reason: {"count": len(records), "examples": records[:EXAMPLES_PER_REASON]}
            for reason, records in sorted(rejected.items())
        },
        "hours_kept": round(sum(durations) / 3600, 4),
        "speakers": {
            speaker: {"utterances": per_speaker_count[speaker], "hours": round(per_speaker_seconds[speaker] / 3600, 4)}
            for speaker in sorted(per_speaker_count)
        },
        "single_utterance_speakers": sorted(s for s, n in per_speaker_count.items() if n == 1),
        "duration_histogram": {"bin_seconds": 1, "counts": [histogram.get(b, 0) for b in range(max_bin)]},
        "fixed_pairs": len(pairs),
        "num_shards": plan["num_shards"],
        "frames_per_second": FRAMES_PER_SECOND,
    }
    atomic_write_json(cache_dir / "report.json", report)
    return report


def format_report(report: dict) -> str:
    lines = [
        f"cache: {report['cache_dir']} ({report['num_shards']} shards)",
        f"items: {report['items_in']} in, {report['kept']} kept ({report['hours_kept']:.3f} h), "
        f"{report['rejected_total']} rejected",
    ]
    for reason, entry in report["rejected"].items():
        example = entry["examples"][0]
        where = example.get("audio") or example.get("source_id")
        lines.append(f"  rejected {reason}: {entry['count']} (e.g. {where}: {example.get('detail', '')})")
    lines.append(f"speakers: {len(report['speakers'])}; fixed pairs: {report['fixed_pairs']}")
    if report["single_utterance_speakers"]:
        lines.append(
            f"  WARNING: {len(report['single_utterance_speakers'])} speakers have one utterance and cannot "
            f"be their own reference: {', '.join(report['single_utterance_speakers'][:10])}"
        )
    counts = report["duration_histogram"]["counts"]
    peak = max(counts) if counts and max(counts) else 1
    for second, count in enumerate(counts):
        if count:
            lines.append(f"  {second:3d}-{second + 1:<3d} s {count:6d} {'#' * max(1, round(30 * count / peak))}")
    return "\n".join(lines)


def check_model_layout(cfg: RunConfig) -> None:
    """The model directory's layout before any work (CheckpointError with the convert command for an original one):
    the codec is found beside the model unless model.codec_path names it, and training needs the model next."""
    from higgs_lora.model.loading import check_model_dir

    if not cfg.model.codec_path or (Path(cfg.model.path).expanduser() / "config.json").is_file():
        check_model_dir(cfg.model.path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="higgs-lora prepare", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument(
        "--num-shards",
        type=int,
        default=1,
        help="number of array-job tasks sharing the work (not the number of cache shards)",
    )
    parser.add_argument("--shard-index", type=int, default=0, help="this task's index, 0 .. --num-shards - 1")
    parser.add_argument("--join", action="store_true", help="only check the shards and write the report")
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return startup.run_command(args, lambda: _prepare(args))


def _prepare(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    if not cfg.data.corpus:
        raise ConfigError(["data.corpus is not set: point it at your corpus (see docs/data.md)"])
    check_model_layout(cfg)
    problem = writable_dir_problem(cache_dir_of(cfg))
    if problem is not None:
        raise ConfigError([f"the cache directory: {problem}; set data.cache_dir (or output_dir) to one you can write"])
    # data.replay is prepared the same way, into <cache_dir>/replay, after the main corpus.
    for what, run_cfg in [("", cfg)] + ([("replay corpus ", replay_config(cfg))] if cfg.data.replay else []):
        started = time.perf_counter()
        # What was done and the report are the command's result: printed even with --quiet (which hides the bar).
        if not args.join:
            counts = run_prepare(run_cfg, args.num_shards, args.shard_index)
            print(
                f"[prepare] {what}shards written: {counts['done']}, already done: {counts['skipped']} "
                f"({time.perf_counter() - started:.1f} s)"
            )
        if args.join or args.num_shards == 1:
            report = join(run_cfg)
            print(format_report(report))
            print(f"[prepare] {what}report: {cache_dir_of(run_cfg) / 'report.json'}")
            if report["kept"] == 0:
                key = "data.replay" if what else "data.corpus"
                raise CacheError(
                    f"no utterance of {key}={run_cfg.data.corpus} was kept: all {report['items_in']} items were "
                    f"rejected (reasons above and in {cache_dir_of(run_cfg) / 'report.json'}); fix the corpus, or "
                    "the data.* / audio.* limits that reject it"
                )


if __name__ == "__main__":
    raise SystemExit(main())
