"""The layout of a run's output folder: where the checkpoints and the adapter are, and how to find the newest.

Training writes it (`higgs_lora.train.checkpoint`); deployment and inference read it without importing training.
Imports only the config. The layout is described in docs/training.md (Checkpoints and resume).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from higgs_lora.config import RunConfig, load_config
from higgs_lora.constants import RUN_CONFIG, STEP_NAME

CHECKPOINTS = "checkpoints"
DEEPSPEED_TAG = "deepspeed"
ADAPTER = "adapter"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
"""The file in checkpoints/ that names the newest complete checkpoint."""
BEST = "best"
"""<output_dir>/best/: the adapter of the run's best evaluation (higgs_lora.train.best), with best.json."""
BEST_JSON = "best.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return STEP_NAME.format(step)


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def is_complete(path: Path) -> bool:
    return (path / TRAINER_STATE).is_file() and (path / DEEPSPEED_TAG).is_dir()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    root = checkpoints_root(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):  # a damaged pointer: fall back to the newest complete checkpoint
            name = ""
        named = root / name
        if name and _STEP_DIR.match(name) and is_complete(named):
            return named
    complete = list_checkpoints(output_dir)
    return complete[-1] if complete else None


def resolve_adapter(given: str | Path) -> tuple[Path, str]:
    """(the adapter directory, one line saying which one it is) for what a user gave `--adapter`:

    an adapter directory as it is (a run's `best/` says its step, from best.json); a run folder -> its final
    `adapter/`; anything else is returned as given (the caller's check says what is wrong with it).
    """
    path = Path(given)
    if (path / "adapter_config.json").is_file():
        if (path / BEST_JSON).is_file():
            step = json.loads((path / BEST_JSON).read_text(encoding="utf-8"))["step"]
            return path, f"{given}: the run's best adapter (step {step}, chosen by the rule in {BEST_JSON})"
        return path, f"{given}: adapter directory"
    if (path / ADAPTER / "adapter_config.json").is_file():
        best = path / BEST
        also = f"; the best evaluation's is {best}" if (best / BEST_JSON).is_file() else ""
        return path / ADAPTER, f"{given}: run folder, its final adapter {path / ADAPTER}{also}"
    return path, f"{given}"


def read_adapter_config(adapter_dir: str | Path) -> RunConfig:
    """The run config saved with an adapter (base model path included)."""
    return load_config(Path(adapter_dir) / RUN_CONFIG)


def licence_notice(what: str) -> str:
    """The NOTICE the base weights' licence asks a distributed fine-tune to ship; `what` is 'adapter' or 'model'.

    Every adapter folder of a run holds it, and so does a model merged from one."""
    return (
        f"This {what} was fine-tuned from Higgs Audio 2 (Boson AI), which is built on Meta Llama 3.\n\n"
        "Higgs Audio 2 is licensed under the Boson Higgs Audio 2 Community License; Meta Llama 3 is licensed under "
        "the\nMeta Llama 3 Community License, Copyright (c) Meta Platforms, Inc. All Rights Reserved.\n\n"
        'A distributed fine-tune must carry "Higgs Audio 2" at the start of its name, ship this NOTICE, and '
        "follow the\nLlama 3 Acceptable Use Policy. Check the licences that came with your base weights for the "
        "binding text.\n"
    )
