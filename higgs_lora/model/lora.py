"""LoRA on the loaded base: which layers get adapters, and the PEFT model that trains them.

May import config; torch and PEFT are imported when a model is wrapped.
"""

from __future__ import annotations

from higgs_lora.config import LoraConfig, ModelConfig
from higgs_lora.errors import UserError


class LoraTargetError(UserError, ValueError):
    """A `lora.target_modules` entry that names no module of the model."""


def linear_names(model) -> list[str]:
    """The distinct last name components of the model's linear layers (what `lora.target_modules` can name)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_targets(model, lora: LoraConfig) -> None:
    """Raise LoraTargetError naming each `lora.target_modules` entry that matches no module, with the names there
    are (a typo would otherwise train nothing there)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise LoraTargetError(
            f"lora.target_modules entries {', '.join(repr(t) for t in missing)} match no module of the model; "
            f"its linear layers are named: {', '.join(linear_names(model))}"
        )


def check_targets_early(model_cfg: ModelConfig, lora: LoraConfig) -> bool:
    """Check `lora.target_modules` on an empty (meta-device) copy of the model built from its config.json, before
    any weight is read; returns False when that copy cannot be built (the check then happens at load)."""
    import torch
    from transformers import AutoConfig, HiggsAudioV2ForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(str(model_cfg.path))
        with torch.device("meta"):
            skeleton = HiggsAudioV2ForConditionalGeneration._from_config(config)
    except Exception:  # noqa: BLE001 - an unusual checkpoint: apply_lora checks the loaded model instead
        return False
    check_targets(skeleton, lora)
    return True


def apply_lora(model, lora: LoraConfig, model_cfg: ModelConfig):
    """Wrap the frozen base in a PEFT LoRA model; only adapter weights require grad.

    Raises ValueError naming the targets that match no module (a typo would otherwise train nothing there).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_targets(model, lora)
    if model_cfg.quantization == "nf4":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=model_cfg.gradient_checkpointing is True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif model_cfg.gradient_checkpointing is True:  # 'auto' is decided by the planner before the model is built
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # With every base weight frozen the checkpointed blocks would see no input requiring grad.
        model.enable_input_require_grads()
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    return get_peft_model(model, peft_config)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit packed weights count as stored elements)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
