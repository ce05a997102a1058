"""The codec-token cache on disk: where it is, what it holds, and how to read it (training never runs the codec).

`higgs_lora.data.prepare` writes it; training, the planner and the tests read it through `load_cache` and
`read_pairs`. Layout (`data.cache_dir`):

    plan.json                 settings fingerprint (`cache_settings`), shard count, source problems
    pairs.jsonl               fixed (reference, target) source-id pairs from ChatML
    shards/shard-00000-of-00010/   Arrow data + rejected.jsonl + summary.json
    report.json               written by the join

Imports the config only (datasets when reading). Columns and report: docs/data.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from higgs_lora.config import RunConfig
from higgs_lora.errors import UserError

CACHE_VERSION = 1


class CacheError(UserError, RuntimeError):
    """The cache directory cannot be used as asked (settings changed, shards missing, ...)."""


def cache_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.output_dir) / "cache")


REPLAY = "replay"
"""<cache_dir>/replay/: the cache of `data.replay`, prepared with the main one."""
REPLAY_PREFIX = "replay:"
"""Prefix of the replay corpus's speakers and source ids in training, so they never meet the main corpus's."""


def replay_config(cfg: RunConfig) -> RunConfig:
    """The run config that prepares `data.replay` into <cache_dir>/replay: its corpus, format and language, the
    same audio and length settings, no replay of its own and no named held-out speakers (drawn as usual)."""
    import dataclasses

    data = dataclasses.replace(
        cfg.data,
        corpus=cfg.data.replay,
        format=cfg.data.replay_format,
        language=cfg.data.replay_language,
        cache_dir=str(cache_dir_of(cfg) / REPLAY),
        replay="",
        replay_fraction=0.0,
        eval_speakers=[],
    )
    return dataclasses.replace(cfg, data=data)


def cache_settings(cfg: RunConfig, codec_path: str) -> dict:
    """Everything that changes the cache's content; a cache made with other settings is not reused."""
    data = cfg.data
    return {
        "cache_version": CACHE_VERSION,
        "corpus": str(Path(data.corpus).expanduser().resolve()),
        "format": data.format,
        "language": data.language,
        "sample_rate": data.sample_rate,
        "min_seconds": data.min_seconds,
        "max_seconds": data.max_seconds,
        "strip_diacritics": data.strip_diacritics,
        "fold_letters": data.fold_letters,
        "numbers_to_words": data.numbers_to_words,
        "diacritize": data.diacritize,
        "require_arabic_letters": data.require_arabic_letters,
        "max_letters_per_second": data.max_letters_per_second,
        "audio": asdict(cfg.audio),
        "codec": str(Path(codec_path).expanduser().resolve()),
        "shard_size": cfg.prepare.shard_size,
    }


def cache_features():
    """The columns of a cache shard (`datasets.Features`)."""
    from datasets import Features, List, Value

    return Features(
        {
            "source_id": Value("string"),
            "audio": Value("string"),
            "speaker": Value("string"),
            "language": Value("string"),
            "text": Value("string"),
            "text_normalized": Value("string"),
            "duration": Value("float32"),
            "num_frames": Value("int32"),
            "source_sample_rate": Value("int32"),
            "loudness_lufs": Value("float32"),
            "codes": List(List(Value("int16"))),
        }
    )


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def shard_dirs(cache_dir: Path) -> tuple[list[Path], dict]:
    """(every shard's directory in corpus order, the cache's plan.json); raises CacheError if any is missing."""
    plan_file = cache_dir / "plan.json"
    if not plan_file.is_file():
        raise CacheError(f"{cache_dir} has no plan.json: run `python -m higgs_lora.prepare --config ...` first")
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    dirs = [cache_dir / "shards" / shard_name(k, plan["num_shards"]) for k in range(plan["num_shards"])]
    missing = [d.name for d in dirs if not d.is_dir()]
    if missing:
        raise CacheError(
            f"{cache_dir} is incomplete: {len(missing)} of {len(dirs)} shards missing ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); re-run prepare with the same config to finish it"
        )
    return dirs, plan


def _shard_kept(shard: Path) -> int:
    """Rows a shard holds (0: all rejected, and the shard has no Arrow table)."""
    return json.loads((shard / "summary.json").read_text(encoding="utf-8"))["kept"]


def load_cache(cache_dir: str | Path):
    """The whole cache as one memory-mapped `datasets.Dataset`, rows in corpus order (raises if incomplete)."""
    from datasets import Dataset, concatenate_datasets, load_from_disk

    dirs, _ = shard_dirs(Path(cache_dir))
    parts = [load_from_disk(str(shard)) for shard in dirs if _shard_kept(shard)]
    if not parts:
        return Dataset.from_dict({key: [] for key in cache_features()}, features=cache_features())
    return concatenate_datasets(parts)


def read_pairs(cache_dir: str | Path) -> list[tuple[str, str]]:
    """Fixed (reference, target) source-id pairs recorded from the corpus (ChatML)."""
    lines = (Path(cache_dir) / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    return [(record["reference"], record["target"]) for record in map(json.loads, lines)]
