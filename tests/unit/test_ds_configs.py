"""Every shipped DeepSpeed config, resolved by the plan, parses in DeepSpeed's own config class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from higgs_lora.config import load_config
from higgs_lora.plan import make_plan, resolve_ds_config

from tests.conftest import FULL_SIZE_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIGS = sorted((REPO_ROOT / "ds_configs").glob("*.json"))


def test_there_are_zero2_and_zero3_configs():
    assert {p.name for p in DS_CONFIGS} >= {"zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_resolved_ds_config_loads_into_deepspeed(path, dtype):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    cfg = load_config(REPO_ROOT / "configs" / "arabic_lora.yaml",
                      [f"model.dtype={dtype}", "train.micro_batch_tokens=8192", "train.global_batch_tokens=65536"])
    plan = make_plan(cfg, raw, world_size=4, model_config=FULL_SIZE_CONFIG)
    resolved = resolve_ds_config(raw, cfg, plan, FULL_SIZE_CONFIG["hidden_size"])
    assert "auto" not in json.dumps(resolved)
    ds = DeepSpeedConfig(resolved)
    assert ds.zero_config.stage == raw["zero_optimization"]["stage"]
    assert ds.gradient_accumulation_steps == plan.accumulation == 2  # 65536 / (8192 x 4 ranks)
    assert ds.train_micro_batch_size_per_gpu == 1  # one token-budget micro-batch per step call
    assert ds.bfloat16_config.enabled == (dtype == "bf16")
    assert ds.gradient_clipping == cfg.train.grad_clip
    offload = raw["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    assert (ds.zero_config.offload_optimizer.device if ds.zero_config.offload_optimizer else "none") == offload
    # Buckets sized for LoRA gradients, not DeepSpeed's 5e8 default.
    assert resolved["zero_optimization"]["reduce_bucket_size"] == plan.trainable_parameters
