"""Time one LoRA forward + backward pass of the demo batch (tiny model on CPU, or any model on a GPU).

    python bench/foundation_step.py --config configs/demo.yaml --repeats 20
    python bench/foundation_step.py --config configs/arabic_lora.yaml --repeats 20 model.path=... (GPU)

Prints load time, the median / min step time over `--repeats` steps after `--warmup` steps, positions per
second (padding included), and peak memory (CUDA allocator peak on GPU, process max RSS on CPU). Results go to
docs/benchmarks.md with the command, date, machine and versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys

from higgs_lora.config import add_config_arguments, config_from_args
from higgs_lora.demo import build_model_and_batch, forward_backward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2, help="zero-shot pairs in the batch")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, batch, load_seconds = build_model_and_batch(cfg, args.pairs)
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    times = []
    for step in range(args.warmup + args.repeats):
        model.zero_grad(set_to_none=True)
        _, _, seconds = forward_backward(model, batch)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(seconds)
    positions = batch["input_ids"].numel()
    median = statistics.median(times)
    if device == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA allocator peak)"
        machine = torch.cuda.get_device_name()
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"machine: {machine}; python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"model: {cfg.model.path} ({cfg.model.dtype}, quantization={cfg.model.quantization}, "
          f"checkpointing={cfg.model.gradient_checkpointing}); LoRA r={cfg.lora.r}")
    print(f"batch: {list(batch['input_ids'].shape)} positions ({positions} incl. padding)")
    print(f"load: {load_seconds:.2f} s")
    print(f"forward+backward: median {median * 1000:.1f} ms, min {min(times) * 1000:.1f} ms over {len(times)} steps")
    print(f"throughput: {positions / median:,.0f} positions/s")
    print(f"peak memory: {peak}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
