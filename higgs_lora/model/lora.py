"""LoRA on the loaded base: which layers get adapters, and the PEFT model that trains them.

May import config; torch and PEFT are imported when a model is wrapped.
"""

from __future__ import annotations

from higgs_lora.config import LoraConfig, ModelConfig


def apply_lora(model, lora: LoraConfig, model_cfg: ModelConfig):
    """Wrap the frozen base in a PEFT LoRA model; only adapter weights require grad.

    Raises ValueError naming the targets that match no module (a typo would otherwise train nothing there).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} match no module of the model; "
            f"linear layers are named e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        )
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
