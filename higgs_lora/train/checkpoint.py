"""Checkpoints: saving and loading DeepSpeed state for exact resume, and the PEFT adapter for deployment.

Written atomically: under `.step_N.partial`, renamed once every rank is done, then `latest` moves; under ZeRO-3 the
adapter export gathers the sharded LoRA weights first. The folder's names are `higgs_lora.run_folder`. Imports no
torch at module level. See docs/training.md (Checkpoints and resume).
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

from higgs_lora.config import RunConfig, save_config
from higgs_lora.constants import RUN_CONFIG
from higgs_lora.errors import UserError
from higgs_lora.files import atomic_write_json, atomic_write_text
from higgs_lora.logs import get_logger
from higgs_lora.run_folder import (
    ADAPTER,
    DEEPSPEED_TAG,
    LATEST,
    TRAINER_STATE,
    checkpoints_root,
    is_complete,
    latest_checkpoint,
    licence_notice,
    list_checkpoints,
    read_adapter_config,
    step_name,
    step_of,
)
from higgs_lora.train.checkpoint_manifest import MANIFEST, verify_checkpoint, write_manifest

log = get_logger("train")


class ResumeError(UserError, ValueError):
    """The requested checkpoint cannot be resumed from."""


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint `train.resume` asks for: 'auto' -> latest complete or None, 'never' -> None, else a path.

    'never' refuses an output_dir that already holds checkpoints: a fresh run would interleave its checkpoints
    with the old ones (and prune them), and `auto` would later resume whichever is newest.
    """
    if cfg.train.resume == "never":
        existing = list_checkpoints(cfg.output_dir)
        if existing:
            raise ResumeError(
                f"train.resume=never but {checkpoints_root(cfg.output_dir)} already holds {len(existing)} "
                "checkpoints; use a new output_dir, delete them, or resume with train.resume=auto"
            )
        return None
    if cfg.train.resume == "auto":
        return newest_verified_checkpoint(cfg.output_dir)
    path = Path(cfg.train.resume)
    if not is_complete(path):
        raise ResumeError(
            f"train.resume={path} is not a complete checkpoint (expected {TRAINER_STATE} and {DEEPSPEED_TAG}/ in it); "
            f"use train.resume=auto to take the newest complete one in {checkpoints_root(cfg.output_dir)}"
        )
    verdict = verify_checkpoint(path)
    if verdict.problem is not None:
        raise ResumeError(
            f"train.resume={path} is damaged: {verdict.problem}; use train.resume=auto to take the newest checkpoint "
            f"in {checkpoints_root(cfg.output_dir)} that verifies, or name another one"
        )
    if not verdict.has_manifest:
        log.warning(f"{path} has no {MANIFEST} (written by an older version): resuming from it unverified")
    return path


def newest_verified_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names if it verifies, else the newest complete one that does, else None.

    Each one skipped is logged with the reason (a warning), so a fallback is never silent."""
    latest = latest_checkpoint(output_dir)
    candidates = ([latest] if latest is not None else []) + [
        p for p in reversed(list_checkpoints(output_dir)) if p != latest
    ]
    for path in candidates:
        verdict = verify_checkpoint(path)
        if verdict.problem is None:
            if not verdict.has_manifest:
                log.warning(f"{path} has no {MANIFEST} (written by an older version): resuming from it unverified")
            return path
        log.warning(f"skipping checkpoint {path}: {verdict.problem}")
    return None


# -------------------------------------------------------------------------------------------------- RNG


RNG_FORMAT = 2
"""Version of the rng/rank_*.pt layout: 2 = plain tensors, ints and floats only (readable with weights_only=True)."""


def capture_rng() -> dict:
    """This process's Python, NumPy, torch (and CUDA) generator states as tensors, ints and floats only, so
    `torch.load(..., weights_only=True)` reads them back: loading one can never run code."""
    import numpy as np
    import torch

    version, mt_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "format": RNG_FORMAT,
        "python": {
            "version": int(version),
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    """Set the generators from a `capture_rng` dict."""
    import numpy as np
    import torch

    python = state["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng(rng_file: Path) -> bool:
    """Restore this rank's generators from `rng_file` (read with weights_only=True); returns whether it did.

    A file in the old pickled layout (before RNG_FORMAT 2), or one that is not a plain state, is never unpickled: a
    warning says so and the generators keep this run's seed, so the resumed run is valid but not bit-identical to an
    uninterrupted one."""
    import pickle

    import torch

    try:
        state = torch.load(rng_file, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
            raise ValueError(f"not an RNG state of format {RNG_FORMAT}")
        restore_rng(state)
    except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, EOFError) as err:
        log.warning(
            f"{rng_file} was not loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): "
            "random generators continue from this run's seed, so this resume is not bit-identical. Files in the "
            "pickled layout of older versions are refused because unpickling can run code"
        )
        return False
    return True


# ---------------------------------------------------------------------------------------------- adapter


def gathered_adapter_state(model) -> dict:
    """Full CPU copies of the trainable (LoRA) tensors, gathered from their ZeRO-3 shards when sharded.

    Every rank must call this (the gather is collective). Keys are the PEFT model's parameter names.
    """
    import deepspeed

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in named}


LICENCE_NOTICE = licence_notice("adapter")


def _model_card(cfg: RunConfig, step: int) -> str:
    return (
        f"# {cfg.name}\n\n"
        f"LoRA adapter (r={cfg.lora.r}, alpha={cfg.lora.alpha}, targets: {', '.join(cfg.lora.target_modules)}) for "
        f"Higgs Audio v2 zero-shot voice cloning (language: {cfg.data.language}), trained with higgs-lora for "
        f"{step} optimizer steps.\n\n"
        f"Base model: `{cfg.model.path}`. The resolved training config is in `{RUN_CONFIG}`.\n\n"
        f"Prompt settings (inference uses them unless a request names its own): "
        f"`{json.dumps(cfg.data.prompt_settings(), ensure_ascii=False)}`.\n\n"
        "Load with PEFT:\n\n```python\n"
        "from peft import PeftModel\n"
        "from transformers import HiggsAudioV2ForConditionalGeneration\n"
        "base = HiggsAudioV2ForConditionalGeneration.from_pretrained(BASE_DIR)\n"
        "model = PeftModel.from_pretrained(base, ADAPTER_DIR)\n```\n\n"
        "Fold it into the base: `python -m higgs_lora.merge --adapter <this directory>`.\n\n"
        "See NOTICE for the licence terms of the base weights.\n"
    )


def export_adapter(model, out: Path, cfg: RunConfig, step: int, is_main: bool) -> None:
    """Write the PEFT adapter of `model` into directory `out` (all ranks call; rank 0 writes).

    The adapter folder is self-describing: `adapter_config.json` names the base model by absolute path and
    `higgs_lora.yaml` holds the resolved run config, so merge and inference need no flags.
    """
    state = gathered_adapter_state(model)
    if not is_main:
        return
    empty = [name for name, tensor in state.items() if tensor.numel() == 0]
    if not state or empty:
        raise RuntimeError(
            f"refusing to write an empty adapter ({len(empty)} of {len(state)} LoRA tensors have no elements): "
            "under ZeRO-3 the weights must be gathered before saving"
        )
    base_path = str(Path(cfg.model.path).expanduser().resolve())
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base_path
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    run_config = copy.deepcopy(cfg)
    run_config.model.path = base_path
    if cfg.model.codec_path:
        run_config.model.codec_path = str(Path(cfg.model.codec_path).expanduser().resolve())
    save_config(run_config, out / RUN_CONFIG)
    atomic_write_text(out / "README.md", _model_card(run_config, step))
    atomic_write_text(out / "NOTICE", LICENCE_NOTICE)


# ------------------------------------------------------------------------------------------- save / load


def prune(output_dir: str | Path, newest_step: int, keep_last: int, keep_step: int | None = None) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` up to `newest_step`; returns what was deleted.

    Checkpoints past `newest_step` (left by another run in the same directory) are never touched, and neither is
    `newest_step` itself, nor `keep_step` (the best evaluation's step, whose checkpoint is kept when there is one).
    """
    older = [p for p in list_checkpoints(output_dir) if step_of(p) <= newest_step]
    doomed = [p for p in older[: -max(1, keep_last)] if step_of(p) != keep_step]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_checkpoint(
    engine,
    cfg: RunConfig,
    step: int,
    trainer_state: dict,
    rank: int,
    keep_last: int,
    run_files: dict[str, dict] | None = None,
    keep_step: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically (all ranks call). Returns its final directory.

    `run_files` are JSON files written beside the trainer state (the resolved DeepSpeed config and the plan), so a
    checkpoint says how it was trained. `keep_step`: a checkpoint pruning must keep (the best one).

    A failure on any rank (disk full, an empty adapter) raises on every rank instead of leaving the others waiting.
    """
    import torch

    from higgs_lora.distributed import raise_if_any_failed

    root = checkpoints_root(cfg.output_dir)
    final = root / step_name(step)
    partial = root / f".{step_name(step)}.partial"
    error = None
    if rank == 0:
        try:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        except OSError as err:
            error = err
    raise_if_any_failed(error, f"preparing {partial}")
    engine.save_checkpoint(str(partial), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
    try:
        rng_dir = partial / "rng"
        rng_dir.mkdir(exist_ok=True)
        torch.save(capture_rng(), rng_dir / f"rank_{rank:05d}.pt")
        export_adapter(engine.module, partial / ADAPTER, cfg, step, is_main=rank == 0)
    except (OSError, RuntimeError) as err:
        error = err
    raise_if_any_failed(error, f"writing {partial}")
    if rank == 0:
        try:
            atomic_write_json(partial / TRAINER_STATE, trainer_state)
            for name, content in (run_files or {}).items():
                atomic_write_json(partial / name, content)
            write_manifest(partial)  # last: a checkpoint whose manifest verifies is whole
            if final.exists():  # a re-run of the same step (e.g. after a crash right after the rename)
                shutil.rmtree(final)
            partial.rename(final)
            atomic_write_text(root / LATEST, final.name + "\n")
            prune(cfg.output_dir, step, keep_last, keep_step)
        except OSError as err:
            error = err
    raise_if_any_failed(error, f"publishing {final}")
    return final


def check_compatible(path: Path, cfg: RunConfig, world_size: int) -> dict:
    """The trainer state at `path`, after checking this run can resume it; raises ResumeError saying why not.

    DeepSpeed's own load fails deep inside its flat buffers (or, with equal sizes, silently misassigns weights) when
    the adapter's shape or the number of ranks changed: check those first, from the checkpoint's own files.
    """
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        saved_world = state["sampler"]["world_size"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ResumeError(
            f"{path / TRAINER_STATE} is unreadable ({type(err).__name__}: {err}); resume from another checkpoint "
            "(train.resume=auto takes the newest that verifies)"
        ) from None
    if saved_world != world_size:
        raise ResumeError(
            f"{path} was written by {saved_world} ranks and this run has {world_size}: DeepSpeed's ZeRO state is "
            f"partitioned per rank. Resume with {saved_world} ranks, or convert it with DeepSpeed's universal "
            "checkpoint tools (ds_to_universal.py) first"
        )
    saved = read_adapter_config(path / ADAPTER)
    mismatched = [key for key in ("r", "alpha", "target_modules") if getattr(saved.lora, key) != getattr(cfg.lora, key)]
    if saved.model.quantization != cfg.model.quantization:
        mismatched.append("model.quantization")
    if mismatched:
        raise ResumeError(
            f"{path} was trained with different adapter settings ({', '.join(mismatched)}); resume with the same "
            f"settings (see {path / ADAPTER / RUN_CONFIG}) or start a new run in a new output_dir"
        )
    return state


def load_checkpoint(engine, path: Path, rank: int) -> dict:
    """Restore engine state, this rank's RNG, and return the trainer state saved at `path`."""
    import pickle

    try:
        load_path, _ = engine.load_checkpoint(
            str(path),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
        # A damaged file the manifest could not catch (a checkpoint without one): say which checkpoint, exit 2.
        raise ResumeError(
            f"DeepSpeed could not load {path / DEEPSPEED_TAG} ({type(err).__name__}: {err}); resume from another "
            "checkpoint (train.resume=auto takes the newest that verifies) or delete this one"
        ) from err
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load {path / DEEPSPEED_TAG}")
    rng_file = path / "rng" / f"rank_{rank:05d}.pt"
    if rng_file.is_file():
        load_rng(rng_file)
    return json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
