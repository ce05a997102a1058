"""What a merge reads and writes, resolved and checked before any tensor is touched: the adapter (found from an
adapter, checkpoint or run directory), its run config, the base, the codec and the output directory.

May import config, model loading and the training checkpoint helpers; nothing that writes. See docs/deploy.md
("Merge").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from higgs_lora.config import ConfigError, LoraConfig, ModelConfig, RunConfig
from higgs_lora.constants import RUN_CONFIG
from higgs_lora.deploy.lora_weights import AdapterError
from higgs_lora.deploy.shards import sha256_file
from higgs_lora.errors import UserError
from higgs_lora.model.loading import (
    check_codec,
    check_model_dir,
    resolve_codec_path,
)
from higgs_lora.run_folder import ADAPTER, BEST, BEST_JSON, latest_checkpoint, read_adapter_config

MERGE_MARKER = "higgs_lora_merge.json"
"""Provenance of a merged directory; its presence is how an already merged directory is recognised."""
NAME_PREFIX = "Higgs-Audio-2-"
"""The licence wants a distributed fine-tune's name to start with "Higgs Audio 2"."""
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_STEP = re.compile(r"^step_(\d+)$")


class MergeError(UserError, ValueError):
    """The inputs cannot be merged as given; the message says what to do."""


@dataclass(frozen=True)
class AdapterLocation:
    """Where the adapter to merge is, and how it was found from what the user gave."""

    path: Path
    """The directory holding adapter_config.json, adapter_model.safetensors and higgs_lora.yaml."""
    how: str
    """One line for the user: what was given and what was taken from it."""
    run_dir: Path
    """The run's output directory when the adapter sits in one, else the adapter's parent."""
    step: int | None
    """The optimizer step of a checkpoint's adapter; None for a run's final adapter or a loose one."""


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def refuse_if_merged(path: Path) -> None:
    """Raise MergeError when `path` is a directory written by this tool: it holds no adapter to merge."""
    marker = path / MERGE_MARKER
    if marker.is_file():
        record = json.loads(marker.read_text(encoding="utf-8"))
        raise MergeError(
            f"{path} is already a merged model (higgs_lora.deploy.merge folded adapter {record.get('adapter')} into "
            f"base {record.get('base')}): it holds no adapter to merge. "
            "Load it with from_pretrained as it is, or merge "
            "the adapter it came from again."
        )


def locate_adapter(given: str | Path) -> AdapterLocation:
    """Find the adapter in what the user gave: an adapter dir, a checkpoint dir, or a run output dir."""
    path = Path(given).expanduser().resolve()
    if not path.is_dir():
        raise MergeError(f"--adapter {given}: no such directory")
    refuse_if_merged(path)
    if is_adapter_dir(path) and (path / BEST_JSON).is_file():
        step = json.loads((path / BEST_JSON).read_text(encoding="utf-8"))["step"]
        return AdapterLocation(
            path, f"the run's best adapter {path} (step {step}, by the rule in {BEST_JSON})", path.parent, step
        )
    if is_adapter_dir(path):
        parent = path.parent
        step_match = _STEP.match(parent.name)
        if step_match and parent.parent.name == "checkpoints":
            return AdapterLocation(path, f"adapter directory {path}", parent.parent.parent, int(step_match[1]))
        run_dir = parent if path.name == ADAPTER else path.parent
        return AdapterLocation(path, f"adapter directory {path}", run_dir, None)
    step_match = _STEP.match(path.name)
    if step_match and is_adapter_dir(path / ADAPTER):
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return AdapterLocation(
            path / ADAPTER, f"checkpoint {path.name}: its adapter {path / ADAPTER}", run_dir, int(step_match[1])
        )
    if is_adapter_dir(path / ADAPTER):
        also = f" (the best evaluation's is {path / BEST}/)" if (path / BEST / BEST_JSON).is_file() else ""
        return AdapterLocation(
            path / ADAPTER, f"run directory {path}: its final adapter {path / ADAPTER}{also}", path, None
        )
    latest = latest_checkpoint(path)
    if latest is not None and is_adapter_dir(latest / ADAPTER):
        return AdapterLocation(
            latest / ADAPTER,
            f"run directory {path} (no final adapter/): the newest checkpoint's adapter {latest / ADAPTER}",
            path,
            int(_STEP.match(latest.name)[1]),
        )
    raise MergeError(
        f"--adapter {given}: found no adapter there. Give an adapter directory (with adapter_config.json), a "
        "checkpoint (checkpoints/step_N) or a training output directory (with adapter/ or checkpoints/latest)."
    )


def licence_name(name: str) -> str:
    """`name` with the licence's "Higgs-Audio-2-" prefix (once, even if `name` has it), safe as a directory name."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    rest = re.sub(r"^higgs[-_]?audio[-_]?2[-_]*", "", safe, flags=re.IGNORECASE)
    return NAME_PREFIX + (rest or "fine-tune")


def default_output(location: AdapterLocation, cfg: RunConfig) -> Path:
    """`<run dir>/Higgs-Audio-2-<run name>[-step<N>]`: the licence's naming, next to the run it came from."""
    name = licence_name(cfg.name)
    if location.step is not None:
        name += f"-step{location.step}"
    return location.run_dir / name


# --------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge reads and writes, checked before any tensor is touched."""

    adapter: AdapterLocation
    cfg: RunConfig
    base: Path
    codec: Path
    out: Path
    dtype: str
    device: str
    force: bool


def config_of_foreign_adapter(adapter_dir: Path, base: str, codec: str | None) -> RunConfig:
    """A run config for a PEFT adapter trained elsewhere (no higgs_lora.yaml): named after it, on `base`.

    How it was trained (bf16 or NF4) is unknown, so the check compares with the bf16 base only.
    """
    settings = read_adapter_settings(adapter_dir)
    name = adapter_dir.parent.name if adapter_dir.name == ADAPTER else adapter_dir.name
    targets = settings.get("target_modules") or ["q_proj"]
    try:
        return RunConfig(
            name=name,
            model=ModelConfig(path=str(base), codec_path=codec or ""),
            lora=LoraConfig(
                r=int(settings.get("r", 8)),
                alpha=settings.get("lora_alpha", 8),
                target_modules=[targets] if isinstance(targets, str) else list(targets),
            ),
        )
    except ConfigError as err:
        raise MergeError(f"{adapter_dir}/adapter_config.json: {err}") from err


def read_adapter_settings(adapter_dir: Path) -> dict:
    """adapter_config.json as a dict; AdapterError naming the file when it is not a JSON object."""
    path = adapter_dir / "adapter_config.json"
    try:
        settings = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AdapterError(
            f"{path} is not valid JSON ({type(err).__name__}: {err}); copy it again from the training run"
        ) from None
    if not isinstance(settings, dict):
        raise AdapterError(f"{path} holds a JSON {type(settings).__name__}, not an object of LoRA settings")
    return settings


def check_adapter_weights(adapter_dir: Path) -> None:
    """AdapterError naming adapter_model.safetensors when its header or its size is not that of a whole file."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            if names:  # reading the last tensor checks that the data the header promises is there
                handle.get_slice(names[-1])[...]
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types (and OSError) for bad files
        raise AdapterError(
            f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it is truncated or damaged: "
            "copy it again, or export the adapter again from the checkpoint"
        ) from None


def find_codec(base_dir: Path, cfg: RunConfig, base_given: bool) -> Path:
    """The codec for a merge without --codec: the one recorded with the adapter, else one beside the base; with
    --base (a moved or different base) the one beside the new base comes first."""
    recorded = Path(cfg.model.codec_path).expanduser() if cfg.model.codec_path else None
    recorded_ok = recorded is not None and (recorded / "config.json").is_file()
    if recorded_ok and not base_given:
        return recorded.resolve()
    try:
        return resolve_codec_path(ModelConfig(path=str(base_dir), codec_path="")).resolve()
    except UserError as err:
        if recorded_ok:
            return recorded.resolve()
        where = f"the recorded codec {recorded} is not there either; " if recorded is not None else ""
        raise MergeError(f"{err} {where}pass --codec CODEC_DIR") from None


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def plan_merge(
    adapter: str,
    out: str | None = None,
    base: str | None = None,
    codec: str | None = None,
    dtype: str = "bf16",
    device: str = "auto",
    force: bool = False,
) -> MergePlan:
    """Resolve and check every input of a merge; raises MergeError/CheckpointError saying what to do."""
    location = locate_adapter(adapter)
    missing = [name for name in ADAPTER_FILES if not (location.path / name).is_file()]
    if missing:
        raise MergeError(f"{location.path} lacks {', '.join(missing)}: not a complete PEFT adapter")
    if (location.path / RUN_CONFIG).is_file():
        try:
            cfg = read_adapter_config(location.path)
        except ConfigError as err:
            raise MergeError(f"{location.path / RUN_CONFIG} does not load: {err}") from err
    elif base:
        cfg = config_of_foreign_adapter(location.path, base, codec)
    else:
        raise MergeError(
            f"{location.path} has no {RUN_CONFIG}: it was not written by higgs-lora training, so the "
            "base model is unknown. Pass --base BASE_DIR (and --codec CODEC_DIR if the codec is not "
            "beside it)."
        )
    read_adapter_settings(location.path)
    if base:
        base_dir = Path(base).expanduser().resolve()
    else:
        base_dir = Path(cfg.model.path).expanduser().resolve()
        if not base_dir.is_dir():
            raise MergeError(
                f"the base model recorded with the adapter (model.path in {location.path / RUN_CONFIG}) is not "
                f"there: {base_dir}. If it moved, pass --base NEW_BASE_DIR (the codec is then looked for beside it; "
                "add --codec CODEC_DIR if it is elsewhere)"
            )
    check_model_dir(base_dir)  # before the adapter's weights: an unconverted base gets the convert command first
    check_adapter_weights(location.path)
    codec_dir = Path(codec).expanduser().resolve() if codec else find_codec(base_dir, cfg, base_given=bool(base))
    if not (codec_dir / "config.json").is_file():
        raise MergeError(f"codec {codec_dir} has no config.json; pass --codec with the audio tokenizer directory")
    check_codec(codec_dir)
    out_dir = Path(out).expanduser().resolve() if out else default_output(location, cfg)
    for what, path in (("the adapter", location.path), ("the base model", base_dir), ("the codec", codec_dir)):
        if _contains(out_dir, path):
            raise MergeError(f"--out {out_dir} would overwrite {what} ({path}); choose another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"--out {out_dir} is a file; choose a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise MergeError(
            f"--out {out_dir} exists and is not empty; choose another directory, or pass --force to replace it"
        )
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return MergePlan(location, cfg, base_dir, codec_dir, out_dir, dtype, device, force)


def refuse_double_merge(plan: MergePlan) -> None:
    """Refuse to merge an adapter into a base that a previous merge of the same adapter produced."""
    marker = plan.base / MERGE_MARKER
    if not marker.is_file():
        return
    record = json.loads(marker.read_text(encoding="utf-8"))
    ours = sha256_file(plan.adapter.path / "adapter_model.safetensors")
    if record.get("adapter_sha256", {}).get("adapter_model.safetensors") == ours:
        raise MergeError(
            f"the base {plan.base} is a merged model that already contains this adapter ({record.get('adapter')}); "
            f"merging it again would apply the update twice. Use {plan.base} as it is, or merge into "
            f"{record.get('base')}."
        )
