"""The planner's memory terms held against one real LoRA training step on the CPU, term by term.

    python bench/plan_memory.py                                   # released width, 1 and 2 layers, 1k/2k budgets
    python bench/plan_memory.py --layers 1 2 3 --budgets 1024 2048 4096 --json out.json
    python bench/plan_memory.py --hidden 256 --intermediate 1024 --vocab 2048   # reduced width (what the test runs)

One optimizer step through our code path: the synthetic corpus packed to a token budget, our collate, our loss
(`micro_batch_loss_sums`: audio logits only where labelled, `logits_to_keep`), PEFT LoRA r16 on all projections
(project defaults), SDPA, bf16, checkpointing on and off, then the step of fp32 master copies with AdamW (16 bytes
per trainable parameter, as ZeRO-2 on one rank keeps). The model has the released hidden/intermediate sizes and
1-3 decoder layers with random weights.

Measurement: a TorchDispatchMode sees every tensor an operator returns and follows its storage until it is freed
(a weak reference on the storage), so it knows the bytes alive at any moment that were made during the step:
activations, temporaries. Adam's moments are created before the measured step (a step on zero gradients), and so
is the LoRA gradient buffer, which backward accumulates into (DeepSpeed's contiguous gradient buffer exists from the
start too, and the planner counts it as a fixed term); their bytes and the weights' are counted from the tensors
themselves. Reported per kind:
- weights: frozen parameters (and buffers), counted;
- LoRA state: LoRA weights + gradients + fp32 masters + Adam m, v, counted;
- activations: bytes alive at the end of the forward (the loss computed), what backward will need;
- backward, beyond the activations: the step's peak minus the activations (with checkpointing the recomputed
  layer and the working set, without it the working set alone). The peak is either in the audio head's backward
  (fp32 logit gradients) or in a layer's, whichever is larger; the planner takes the same maximum.
Re-score stored rows against a changed planner without measuring again: `--rows out.json`.
Activations and peak are fitted per layer (fixed + per-layer) over the layer counts run and extrapolated to the
released 28 layers, then compared with the planner's terms (higgs_lora.plan.memory) for the same micro-batch.

What a CPU cannot see stays out of both columns and a named planner term: the CUDA context, allocator rounding and
fragmentation, cuBLAS / flash-attention workspaces, NCCL buffers ("CUDA context"; calibrated on a GPU by
bench/plan_calibration.py --method gpu). The CPU's SDPA differs from flash attention in what it keeps: both keep the
output and the log-sum-exp per query (the CPU flash kernel), which is what the planner's coefficients assume.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plan_calibration as pc  # noqa: E402  (released config with a layer shape, random LoRA model, packing)
import train_throughput as tt  # noqa: E402  (synthetic corpus, collation)

RELEASED_LAYERS = 28
BOUND = 0.10
"""Acceptance: the planner's activation + LoRA-state + backward-working-set sum within this of the measurement."""


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages made by operators under this mode that are still alive; their peak.

    `existing`: tensors made before the step (parameters, buffers, the batch, optimizer state). An operator that
    returns a view of one (`aten::t` of a weight inside every linear, an in-place update) returns *its* storage,
    which must not be counted as made by the step: without this, each layer's weights were counted as activations
    (a constant ~350 MB per released layer, 2026-12-03).
    """

    def __init__(self, existing=()):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing if isinstance(t, torch.Tensor)}
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._follow(tensor.untyped_storage())
        return out

    def _follow(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live or key in self.existing:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._freed(key))

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self._refs.pop(key, None)

    def reset_peak(self) -> None:
        self.peak = self.current


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_step(config, processor, items, budget: int, checkpointing: bool, step_index: int = 1) -> dict:
    """One measured optimizer step of a random LoRA model with `config`'s layers."""
    from higgs_lora.train.loss import label_counts, micro_batch_loss_sums, normalised_loss

    model = pc.random_lora_model(config, torch.bfloat16, "cpu", 0.0, checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    optimizer = torch.optim.AdamW(masters, lr=1e-5, foreach=False)
    for master in masters:  # Adam's moments exist before the measured step, as from the second step on
        master.grad = torch.zeros_like(master)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for param in params:  # the gradient buffer exists before the step, as DeepSpeed's contiguous one does
        param.grad = torch.zeros_like(param)

    def step(batch, tracker: LiveBytes | None) -> dict:
        found: dict = {}
        audio, text = label_counts(batch)
        loss = normalised_loss(micro_batch_loss_sums(model, batch), audio, text, 0.0)
        if tracker is not None:
            found["after_forward"] = tracker.current
        loss.backward()
        del loss
        if tracker is not None:
            found["after_backward"] = tracker.current
        for param, master in zip(params, masters):
            master.grad = param.grad.float()
            param.grad.zero_()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for param, master in zip(params, masters):
                param.copy_(master)
        return found

    batch = pc._batch_of(processor, items, budget, step_index)
    state = [v for per_param in optimizer.state.values() for v in per_param.values()]
    grads = [p.grad for p in params]
    existing = [*model.parameters(), *grads, *model.buffers(), *masters, *state, *tree_flatten(batch)[0]]
    tracker = LiveBytes(existing)
    started = time.perf_counter()
    with tracker:
        found = step(batch, tracker)
    seconds = time.perf_counter() - started
    lora_weights = _nbytes(params)
    adam = sum(
        _nbytes(v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        for state in optimizer.state.values()
    )
    frozen = _nbytes(p for p in model.parameters() if not p.requires_grad) + _nbytes(model.buffers())
    lora_grads = _nbytes(grads)  # bf16, counted from the buffer (outside the live bytes)
    positions = batch["input_ids"].numel()
    labelled = int(batch["loss_mask"].sum())
    result = {
        "positions": positions,
        "real_positions": int(batch["attention_mask"].sum()),
        "labelled_audio_positions": labelled,
        "weights": frozen,
        "lora_state": lora_weights + lora_grads + _nbytes(masters) + adam,
        "trainable": sum(p.numel() for p in params),
        "activations": found["after_forward"],
        "working_set": tracker.peak - found["after_forward"],
        "peak": tracker.peak,
        "seconds": seconds,
    }
    return result


def fit_layers(rows: list[dict], key: str) -> tuple[float, float]:
    """(fixed, per layer) of `key` over rows measured at different layer counts (least squares)."""
    if len(rows) == 1:
        return 0.0, rows[0][key] / rows[0]["layers"]
    pc_line = pc._line([(r["layers"], r[key]) for r in rows])
    return pc_line


def planner_terms(config, batch_stats: dict, layers: int, checkpointing: bool, trainable: int) -> dict:
    """The planner's terms for this micro-batch: activations (with logits), backward working set, LoRA state."""
    from higgs_lora.plan import Candidate, MemoryModel
    from higgs_lora.plan.inputs import SequenceStats, model_sizes

    values = config.to_dict()
    values["num_hidden_layers"] = layers
    sizes = model_sizes(values, text_head=False)
    fraction = batch_stats["labelled_audio_positions"] / batch_stats["positions"]
    seq = SequenceStats(longest=batch_stats["positions"], labelled_fraction=fraction, source="this micro-batch")
    memory = MemoryModel(sizes, trainable, 1, "bf16", "none", 0.0, seq, config.hidden_size, config.intermediate_size)
    terms = {t.name: t.at(batch_stats["positions"]) for t in memory.terms(Candidate(2, "none", checkpointing))}
    activations = sum(terms[n] for n in terms if n.startswith("activations") or n == "audio logits")
    if checkpointing:
        activations_at_peak = activations + terms["recomputed layer"]
    else:
        activations_at_peak = activations
    lora = terms["LoRA weights"] + terms["LoRA gradients (partition)"] + terms["fp32 master + Adam m, v"]
    return {
        "activations": activations,
        "recomputed_layer": terms.get("recomputed layer", 0.0),
        "working_set": terms["backward working set"],
        "lora_state": lora,
        "sum": activations_at_peak + terms["backward working set"] + lora,
        "cuda_context": terms["CUDA context"],
    }


def measure(config, processor, items, layer_counts, budgets, checkpointing_modes, log=print) -> list[dict]:
    """One measured step per checkpointing mode, budget and layer count; the rows `compare` scores."""
    rows = []
    for checkpointing in checkpointing_modes:
        for budget in budgets:
            for layers in layer_counts:
                config.num_hidden_layers = layers
                row = measure_step(config, processor, items, budget, checkpointing)
                row.update(checkpointing=checkpointing, budget=budget, layers=layers)
                rows.append(row)
                log(json.dumps(row))
    return rows


def compare(config, rows: list[dict]) -> list[dict]:
    """Measured (extrapolated to 28 layers) against predicted, per budget and checkpointing; rows of a table."""
    table = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["checkpointing"], row["budget"]), []).append(row)
    for (checkpointing, budget), group in groups.items():
        measured = {
            "positions": group[0]["positions"],
            "labelled_audio_positions": group[0]["labelled_audio_positions"],
        }
        trainable_per_layer = fit_layers(group, "trainable")
        trainable = round(trainable_per_layer[0] + RELEASED_LAYERS * trainable_per_layer[1])
        for key in ("activations", "peak", "lora_state"):
            fixed, per_layer = fit_layers(group, key)
            measured[key] = fixed + RELEASED_LAYERS * per_layer
        measured["working_set"] = measured["peak"] - measured["activations"]
        config.num_hidden_layers = RELEASED_LAYERS
        predicted = planner_terms(config, measured, RELEASED_LAYERS, checkpointing, trainable)
        # At the step's peak: what backward needs of the forward (activations), what it holds beyond them (with
        # checkpointing the layer recomputed, and the working set), and the LoRA state.
        measured_sum = measured["peak"] + measured["lora_state"]
        table.append(
            {
                "checkpointing": checkpointing,
                "budget": budget,
                "positions": measured["positions"],
                "layers_run": sorted({r["layers"] for r in group}),
                "measured": {k: measured[k] for k in ("activations", "working_set", "lora_state")}
                | {"sum": measured_sum},
                "predicted": predicted,
                "error": predicted["sum"] / measured_sum - 1,
            }
        )
    return table


def read_rows(path: Path) -> list[dict]:
    """Measured rows from an earlier run: its --json file, or its log (one JSON object per measured step)."""
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)["rows"]
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    if not rows:
        raise SystemExit(f"{path}: no measured rows (a --json file of this script, or its printed log)")
    return rows


def markdown(table: list[dict]) -> str:
    gib = 1024**3
    lines = [
        "| checkpointing | positions | activations meas / pred (GiB) | backward, beyond them, meas / pred | "
        "LoRA state meas / pred | sum meas / pred | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        m, p = row["measured"], row["predicted"]
        beyond = p["recomputed_layer"] + p["working_set"]
        lines.append(
            f"| {'on' if row['checkpointing'] else 'off'} | {row['positions']:,} | "
            f"{m['activations'] / gib:.2f} / {p['activations'] / gib:.2f} | {m['working_set'] / gib:.2f} / "
            f"{beyond / gib:.2f} | {m['lora_state'] / gib:.3f} / {p['lora_state'] / gib:.3f} | "
            f"{m['sum'] / gib:.2f} / {p['sum'] / gib:.2f} | {100 * row['error']:+.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=None, help="text vocabulary (default: the released 128,256)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny-dir", type=Path, default=Path("build/tiny"))
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--rows",
        type=Path,
        help="score the steps an earlier run measured (its --json file or its log) against today's planner, "
        "instead of measuring; give the same --hidden/--intermediate/--vocab",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model_dir, processor = pc.setup(args.tiny_dir)
    items = tt.synthetic_corpus(processor, args.num_samples, args.seed)
    config = pc.layer_config(model_dir, processor, args.hidden, args.intermediate, max(args.layers), args.vocab)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.rows:
        rows = read_rows(args.rows)
    else:
        rows = measure(config, processor, items, args.layers, args.budgets, modes)
    table = compare(config, rows)
    print(markdown(table))
    if args.json:
        meta = {"date": started, "torch": torch.__version__, "machine": platform.machine(), "args": vars(args)}
        meta["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in meta["args"].items()}
        out = {"meta": meta, "rows": rows, "table": table}
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
