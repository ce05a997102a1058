"""Cross-field checks of a run config: every impossible combination, each named by its keys with what to do
(`data.min_seconds` above `data.max_seconds`, flash attention in fp32, a micro-batch smaller than one sample, ...).

`RunConfig` runs `validate_run` when it is built. Imports only constants (schema's types for type checking).
See docs/training.md ("Configuration").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from higgs_lora.constants import DELAY_POSITIONS, FRAMES_PER_SECOND

if TYPE_CHECKING:
    from higgs_lora.config.schema import DataConfig, RunConfig

TRACKERS = ("tensorboard", "wandb", "mlflow")
"""What `train.report_to` may name (higgs_lora.train.trackers implements each)."""


def max_sample_audio_positions(data: DataConfig) -> int:
    """Model positions taken by the audio of the longest possible sample: target plus reference, delay included.

    A lower bound on one sample's length (the prompt text comes on top), in positions.
    """
    target = round(data.max_seconds * FRAMES_PER_SECOND) + DELAY_POSITIONS
    reference = round(data.reference_max_seconds * FRAMES_PER_SECOND) + DELAY_POSITIONS
    return target + reference


def validate_run(cfg: RunConfig) -> list[str]:
    """Cross-field checks; returns every problem found (empty when the config is consistent)."""
    problems: list[str] = []
    data, model, lora, train, plan = cfg.data, cfg.model, cfg.lora, cfg.train, cfg.plan

    def positive(key: str, value: float) -> None:
        if value <= 0:
            problems.append(f"{key}={value} must be > 0")

    def non_negative(key: str, value: float) -> None:
        if value < 0:
            problems.append(f"{key}={value} must be >= 0")

    if data.diacritize == "auto" and data.strip_diacritics:
        problems.append("data.diacritize=auto adds the diacritics data.strip_diacritics=true removes: set one of them")
    positive("lora.r", lora.r)
    positive("lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        problems.append(f"lora.dropout={lora.dropout} must be in [0, 1)")
    if not lora.target_modules:
        problems.append("lora.target_modules is empty; list module names such as q_proj,v_proj")
    positive("train.lr", train.lr)
    for key in (
        "weight_decay",
        "warmup_steps",
        "max_steps",
        "epochs",
        "micro_batch_tokens",
        "global_batch_tokens",
        "grad_clip",
        "text_loss_weight",
    ):
        non_negative(f"train.{key}", getattr(train, key))
    non_negative("train.eval_every", train.eval_every)
    non_negative("train.eval_samples", train.eval_samples)
    positive("train.eval_sample_seconds", train.eval_sample_seconds)
    non_negative("train.peak_tflops", train.peak_tflops)
    non_negative("data.num_eval_speakers", data.num_eval_speakers)
    for key in ("log_every", "save_every", "keep_last", "max_nonfinite_steps"):
        positive(f"train.{key}", getattr(train, key))
    unknown = [name for name in train.report_to if name not in TRACKERS]
    if unknown:
        problems.append(
            f"train.report_to: unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)} "
            "(or [] for metrics.jsonl only)"
        )
    if len(set(train.report_to)) != len(train.report_to):
        problems.append(f"train.report_to={train.report_to} names a tracker twice")
    if train.max_steps == 0 and train.epochs == 0:
        problems.append("train.max_steps=0 and train.epochs=0: nothing to train; set one of them")
    if train.text_loss_weight > 0 and not model.use_text_head:
        problems.append(
            f"train.text_loss_weight={train.text_loss_weight} needs the text head; set model.use_text_head=true "
            "or train.text_loss_weight=0"
        )
    if model.attn_implementation == "flash_attention_2" and model.dtype == "fp32":
        problems.append("model.attn_implementation=flash_attention_2 needs model.dtype=bf16 or fp16; or use sdpa")

    if train.eval_asr and not (train.eval_samples and train.eval_every):
        problems.append(
            f"train.eval_asr={train.eval_asr} transcribes the evaluation clips, but there are none: set "
            "train.eval_samples and train.eval_every > 0, or train.eval_asr=''"
        )
    if not 0 <= data.replay_fraction < 1:
        problems.append(f"data.replay_fraction={data.replay_fraction} must be in [0, 1) (e.g. 0.1); 0 turns it off")
    if data.replay_fraction > 0 and not data.replay:
        problems.append(
            f"data.replay_fraction={data.replay_fraction} but data.replay is empty: name the replay corpus or set "
            "data.replay_fraction=0"
        )
    if data.max_letters_per_second <= 0:
        problems.append(f"data.max_letters_per_second={data.max_letters_per_second} must be > 0")
    for key in ("shard_size", "num_workers", "codec_batch_size"):
        positive(f"prepare.{key}", getattr(cfg.prepare, key))
    if not 0 <= cfg.audio.max_clipped_fraction <= 1:
        problems.append(f"audio.max_clipped_fraction={cfg.audio.max_clipped_fraction} must be in [0, 1]")
    if cfg.audio.target_lufs > 0:
        problems.append(f"audio.target_lufs={cfg.audio.target_lufs} must be <= 0 (e.g. -20), or 0 to disable")
    positive("data.sample_rate", data.sample_rate)
    positive("data.min_seconds", data.min_seconds)
    positive("data.reference_min_seconds", data.reference_min_seconds)
    if data.min_seconds >= data.max_seconds:
        problems.append(
            f"data.min_seconds={data.min_seconds} is not below data.max_seconds={data.max_seconds}; "
            "lower one or raise the other"
        )
    if data.reference_min_seconds >= data.reference_max_seconds:
        problems.append(
            f"data.reference_min_seconds={data.reference_min_seconds} is not below "
            f"data.reference_max_seconds={data.reference_max_seconds}; lower one or raise the other"
        )
    if train.micro_batch_tokens:
        longest = max_sample_audio_positions(data)
        if train.micro_batch_tokens < longest:
            problems.append(
                f"train.micro_batch_tokens={train.micro_batch_tokens} is smaller than one sample's audio alone "
                f"({longest:,} positions for data.max_seconds={data.max_seconds} plus "
                f"data.reference_max_seconds={data.reference_max_seconds}); raise it, lower those, or set 0 to plan it"
            )
    if train.global_batch_tokens and train.micro_batch_tokens and train.global_batch_tokens < train.micro_batch_tokens:
        problems.append(
            f"train.global_batch_tokens={train.global_batch_tokens} is below train.micro_batch_tokens="
            f"{train.micro_batch_tokens}; raise it or set 0 to plan it"
        )
    if plan.zero_stage not in (0, 2, 3):
        problems.append(f"plan.zero_stage={plan.zero_stage} must be 2, 3, or 0 (planned)")
    for key in ("gpus_per_node", "gpu_memory_gib", "nodes"):
        non_negative(f"plan.{key}", getattr(plan, key))
    positive("plan.useful_micro_batch_tokens", plan.useful_micro_batch_tokens)
    if plan.max_micro_batch_tokens < plan.useful_micro_batch_tokens:
        problems.append(
            f"plan.max_micro_batch_tokens={plan.max_micro_batch_tokens} is below "
            f"plan.useful_micro_batch_tokens={plan.useful_micro_batch_tokens}"
        )
    if not 0 <= plan.memory_margin < 0.9:
        problems.append(f"plan.memory_margin={plan.memory_margin} must be in [0, 0.9)")
    if model.quantization == "nf4" and plan.offload == "optimizer+params":
        problems.append(
            "model.quantization=nf4 with plan.offload=optimizer+params: 4-bit weights cannot be offloaded by ZeRO; "
            "use plan.offload=optimizer or auto"
        )
    return problems
