"""A bf16 training step on a GPU through the training loss path (skipped where CUDA is absent)."""

from __future__ import annotations

import math

import pytest

from higgs_lora.config import LoraConfig, ModelConfig


@pytest.mark.gpu
def test_bf16_loss_and_backward_on_cuda(tiny_checkpoint):
    import torch

    from higgs_lora.data.collate import build_example, collate
    from higgs_lora.model.loading import load_base_model, load_processor
    from higgs_lora.model.lora import apply_lora
    from higgs_lora.train.loss import label_counts, micro_batch_loss_sums, normalised_loss, to_device

    cfg = ModelConfig(path=str(tiny_checkpoint.model_dir), codec_path=str(tiny_checkpoint.codec_dir), dtype="bf16")
    processor = load_processor(cfg)
    model = apply_lora(load_base_model(cfg, "cuda"), LoraConfig(r=8), cfg)
    codes = lambda t: torch.randint(0, 1024, (8, t))  # noqa: E731
    batch = collate(
        [build_example(processor, "مرجع", codes(40), "هدف", codes(30 + i)) for i in range(2)],
        processor.tokenizer.pad_token_id,
        processor.audio_stream_eos_id,
    )
    sums = micro_batch_loss_sums(model, to_device(batch, "cuda"))
    loss = normalised_loss(sums, label_counts(batch)[0], 0, 0.0)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(8 * math.log(1026), rel=0.15)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and g.is_cuda for g in grads)
