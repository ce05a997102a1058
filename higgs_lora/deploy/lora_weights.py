"""LoRA weights read from a PEFT adapter file and folded into base weights: W' = W + (alpha / r) * B @ A.

Pure tensor arithmetic on state dicts, no PEFT model: merging this way never instantiates the base model, so it
needs neither the memory for a model nor a GPU, and it works the same for adapters trained on a 4-bit (QLoRA) base,
whose base weights are merged in full precision instead of the quantised ones the adapter was trained against.

Only what our training writes is supported (plain LoRA on linear layers, `bias="none"`); anything else (DoRA,
embedding LoRA, `modules_to_save`, LoRA biases, per-module alpha) is refused by name, not silently dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from higgs_lora.errors import UserError

if TYPE_CHECKING:
    import torch

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class AdapterError(UserError, ValueError):
    """An adapter that cannot be merged as it is; the message lists every problem."""


@dataclass(frozen=True)
class LoraDelta:
    """The low-rank update of one linear layer: delta W = scale * B @ A (out_features x in_features)."""

    a: torch.Tensor
    """(r, in_features)"""
    b: torch.Tensor
    """(out_features, r)"""
    scale: float
    """lora_alpha / r (or / sqrt(r) with rsLoRA)."""
    fan_in_fan_out: bool = False
    """The base stores the weight transposed (Conv1D-style layers): the update is transposed too."""

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the base weight this delta applies to."""
        rows, cols = self.b.shape[0], self.a.shape[1]
        return (cols, rows) if self.fan_in_fan_out else (rows, cols)


def lora_deltas(tensors: dict[str, torch.Tensor], adapter_config: dict) -> dict[str, LoraDelta]:
    """The updates of a PEFT LoRA adapter, keyed by the base weight they apply to (`model.layers.0.mlp.up_proj.weight`).

    `tensors` is the content of `adapter_model.safetensors`, `adapter_config` that of `adapter_config.json`.
    Raises AdapterError listing every problem: unsupported options, keys that are not LoRA A/B weights, A without B,
    ranks that disagree, non-finite values.
    """
    import torch

    problems = []
    if adapter_config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={adapter_config.get('peft_type')!r}: only LoRA adapters can be merged here")
    for option, meaning in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if adapter_config.get(option):
            problems.append(f"{option}=true ({meaning}) is not supported; merge it with PEFT's merge_and_unload")
    if adapter_config.get("alpha_pattern"):
        problems.append("alpha_pattern (a different alpha per module) is not supported; merge it with PEFT")
    if adapter_config.get("modules_to_save"):
        problems.append(
            f"modules_to_save={adapter_config['modules_to_save']} is not supported: those modules are "
            "fully trained copies, not low-rank updates; merge it with PEFT"
        )
    alpha = adapter_config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        problems.append(f"lora_alpha={alpha!r} in adapter_config.json must be a positive number")
    rslora = bool(adapter_config.get("use_rslora"))
    fan_in_fan_out = bool(adapter_config.get("fan_in_fan_out"))

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            problems.append(f"{key}: not a LoRA A/B weight")
            continue
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    bad_values = [
        key for key, tensor in tensors.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad_values:
        problems.append(
            f"{len(bad_values)} adapter tensors hold NaN or inf ({', '.join(bad_values[:5])}"
            f"{', ...' if len(bad_values) > 5 else ''}): the run diverged before this checkpoint was "
            "written; merge an earlier checkpoint"
        )
    deltas: dict[str, LoraDelta] = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"{module}: lora_{'B' if 'A' in pair else 'A'} is missing from the adapter")
            continue
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not multiply")
            continue
        if problems:
            continue  # reported below; the scale may need an alpha that is not valid
        rank = a.shape[0]
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        deltas[f"{module}.weight"] = LoraDelta(a=a, b=b, scale=scale, fan_in_fan_out=fan_in_fan_out)
    if not problems and not deltas:
        problems.append("the adapter holds no LoRA weights")
    if problems:
        raise AdapterError("cannot merge this adapter:\n" + "\n".join(f"  - {p}" for p in problems))
    return deltas


def check_targets(deltas: dict[str, LoraDelta], base_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Problems (empty if none) with applying `deltas` to a base whose tensors have `base_shapes`."""
    problems = []
    for name, delta in deltas.items():
        shape = base_shapes.get(name)
        if shape is None:
            problems.append(f"{name}: the adapter adapts it but the base has no such weight (wrong base model?)")
        elif tuple(shape) != delta.shape:
            problems.append(
                f"{name}: base weight {tuple(shape)} but the adapter's update is {delta.shape} "
                "(the adapter was trained on a different model)"
            )
    return problems


def merge_weight(
    weight: torch.Tensor, delta: LoraDelta, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`weight + scale * B @ A`, computed in float32 on `device`, returned in `dtype` on CPU.

    Float32 accumulation: the update of a trained adapter is small next to W, and adding it in bf16 would round a
    good part of it away before the single final rounding to `dtype`.
    """
    import torch

    update = delta.b.to(device, torch.float32) @ delta.a.to(device, torch.float32)
    if delta.fan_in_fan_out:
        update = update.T
    merged = weight.to(device, torch.float32) + delta.scale * update
    return merged.to(dtype).cpu()
