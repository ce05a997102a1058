"""Batch cloning split across the tasks of an array job: `infer ... --shard i/n`, then `infer ... --join`.

    out/shards/plan.json                  what every shard was made from (input file, settings, number of shards)
    out/shards/shard-00002-of-00008/      shard 2 of 8: an ordinary `infer --out` folder (NNN.wav, manifest.jsonl,
                                          errors.jsonl, run.json) for the samples with index 2, 10, 18, ...
    out/NNN.wav, manifest.jsonl, ...      written by the join: one folder, as one unsharded run writes it

Shard i of n takes the samples whose position in the input is i mod n (strided like `prepare`'s shards, so one
task does not get all the long texts at the end of a file), names each wav after that global position and seeds
it with `--seed + position`: the joined folder has the same file names and seeds as one `infer` run over the file.

Completion is atomic: a shard is generated into a hidden staging folder beside its final name and renamed into
place only when its manifest and run record are written (the rename is the done marker). A rerun skips the
shards whose folder exists, without loading the model; the leftovers of a task that was killed half-way are
deleted and that shard is generated again. `plan.json` guards against mixing: a shard run with another input file,
other settings or another number of shards is refused, so one `out/` never holds shards of two different runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from higgs_lora.errors import UserError
from higgs_lora.files import atomic_write_json, atomic_write_text, staged_directory
from higgs_lora.logs import get_logger

log = get_logger("infer")

SHARDS = "shards"
PLAN = "plan.json"
OUTPUT_INDEPENDENT = frozenset({"out", "shard", "join", "device", "max_batch", "quiet", "verbose", "chatml", "jsonl"})
"""Command-line options that do not change what a sample sounds like (where it runs, how many at once, logging,
the input's name: its content is hashed instead); every other option is recorded in plan.json and must match."""


class ShardError(UserError, ValueError):
    """A --shard value, or an output folder, that the sharded run cannot use; the message says what to do."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the samples whose position in the input is `index` mod `count`."""

    index: int
    count: int

    @property
    def name(self) -> str:
        return shard_name(self.index, self.count)

    def owns(self, position: int) -> bool:
        return position % self.count == self.index


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def parse_shard(text: str) -> Shard:
    """'I/N' (0 <= I < N) -> Shard; ShardError naming the expected form otherwise."""
    index, slash, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        shard = None
    if not slash or shard is None or shard.count < 1 or not 0 <= shard.index < shard.count:
        raise ShardError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/8 for the first of 8 tasks")
    return shard


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_plan(input_path: Path, num_records: int, count: int, options: dict) -> dict:
    """What a shard is made from: the input's content, its record count, the number of shards and every option that
    changes the output (OUTPUT_INDEPENDENT ones left out). Same command, same plan, on every task."""
    settings = {k: v for k, v in sorted(options.items()) if k not in OUTPUT_INDEPENDENT}
    return {
        "input": str(input_path),
        "input_sha1": file_sha1(input_path),
        "records": num_records,
        "shards": count,
        "settings": json.loads(json.dumps(settings, default=str)),
    }


def claim_plan(out: Path, plan: dict) -> None:
    """Write out/shards/plan.json, or check the one there matches `plan` (the input's name may differ)."""
    path = out / SHARDS / PLAN
    if path.is_file():
        held = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in ("input_sha1", "records", "shards", "settings") if held.get(k) != plan[k]]
        if changed:
            raise ShardError(
                f"{out} holds shards of another run (different {', '.join(changed)}; see {path}): rerun with the "
                f"same samples file, options and number of shards ({held.get('shards')}), or give a new --out"
            )
        return
    # Every task of an array may get here at once: they all write the same content, so whichever rename is last
    # leaves the same file.
    atomic_write_json(path, plan)


def done(out: Path, shard: Shard) -> bool:
    """Whether the shard's folder is in place (it is renamed there only when complete)."""
    return (out / SHARDS / shard.name).is_dir()


def remove_leftovers(out: Path, shard: Shard) -> list[Path]:
    """Delete the staging folders of this shard that a killed task left behind; returns what was deleted."""
    folder = out / SHARDS
    stale = sorted(folder.glob(f".{shard.name}.*.partial")) if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def write_shard(out: Path, shard: Shard, generate: Callable[[Path], dict]) -> dict:
    """Run `generate(folder)` into a fresh staging folder and rename it to the shard's name when it returns; returns
    what `generate` returned. An exception (or a killed task) leaves no shard: the next run generates it again."""
    for path in remove_leftovers(out, shard):
        log.info(f"removed {path.name}, the unfinished output of an earlier task for shard {shard.name}")
    with staged_directory(out / SHARDS / shard.name) as staging:
        return generate(staging)


# ------------------------------------------------------------------------------------------------ the join


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _place(source: Path, target: Path) -> None:
    """`target` becomes `source`'s content atomically: a hard link (no copy, same file system), else a copy."""
    temporary = target.with_name(f".{target.name}.join-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:  # a file system without hard links: copy instead
        shutil.copyfile(source, temporary)
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)


def missing_shards(out: Path) -> tuple[dict, list[str]]:
    """(plan, names of the shards not in place); ShardError when out/ has no sharded run at all."""
    path = out / SHARDS / PLAN
    if not path.is_file():
        raise ShardError(f"{path} not found: --join needs the folder the `--shard I/N` tasks wrote to (--out)")
    plan = json.loads(path.read_text(encoding="utf-8"))
    count = plan["shards"]
    return plan, [shard_name(k, count) for k in range(count) if not done(out, Shard(k, count))]


def join(out: Path) -> dict:
    """Gather every shard of out/ into out/ itself: wavs, manifest.jsonl, errors.jsonl, run.json; returns the record.

    Refuses (ShardError, nothing written) while a shard is missing, naming them. Idempotent: joining again gives the
    same folder. manifest.jsonl is written last, so a folder with a manifest is a complete one.
    """
    plan, missing = missing_shards(out)
    if missing:
        raise ShardError(
            f"{len(missing)} of {plan['shards']} shards are not finished in {out / SHARDS} ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): their tasks failed or are still running; submit the same array "
            "command again (finished shards are skipped), then join"
        )
    lines, errors, runs = [], [], []
    for k in range(plan["shards"]):
        folder = out / SHARDS / shard_name(k, plan["shards"])
        for line in _read_jsonl(folder / "manifest.jsonl"):
            _place(folder / line["wav"], out / line["wav"])
            lines.append(line)
        errors.extend(_read_jsonl(folder / "errors.jsonl"))
        runs.append({"shard": folder.name, **json.loads((folder / "run.json").read_text(encoding="utf-8"))})
    lines.sort(key=lambda line: line["index"])
    errors.sort(key=lambda error: error["index"])
    if len(lines) + len(errors) != plan["records"]:
        raise ShardError(
            f"the shards hold {len(lines)} generated and {len(errors)} failed samples, but the input had "
            f"{plan['records']}: {out / SHARDS} was changed by hand; delete it and run the array again"
        )
    if errors:
        atomic_write_text(out / "errors.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    else:
        (out / "errors.jsonl").unlink(missing_ok=True)
    record = joined_record(runs, len(lines), len(errors))
    atomic_write_json(out / "run.json", record)
    atomic_write_text(out / "manifest.jsonl", "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return record


def joined_record(runs: list[dict], samples: int, failed: int) -> dict:
    """run.json of the joined folder: the first shard's model and settings, totals over all shards, and one line per
    shard (where it ran, how long it took). No "seconds": the tasks ran side by side, so their sum is not the
    wall time of the run; `task_seconds` (the sum) and `slowest_task_seconds` say what is known."""
    totals = {"samples", "failed", "seconds", "audio_seconds", "shard", "device"}
    described = next((r for r in runs if "model" in r), runs[0])  # a shard with nothing to generate loads no model
    return {
        **{k: v for k, v in described.items() if k not in totals},
        "samples": samples,
        "failed": failed,
        "audio_seconds": round(sum(r.get("audio_seconds", 0.0) for r in runs), 3),
        "task_seconds": round(sum(r.get("seconds", 0.0) for r in runs), 3),
        "slowest_task_seconds": max((r.get("seconds", 0.0) for r in runs), default=0.0),
        "devices": sorted({str(r["device"]) for r in runs if r.get("device")}),
        "shards": [
            {k: r.get(k) for k in ("shard", "device", "samples", "failed", "seconds", "audio_seconds")} for r in runs
        ],
    }
