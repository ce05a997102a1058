"""The bundled demo: the whole pipeline on a tiny model and the demo corpus, on CPU.

`make demo` runs `python -m higgs_lora.demo --config configs/demo.yaml`. It builds the tiny model if it is missing,
then runs the pipeline stages that exist: `prepare` (demo corpus -> codec-token cache, with its report), then load
the tiny checkpoint through the same loading code as real weights, apply LoRA, build zero-shot batches (reference +
target of the same speaker) from the cache, run a forward and backward pass, and report the loss. Later stages
(plan -> train -> merge -> clone -> evaluate) extend this same command.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from higgs_lora.config import ConfigError, RunConfig, add_config_arguments, config_from_args, save_config
from higgs_lora.files import atomic_write_json

DEFAULT_TINY_DIR = "build/tiny"


def demo_pairs(rows: list[dict], num_pairs: int) -> list[tuple[dict, dict]]:
    """(reference, target) pairs of the same speaker, one per speaker in turn: consecutive utterances."""
    by_speaker: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_speaker[row["speaker"]].append(row)
    pairs = []
    for speaker in sorted(by_speaker):
        utterances = by_speaker[speaker]
        if len(utterances) >= 2:
            pairs.append((utterances[0], utterances[1]))
    return pairs[:num_pairs]


def ensure_cache(cfg: RunConfig, quiet: bool = True) -> dict:
    """Build (or finish) the codec-token cache for `cfg` and return its report."""
    from higgs_lora.data.prepare import join, run_prepare

    run_prepare(cfg, quiet=quiet)
    return join(cfg)


def build_model_and_batch(cfg: RunConfig, num_pairs: int = 2):
    """Load the base through the real loaders, apply LoRA, and build a zero-shot batch from the cache.

    Returns (model, batch, load_seconds). Each pair is a reference and a target of the same speaker; their codes
    come from the cache (the codec does not run here).
    """
    import torch

    from higgs_lora.data.collate import build_example, collate
    from higgs_lora.data.prepare import cache_dir_of, load_cache
    from higgs_lora.model import apply_lora, load_base_model, load_processor

    ensure_cache(cfg)
    rows = list(load_cache(cache_dir_of(cfg)))
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    processor = load_processor(cfg.model)
    model = apply_lora(load_base_model(cfg.model), cfg.lora, cfg.model)
    model.train()
    load_seconds = time.perf_counter() - started

    def codes(row: dict) -> torch.Tensor:
        return torch.tensor(row["codes"], dtype=torch.long)

    examples = [
        build_example(processor, reference["text_normalized"], codes(reference), target["text_normalized"],
                      codes(target), scene=cfg.data.scene)
        for reference, target in demo_pairs(rows, num_pairs)
    ]
    batch = collate(examples, processor.tokenizer.pad_token_id, processor.audio_stream_eos_id)
    return model, batch, load_seconds


def per_codebook_losses(model, batch: dict, logits) -> list[float]:
    """Cross-entropy of each codebook over the labelled positions of `batch` (the model reports only their sum)."""
    import torch

    num_codebooks, codebook_size = model.config.num_codebooks, model.config.codebook_size
    logits = logits.float().reshape(*logits.shape[:2], num_codebooks, codebook_size)
    labels = torch.full((*batch["input_ids"].shape, num_codebooks), -100, dtype=torch.long)
    audio_positions = model.get_base_model().model.get_placeholder_mask(batch["input_ids"], None, None)
    labels[audio_positions] = batch["audio_labels"][batch["audio_input_ids_mask"]]
    return [
        torch.nn.functional.cross_entropy(
            logits[:, :-1, k].reshape(-1, codebook_size), labels[:, 1:, k].reshape(-1), ignore_index=-100
        ).item()
        for k in range(num_codebooks)
    ]


def forward_backward(model, batch: dict):
    """One forward and backward pass; returns (outputs, adapter gradient norm, seconds)."""
    import torch

    started = time.perf_counter()
    outputs = model(**batch)
    outputs.loss.backward()
    seconds = time.perf_counter() - started
    grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return outputs, grad_norm.item(), seconds


def foundation_step(cfg: RunConfig, num_pairs: int = 2) -> dict:
    """Load through the real loaders, apply LoRA, run forward + backward on a demo batch; returns a summary."""
    import torch

    from higgs_lora.model import count_parameters

    model, batch, load_seconds = build_model_and_batch(cfg, num_pairs)
    outputs, grad_norm, step_seconds = forward_backward(model, batch)
    with torch.no_grad():
        per_codebook = per_codebook_losses(model, batch, outputs.logits)
    trainable, total = count_parameters(model)
    return {
        "loss": outputs.loss.item(),
        "per_codebook_loss": per_codebook,
        "labelled_positions": int((batch["audio_labels"] != -100).sum()),
        "batch_shape": list(batch["input_ids"].shape),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "adapter_grad_norm": grad_norm,
        "load_seconds": round(load_seconds, 3),
        "forward_backward_seconds": round(step_seconds, 3),
    }


def run(cfg: RunConfig, tiny_dir: str | None) -> int:
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    out = Path(cfg.output_dir)
    if tiny_dir:
        from higgs_lora.tiny import ensure_tiny

        paths = ensure_tiny(tiny_dir)
        print(f"[demo] tiny model ready: {paths.model_dir}")
    save_config(cfg, out / "config.yaml")
    print(f"[demo] resolved config written to {out / 'config.yaml'}")

    from higgs_lora.data.prepare import cache_dir_of, format_report

    print("[demo] prepare: demo corpus -> checked, normalised codec-token cache")
    print("\n".join(f"[demo]   {line}" for line in format_report(ensure_cache(cfg, quiet=False)).splitlines()))
    print("[demo] foundation: load through the real loaders -> LoRA -> forward + backward on a zero-shot batch")
    summary = foundation_step(cfg)
    codebooks = " ".join(f"{x:.3f}" for x in summary["per_codebook_loss"])
    print(
        f"[demo] loss {summary['loss']:.4f} (per codebook: {codebooks}); "
        f"{summary['labelled_positions']} labelled target positions in a batch of {summary['batch_shape']}; "
        f"adapter grad norm {summary['adapter_grad_norm']:.4f}; "
        f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,} parameters trainable"
    )
    report = atomic_write_json(out / "demo_report.json", summary)
    if not math.isfinite(summary["loss"]) or not math.isfinite(summary["adapter_grad_norm"]):
        print("[demo] FAILED: the loss or the gradient is not finite", file=sys.stderr)
        return 1
    print(f"[demo] done. Outputs in {out.resolve()}: config.yaml, {report.name}, "
          f"cache {cache_dir_of(cfg)} (report.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m higgs_lora.demo", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument(
        "--tiny-dir", default=DEFAULT_TINY_DIR,
        help="build the tiny model here if missing (set model.path to its model/ directory); '' to skip",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never reaches a model hub
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run(cfg, args.tiny_dir or None)


if __name__ == "__main__":
    raise SystemExit(main())
