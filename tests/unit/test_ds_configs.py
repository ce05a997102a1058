"""Every shipped DeepSpeed config parses in DeepSpeed's own config class once its "auto" fields get values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIGS = sorted((REPO_ROOT / "ds_configs").glob("*.json"))

# Stand-ins for what the planner fills in; the point here is that the rest of each file is valid DeepSpeed.
PLANNED = {
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "enabled": True,
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


def fill_auto(node):
    if isinstance(node, dict):
        return {k: (PLANNED[k] if v == "auto" else fill_auto(v)) for k, v in node.items()}
    return node


def test_there_are_zero2_and_zero3_configs():
    assert {p.name for p in DS_CONFIGS} >= {"zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_loads_into_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    ds = DeepSpeedConfig(fill_auto(raw))
    assert ds.zero_config.stage == raw["zero_optimization"]["stage"]
    assert ds.gradient_accumulation_steps == 4
    assert ds.train_micro_batch_size_per_gpu == 1  # one token-budget micro-batch per step call
    assert ds.bfloat16_config.enabled
    offload = raw["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
    assert (ds.zero_config.offload_optimizer.device if ds.zero_config.offload_optimizer else "none") == offload
