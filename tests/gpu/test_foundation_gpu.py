"""The foundation step on a GPU in bf16 (skipped where CUDA is absent)."""

from __future__ import annotations

import math

import pytest

from higgs_lora.config import load_config
from higgs_lora.demo import build_model_and_batch, forward_backward

from tests.conftest import REPO_ROOT


@pytest.mark.gpu
def test_bf16_forward_backward_on_cuda(tiny_checkpoint, tmp_path):
    import torch

    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [
        f"model.path={tiny_checkpoint.model_dir}", f"model.codec_path={tiny_checkpoint.codec_dir}",
        f"output_dir={tmp_path}", "model.dtype=bf16",
        f"data.corpus={REPO_ROOT / 'examples' / 'demo_corpus' / 'manifest.jsonl'}",
    ])
    model, batch, _ = build_model_and_batch(cfg)
    model.to("cuda")
    outputs, grad_norm, _ = forward_backward(model, {k: v.to("cuda") for k, v in batch.items()})
    assert outputs.logits.dtype == torch.bfloat16
    assert math.isfinite(outputs.loss.item()) and outputs.loss.item() == pytest.approx(8 * math.log(1026), rel=0.15)
    assert grad_norm > 0
