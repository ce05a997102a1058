"""The loss: equal to the model's own on one micro-batch, and normalised over the global batch across splits."""

from __future__ import annotations

import pytest
import torch

from higgs_lora.config import LoraConfig, ModelConfig
from higgs_lora.data.collate import MODEL_INPUTS, build_example, collate
from higgs_lora.train.loss import label_counts, micro_batch_loss_sums, normalised_loss


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    from higgs_lora.model.loading import load_base_model, load_processor
    from higgs_lora.model.lora import apply_lora

    cfg = ModelConfig(
        path=str(tiny_checkpoint.model_dir),
        codec_path=str(tiny_checkpoint.codec_dir),
        dtype="fp32",
        gradient_checkpointing=False,
        use_text_head=True,
    )
    processor = load_processor(cfg)
    torch.manual_seed(0)
    model = apply_lora(load_base_model(cfg), LoraConfig(r=4, alpha=8, dropout=0.0), cfg)
    with torch.no_grad():  # non-zero B so every adapter has a gradient path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    gen = torch.Generator().manual_seed(0)
    codes = lambda t: torch.randint(0, 1024, (8, t), generator=gen)  # noqa: E731
    examples = [
        build_example(processor, f"مرجع {i}", codes(10 + 3 * i), f"هدف {i}", codes(5 + 7 * i)) for i in range(4)
    ]
    return processor, model, examples


def batch_of(processor, examples):
    return collate(examples, processor.tokenizer.pad_token_id, processor.audio_stream_eos_id)


def test_equals_the_models_own_loss_on_one_micro_batch(parts):
    processor, model, examples = parts
    batch = batch_of(processor, examples[:3])
    with torch.no_grad():
        own = model(**{k: batch[k] for k in MODEL_INPUTS}, audio_labels=batch["audio_labels"]).loss
        sums = micro_batch_loss_sums(model, batch)
    audio_positions, _ = label_counts(batch)
    assert audio_positions == sum(
        e.audio_labels.shape[0] - e.audio_labels.eq(-100).all(-1).sum().item() - 7 for e in examples[:3]
    )  # T + 1 labelled positions per codebook per target
    assert normalised_loss(sums, audio_positions, 0, 0.0).item() == pytest.approx(own.item(), rel=1e-5)


def test_text_loss_matches_cross_entropy_on_the_labelled_text_positions(parts):
    processor, model, examples = parts
    batch = batch_of(processor, examples[:2])
    with torch.no_grad():
        sums = micro_batch_loss_sums(model, batch, text_loss=True)
        full = model(**{k: batch[k] for k in MODEL_INPUTS}, output_hidden_states=True)
        head = model.get_base_model().text_lm_head
        logits = head(full.hidden_states[-1])[batch["text_loss_mask"]]
        expected = torch.nn.functional.cross_entropy(logits.float(), batch["text_loss_labels"], reduction="sum")
    assert sums.text_count.item() == 4  # <|audio_eos|> and <|eot_id|> of each target turn
    assert sums.text.item() == pytest.approx(expected.item(), rel=1e-4)


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_split_micro_batches_give_the_gradient_of_the_whole_batch(parts):
    """Token-budget micro-batches of unequal size, normalised by the global count, sum to the one-batch gradient."""
    processor, model, examples = parts
    whole = batch_of(processor, examples)
    model.zero_grad()
    total, _ = label_counts(whole)
    normalised_loss(micro_batch_loss_sums(model, whole), total, 0, 0.0).backward()
    expected = adapter_grads(model)

    model.zero_grad()
    for part in ([examples[0]], examples[1:]):  # 1 sample, then 3: a per-micro-batch mean would weigh them wrong
        normalised_loss(micro_batch_loss_sums(model, batch_of(processor, part)), total, 0, 0.0).backward()
    got = adapter_grads(model)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-6, rtol=1e-4), name

    model.zero_grad()
    for part in ([examples[0]], examples[1:]):  # the mistake this guards against
        batch = batch_of(processor, part)
        normalised_loss(micro_batch_loss_sums(model, batch), label_counts(batch)[0], 0, 0.0).backward()
    assert any(not torch.allclose(adapter_grads(model)[n], expected[n], atol=1e-6, rtol=1e-4) for n in expected)
    model.zero_grad()


def test_world_size_undoes_data_parallel_averaging():
    from higgs_lora.train.loss import LossSums

    sums = LossSums(
        audio=torch.tensor([2.0, 4.0]),
        audio_counts=torch.tensor([3, 3]),
        text=torch.tensor(6.0),
        text_count=torch.tensor(2),
    )
    assert normalised_loss(sums, 10, 4, 0.5, world_size=4).item() == pytest.approx((6 / 10 + 0.5 * 6 / 4) * 4)
