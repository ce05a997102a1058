"""A checkpoint's manifest: every file's size and SHA-256, written last, checked before a resume trusts the folder.

`save_checkpoint` writes `manifest.json` into the staging folder once every rank's files are there (atomically, as
the last file before the rename), so a checkpoint whose manifest verifies is whole and unchanged. On resume,
`train.resume=auto` takes the newest checkpoint that verifies and says which newer ones it skipped and why; an
explicit `train.resume=DIR` that does not verify is an error naming the file. A checkpoint written before manifests
existed is accepted with a warning after a cheap check (its trainer state parses, its DeepSpeed folder holds files).
Pure file work: imports no torch. See docs/training.md (Checkpoints and resume).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from higgs_lora.files import atomic_write_json
from higgs_lora.run_folder import DEEPSPEED_TAG, TRAINER_STATE

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> Path:
    """Record every file under `directory` (relative path -> size, sha256) in `directory/manifest.json`."""
    files = {
        path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": sha256_of(path)}
        for path in _files(directory)
    }
    return atomic_write_json(directory / MANIFEST, {"version": MANIFEST_VERSION, "files": files})


@dataclass(frozen=True)
class Verdict:
    """What checking a checkpoint folder found: `problem` is None when it can be used."""

    problem: str | None
    has_manifest: bool


def verify_checkpoint(directory: Path) -> Verdict:
    """Check `directory` against its manifest (sizes, then hashes); without one, the cheap checks only."""
    manifest_file = directory / MANIFEST
    if not manifest_file.is_file():
        return Verdict(_legacy_problem(directory), has_manifest=False)
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = manifest["files"]
        entries = [(name, int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        return Verdict(f"{manifest_file} is unreadable ({type(err).__name__}: {err})", has_manifest=True)
    if not entries:
        return Verdict(f"{manifest_file} lists no files", has_manifest=True)
    for name, size, _ in entries:
        path = directory / name
        if not path.is_file():
            return Verdict(f"{path} is missing (listed in {MANIFEST})", has_manifest=True)
        actual = path.stat().st_size
        if actual != size:
            return Verdict(f"{path} has {actual} bytes, {MANIFEST} says {size} (truncated?)", has_manifest=True)
    for name, _, expected in entries:
        path = directory / name
        try:
            actual_hash = sha256_of(path)
        except OSError as err:
            return Verdict(f"{path} cannot be read ({err})", has_manifest=True)
        if actual_hash != expected:
            return Verdict(f"{path} does not match its SHA-256 in {MANIFEST} (changed or damaged)", has_manifest=True)
    return Verdict(None, has_manifest=True)


def _legacy_problem(directory: Path) -> str | None:
    state = directory / TRAINER_STATE
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{state} is not a readable JSON file ({type(err).__name__}: {err})"
    deepspeed = directory / DEEPSPEED_TAG
    if not deepspeed.is_dir() or not any(p.is_file() and p.stat().st_size for p in deepspeed.rglob("*")):
        return f"{deepspeed} holds no DeepSpeed state"
    return None
