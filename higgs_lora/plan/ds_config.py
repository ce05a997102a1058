"""The DeepSpeed JSON: `--ds` loaded (a file, or `auto`), what it pins, and every "auto" in it filled from the plan.

Pure: reads and writes dicts; never imports deepspeed (the resolved dict is what training hands it). May import
config and the other plan modules. See docs/planning.md ("What you can pin, and `--ds auto`").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

from higgs_lora.config import RunConfig
from higgs_lora.plan.errors import PlanError
from higgs_lora.plan.inputs import model_sizes
from higgs_lora.plan.memory import bucket_size, prefetch_bucket_size

if TYPE_CHECKING:
    from higgs_lora.plan.choice import Plan

AUTO_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": "auto",
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "allgather_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": "auto",
        "stage3_max_reuse_distance": "auto",
        "stage3_gather_16bit_weights_on_model_save": False,
        "offload_optimizer": {"device": "auto"},
        "offload_param": {"device": "auto"},
    },
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
}
"""What `--ds auto` starts from: every choice left to the planner."""

STAGE3_ONLY = (
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save",
    "offload_param",
)


def load_ds_config(spec: str | Path) -> dict:
    """The DeepSpeed JSON named by `--ds`: a file, or 'auto' for `AUTO_DS_CONFIG`."""
    if str(spec) == "auto":
        return copy.deepcopy(AUTO_DS_CONFIG)
    path = Path(spec)
    if not path.is_file():
        raise PlanError(f"--ds {spec}: no such file (ds_configs/zero2.json, zero3.json, zero3_offload.json or auto)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PlanError(f"--ds {spec} is not valid JSON: {err}") from None


def ds_stage_and_offload(ds_config: dict) -> tuple[int | None, str | None]:
    """(ZeRO stage, offload) a DeepSpeed JSON pins; None where it says "auto" (or nothing)."""
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", "auto")
    stage = None if stage == "auto" else int(stage)
    optimizer, params = (zero.get(key, {}).get("device", "auto") for key in ("offload_optimizer", "offload_param"))
    offloaded = lambda device: device not in ("auto", None, "none")  # noqa: E731
    if offloaded(params):
        return stage, "optimizer+params"
    if "auto" in (optimizer, params):
        return stage, None  # open (with the optimizer pinned to the CPU, '+params' would still fit the JSON)
    return stage, "optimizer" if offloaded(optimizer) else "none"


def resolve_ds_config(ds_config: dict, cfg: RunConfig, plan: Plan, model_config: dict) -> dict:
    """`ds_config` with every "auto" filled from the run config and the plan (a new dict)."""
    resolved = copy.deepcopy(ds_config)
    if resolved.get("gradient_allreduce_op", "mean") != "mean":
        # The loss is already scaled so that rank-averaged gradients are those of the global batch.
        raise PlanError(
            "the DeepSpeed config sets gradient_allreduce_op to 'sum'; remove it (the default 'mean' "
            "is what the global-batch loss normalisation expects)"
        )
    hidden = model_config["hidden_size"]
    resolved["gradient_accumulation_steps"] = plan.accumulation
    resolved["train_micro_batch_size_per_gpu"] = 1  # our micro-batches hold a variable number of samples
    # In micro-batches: DeepSpeed checks train_batch_size = micro x accumulation x ranks at start-up, which catches
    # a launch on a different number of ranks than planned.
    resolved["train_batch_size"] = plan.accumulation * plan.world_size
    # Our optimizer is torch AdamW with a skip switch (higgs_lora.train.optim.SkippableAdamW); DeepSpeed only knows the
    # class by name, so it must be told the subclass is fine.
    resolved["zero_allow_untested_optimizer"] = True
    if resolved.get("gradient_clipping", "auto") == "auto":
        resolved["gradient_clipping"] = cfg.train.grad_clip
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(cfg.model.dtype)
    for key in ("bf16", "fp16"):
        section = resolved.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = key == precision
    zero = resolved.setdefault("zero_optimization", {})
    zero["stage"] = plan.zero_stage
    optimizer_device = "cpu" if plan.offload in ("optimizer", "optimizer+params") else "none"
    param_device = "cpu" if plan.offload == "optimizer+params" else "none"
    for key, device in (("offload_optimizer", optimizer_device), ("offload_param", param_device)):
        section = zero.setdefault(key, {})
        if section.get("device", "auto") == "auto":
            section["device"] = device
            if device == "cpu":
                section.setdefault("pin_memory", True)
    if plan.offload != "none":
        # DeepSpeed would swap in its CPU Adam (a C++ extension built at start-up); ours runs on the host as is.
        resolved.setdefault("zero_force_ds_cpu_optimizer", False)
    if plan.zero_stage != 3:
        for key in STAGE3_ONLY:
            zero.pop(key, None)
    bucket = bucket_size(plan.trainable_parameters)
    layer = model_sizes(model_config, text_head=False).layer
    defaults = {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": prefetch_bucket_size(hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
        # Two layers live at once (the one running and the one prefetched): what the memory model counts.
        "stage3_max_live_parameters": 2 * layer,
        "stage3_max_reuse_distance": 2 * layer,
    }
    for key, value in defaults.items():
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = sorted(_auto_keys(resolved))
    if leftover:
        raise PlanError(f"the DeepSpeed config has 'auto' values this version cannot fill: {leftover}")
    return resolved


def _auto_keys(node, prefix: str = "") -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _auto_keys(value, f"{prefix}{key}.")
    elif node == "auto":
        found.append(prefix.rstrip("."))
    return found
