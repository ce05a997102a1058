"""Calibrate and check the planner's memory model (higgs_lora.plan.memory.Coefficients).

    # CPU, no GPU needed: count the bytes autograd keeps per position per decoder layer for several layer shapes
    # and fit act_h * hidden + act_i * intermediate + act_0 (with and without LoRA dropout)
    python bench/plan_calibration.py --method saved-tensors
    python bench/plan_calibration.py --method saved-tensors --quick      # small shapes: a smoke run in seconds

    # GPU: the released architecture with random weights, memory capped with set_per_process_memory_fraction
    python bench/plan_calibration.py --method gpu --caps 16 24 40 80 --json out.json

Saved-tensor counting: a forward pass under `torch.autograd.graph.saved_tensors_hooks` records every tensor kept
for backward (deduplicated by storage, parameters and buffers excluded); run with 2 and 3 decoder layers, the
difference is one layer's activations, exact and device independent (the same autograd graph runs on a GPU; only
the attention kernel's own workspace differs, and SDPA keeps its output and log-sum-exp on both). It cannot see
transient peaks (backward working set, allocator rounding): those need the GPU method.

GPU method, per cap (GiB) and for LoRA bf16 and QLoRA: the planner's plan for one GPU of that size, then
`--steps` optimizer steps of micro-batches at exactly the planned budget with the planned checkpointing, and the
allocator's peak (torch.cuda.max_memory_allocated) against the prediction minus the CUDA context (which the
allocator does not see). A plain PyTorch loop on one GPU stands in for ZeRO-2 on one rank (DeepSpeed is not on the
GPU machine): bf16 LoRA weights and gradients, fp32 master copies with AdamW's moments, 16 bytes per trainable
parameter as under DeepSpeed. QLoRA saves the random model once and loads it 4-bit as training does (bitsandbytes
must be on the GPU machine). Before the capped runs it measures uncapped peaks at `--sweep` budgets with and without
checkpointing and fits the fixed part and the bytes per position, to update the coefficients.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_throughput as tt  # noqa: E402  (bench helpers: synthetic corpus, model on meta, collation)

SHAPES_FULL = [(3072, 8192), (1536, 8192), (3072, 4096)]
SHAPES_QUICK = [(256, 1024), (128, 1024), (256, 512)]
HEAD_DIM = 128


def setup(tiny_dir: Path):
    from higgs_lora.config import ModelConfig
    from higgs_lora.model.loading import load_processor
    from higgs_lora.tiny import ensure_tiny

    tiny = ensure_tiny(tiny_dir)
    return tiny.model_dir, load_processor(ModelConfig(path=str(tiny.model_dir)))


def layer_config(model_dir: Path, processor, hidden: int, intermediate: int, layers: int, vocab: int | None = None):
    """The released config (rope, ids, codebooks) with the given layer shape; 3 query heads per KV head, as released."""
    from argparse import Namespace

    config = tt.model_config(Namespace(size="full"), model_dir, processor)
    head_dim = min(HEAD_DIM, hidden // 4)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden, intermediate, layers
    config.head_dim = head_dim
    config.num_attention_heads = hidden // head_dim
    config.num_key_value_heads = max(1, config.num_attention_heads // 3)
    if vocab:
        config.vocab_size = vocab
    return config


def random_lora_model(config, dtype: torch.dtype, device: str, dropout: float, checkpointing: bool, seed: int = 0):
    from higgs_lora.config import LoraConfig, ModelConfig
    from higgs_lora.model.lora import apply_lora

    model = tt.random_model(config, dtype, device, seed)
    model = apply_lora(model, LoraConfig(dropout=dropout), ModelConfig(gradient_checkpointing=checkpointing))
    # PEFT makes the adapters fp32; DeepSpeed's bf16/fp16 engine casts every parameter to the training dtype (its
    # buffers stay as they are), so training runs them in `dtype`. With fp32 adapters each adapted projection would
    # keep an fp32 copy of its input for backward: ~60% more activation memory than training really has
    # (the coefficients of 2026-11-26 were measured that way; corrected 2026-12-03).
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model.train()


def saved_bytes(model, batch: dict) -> int:
    """Bytes of the distinct tensors autograd keeps for backward during one training forward (parameters excluded)."""
    from higgs_lora.train.loss import label_counts, micro_batch_loss_sums, normalised_loss

    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sums = micro_batch_loss_sums(model, batch)
        audio, text = label_counts(batch)
        normalised_loss(sums, audio, text, 0.0)
    return sum(kept.values())


def per_layer_bytes(model_dir, processor, hidden, intermediate, dropout, batch, vocab=None) -> float:
    """Activation bytes per position of one decoder layer: saved bytes with 3 layers minus with 2."""
    counts = []
    for layers in (2, 3):
        config = layer_config(model_dir, processor, hidden, intermediate, layers, vocab)
        model = random_lora_model(config, torch.bfloat16, "cpu", dropout, checkpointing=False)
        counts.append(saved_bytes(model, batch))
        del model
    return (counts[1] - counts[0]) / batch["input_ids"].numel()


def fit(rows: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least squares of bytes = a_h * hidden + a_i * intermediate + a_0 over (hidden, intermediate, bytes) rows."""
    a = torch.tensor([[h, i, 1.0] for h, i, _ in rows], dtype=torch.float64)
    b = torch.tensor([[v] for _, _, v in rows], dtype=torch.float64)
    solution = torch.linalg.lstsq(a, b).solution.flatten().tolist()
    return tuple(solution)


def saved_tensor_method(args) -> dict:
    model_dir, processor = setup(args.tiny_dir)
    items = tt.synthetic_corpus(processor, 2, args.seed)
    batch = tt.collate_items(processor, items)  # two samples, right-padded: as a packed micro-batch
    shapes = SHAPES_QUICK if args.quick else SHAPES_FULL
    vocab = 2048 if args.quick else None
    result = {"positions": batch["input_ids"].numel(), "rows": []}
    for dropout in (0.0, 0.1):
        rows = []
        for hidden, intermediate in shapes:
            value = per_layer_bytes(model_dir, processor, hidden, intermediate, dropout, batch, vocab)
            rows.append((hidden, intermediate, value))
            result["rows"].append(
                {"hidden": hidden, "intermediate": intermediate, "dropout": dropout, "bytes_per_position_layer": value}
            )
            print(
                f"dropout {dropout}: hidden {hidden}, intermediate {intermediate}: {value:,.1f} B/position/layer",
                flush=True,
            )
        a_h, a_i, a_0 = fit(rows)
        result[f"fit_dropout_{dropout}"] = {"act_h": a_h, "act_i": a_i, "act_0": a_0}
        print(f"  fit: {a_h:.5f} * hidden + {a_i:.5f} * intermediate + {a_0:.1f}", flush=True)
    return result


def gpu_method(args) -> dict:
    """Plans per cap, runs them, compares the allocator's peak with the prediction; fits slopes at several budgets."""
    from higgs_lora.config import load_config
    from higgs_lora.plan import GIB, RELEASED_MODEL_CONFIG, Hardware, load_ds_config, make_plan, sequence_stats

    if not torch.cuda.is_available():
        raise SystemExit("--method gpu needs a CUDA GPU; use --method saved-tensors on CPU")
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    model_dir, processor = setup(args.tiny_dir)
    items = tt.synthetic_corpus(processor, 256, args.seed)
    result: dict = {"runs": [], "sweeps": []}
    for quantization in args.quantizations:
        cfg = load_config(
            Path(args.config),
            [f"model.quantization={quantization}", "model.path=released", "train.global_batch_tokens=0"],
        )
        if quantization == "nf4":
            _saved_random_base(model_dir, processor, device)
        # Slopes: peak at several budgets, checkpointing on and off, no cap; fitted as fixed + per-position bytes.
        for checkpointing in (False, True):
            peaks = []
            for budget in args.sweep:
                peak = _measure(
                    model_dir, processor, items, quantization, cfg.lora.dropout, checkpointing, budget, 3, device
                )
                peaks.append((budget, peak))
                print(
                    json.dumps(
                        {
                            "sweep": quantization,
                            "checkpointing": checkpointing,
                            "budget": budget,
                            "peak_gb": None if peak is None else peak / 1e9,
                        }
                    ),
                    flush=True,
                )
            good = [(b, p) for b, p in peaks if p is not None]
            if len(good) >= 2:
                fixed, slope = _line(good)
                result["sweeps"].append(
                    {
                        "quantization": quantization,
                        "checkpointing": checkpointing,
                        "fixed_gb": fixed / 1e9,
                        "bytes_per_position": slope,
                        "points": good,
                    }
                )
        caps = args.caps if quantization == "none" or args.nf4_caps is None else args.nf4_caps
        for cap in caps:
            hardware = Hardware(1, 1, int(cap * GIB), torch.cuda.get_device_name(device), "cap")
            plan = make_plan(cfg, load_ds_config("auto"), hardware, RELEASED_MODEL_CONFIG, sequence_stats(cfg))
            row = {
                "cap_gib": cap,
                "quantization": quantization,
                "checkpointing": plan.gradient_checkpointing,
                "zero_stage": plan.zero_stage,
                "offload": plan.offload,
                "budget": plan.micro_batch_tokens,
                "predicted_gb": plan.predicted_peak / 1e9,
            }
            if plan.zero_stage != 2 or plan.offload != "none":
                row["skipped"] = "needs DeepSpeed ZeRO-3/offload (not on this machine)"
            else:
                torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total), device)
                peak = _measure(
                    model_dir,
                    processor,
                    items,
                    quantization,
                    cfg.lora.dropout,
                    plan.gradient_checkpointing,
                    plan.micro_batch_tokens,
                    args.steps,
                    device,
                )
                torch.cuda.set_per_process_memory_fraction(1.0, device)
                context = dict(plan.memory)["CUDA context"] / 1e9
                if peak is None:
                    row["oom"] = True
                else:
                    row["measured_gb"] = peak / 1e9
                    row["error"] = row["measured_gb"] / (row["predicted_gb"] - context) - 1
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
        if quantization == "nf4" and args.nf4_budget:
            result["qlora_16gib"] = _qlora_16gib(args, result["runs"], model_dir, processor, items, cfg, total, device)
            print(json.dumps({"qlora_16gib": result["qlora_16gib"]}), flush=True)
    return result


def _qlora_16gib(args, runs, model_dir, processor, items, cfg, total, device) -> dict:
    """QLoRA on a 16 GiB card at `--nf4-budget` positions, checkpointing on: the planner's 16 GiB run answers it
    when it ran at least that budget with checkpointing, else one more run under a 16 GiB cap."""
    from higgs_lora.plan import GIB

    planned = next((r for r in runs if r["quantization"] == "nf4" and r["cap_gib"] == 16 and "skipped" not in r), None)
    if planned and planned["checkpointing"] and planned["budget"] >= args.nf4_budget:
        budget, source = planned["budget"], "the planner's 16 GiB row"
        peak = None if planned.get("oom") else planned["measured_gb"] * 1e9
    else:
        budget, source = args.nf4_budget, "its own run"
        torch.cuda.set_per_process_memory_fraction(min(1.0, 16 * GIB / total), device)
        try:
            peak = _measure(model_dir, processor, items, "nf4", cfg.lora.dropout, True, budget, args.steps, device)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    row = {"cap_gib": 16, "budget": budget, "checkpointing": True, "fits": peak is not None, "from": source}
    if peak is not None:
        row["measured_gib"] = peak / GIB
    return row


def _measure(model_dir, processor, items, quantization, dropout, checkpointing, budget, steps, device) -> int | None:
    """Allocator peak (bytes) over `steps` optimizer steps at `budget` positions; None when it ran out of memory.

    LoRA weights stay bf16 as under DeepSpeed; fp32 master copies and their Adam moments stand in for ZeRO-2's
    optimizer state on one rank (2 + 2 + 4 + 8 bytes per trainable parameter, as the memory model counts).
    """
    from higgs_lora.train.loss import label_counts, micro_batch_loss_sums, normalised_loss, to_device

    model = optimizer = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        model = _released_model(model_dir, processor, quantization, dropout, checkpointing, device)
        params = [p for p in model.parameters() if p.requires_grad]
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        optimizer = torch.optim.AdamW(masters, lr=1e-5, fused=True)
        for step in range(steps):
            batch = to_device(_batch_of(processor, items, budget, step), device)
            audio, text = label_counts(batch)
            normalised_loss(micro_batch_loss_sums(model, batch), audio, text, 0.0).backward()
            for param, master in zip(params, masters):
                master.grad = param.grad.float()
                param.grad = None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for param, master in zip(params, masters):
                    param.copy_(master)
        return torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        del model, optimizer
        torch.cuda.empty_cache()


def _line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (budget, bytes) points."""
    a = torch.tensor([[1.0, b] for b, _ in points], dtype=torch.float64)
    y = torch.tensor([[float(p)] for _, p in points], dtype=torch.float64)
    intercept, slope = torch.linalg.lstsq(a, y).solution.flatten().tolist()
    return intercept, slope


_SAVED_RANDOM: dict[str, Path] = {}


def _saved_random_base(model_dir, processor, device) -> Path:
    """The released architecture with random weights saved once (bf16, the released keys) for 4-bit loading.

    Initialised on the GPU (5.8B random initialisations on a CPU take minutes), saved, and freed before any cap
    or peak measurement (gpu_method calls this first), so the bf16 copy is in no measured peak."""
    import tempfile

    if "path" not in _SAVED_RANDOM:
        path = Path(tempfile.mkdtemp(prefix="higgs-random-"))
        base = tt.random_model(layer_config(model_dir, processor, 3072, 8192, 28), torch.bfloat16, device)
        base.save_pretrained(path)
        del base
        torch.cuda.empty_cache()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (Path(model_dir) / name).is_file():
                (path / name).write_bytes((Path(model_dir) / name).read_bytes())
        _SAVED_RANDOM["path"] = path
    return _SAVED_RANDOM["path"]


def _released_model(model_dir, processor, quantization, dropout, checkpointing, device):
    """The released architecture with random weights; for NF4 saved once to disk and loaded 4-bit as training does."""
    from higgs_lora.config import LoraConfig, ModelConfig
    from higgs_lora.model.loading import load_base_model
    from higgs_lora.model.lora import apply_lora

    config = layer_config(model_dir, processor, 3072, 8192, 28)
    if quantization == "none":
        return random_lora_model(config, torch.bfloat16, str(device), dropout, checkpointing)
    path = str(_saved_random_base(model_dir, processor, device))
    model_cfg = ModelConfig(path=path, quantization="nf4", gradient_checkpointing=checkpointing)
    model = apply_lora(load_base_model(model_cfg, device), LoraConfig(dropout=dropout), model_cfg)
    for param in model.parameters():  # adapters in bf16, as DeepSpeed's bf16 engine runs them (random_lora_model)
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    return model.train()


def _batch_of(processor, items, budget: int, step: int) -> dict:
    """Samples from `items` (rotating) packed up to `budget` positions: samples x longest <= budget."""
    chosen = []
    index = step * 7
    while True:
        item = items[index % len(items)]
        longest = max([item.num_positions] + [i.num_positions for i in chosen])
        if chosen and longest * (len(chosen) + 1) > budget:
            break
        chosen.append(item)
        index += 1
    return tt.collate_items(processor, chosen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["saved-tensors", "gpu"], default="saved-tensors")
    parser.add_argument("--quick", action="store_true", help="small layer shapes (a smoke run)")
    parser.add_argument("--caps", type=float, nargs="+", default=[16, 24, 40, 80], help="GiB per GPU")
    parser.add_argument("--quantizations", nargs="+", default=["none"], choices=["none", "nf4"])
    parser.add_argument("--config", default="configs/arabic_lora.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--sweep", type=int, nargs="*", default=[1024, 2048, 4096], help="slope-fit budgets (no cap; none: skip)"
    )
    parser.add_argument("--nf4-caps", type=float, nargs="*", help="caps of the QLoRA rows (default: --caps)")
    parser.add_argument(
        "--nf4-budget", type=int, default=2048, help="QLoRA at this many positions under a 16 GiB cap (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny-dir", type=Path, default=Path("build/tiny"))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        result = saved_tensor_method(args) if args.method == "saved-tensors" else gpu_method(args)
    finally:  # the NF4 sweep's saved random checkpoint (full size: ~12 GB in the temporary directory)
        if "path" in _SAVED_RANDOM:
            shutil.rmtree(_SAVED_RANDOM.pop("path"), ignore_errors=True)
    result["meta"] = {
        "method": args.method,
        "date": started,
        "machine": platform.node() and platform.machine(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
