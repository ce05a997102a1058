"""Zero-shot training loss, normalised over the global batch.

The model's own loss is the sum over the 8 codebooks of a per-micro-batch mean. With token-budget micro-batches of
different sizes, gradient accumulation and several ranks, a per-micro-batch mean weighs a position of a small
micro-batch more than one of a large micro-batch. Here each micro-batch returns *sums* and counts; the training
loop divides by the number of labelled target positions of the whole optimizer step, over all micro-batches and
ranks (known before the first backward: the sampler fixes the step's micro-batches in advance). Summed over the
step, the gradient is that of

    loss = sum_k sum_{labelled (position, k)} CE / (labelled target positions in the global batch)

where a target of T frames has T + 1 labelled positions per codebook (its codes and one EOS). On a single
micro-batch this equals the model's own loss (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from higgs_lora.data.collate import IGNORE_INDEX, MODEL_INPUTS


@dataclass
class LossSums:
    """Sums of one micro-batch (or, reduced, of a step): the loss terms before normalisation."""

    audio: torch.Tensor
    """(K,) summed cross-entropy per codebook, graph attached."""
    audio_counts: torch.Tensor
    """(K,) labelled positions per codebook."""
    text: torch.Tensor
    """() summed text cross-entropy (0 without a text loss), graph attached."""
    text_count: torch.Tensor
    """() labelled text positions."""


def label_counts(batch: dict) -> tuple[int, int]:
    """(labelled target audio positions, labelled text positions) of a collated micro-batch.

    Audio positions are counted once per position, not per codebook: labels / K (every codebook of a target has
    T + 1 labels).
    """
    labels = batch["loss_labels"]
    audio = int((labels != IGNORE_INDEX).sum()) // labels.shape[-1] if labels.numel() else 0
    return audio, int((batch["text_loss_labels"] != IGNORE_INDEX).sum())


def audio_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, num_codebooks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-codebook summed cross-entropy of (N, K * V) logits against (N, K) labels; -100 is ignored."""
    per_codebook = logits.float().reshape(labels.shape[0], num_codebooks, -1)
    sums = torch.stack(
        [
            F.cross_entropy(per_codebook[:, k], labels[:, k], ignore_index=IGNORE_INDEX, reduction="sum")
            for k in range(num_codebooks)
        ]
    )
    counts = (labels != IGNORE_INDEX).sum(0)
    return sums, counts


class _LastHidden:
    """Captures the decoder's final hidden states during a forward pass (for the text head)."""

    def __init__(self, decoder):
        self.value = None
        self.handle = decoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = output.last_hidden_state

    def remove(self):
        self.handle.remove()


def find_module(model, class_name: str):
    """The first submodule of `model` whose class is named `class_name`."""
    for module in model.modules():
        if type(module).__name__ == class_name:
            return module
    raise ValueError(f"the model has no {class_name} submodule")


def micro_batch_loss_sums(model, batch: dict, text_loss: bool = False) -> LossSums:
    """Run `model` on a collated micro-batch and return its loss sums.

    Logits are computed only at positions that predict a label (`loss_mask`), not at every position: the audio head
    has 8 x 1026 outputs per position. `model` is the PEFT model or a DeepSpeed engine around it.
    """
    inputs = {key: batch[key] for key in MODEL_INPUTS}
    config = getattr(model, "module", model).config  # a DeepSpeed engine's own `config` is its JSON
    capture = None
    if text_loss:
        capture = _LastHidden(find_module(model, "HiggsAudioV2Model"))
    try:
        outputs = model(**inputs, logits_to_keep=batch["loss_mask"])
    finally:
        if capture is not None:
            capture.remove()
    audio, audio_counts = audio_loss_sums(outputs.logits, batch["loss_labels"], config.num_codebooks)
    text = audio.new_zeros(())
    text_count = torch.zeros((), dtype=torch.long)
    if text_loss:
        head = find_module(model, "HiggsAudioV2ForConditionalGeneration").text_lm_head
        if head is None:
            raise ValueError("train.text_loss_weight > 0 needs the text head: set model.use_text_head=true")
        hidden = capture.value[batch["text_loss_mask"].to(capture.value.device)]
        labels = batch["text_loss_labels"].to(hidden.device)
        text = F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        text_count = (labels != IGNORE_INDEX).sum()
    return LossSums(audio=audio, audio_counts=audio_counts.cpu(), text=text, text_count=text_count.cpu())


def normalised_loss(
    sums: LossSums,
    global_audio_positions: int,
    global_text_positions: int,
    text_loss_weight: float,
    world_size: int = 1,
) -> torch.Tensor:
    """The micro-batch's share of the step loss, ready for backward.

    `global_*_positions` are the step's totals over all micro-batches and ranks. Multiplying by `world_size`
    undoes the data-parallel gradient averaging, so the summed gradient is that of the global-batch loss.
    """
    loss = sums.audio.sum() / max(global_audio_positions, 1)
    if text_loss_weight > 0:
        loss = loss + text_loss_weight * sums.text / max(global_text_positions, 1)
    return loss * world_size


def to_device(batch: dict, device) -> dict:
    """Move every tensor of a collated batch to `device` (non-blocking where possible)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
