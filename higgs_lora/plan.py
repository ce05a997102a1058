"""The run's plan: ZeRO stage, offload, micro-batch token budget, gradient accumulation, and the resolved DeepSpeed
config. Pure: it reads config numbers (run config, DeepSpeed JSON, the checkpoint's config.json), never torch or
a process group, so every rank computes the same plan and it is tested with tables of cases.

Until the memory-model planner lands (issue 5), the choices are explicit: the stage and offload come from the
DeepSpeed JSON given with `--ds`, `train.micro_batch_tokens=0` means `DEFAULT_MICRO_BATCH_TOKENS`, and gradient
accumulation follows from `train.global_batch_tokens`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

from higgs_lora.config import RunConfig, max_sample_audio_positions

DEFAULT_MICRO_BATCH_TOKENS = 8192
"""Token budget per micro-batch when the config leaves it at 0 (before the planner chooses it from memory)."""


class PlanError(ValueError):
    """The run cannot be planned as configured; the message says what to change."""


@dataclass(frozen=True)
class Plan:
    """What the run will do on this hardware."""

    world_size: int
    zero_stage: int
    offload: str
    """'none', 'optimizer' or 'optimizer+params'."""
    micro_batch_tokens: int
    accumulation: int
    """Micro-batches per rank per optimizer step."""
    gradient_checkpointing: bool
    dtype: str
    quantization: str
    trainable_parameters: int

    @property
    def global_batch_tokens(self) -> int:
        """Upper bound of model positions (padding included) per optimizer step."""
        return self.micro_batch_tokens * self.accumulation * self.world_size

    def describe(self) -> str:
        rows = [
            ("ranks", f"{self.world_size}"),
            ("ZeRO stage", f"{self.zero_stage} (offload: {self.offload})"),
            ("base weights", f"{self.dtype}" + (" + NF4 4-bit (QLoRA)" if self.quantization == "nf4" else "")),
            ("gradient checkpointing", "on" if self.gradient_checkpointing else "off"),
            ("trainable (LoRA) parameters", f"{self.trainable_parameters:,}"),
            ("micro-batch token budget", f"{self.micro_batch_tokens:,} positions per rank"),
            ("gradient accumulation", f"{self.accumulation} micro-batches per rank per step"),
            ("global batch", f"<= {self.global_batch_tokens:,} positions per optimizer step"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def read_model_config(model_path: str | Path) -> dict:
    """The checkpoint's config.json (the planner's source for layer sizes)."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise PlanError(f"{path} not found: model.path must be a local checkpoint directory")
    return json.loads(path.read_text(encoding="utf-8"))


def lora_parameter_count(model_config: dict, target_modules: list[str], r: int) -> int:
    """Trainable parameters of LoRA with rank `r` on `target_modules` of every layer (both MLPs for gate/up/down)."""
    hidden = model_config["hidden_size"]
    intermediate = model_config["intermediate_size"]
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads", heads)
    head_dim = model_config.get("head_dim") or hidden // heads
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    mlp_copies = 2  # text MLP and audio MLP in every layer of the released model
    per_layer = 0
    for name in target_modules:
        if name in shapes:
            fan_in, fan_out = shapes[name]
            copies = mlp_copies if name in ("gate_proj", "up_proj", "down_proj") else 1
            per_layer += copies * r * (fan_in + fan_out)
    return per_layer * model_config["num_hidden_layers"]


def ds_stage_and_offload(ds_config: dict) -> tuple[int, str]:
    """(ZeRO stage, offload) a DeepSpeed JSON asks for."""
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    optimizer = zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    params = zero.get("offload_param", {}).get("device", "none") not in (None, "none")
    offload = "optimizer+params" if params else ("optimizer" if optimizer else "none")
    return stage, offload


def make_plan(cfg: RunConfig, ds_config: dict, world_size: int, model_config: dict) -> Plan:
    """The plan for `cfg` on `world_size` ranks with the DeepSpeed JSON `ds_config`; raises PlanError."""
    stage, offload = ds_stage_and_offload(ds_config)
    problems = []
    if stage not in (2, 3):
        problems.append(f"the DeepSpeed config has ZeRO stage {stage}; use ds_configs/zero2.json or zero3*.json")
    if cfg.plan.zero_stage and cfg.plan.zero_stage != stage:
        problems.append(
            f"plan.zero_stage={cfg.plan.zero_stage} but the DeepSpeed config has stage {stage}: pass "
            f"--ds ds_configs/zero{cfg.plan.zero_stage}.json, or drop plan.zero_stage"
        )
    if cfg.plan.offload not in ("auto", offload):
        problems.append(f"plan.offload={cfg.plan.offload} but the DeepSpeed config offloads '{offload}'")
    if cfg.model.quantization == "nf4" and offload == "optimizer+params":
        problems.append("QLoRA (model.quantization=nf4) cannot offload parameters: use ds_configs/zero3.json")
    budget = cfg.train.micro_batch_tokens or DEFAULT_MICRO_BATCH_TOKENS
    longest = max_sample_audio_positions(cfg.data)
    if budget < longest:
        problems.append(
            f"micro-batch budget {budget} is below the audio of the longest sample ({longest} positions); "
            "raise train.micro_batch_tokens or lower data.max_seconds"
        )
    if problems:
        raise PlanError("cannot plan this run:\n" + "\n".join(f"  - {p}" for p in problems))
    accumulation = 1
    if cfg.train.global_batch_tokens:
        accumulation = max(1, math.ceil(cfg.train.global_batch_tokens / (budget * world_size)))
    return Plan(
        world_size=world_size,
        zero_stage=stage,
        offload=offload,
        micro_batch_tokens=budget,
        accumulation=accumulation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        dtype=cfg.model.dtype,
        quantization=cfg.model.quantization,
        trainable_parameters=lora_parameter_count(model_config, cfg.lora.target_modules, cfg.lora.r),
    )


def resolve_ds_config(ds_config: dict, cfg: RunConfig, plan: Plan, hidden_size: int) -> dict:
    """`ds_config` with every "auto" filled from the run config and the plan (a new dict)."""
    resolved = copy.deepcopy(ds_config)
    if resolved.get("gradient_allreduce_op", "mean") != "mean":
        # The loss is already scaled so that rank-averaged gradients are those of the global batch.
        raise PlanError("the DeepSpeed config sets gradient_allreduce_op to 'sum'; remove it (the default 'mean' "
                        "is what the global-batch loss normalisation expects)")
    resolved["gradient_accumulation_steps"] = plan.accumulation
    resolved["train_micro_batch_size_per_gpu"] = 1  # our micro-batches hold a variable number of samples
    resolved.pop("train_batch_size", None)
    # Our optimizer is torch AdamW with a skip switch (higgs_lora.train.SkippableAdamW); DeepSpeed only knows the
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
    # LoRA gradients are small: buckets near their size, not DeepSpeed's 5e8 default (1 GB each in bf16).
    bucket = int(min(5e8, max(1e6, plan.trainable_parameters)))
    defaults = {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
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
