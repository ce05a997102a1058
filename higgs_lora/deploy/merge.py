"""Fold a trained LoRA adapter into its base: a plain transformers checkpoint, ready to deploy.

    python -m higgs_lora.merge --adapter runs/arabic_lora                    # the run's final adapter
    python -m higgs_lora.merge --adapter runs/arabic_lora/checkpoints/step_00000800 --out /models/Higgs-Audio-2-ar
    python -m higgs_lora.merge --adapter ADAPTER_DIR --base /models/higgs-v2 --dtype bf16 --no-verify

The adapter folder says everything else: the base model's location and the resolved run config (`higgs_lora.yaml`).

1. Resolve: an adapter directory, a checkpoint (`step_N/`), or a run directory (its `adapter/`, else the newest
   checkpoint's); refuse a directory this tool already merged (higgs_lora.deploy.merge_plan).
2. Merge, streaming: every base tensor is read from its shard, the adapter's update added in float32
   (W + alpha/r * B @ A), cast to `--dtype`, checked finite and written at its place in the output shards. The model
   is never instantiated: host memory holds the adapter and one tensor at a time (higgs_lora.deploy.shards). A QLoRA
   adapter is merged into the full-precision base, not into the 4-bit weights it was trained against
   (docs/deploy.md).
3. Copy what loading needs (config with the new dtype, generation config, tokenizer, chat template, processor config,
   the codec under `audio_tokenizer/`, licence files) and write NOTICE, a model card and `higgs_lora_merge.json`
   (provenance; it also marks the directory as merged; higgs_lora.deploy.merged_folder).
4. Verify (`--no-verify` skips): logits of adapter-on-base (PEFT) and of the merged model (plain `from_pretrained`)
   on a fixed sample; the maximum difference is printed, one model in memory at a time.
5. Publish: all of it is written into a staging directory beside `--out`, renamed into place only when done.

Exit codes: 0 merged, 2 a problem with the inputs (the message says what to do), 1 verification failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from higgs_lora import startup
from higgs_lora.deploy.lora_weights import AdapterError, check_targets, lora_deltas, merge_weight
from higgs_lora.deploy.merge_plan import (
    MERGE_MARKER,
    NAME_PREFIX,
    MergeError,
    MergePlan,
    plan_merge,
    read_adapter_settings,
    refuse_double_merge,
)
from higgs_lora.deploy.merged_folder import provenance, write_support_files
from higgs_lora.deploy.shards import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    TensorSpec,
    dtype_code,
    iter_tensors,
    parse_size,
    tensor_specs,
)
from higgs_lora.files import atomic_write_json, staged_directory, stale_staging
from higgs_lora.logs import get_logger, is_quiet

log = get_logger("merge")


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

    adapter_config = read_adapter_settings(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - safetensors' own error types for a damaged file
        raise AdapterError(f"{weights} is not a readable safetensors file ({type(err).__name__}: {err})") from None
    return lora_deltas(tensors, adapter_config)


def merge_into_shards(
    base_dir: Path,
    deltas: dict,
    out_dir: Path,
    dtype_name: str,
    device: str = "cpu",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> MergeResult:
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
    plan = [
        TensorSpec(name, dtype_code(dtype) if code in float_codes else code, shape)
        for name, (code, shape) in specs.items()
    ]
    from tqdm import tqdm

    writer = ShardWriter(out_dir, plan, max_shard_bytes)
    non_finite, num_merged = [], 0
    # A bar only on a terminal (disable=None) and not with --quiet: minutes of work at full size, nothing else to show.
    progress = tqdm(
        total=writer.total_bytes, unit="B", unit_scale=True, desc="[merge]", disable=True if is_quiet() else None
    )
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
        raise MergeError(
            f"{len(non_finite)} merged tensors hold NaN or inf ({', '.join(non_finite[:5])}); no "
            f"merged model was published. Check the base model's weights and that --dtype {dtype_name} "
            "can hold them."
        )
    files = writer.close()
    return MergeResult(files, len(plan), num_merged, writer.total_bytes)


def all_finite(tensor, chunk: int = 2**24) -> bool:
    """Whether every element is finite, checked in chunks (a whole-tensor mask would be a second, bool-sized copy)."""
    import torch

    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


# ------------------------------------------------------------------------------------------------- run


def remove_stale_staging(out: Path, started: float) -> list[Path]:
    """Delete what killed merges into `out` left behind (their staging copies of the whole model); a concurrent
    merge's staging is left alone. Returns what was deleted."""
    stale, live = stale_staging(out, started)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        log.info(f"removed {path}, the staging copy of a merge into {out.name} that did not finish")
    for path in live:
        log.warning(f"{path} belongs to a merge into {out.name} that is still running (or runs on another host): left")
    return stale


def run_merge(
    plan: MergePlan, verify: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES, started: float | None = None
) -> dict | None:
    """Merge, write, verify and publish as `plan` says; returns the verification report (None if skipped).

    Raises MergeError/AdapterError for unusable inputs and VerificationError when the merged model disagrees with
    the adapter; in every failure case `plan.out` is left as it was. Staging directories of earlier merges into
    `plan.out` whose process is gone (or, unowned, older than `started`, default now) are removed first.
    """
    started = time.time() if started is None else started
    from higgs_lora.deploy.verify import VerificationError, compare_logits

    refuse_double_merge(plan)
    remove_stale_staging(plan.out, started)
    deltas = load_adapter_deltas(plan.adapter.path)
    log.info(
        f"{len(deltas)} LoRA updates (r={plan.cfg.lora.r}, alpha={plan.cfg.lora.alpha}) -> base {plan.base}, "
        f"{plan.dtype} on {plan.device}"
    )
    with staged_directory(plan.out) as staging:
        result = merge_into_shards(plan.base, deltas, staging, plan.dtype, plan.device, max_shard_bytes)
        del deltas
        gigabytes = result.total_bytes / 1e9
        size = f"{gigabytes:.2f} GB" if gigabytes >= 0.1 else f"{gigabytes * 1e3:.1f} MB"
        log.info(
            f"wrote {result.num_tensors} tensors ({result.num_merged} with the adapter folded in), "
            f"{size} in {len(result.files)} file(s)"
        )
        copied = write_support_files(plan, staging)
        log.info(f"copied {', '.join(copied)}")
        report = None
        if verify:
            report = compare_logits(staging, plan.base, plan.adapter.path, plan.cfg, plan.dtype, plan.device)
        if report is not None and not report["passed"]:
            raise VerificationError(report["reason"])
        atomic_write_json(staging / MERGE_MARKER, provenance(plan, result, report))
    log.info(f"merged model: {plan.out}")
    if not plan.out.name.startswith(NAME_PREFIX):
        log.info(
            f'note: the licence requires a distributed fine-tune\'s name to start with "Higgs Audio 2" '
            f"(e.g. {NAME_PREFIX}{plan.out.name}); NOTICE must travel with it"
        )
    return report


def _run(args: argparse.Namespace) -> int:
    from higgs_lora.deploy.verify import VerificationError

    started = time.time()
    try:
        shard_bytes = parse_size(args.shard_size)
    except ValueError as err:
        raise MergeError(f"--shard-size: {err}") from err
    plan = plan_merge(args.adapter, args.out, args.base, args.codec, args.dtype, args.device, args.force)
    log.info(f"adapter: {plan.adapter.how}")
    recorded = Path(plan.cfg.model.path).expanduser().resolve()
    note = f" (given with --base; the adapter was trained on {recorded})" if recorded != plan.base else ""
    log.info(f"base: {plan.base}{note}")
    log.info(f"codec: {plan.codec}")
    log.info(f"out: {plan.out}")
    try:
        run_merge(plan, verify=not args.no_verify, max_shard_bytes=shard_bytes, started=started)
    except VerificationError as err:  # not the input's fault as such: exit 1, as a failed check
        print(f"error: verification failed, nothing was written: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="higgs-lora merge",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--adapter", required=True, help="adapter directory, checkpoint directory (step_N) or training output directory"
    )
    parser.add_argument("--out", help="output directory (default: <run dir>/Higgs-Audio-2-<run name>[-step<N>])")
    parser.add_argument("--base", help="base model directory (default: the one recorded with the adapter)")
    parser.add_argument(
        "--codec", help="codec directory (default: the one recorded with the adapter, else found beside the base)"
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default="bf16",
        help="dtype of the merged weights (default bf16, as released)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the update and the verification are computed (default: a GPU if present)",
    )
    parser.add_argument(
        "--shard-size", default="5GB", help="largest output file (default 5GB; memory does not depend on it)"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits comparison after merging")
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return startup.run_command(args, lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
