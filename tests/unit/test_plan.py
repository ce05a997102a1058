"""The run plan (before the memory-model planner): stage from the DeepSpeed JSON, budget, accumulation, LoRA size."""

from __future__ import annotations

import json

import pytest

from higgs_lora.config import LoraConfig, ModelConfig, load_config
from higgs_lora.plan import DEFAULT_MICRO_BATCH_TOKENS, PlanError, lora_parameter_count, make_plan, read_model_config

from tests.conftest import FULL_SIZE_CONFIG, REPO_ROOT

ZERO2 = json.loads((REPO_ROOT / "ds_configs" / "zero2.json").read_text())
ZERO3_OFFLOAD = json.loads((REPO_ROOT / "ds_configs" / "zero3_offload.json").read_text())


def cfg(*overrides):
    return load_config(REPO_ROOT / "configs" / "arabic_lora.yaml", list(overrides))


def test_lora_count_matches_peft_on_the_tiny_model(tiny_checkpoint):
    from higgs_lora.model import apply_lora, count_parameters, load_base_model

    model_cfg = ModelConfig(path=str(tiny_checkpoint.model_dir), dtype="fp32", gradient_checkpointing=False)
    for lora in (LoraConfig(r=8), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])):
        trainable, _ = count_parameters(apply_lora(load_base_model(model_cfg), lora, model_cfg))
        assert lora_parameter_count(read_model_config(model_cfg.path), lora.target_modules, lora.r) == trainable


def test_lora_count_full_size_r16_all_projections():
    # Per layer: q,o 16*(3072+3072) each, k,v 16*(3072+1024) each, 2 MLPs x 3 projections 16*(3072+8192).
    per_layer = 2 * 16 * 6144 + 2 * 16 * 4096 + 2 * 3 * 16 * 11264
    assert lora_parameter_count(FULL_SIZE_CONFIG, list(LoraConfig().target_modules), 16) == 28 * per_layer


@pytest.mark.parametrize("world_size,global_tokens,expected", [(1, 0, 1), (1, 32768, 4), (4, 32768, 1),
                                                                 (3, 50000, 3)])
def test_accumulation_reaches_the_global_batch(world_size, global_tokens, expected):
    plan = make_plan(cfg("train.micro_batch_tokens=8192", f"train.global_batch_tokens={global_tokens}"), ZERO2,
                     world_size, FULL_SIZE_CONFIG)
    assert plan.accumulation == expected
    assert plan.global_batch_tokens >= global_tokens
    assert plan.zero_stage == 2 and plan.offload == "none"


def test_budget_default_and_description():
    plan = make_plan(cfg(), ZERO2, 2, FULL_SIZE_CONFIG)
    assert plan.micro_batch_tokens == DEFAULT_MICRO_BATCH_TOKENS
    text = plan.describe()
    assert "ZeRO stage" in text and f"{DEFAULT_MICRO_BATCH_TOKENS:,}" in text


def test_conflicts_are_reported_together_with_what_to_do():
    with pytest.raises(PlanError) as err:
        make_plan(cfg("plan.zero_stage=3", "plan.offload=none", "model.quantization=nf4"), ZERO3_OFFLOAD, 1,
                  FULL_SIZE_CONFIG)
    message = str(err.value)
    assert "plan.offload=none" in message and "QLoRA" in message
    with pytest.raises(PlanError, match="zero3.json"):
        make_plan(cfg("plan.zero_stage=3"), ZERO2, 1, FULL_SIZE_CONFIG)
