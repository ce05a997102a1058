"""Training throughput of our LoRA pipeline against a Hugging Face Trainer + PEFT baseline, in one run.

    python bench/train_throughput.py --size tiny --steps 5                   # CPU smoke run (tiny demo model)
    python bench/train_throughput.py --size full --steps 10 --json out.json  # released dims, random weights, GPU
    python bench/train_throughput.py --size full --dry-run                   # build on meta, print size and FLOPs
    python bench/train_throughput.py --size full --layers 1 --micro-batch-tokens 2048 --baseline-batch-size 3 \
        --steps 3 --warmup 1                                # CPU: released width, 1 layer, real audio head

Both pipelines train the same model (the tiny checkpoint, or the released architecture built on the meta device and
materialised on the GPU in bf16 with random weights: same FLOPs and memory as the real one) with the same LoRA
(project defaults: r 16, alpha 32, dropout 0.1, all linear layers) and gradient-checkpointing setting, on the same
synthetic corpus: random codes for a 3-10 s reference and a 2-15 s target (25 frames/s), transcripts of 20-120
tokens. Each step builds its samples from texts and codes (tokenising, as training from the cache does). Both sizes
use the tiny checkpoint's tokenizer (built by higgs_lora.tiny if missing): its special tokens sit at the Llama-3
offsets of a ~1k vocabulary, valid ids in the full one, and the full config takes the same ids.

- ours: micro-batches packed under a token budget (`pack_micro_batches`), logits only at labelled positions
  (`micro_batch_loss_sums`), loss normalised by the labelled positions, torch AdamW (fused on CUDA). A plain
  PyTorch loop on one device, not DeepSpeed (absent on the GPU machine): it measures the model and data path, not
  DeepSpeed's own costs (ZeRO collectives, its optimizer wrapper).
- baseline: as the public Higgs fine-tuning scripts do it: `transformers.Trainer`, fixed samples per batch padded
  to the longest, random order, the model's own loss over full logits (`audio_labels`), optionally the codec run
  in the collator on random audio of each clip's length (`--baseline-codec`, tiny codec on CPU: cheaper than the
  real codec, so it understates the baseline's data-loading cost).

One optimizer step is one micro-batch in both. After `--warmup` steps, each step is timed end to end (data
included) with synchronised clocks; the table gives the median seconds per step, and rates (totals over the timed
steps / their summed time) of real and padded positions, target audio seconds, and MFU: model FLOPs of the real
positions (higgs_lora.train.flops; the audio head counted at labelled positions only, for both) over the measured bf16
peak, n/a where none is known. Compare pipelines by target audio seconds per second: their steps hold different
amounts of work. Peak memory: CUDA allocator peaks per pipeline; on CPU the process max RSS, which cannot be reset,
so the second pipeline's figure includes the first's.

`--layers N` keeps the released width (hidden, intermediate, heads, vocabulary, the real audio head) with N decoder
layers: on a CPU, 1-2 layers give the released mix of work per position in a step a CPU can run. Ours also reports
where a step's time goes (medians over the timed steps): data (packing, collation, the copy to the device),
forward (to the loss), backward, optimiser (step and zeroing), logging (reading the loss back, as the training
loop's log lines do).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from higgs_lora.constants import FRAMES_PER_SECOND, HOP_SAMPLES

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL_DIMS = {
    "hidden_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 8192,
    "vocab_size": 128256,
}
DEFAULTS = {
    "tiny": {"micro_batch_tokens": 1024, "baseline_batch_size": 2},
    "full": {"micro_batch_tokens": 16384, "baseline_batch_size": 4},
}


PHASES = ("data", "forward", "backward", "optimiser", "logging")
"""Where one step of ours spends its time."""


@dataclass
class Item:
    """One synthetic zero-shot sample: texts, (8, T) codes, and its size once rendered."""

    reference_text: str
    reference_codes: torch.Tensor
    target_text: str
    target_codes: torch.Tensor
    num_positions: int
    num_loss_positions: int


@dataclass
class Setup:
    """What both pipelines share."""

    args: argparse.Namespace
    tiny_dir: Path
    processor: object
    items: list[Item]
    counter: object  # higgs_lora.train.flops.FlopCounter of the model's config
    device: torch.device
    dtype: torch.dtype


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--layers", type=int, help="--size full with this many decoder layers (CPU: 1-2)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per pipeline")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    parser.add_argument("--micro-batch-tokens", type=int, help="our token budget (default 1024 tiny, 16384 full)")
    parser.add_argument("--baseline-batch-size", type=int, help="baseline samples per step (default 2 tiny, 4 full)")
    parser.add_argument("--num-samples", type=int, default=64, help="synthetic corpus size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--baseline-codec", action="store_true", help="run the tiny codec in the baseline's collator")
    parser.add_argument("--dry-run", action="store_true", help="build the model on meta, print its size, exit")
    args = parser.parse_args()
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.warmup = max(args.warmup, 1)  # a step's time is the gap since the previous step ended
    return args


def synthetic_corpus(processor, num_samples: int, seed: int) -> list[Item]:
    """Random codes and transcripts with realistic lengths (reference 3-10 s, target 2-15 s, 20-120 tokens)."""
    from higgs_lora.data.collate import build_example
    from higgs_lora.tiny import DEFAULT_TRANSCRIPTS, ENGLISH_LINES, read_transcripts

    words = " ".join(read_transcripts(DEFAULT_TRANSCRIPTS) + list(ENGLISH_LINES)).split()
    rng = random.Random(f"corpus/{seed}")
    generator = torch.Generator().manual_seed(seed)

    def text(num_tokens: int) -> str:
        picked = []
        while len(processor.tokenizer(" ".join(picked), add_special_tokens=False)["input_ids"]) < num_tokens:
            picked.append(rng.choice(words))
        return " ".join(picked)

    def codes(low_s: float, high_s: float) -> torch.Tensor:
        frames = round(rng.uniform(low_s, high_s) * FRAMES_PER_SECOND)
        return torch.randint(0, 1024, (8, frames), generator=generator)

    items = []
    for _ in range(num_samples):
        parts = (text(rng.randint(20, 120)), codes(3, 10), text(rng.randint(20, 120)), codes(2, 15))
        example = build_example(processor, *parts)
        loss_positions = int((example.loss_labels != -100).any(-1).sum())
        items.append(Item(*parts, example.num_positions, loss_positions))
    return items


def model_config(args, tiny_dir: Path, processor):
    """The tiny checkpoint's config, with the released dimensions for --size full (same rope, ids, codebooks)."""
    from transformers import HiggsAudioV2Config

    values = json.loads((tiny_dir / "config.json").read_text(encoding="utf-8"))
    if args.size == "full":
        values.update(FULL_DIMS)
        if getattr(args, "layers", None):
            values["num_hidden_layers"] = args.layers
        ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in processor.tokenizer.all_special_tokens]
        assert max(ids) < FULL_DIMS["vocab_size"], "tiny special-token ids must be valid rows of the full vocab"
    return HiggsAudioV2Config.from_dict(values)


def build_on_meta(config, dtype: torch.dtype):
    """The model (text head included, as released) on the meta device: no memory, no initialisation."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    finally:
        torch.set_default_dtype(previous)


def random_model(config, dtype: torch.dtype, device, seed: int = 0):
    """The model of `config` on `device` with random weights, frozen: built on meta, materialised, then transformers'
    initialiser (linear and embedding N(0, 0.02), norms 1, rotary tables and codebook offsets recomputed). On a GPU
    the 5.8B initialisations take seconds; on a CPU, minutes."""
    model = build_on_meta(config, dtype)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.initialize_weights()
    return model.requires_grad_(False)


def lora_model(setup: Setup):
    """A fresh frozen base on the device with PEFT LoRA (project defaults) and checkpointing as asked.

    The base is the tiny checkpoint, or the full-size model with random weights (`random_model`)."""
    from higgs_lora.config import LoraConfig, ModelConfig
    from higgs_lora.model.loading import load_base_model
    from higgs_lora.model.lora import apply_lora

    args, device, dtype = setup.args, setup.device, setup.dtype
    if args.size == "tiny":
        name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        model = load_base_model(ModelConfig(path=str(setup.tiny_dir), dtype=name), device=device)
    else:
        model = random_model(model_config(args, setup.tiny_dir, setup.processor), dtype, device, args.seed)
    return apply_lora(model, LoraConfig(), ModelConfig(gradient_checkpointing=args.gradient_checkpointing))


def clock(device: torch.device) -> float:
    """Seconds (perf_counter), after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def collate_items(processor, items: list[Item]) -> dict:
    """Build the examples of `items` and collate them (right padding)."""
    from higgs_lora.data.collate import build_example, collate

    examples = [
        build_example(processor, i.reference_text, i.reference_codes, i.target_text, i.target_codes) for i in items
    ]
    return collate(examples, processor.tokenizer.pad_token_id, processor.audio_stream_eos_id)


def batch_work(batch: dict, items: list[Item], counter) -> dict:
    """Work in a collated batch: real and padded positions, target frames, model FLOPs of the real positions."""
    real = batch["attention_mask"].sum(1)
    loss_positions = sum(i.num_loss_positions for i in items)
    return {
        "real": int(real.sum()),
        "padded": batch["input_ids"].numel(),
        "target_frames": sum(i.target_codes.shape[1] for i in items),
        "flops": counter.step_flops(int(real.sum()), loss_positions, int((real**2).sum())),
    }


def run_ours(model, setup: Setup) -> tuple[list[float], list[dict]]:
    """Our loop; returns per-step seconds and work for every step (warm-up included)."""
    from higgs_lora.config import TrainConfig
    from higgs_lora.data.sampler import Pair, pack_micro_batches
    from higgs_lora.train.loss import label_counts, micro_batch_loss_sums, normalised_loss, to_device

    args, device, items, processor = setup.args, setup.device, setup.items, setup.processor
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=TrainConfig().lr, weight_decay=0.0, fused=device.type == "cuda")
    samples = [Pair(i, i, item.num_positions) for i, item in enumerate(items)]
    rng = random.Random(f"ours/{args.seed}")
    queue: list = []
    model.train()
    stamps, works = [clock(device)], []
    for _ in range(args.warmup + args.steps):
        if not queue:  # a new epoch: re-pack the corpus
            queue = pack_micro_batches(samples, args.micro_batch_tokens, rng)
        chosen = [items[s.target] for s in queue.pop()]
        batch = collate_items(processor, chosen)
        work = batch_work(batch, chosen, setup.counter)
        audio, text = label_counts(batch)
        batch = to_device(batch, device)
        phases = [clock(device)]
        loss = normalised_loss(micro_batch_loss_sums(model, batch), audio, text, 0.0)
        phases.append(clock(device))
        loss.backward()
        phases.append(clock(device))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phases.append(clock(device))
        float(loss.detach())  # what a log line costs: the loss read back
        phases.append(clock(device))
        stamps.append(clock(device))
        work["phases"] = dict(zip(PHASES, [phases[0] - stamps[-2]] + [b - a for a, b in zip(phases, phases[1:])]))
        works.append(work)
    return [b - a for a, b in zip(stamps, stamps[1:])], works


def run_baseline(model, setup: Setup) -> tuple[list[float], list[dict]]:
    """transformers.Trainer on the same model; returns per-step seconds and work for every step."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from higgs_lora.config import TrainConfig
    from higgs_lora.data.collate import MODEL_INPUTS

    args, device, processor = setup.args, setup.device, setup.processor
    codec = processor.audio_tokenizer if args.baseline_codec else None
    noise = torch.Generator().manual_seed(args.seed)
    works: list[dict] = []

    def collator(chosen: list[Item]) -> dict:
        if codec is not None:  # encode each clip as a loader that reads audio would; the codes are not used
            with torch.no_grad():
                for item in chosen:
                    for codes in (item.reference_codes, item.target_codes):
                        codec.encode(torch.randn(1, 1, codes.shape[1] * HOP_SAMPLES, generator=noise) * 0.1)
        batch = collate_items(processor, chosen)
        works.append(batch_work(batch, chosen, setup.counter))  # collation order is consumption order
        return {key: batch[key] for key in (*MODEL_INPUTS, "audio_labels")}

    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *unused, **kwargs):
            stamps.append(clock(device))

        on_step_end = on_train_begin  # a step's time runs from the previous step's end: its data loading included

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            max_steps=args.warmup + args.steps,
            seed=args.seed,
            per_device_train_batch_size=args.baseline_batch_size,
            learning_rate=TrainConfig().lr,
            lr_scheduler_type="constant",
            bf16=device.type == "cuda",
            use_cpu=device.type == "cpu",
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        Trainer(
            model=model, args=training_args, train_dataset=setup.items, data_collator=collator, callbacks=[StepClock()]
        ).train()
    return [b - a for a, b in zip(stamps, stamps[1:])], works[: len(stamps) - 1]


def measure(name: str, run, setup: Setup, peak: float | None) -> dict:
    """Run one pipeline on a fresh model; steady-state figures over the steps after warm-up: rates per second of
    summed step time, MFU (None without a known peak), memory in GiB (CUDA peaks from the model build on, or the
    process max RSS on CPU)."""
    device, warmup = setup.device, setup.args.warmup
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    print(f"[{name}] {warmup} warm-up + {setup.args.steps} timed steps", flush=True)
    seconds, works = run(lora_model(setup), setup)
    if device.type == "cuda":
        memory = {
            "allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    else:
        memory = {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    seconds, works = seconds[warmup:], works[warmup:]
    total = sum(seconds)
    sums = {key: sum(w[key] for w in works) for key in works[0] if key != "phases"}
    breakdown = (
        {phase: statistics.median(w["phases"][phase] for w in works) for phase in PHASES}
        if "phases" in works[0]
        else None
    )
    return {
        "step_breakdown_s": breakdown,
        "timed_steps": len(seconds),
        "median_step_s": statistics.median(seconds),
        "min_step_s": min(seconds),
        "real_positions_per_s": sums["real"] / total,
        "padded_positions_per_s": sums["padded"] / total,
        "padding_fraction": 1 - sums["real"] / sums["padded"],
        "target_audio_s_per_s": sums["target_frames"] / FRAMES_PER_SECOND / total,
        "mfu": sums["flops"] / total / peak if peak else None,
        "memory": memory,
    }


def report(results: dict, meta: dict, args) -> None:
    """Print the run's settings and an aligned table, ours / baseline last."""
    rows = [("pipeline", "s/step", "real pos/s", "padded pos/s", "padding", "audio s/s", "MFU", "peak memory")]
    for name, r in results.items():
        memory = r["memory"]
        rows.append(
            (
                name,
                f"{r['median_step_s']:.3f}",
                f"{r['real_positions_per_s']:,.0f}",
                f"{r['padded_positions_per_s']:,.0f}",
                f"{r['padding_fraction']:.1%}",
                f"{r['target_audio_s_per_s']:.1f}",
                "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}",
                f"{memory['allocated_gib']:.1f}/{memory['reserved_gib']:.1f} GiB alloc/reserved"
                if "allocated_gib" in memory
                else f"{memory['max_rss_gib']:.2f} GiB max RSS",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(
        f"\n{meta['date']}  {meta['device']} ({meta['torch_threads']} torch threads)  torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta['peft']}"
    )
    print(f"command: {meta['command']}")
    baseline = (
        "skipped"
        if args.skip_baseline
        else (f"{args.baseline_batch_size} samples/step, codec in loader {'on' if args.baseline_codec else 'off'}")
    )
    layers = f", {args.layers} layers" if args.layers else ""
    print(
        f"size {args.size}{layers} ({meta['dtype']}), checkpointing {args.gradient_checkpointing}, {args.num_samples} "
        f"samples; ours: {args.micro_batch_tokens} positions/micro-batch; baseline: {baseline}; "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if meta["ratio"] is not None:
        print(f"ours / baseline, target audio seconds per second: {meta['ratio']:.2f}x")
    breakdown = results["ours"]["step_breakdown_s"]
    if breakdown:
        total = sum(breakdown.values())
        print(
            "ours, median step by phase: " + ", ".join(f"{k} {v:.3f} s ({v / total:.0%})" for k, v in breakdown.items())
        )


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import transformers

    from higgs_lora.config import LoraConfig, ModelConfig
    from higgs_lora.model.loading import load_codec, load_processor
    from higgs_lora.tiny import ensure_tiny
    from higgs_lora.train.flops import FlopCounter, peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = ensure_tiny(REPO_ROOT / "build" / "tiny")
    processor = load_processor(ModelConfig(path=str(tiny.model_dir)), codec=load_codec(tiny.codec_dir))
    config = model_config(args, tiny.model_dir, processor)
    counter = FlopCounter.from_model_config(config.to_dict(), LoraConfig().target_modules, LoraConfig().r)
    items = synthetic_corpus(processor, args.num_samples, args.seed)
    positions = sum(i.num_positions for i in items)
    corpus_flops = sum(counter.step_flops(i.num_positions, i.num_loss_positions, i.num_positions**2) for i in items)
    print(
        f"corpus: {len(items)} samples, {positions / len(items):.0f} positions on average (max "
        f"{max(i.num_positions for i in items)}); model FLOPs {corpus_flops / positions / 1e9:.3f} GFLOP/position"
    )
    if args.dry_run:
        model = build_on_meta(config, dtype)
        print(
            f"{args.size} model on meta: {sum(p.numel() for p in model.parameters()):,} parameters "
            f"(text head included); {counter.path_parameters:,} frozen parameters on a position's path"
        )
        return 0
    if args.size == "full" and device.type == "cpu" and not (args.layers and args.layers <= 3):
        raise SystemExit("--size full trains only on a GPU on 28 layers: on a CPU give --layers 1-3 (or --dry-run)")
    setup = Setup(args, tiny.model_dir, processor, items, counter, device, dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    peak = peak_flops(0.0, device_name)
    results = {"ours": measure("ours", run_ours, setup, peak)}
    if not args.skip_baseline:
        results["baseline"] = measure("baseline", run_baseline, setup, peak)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "command": " ".join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "args": vars(args),
        "ratio": results["ours"]["target_audio_s_per_s"] / results["baseline"]["target_audio_s_per_s"]
        if "baseline" in results
        else None,
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n", encoding="utf-8")
    report(results, meta, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
