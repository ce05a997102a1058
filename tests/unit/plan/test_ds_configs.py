"""Every shipped DeepSpeed config (and --ds auto), planned and resolved, parses in DeepSpeed's own config class."""

from __future__ import annotations

import json

import pytest

from higgs_lora.config import load_config
from higgs_lora.plan import (
    GIB,
    RELEASED_MODEL_CONFIG,
    Hardware,
    PlanError,
    load_ds_config,
    make_plan,
    resolve_ds_config,
)
from tests.conftest import REPO_ROOT

DS_CONFIGS = sorted((REPO_ROOT / "ds_configs").glob("*.json"))
SPECS = [str(p) for p in DS_CONFIGS] + ["auto"]


class DataParallel:
    """The one method DeepSpeedConfig asks an `mpu` for: the data-parallel world size of the plan."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


@pytest.fixture
def ds_config_class(monkeypatch):
    """DeepSpeedConfig that takes the world size from `mpu` without a process group (it asks for a rank first)."""
    import deepspeed.runtime.config as module

    monkeypatch.setattr(module.dist, "get_rank", lambda *args, **kwargs: 0)
    return module.DeepSpeedConfig


def test_there_are_zero2_and_zero3_configs():
    assert {p.name for p in DS_CONFIGS} >= {"zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.rsplit("/", 1)[-1])
@pytest.mark.parametrize("dtype,world,gib", [("bf16", 4, 80), ("bf16", 16, 24), ("fp32", 1, None)])
def test_resolved_ds_config_loads_into_deepspeed(spec, dtype, world, gib, ds_config_class):
    DeepSpeedConfig = ds_config_class

    raw = load_ds_config(spec)
    cfg = load_config(
        REPO_ROOT / "configs" / "arabic_lora.yaml", [f"model.dtype={dtype}", "train.global_batch_tokens=65536"]
    )
    hardware = Hardware(world, 1, int(gib * GIB) if gib else None, "GPU", "test")
    plan = make_plan(cfg, raw, hardware, RELEASED_MODEL_CONFIG)
    resolved = resolve_ds_config(raw, cfg, plan, RELEASED_MODEL_CONFIG)
    assert "auto" not in json.dumps(resolved)
    ds = DeepSpeedConfig(resolved, mpu=DataParallel(world))  # asserts train_batch = micro x accumulation x ranks
    assert ds.zero_config.stage == plan.zero_stage
    assert ds.gradient_accumulation_steps == plan.accumulation
    assert ds.train_micro_batch_size_per_gpu == 1  # one token-budget micro-batch per step call
    assert ds.train_batch_size == plan.accumulation * world
    assert plan.micro_batch_tokens * plan.accumulation * world == plan.global_batch_tokens >= 65536
    assert ds.bfloat16_config.enabled == (dtype == "bf16")
    assert ds.gradient_clipping == cfg.train.grad_clip
    offload = ds.zero_config.offload_optimizer.device if ds.zero_config.offload_optimizer else "none"
    assert (offload != "none") == (plan.offload != "none")
    # Buckets sized for LoRA gradients, not DeepSpeed's 5e8 default.
    assert resolved["zero_optimization"]["reduce_bucket_size"] == plan.trainable_parameters
    if plan.zero_stage == 3:
        assert ds.zero_config.max_live_parameters < 1e9  # the two layers the memory model counts, not 1e9


def test_a_resolved_config_refuses_a_different_world_size(ds_config_class):
    DeepSpeedConfig = ds_config_class

    cfg = load_config(REPO_ROOT / "configs" / "arabic_lora.yaml", ["train.global_batch_tokens=65536"])
    plan = make_plan(cfg, load_ds_config("auto"), Hardware(4, 1, 80 * GIB), RELEASED_MODEL_CONFIG)
    resolved = resolve_ds_config(load_ds_config("auto"), cfg, plan, RELEASED_MODEL_CONFIG)
    with pytest.raises(AssertionError, match="train_batch_size"):
        DeepSpeedConfig(resolved, mpu=DataParallel(8))


def test_stage3_keys_are_dropped_for_stage2():
    cfg = load_config(REPO_ROOT / "configs" / "arabic_lora.yaml", [])
    plan = make_plan(cfg, load_ds_config("auto"), Hardware(1, 1, 141 * GIB), RELEASED_MODEL_CONFIG)
    assert plan.zero_stage == 2
    zero = resolve_ds_config(load_ds_config("auto"), cfg, plan, RELEASED_MODEL_CONFIG)["zero_optimization"]
    assert not [key for key in zero if key.startswith("stage3_") or key == "offload_param"]


def test_bad_ds_specs_are_clear(tmp_path):
    with pytest.raises(PlanError, match="no such file"):
        load_ds_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_ds_config(tmp_path / "bad.json")
