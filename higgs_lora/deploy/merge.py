"""Fold a trained LoRA adapter into its base: a plain transformers checkpoint, ready to deploy.

    python -m higgs_lora.merge --adapter runs/arabic_lora                    # the run's final adapter
    python -m higgs_lora.merge --adapter runs/arabic_lora/checkpoints/step_00000800 --out /models/Higgs-Audio-2-ar
    python -m higgs_lora.merge --adapter ADAPTER_DIR --base /models/higgs-v2 --dtype bf16 --no-verify

The adapter folder says everything else: the base model's location and the resolved run config (`higgs_lora.yaml`).

1. Resolve: an adapter directory, a checkpoint (`step_N/`), or a run directory (its `adapter/`, else the newest
   checkpoint's); refuse a directory this tool already merged.
2. Merge, streaming: every base tensor is read from its shard, the adapter's update added in float32
   (W + alpha/r * B @ A), cast to `--dtype`, checked finite and written at its place in the output shards. The model
   is never instantiated: host memory holds the adapter and one tensor at a time (higgs_lora.deploy.shards). A QLoRA adapter
   is merged into the full-precision base, not into the 4-bit weights it was trained against (docs/deploy.md).
3. Copy what loading needs (config with the new dtype, generation config, tokenizer, chat template, processor config,
   the codec under `audio_tokenizer/`, licence files) and write NOTICE, a model card and `higgs_lora_merge.json`
   (provenance; it also marks the directory as merged).
4. Verify (`--no-verify` skips): logits of adapter-on-base (PEFT) and of the merged model (plain `from_pretrained`)
   on a fixed sample; the maximum difference is printed, one model in memory at a time.
5. Publish: all of it is written into a staging directory beside `--out`, renamed into place only when done.

Exit codes: 0 merged, 2 a problem with the inputs (the message says what to do), 1 verification failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from higgs_lora.errors import UserError
from higgs_lora.run_folder import ADAPTER, latest_checkpoint, licence_notice, read_adapter_config
from higgs_lora.constants import RUN_CONFIG
from higgs_lora.config import ConfigError, LoraConfig, ModelConfig, RunConfig
from higgs_lora.files import atomic_write_json, atomic_write_text, staged_directory
from higgs_lora.deploy.lora_weights import AdapterError, check_targets, lora_deltas, merge_weight
from higgs_lora.errors import CheckpointError
from higgs_lora.model.loading import check_codec, check_loadable, inspect_checkpoint, resolve_codec_path
from higgs_lora.deploy.shards import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    TensorSpec,
    dtype_code,
    iter_tensors,
    parse_size,
    sha256_file,
    tensor_specs,
)

MERGE_MARKER = "higgs_lora_merge.json"
"""Provenance of a merged directory; its presence is how an already merged directory is recognised."""
NAME_PREFIX = "Higgs-Audio-2-"
"""The licence wants a distributed fine-tune's name to start with "Higgs Audio 2"."""
CODEC_SUBDIR = "audio_tokenizer"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SUPPORT_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "chat_template.json")
"""Copied from the base as they are (config.json and processor_config.json are rewritten)."""
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
            f"{path} is already a merged model (higgs_lora.deploy.merge folded adapter {record.get('adapter')} into base "
            f"{record.get('base')}): it holds no adapter to merge. Load it with from_pretrained as it is, or merge "
            "the adapter it came from again."
        )


def locate_adapter(given: str | Path) -> AdapterLocation:
    """Find the adapter in what the user gave: an adapter dir, a checkpoint dir, or a run output dir."""
    path = Path(given).expanduser().resolve()
    if not path.is_dir():
        raise MergeError(f"--adapter {given}: no such directory")
    refuse_if_merged(path)
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
        return AdapterLocation(path / ADAPTER, f"checkpoint {path.name}: its adapter {path / ADAPTER}",
                               run_dir, int(step_match[1]))
    if is_adapter_dir(path / ADAPTER):
        return AdapterLocation(path / ADAPTER, f"run directory {path}: its final adapter {path / ADAPTER}", path, None)
    latest = latest_checkpoint(path)
    if latest is not None and is_adapter_dir(latest / ADAPTER):
        return AdapterLocation(latest / ADAPTER, f"run directory {path} (no final adapter/): the newest checkpoint's "
                               f"adapter {latest / ADAPTER}", path, int(_STEP.match(latest.name)[1]))
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
    settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    name = adapter_dir.parent.name if adapter_dir.name == ADAPTER else adapter_dir.name
    targets = settings.get("target_modules") or ["q_proj"]
    try:
        return RunConfig(name=name, model=ModelConfig(path=str(base), codec_path=codec or ""),
                         lora=LoraConfig(r=int(settings.get("r", 8)), alpha=settings.get("lora_alpha", 8),
                                         target_modules=[targets] if isinstance(targets, str) else list(targets)))
    except ConfigError as err:
        raise MergeError(f"{adapter_dir}/adapter_config.json: {err}") from err


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def plan_merge(adapter: str, out: str | None = None, base: str | None = None, codec: str | None = None,
              dtype: str = "bf16", device: str = "auto", force: bool = False) -> MergePlan:
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
        raise MergeError(f"{location.path} has no {RUN_CONFIG}: it was not written by higgs-lora training, so the "
                         "base model is unknown. Pass --base BASE_DIR (and --codec CODEC_DIR if the codec is not "
                         "beside it).")
    base_dir = Path(base).expanduser().resolve() if base else Path(cfg.model.path).expanduser().resolve()
    info = inspect_checkpoint(base_dir)
    check_loadable(info)
    if codec:
        codec_dir = Path(codec).expanduser().resolve()
    else:
        codec_dir = resolve_codec_path(ModelConfig(path=str(base_dir), codec_path=cfg.model.codec_path)).resolve()
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
        raise MergeError(f"--out {out_dir} exists and is not empty; choose another directory, or pass --force to "
                         "replace it")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return MergePlan(location, cfg, base_dir, codec_dir, out_dir, dtype, device, force)


# -------------------------------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    files: list[Path]
    num_tensors: int
    num_merged: int
    total_bytes: int


def load_adapter_deltas(adapter_dir: Path) -> dict:
    """The adapter's LoRA updates keyed by base weight name (raises AdapterError on anything unsupported)."""
    from safetensors.torch import load_file

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return lora_deltas(load_file(str(adapter_dir / "adapter_model.safetensors")), adapter_config)


def merge_into_shards(base_dir: Path, deltas: dict, out_dir: Path, dtype_name: str, device: str = "cpu",
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> MergeResult:
    """Stream the base's tensors through the merge into safetensors shards under `out_dir`.

    Floating-point tensors are cast to `dtype_name`; those with a LoRA update get it added first. Raises MergeError
    when the adapter does not fit the base (checked from the shard headers before anything is written) or when any
    written tensor holds NaN/inf (all such tensors are named). Memory: one tensor at a time (higgs_lora.deploy.shards).
    """
    from higgs_lora.model.loading import torch_dtype

    specs = tensor_specs(base_dir)
    problems = check_targets(deltas, {name: shape for name, (_, shape) in specs.items()})
    if problems:
        raise MergeError(f"the adapter does not fit the base {base_dir}:\n" + "\n".join(f"  - {p}" for p in problems))
    dtype = torch_dtype(dtype_name)
    float_codes = ("F64", "F32", "F16", "BF16")
    plan = [TensorSpec(name, dtype_code(dtype) if code in float_codes else code, shape)
            for name, (code, shape) in specs.items()]
    from tqdm import tqdm

    writer = ShardWriter(out_dir, plan, max_shard_bytes)
    non_finite, num_merged = [], 0
    # A bar only on a terminal (disable=None): minutes of work at full size, nothing else to show meanwhile.
    progress = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="[merge]", disable=None)
    for name, tensor in iter_tensors(base_dir):
        progress.update(writer.specs[name].num_bytes)
        if name in deltas:
            tensor = merge_weight(tensor, deltas[name], dtype, device)
            num_merged += 1
        elif tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if tensor.is_floating_point() and not all_finite(tensor):
            non_finite.append(name)
        writer.add(name, tensor)
        del tensor  # before the next one is read: one tensor in memory at a time
    progress.close()
    if non_finite:
        raise MergeError(f"{len(non_finite)} merged tensors hold NaN or inf ({', '.join(non_finite[:5])}); no "
                         f"merged model was published. Check the base model's weights and that --dtype {dtype_name} "
                         "can hold them.")
    files = writer.close()
    return MergeResult(files, len(plan), num_merged, writer.total_bytes)


def all_finite(tensor, chunk: int = 2**24) -> bool:
    """Whether every element is finite, checked in chunks (a whole-tensor mask would be a second, bool-sized copy)."""
    import torch

    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


# ------------------------------------------------------------------------------------------ support files


def write_support_files(plan: MergePlan, staging: Path) -> list[str]:
    """Config, generation config, tokenizer, processor config, codec and licence files; returns what was copied."""
    from higgs_lora.model.loading import torch_dtype

    config = json.loads((plan.base / "config.json").read_text(encoding="utf-8"))
    config.pop("torch_dtype", None)
    config["dtype"] = str(torch_dtype(plan.dtype)).removeprefix("torch.")
    config.pop("_name_or_path", None)
    atomic_write_json(staging / "config.json", config)
    copied = ["config.json"]
    licence_files = [p.name for p in plan.base.iterdir() if p.is_file() and re.match(r"^LICEN[CS]E", p.name, re.I)]
    for name in (*SUPPORT_FILES, *licence_files):
        if (plan.base / name).is_file():
            shutil.copy2(plan.base / name, staging / name)
            copied.append(name)
    shutil.copytree(plan.codec, staging / CODEC_SUBDIR, ignore=shutil.ignore_patterns(".*"))
    copied.append(f"{CODEC_SUBDIR}/ (codec from {plan.codec})")
    processor_file = plan.base / "processor_config.json"
    if processor_file.is_file():
        processor = json.loads(processor_file.read_text(encoding="utf-8"))
        # transformers resolves this reference from the current directory or the Hub; the absolute path of the
        # published copy loads from anywhere on this machine (and our loader also finds <model>/audio_tokenizer).
        processor.setdefault("audio_tokenizer", {})["audio_tokenizer_name_or_path"] = str(plan.out / CODEC_SUBDIR)
        processor["audio_tokenizer"].setdefault("audio_tokenizer_class", "HiggsAudioV2TokenizerModel")
        atomic_write_json(staging / "processor_config.json", processor)
        copied.append("processor_config.json")
    atomic_write_text(staging / "NOTICE", licence_notice("model"))
    atomic_write_text(staging / "README.md", _model_card(plan))
    return copied


def _model_card(plan: MergePlan) -> str:
    cfg = plan.cfg
    step = f" at step {plan.adapter.step}" if plan.adapter.step is not None else ""
    return (
        f"# {plan.out.name}\n\n"
        f"Higgs Audio v2 with the LoRA adapter of run `{cfg.name}`{step} merged in (r={cfg.lora.r}, "
        f"alpha={cfg.lora.alpha}, targets: {', '.join(cfg.lora.target_modules)}; trained on a "
        f"{'4-bit NF4' if cfg.model.quantization == 'nf4' else cfg.model.dtype} base), for zero-shot voice cloning "
        f"(language: {cfg.data.language}). Weights in {plan.dtype}; written by `python -m higgs_lora.merge`.\n\n"
        f"Base model: `{plan.base}`. Adapter: `{plan.adapter.path}`. Provenance: `{MERGE_MARKER}`.\n\n"
        "Load with plain transformers:\n\n```python\n"
        "from transformers import HiggsAudioV2ForConditionalGeneration, HiggsAudioV2TokenizerModel\n"
        "model = HiggsAudioV2ForConditionalGeneration.from_pretrained(THIS_DIR)\n"
        f"codec = HiggsAudioV2TokenizerModel.from_pretrained(THIS_DIR + '/{CODEC_SUBDIR}')\n```\n\n"
        "The weights are under the Boson Higgs Audio 2 Community License (see NOTICE): a distributed fine-tune's name "
        "must start with \"Higgs Audio 2\" and it must ship NOTICE.\n"
    )


def provenance(plan: MergePlan, result: MergeResult, verification: dict | None) -> dict:
    """The record written as higgs_lora_merge.json: what was merged into what, how, with which software."""
    from importlib.metadata import version

    base_files = [name for name in ("config.json", "model.safetensors.index.json") if (plan.base / name).is_file()]
    return {
        "tool": "higgs_lora.deploy.merge",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "adapter": str(plan.adapter.path),
        "adapter_step": plan.adapter.step,
        "adapter_sha256": {name: sha256_file(plan.adapter.path / name) for name in ADAPTER_FILES},
        "base": str(plan.base),
        "base_sha256": {name: sha256_file(plan.base / name) for name in base_files},
        "codec": str(plan.codec),
        "dtype": plan.dtype,
        "trained_quantization": plan.cfg.model.quantization,
        "lora": {"r": plan.cfg.lora.r, "alpha": plan.cfg.lora.alpha, "target_modules": plan.cfg.lora.target_modules},
        "tensors": result.num_tensors,
        "merged_weights": result.num_merged,
        "weights_sha256": {path.name: sha256_file(path) for path in result.files},
        "verification": verification,
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "safetensors")},
    }


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


# ------------------------------------------------------------------------------------------------- run


def run_merge(plan: MergePlan, verify: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              log=print) -> dict | None:
    """Merge, write, verify and publish as `plan` says; returns the verification report (None if skipped).

    Raises MergeError/AdapterError for unusable inputs and VerificationError when the merged model disagrees with
    the adapter; in every failure case `plan.out` is left as it was.
    """
    from higgs_lora.deploy.verify import VerificationError, compare_logits

    refuse_double_merge(plan)
    deltas = load_adapter_deltas(plan.adapter.path)
    log(f"[merge] {len(deltas)} LoRA updates (r={plan.cfg.lora.r}, alpha={plan.cfg.lora.alpha}) -> base {plan.base}, "
        f"{plan.dtype} on {plan.device}")
    with staged_directory(plan.out) as staging:
        result = merge_into_shards(plan.base, deltas, staging, plan.dtype, plan.device, max_shard_bytes)
        del deltas
        gigabytes = result.total_bytes / 1e9
        size = f"{gigabytes:.2f} GB" if gigabytes >= 0.1 else f"{gigabytes * 1e3:.1f} MB"
        log(f"[merge] wrote {result.num_tensors} tensors ({result.num_merged} with the adapter folded in), "
            f"{size} in {len(result.files)} file(s)")
        copied = write_support_files(plan, staging)
        log(f"[merge] copied {', '.join(copied)}")
        report = None
        if verify:
            report = compare_logits(staging, plan.base, plan.adapter.path, plan.cfg, plan.dtype, plan.device, log)
        if report is not None and not report["passed"]:
            raise VerificationError(report["reason"])
        atomic_write_json(staging / MERGE_MARKER, provenance(plan, result, report))
    log(f"[merge] merged model: {plan.out}")
    if not plan.out.name.startswith(NAME_PREFIX):
        log(f"[merge] note: the licence requires a distributed fine-tune's name to start with \"Higgs Audio 2\" "
            f"(e.g. {NAME_PREFIX}{plan.out.name}); NOTICE must travel with it")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m higgs_lora.merge", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--adapter", required=True,
                        help="adapter directory, checkpoint directory (step_N) or training output directory")
    parser.add_argument("--out", help="output directory (default: <run dir>/Higgs-Audio-2-<run name>[-step<N>])")
    parser.add_argument("--base", help="base model directory (default: the one recorded with the adapter)")
    parser.add_argument("--codec", help="codec directory (default: the one recorded with the adapter, else found "
                                        "beside the base)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="dtype of the merged weights (default bf16, as released)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the update and the verification are computed (default: a GPU if present)")
    parser.add_argument("--shard-size", default="5GB", help="largest output file (default 5GB; memory does not "
                                                             "depend on it)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits comparison after merging")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach a hub

    from higgs_lora.deploy.verify import VerificationError

    try:
        try:
            shard_bytes = parse_size(args.shard_size)
        except ValueError as err:
            raise MergeError(f"--shard-size: {err}") from err
        plan = plan_merge(args.adapter, args.out, args.base, args.codec, args.dtype, args.device, args.force)
        print(f"[merge] adapter: {plan.adapter.how}")
        recorded = Path(plan.cfg.model.path).expanduser().resolve()
        note = f" (given with --base; the adapter was trained on {recorded})" if recorded != plan.base else ""
        print(f"[merge] base: {plan.base}{note}\n[merge] codec: {plan.codec}\n[merge] out: {plan.out}")
        run_merge(plan, verify=not args.no_verify, max_shard_bytes=shard_bytes)
    except (MergeError, AdapterError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except VerificationError as err:
        print(f"error: verification failed, nothing was written: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
