"""Checking a merge: the merged model must compute what the adapter on its base computes.

On one fixed zero-shot sample (fixed texts, seeded reference and target codes, so both FFN paths and the audio head
are exercised), the audio logits of

- the base alone (to measure how much the adapter changes anything: a merge error means little without it),
- the adapter on the base, through PEFT, in the merge dtype (what the merged model must reproduce),
- the merged directory loaded with plain `HiggsAudioV2ForConditionalGeneration.from_pretrained`,
- for a QLoRA adapter, the adapter on the 4-bit NF4 base it was trained against,

are computed one model at a time (host or GPU memory holds one model, not two) and their differences reported.
"""

from __future__ import annotations

import gc
from pathlib import Path

from higgs_lora.config import ModelConfig, RunConfig
from higgs_lora.logs import get_logger

log = get_logger("verify")

REFERENCE_TEXT = "مرحبا، هذه جملة قصيرة للاختبار."
TARGET_TEXT = "The merged model must speak like the adapter."
NUM_REFERENCE_FRAMES = 20
NUM_TARGET_FRAMES = 15
SAMPLE_SEED = 0

MAX_RELATIVE_ERROR = 0.25
"""The merge fails its check when the mean |merged - adapter| over all logits exceeds this fraction of the mean
|adapter - base| (the adapter's own effect), and the bf16 noise floor below. A correct merge differs from the adapter
only by rounding; a wrong one (a layer missed, a wrong scale) by a large part of the adapter's effect. Means, not
maxima: the maximum of a million rounding differences through 28 bf16 layers is an outlier-prone statistic."""


class VerificationError(RuntimeError):
    """The merged model's logits do not match the adapter's."""


def fixed_sample(processor) -> dict:
    """The model inputs of one zero-shot sample: fixed texts, seeded codes (the same on every machine)."""
    import torch

    from higgs_lora.data.collate import MODEL_INPUTS, build_example, collate

    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    num_codebooks = processor.audio_tokenizer.config.num_quantizers
    reference = torch.randint(0, 1024, (num_codebooks, NUM_REFERENCE_FRAMES), generator=generator)
    target = torch.randint(0, 1024, (num_codebooks, NUM_TARGET_FRAMES), generator=generator)
    example = build_example(processor, REFERENCE_TEXT, reference, TARGET_TEXT, target)
    batch = collate([example], processor.tokenizer.pad_token_id, processor.audio_stream_eos_id)
    return {key: batch[key] for key in MODEL_INPUTS}


def _logits(model, batch: dict, device: str):
    import torch

    with torch.no_grad():
        inputs = {key: value.to(device) for key, value in batch.items()}
        return model(**inputs).logits.float().cpu()


def _release_memory() -> None:
    """Return the memory of models the caller just deleted, before the next one loads (one model at a time)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_logits(
    merged_dir: Path, base_dir: Path, adapter_dir: Path, cfg: RunConfig, dtype: str, device: str
) -> dict:
    """Logits of base, adapter-on-base, merged (and adapter-on-NF4-base for QLoRA) on `fixed_sample`; see module doc.

    Returns a JSON-able report with `passed` and, when not passed, `reason`.
    """
    from peft import PeftModel
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_lora.model.loading import load_base_model, load_processor, torch_dtype

    processor = load_processor(ModelConfig(path=str(merged_dir), codec_path=str(merged_dir / "audio_tokenizer")))
    batch = fixed_sample(processor)
    del processor

    full = ModelConfig(path=str(base_dir), dtype=dtype, attn_implementation="sdpa", gradient_checkpointing=False)
    base = load_base_model(full, device)
    base_logits = _logits(base, batch, device)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    adapter_logits = _logits(adapted, batch, device)
    del adapted, base
    _release_memory()

    quantised_logits = None
    if cfg.model.quantization == "nf4":
        trained = ModelConfig(
            path=str(base_dir),
            dtype=cfg.model.dtype,
            quantization="nf4",
            attn_implementation="sdpa",
            gradient_checkpointing=False,
        )
        quantised = load_base_model(trained, device)
        adapted = PeftModel.from_pretrained(quantised, str(adapter_dir)).eval()
        quantised_logits = _logits(adapted, batch, device)
        del adapted, quantised
        _release_memory()

    # Straight onto the GPU when there is one: a CPU copy first would cost host memory for the whole model.
    placement = {} if device == "cpu" else {"device_map": {"": device}}
    merged = HiggsAudioV2ForConditionalGeneration.from_pretrained(
        str(merged_dir), dtype=torch_dtype(dtype), **placement
    )
    merged_logits = _logits(merged.eval(), batch, device)
    del merged
    _release_memory()

    report = logits_report(base_logits, adapter_logits, merged_logits, quantised_logits)
    report.update(dtype=dtype, device=device, positions=int(batch["input_ids"].shape[1]))
    log.info(
        f"{report['positions']} positions, {dtype} on {device}: max |logit| {report['max_abs_logit']:.4g}; "
        f"the adapter changes logits by up to {report['adapter_effect']:.4g} "
        f"(mean {report['adapter_effect_mean']:.3g})"
    )
    log.info(
        f"max |merged - adapter on base| = {report['merged_vs_adapter']:.4g} "
        f"(mean {report['merged_vs_adapter_mean']:.3g})"
    )
    if quantised_logits is not None:
        log.info(
            f"QLoRA: max |merged - adapter on the NF4 base it was trained on ({cfg.model.dtype} compute)| = "
            f"{report['merged_vs_nf4_adapter']:.4g} (mean {report['merged_vs_nf4_adapter_mean']:.3g}); "
            f"the adapter on the NF4 base and on the {dtype} base differ by up to "
            f"{report['nf4_vs_full_base']:.4g}, the base's quantisation error, which the merged model no longer "
            "has"
        )
    if report["inconclusive"]:
        log.warning(f"inconclusive: {report['reason']}")
    else:
        log.info(f"{'passed' if report['passed'] else 'FAILED: ' + report['reason']}")
    return report


def logits_report(base, adapter, merged, adapter_nf4=None) -> dict:
    """Differences between the logits tensors (float32, same shape) and the pass/fail decision; pure."""
    import torch

    def max_abs(x) -> float:
        return float(x.abs().max())

    def mean_abs(x) -> float:
        return float(x.abs().mean())

    report = {
        "max_abs_logit": max_abs(adapter),
        "adapter_effect": max_abs(adapter - base),
        "adapter_effect_mean": mean_abs(adapter - base),
        "merged_vs_adapter": max_abs(merged - adapter),
        "merged_vs_adapter_mean": mean_abs(merged - adapter),
    }
    if adapter_nf4 is not None:
        report["merged_vs_nf4_adapter"] = max_abs(merged - adapter_nf4)
        report["merged_vs_nf4_adapter_mean"] = mean_abs(merged - adapter_nf4)
        report["nf4_vs_full_base"] = max_abs(adapter - adapter_nf4)
    finite = all(bool(torch.isfinite(x).all()) for x in (base, adapter, merged))
    # bf16 keeps 8 significant bits: a mean difference of a few ulps of the typical logit is rounding, not error.
    noise_floor = 2.0**-7 * mean_abs(adapter)
    allowed = max(MAX_RELATIVE_ERROR * report["adapter_effect_mean"], noise_floor)
    report["allowed_mean"] = allowed
    report["passed"] = finite and report["merged_vs_adapter_mean"] <= allowed
    # Passing only through the noise floor (the merge error above the relative bound, up to the whole adapter's
    # mean effect): the adapter changes too little for this check to tell a correct merge from one that dropped it.
    report["inconclusive"] = bool(
        report["passed"] and report["merged_vs_adapter_mean"] > MAX_RELATIVE_ERROR * report["adapter_effect_mean"]
    )
    report["verdict"] = "inconclusive" if report["inconclusive"] else "passed" if report["passed"] else "failed"
    if report["inconclusive"]:
        report["reason"] = (
            f"mean |merged - adapter| = {report['merged_vs_adapter_mean']:.4g} is not small beside the adapter's mean "
            f"effect {report['adapter_effect_mean']:.4g} (both within bf16 rounding, {noise_floor:.4g}): the adapter "
            "changes too little for the logits to show whether it was merged; compare generated audio or verify in fp32"
        )
    if not finite:
        report["reason"] = "the logits hold NaN or inf"
    elif not report["passed"]:
        report["reason"] = (
            f"mean |merged - adapter| = {report['merged_vs_adapter_mean']:.4g} exceeds {allowed:.4g} "
            f"({MAX_RELATIVE_ERROR:.0%} of the adapter's mean effect "
            f"{report['adapter_effect_mean']:.4g})"
        )
    return report
