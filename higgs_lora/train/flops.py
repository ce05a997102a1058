"""Throughput accounting: model FLOPs of LoRA training and MFU (see docs/benchmarks.md for the method).

The base is frozen, so a position costs forward 2N and backward 2N FLOPs (input gradients only), N being the
parameters that position actually uses: attention, ONE of the two MLPs (text or audio), and the audio head where a
loss is computed. LoRA adds forward 2P and backward 4P (input and weight gradients) for its P parameters on the
path. Attention scores add 4 x layers x seq x hidden per position forward, twice that backward. Recomputation by
gradient checkpointing is real work but not model FLOPs, so it is not counted (MFU, not HFU).
"""

from __future__ import annotations

from dataclasses import dataclass

PEAK_BF16_TFLOPS = {
    "H200": 790.0,
}
"""Dense bf16 matmul rate measured on that GPU (see docs/benchmarks.md), used for MFU when train.peak_tflops=0.
Only measured values belong here: a datasheet peak would flatter MFU."""


@dataclass(frozen=True)
class FlopCounter:
    """Per-position FLOPs of one training step of a Higgs model with LoRA, from its config.json."""

    path_parameters: int
    """Frozen parameters one position uses (attention + one MLP per layer), embeddings and heads excluded."""
    lora_parameters_per_path: int
    """LoRA parameters one position uses (attention adapters + one MLP's adapters)."""
    head_parameters: int
    """Audio head parameters (applied only at positions with a loss)."""
    num_layers: int
    hidden_size: int

    @classmethod
    def from_model_config(cls, config: dict, target_modules: list[str], r: int) -> FlopCounter:
        h, inter = config["hidden_size"], config["intermediate_size"]
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads", heads)
        head_dim = config.get("head_dim") or h // heads
        layers = config["num_hidden_layers"]
        attention = {
            "q_proj": (h, heads * head_dim),
            "k_proj": (h, kv * head_dim),
            "v_proj": (h, kv * head_dim),
            "o_proj": (heads * head_dim, h),
        }
        mlp = {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        shapes = {**attention, **mlp}
        path = sum(i * o for i, o in shapes.values()) * layers
        lora = sum(r * (shapes[t][0] + shapes[t][1]) for t in target_modules if t in shapes) * layers
        codebooks = config.get("num_codebooks", 8) * config.get("codebook_size", 1026)
        return cls(path, lora, h * codebooks, layers, h)

    def step_flops(self, num_positions: int, num_loss_positions: int, sum_squared_lengths: int) -> float:
        """Model FLOPs of forward + backward over a micro-batch.

        `sum_squared_lengths` is the sum over its samples of (real positions)^2: attention cost grows with length.
        """
        dense = 4 * self.path_parameters * num_positions + 6 * self.lora_parameters_per_path * num_positions
        head = 4 * self.head_parameters * num_loss_positions  # frozen head: forward + input gradient
        attention = 12 * self.num_layers * self.hidden_size * sum_squared_lengths
        return float(dense + head + attention)


def peak_flops(configured_tflops: float, device_name: str) -> float | None:
    """Peak FLOP/s for MFU: the configured value, else a measured one for a known GPU, else None."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name in device_name:
            return tflops * 1e12
    return None
