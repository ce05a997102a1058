"""The planner's activation coefficients against a measurement: bytes autograd keeps per position per layer.

The coefficients were fitted on the released layer shapes (bench/plan_calibration.py --method saved-tensors); here
one smaller layer with the released head size and query/KV ratio is measured the same way, and the formula must
predict it. A change in transformers, PEFT or our loss that makes training keep more per position fails here
before it makes a planned run run out of memory.
"""

from __future__ import annotations

import sys

import pytest

from higgs_lora.plan import COEFFICIENTS
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))


@pytest.fixture(scope="module")
def calibration(tiny_checkpoint):
    import plan_calibration
    import train_throughput

    from higgs_lora.config import ModelConfig
    from higgs_lora.model.loading import load_processor

    processor = load_processor(ModelConfig(path=str(tiny_checkpoint.model_dir)))
    batch = train_throughput.collate_items(processor, train_throughput.synthetic_corpus(processor, 2, 0))
    return plan_calibration, tiny_checkpoint.model_dir, processor, batch


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_coefficients_predict_a_measured_layer(calibration, dropout):
    module, model_dir, processor, batch = calibration
    hidden, intermediate = 768, 2048  # head_dim 128, 6 query heads, 2 KV heads: the released ratios
    measured = module.per_layer_bytes(model_dir, processor, hidden, intermediate, dropout, batch, vocab=2048)
    k = COEFFICIENTS
    predicted = k.act_h * hidden + k.act_i * intermediate + k.act_0
    if dropout:
        predicted += k.dropout_h * hidden + k.dropout_i * intermediate
    assert measured > 0
    assert abs(predicted / measured - 1) < 0.03, (measured, predicted)


@pytest.mark.slow
def test_checkpointing_keeps_only_the_layer_input(calibration):
    module, model_dir, processor, batch = calibration
    kept = []
    for layers in (2, 3):
        config = module.layer_config(model_dir, processor, 768, 2048, layers, vocab=2048)
        model = module.random_lora_model(config, module.torch.bfloat16, "cpu", 0.1, checkpointing=True)
        kept.append(module.saved_bytes(model, batch))
    per_layer = (kept[1] - kept[0]) / batch["input_ids"].numel()
    assert per_layer == COEFFICIENTS.checkpoint_h * 768


def test_calibration_batches_stay_within_the_budget_and_lines_fit(calibration):
    module, _, processor, _ = calibration
    import train_throughput

    items = train_throughput.synthetic_corpus(processor, 16, 1)
    for budget in (1024, 2048):
        for step in range(3):
            batch = module._batch_of(processor, items, budget, step)
            assert batch["input_ids"].numel() <= budget or batch["input_ids"].shape[0] == 1
    intercept, slope = module._line([(1024, 5000 + 3 * 1024), (2048, 5000 + 3 * 2048), (4096, 5000 + 3 * 4096)])
    assert abs(intercept - 5000) < 1e-6 and abs(slope - 3) < 1e-9
