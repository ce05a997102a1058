"""`higgs-lora plan` (also `python -m higgs_lora.plan`): the plan for a config on given or detected hardware, printed
without loading a model (a dry run of what training plans).

The printed plan (and, with --show-ds, the resolved DeepSpeed config) is the command's output. Imports config and
the plan modules; data's cache reader and torch (to detect GPUs) only when it runs. See docs/planning.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from higgs_lora import startup
from higgs_lora.config import add_config_arguments, config_from_args
from higgs_lora.plan.choice import make_plan
from higgs_lora.plan.ds_config import load_ds_config, resolve_ds_config
from higgs_lora.plan.hardware import detect_hardware, parse_memory
from higgs_lora.plan.inputs import (
    cache_sequence_stats,
    read_model_config,
    sequence_stats,
)
from higgs_lora.plan.memory import GIB


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="higgs-lora plan",
        description="Plan a run (ZeRO stage, offload, checkpointing, micro-batch, accumulation) and print the "
        "predicted memory per GPU, without loading a model. Hardware: as given, else detected.",
        epilog="example: higgs-lora plan --config configs/arabic_lora.yaml --model released "
        "--gpus 8 --gpu-mem 24GiB --nodes 2",
    )
    parser.add_argument("--ds", default="auto", help="DeepSpeed JSON to plan around, or 'auto' (default)")
    parser.add_argument("--gpus", type=int, help="GPUs per node (default: detected)")
    parser.add_argument("--gpu-mem", help="memory per GPU, e.g. 24GiB, 80GB (default: detected)")
    parser.add_argument("--nodes", type=int, help="nodes (default: detected, else 1)")
    parser.add_argument(
        "--model",
        help="checkpoint directory whose config.json gives the sizes, or 'released' for "
        "the released model's (default: model.path)",
    )
    parser.add_argument("--json", help="also write the plan and the resolved DeepSpeed config to this file")
    parser.add_argument("--show-ds", action="store_true", help="print the resolved DeepSpeed config")
    add_config_arguments(parser)
    startup.add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the plan; a config or plan problem is `error: ...` and exit code 2."""
    args = build_parser().parse_args(argv)
    return startup.run_command(args, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    for flag, key in ((args.gpus, "plan.gpus_per_node"), (args.nodes, "plan.nodes")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.gpu_mem:
        overrides.append(f"plan.gpu_memory_gib={parse_memory(args.gpu_mem) / GIB}")
    args.overrides = overrides
    cfg = config_from_args(args)
    model_config = read_model_config(args.model or cfg.model.path)
    ds_config = load_ds_config(args.ds)
    from higgs_lora.data.cache import cache_dir_of

    seq = cache_sequence_stats(cfg, cache_dir_of(cfg)) if cfg.data.corpus else sequence_stats(cfg)
    plan = make_plan(cfg, ds_config, detect_hardware(cfg), model_config, seq)
    if cfg.data.corpus and str(args.model or cfg.model.path) != "released":
        from higgs_lora.data.schedule import check_one_step
        from higgs_lora.plan.inputs import PROMPT_OVERHEAD_TOKENS

        # With a prepared cache: does it give one optimizer step at this plan? (exit 2 with the knob if not)
        check_one_step(
            cfg, cache_dir_of(cfg), plan.micro_batch_tokens, plan.world_size, plan.accumulation, PROMPT_OVERHEAD_TOKENS
        )
    planned = replace(cfg, model=replace(cfg.model, gradient_checkpointing=plan.gradient_checkpointing))
    resolved = resolve_ds_config(ds_config, planned, plan, model_config)
    print(plan.describe())
    if args.show_ds:
        print("\nresolved DeepSpeed config:\n" + json.dumps(resolved, indent=2))
    if args.json:
        from higgs_lora.files import atomic_write_json

        atomic_write_json(Path(args.json), {"plan": plan.to_dict(), "ds_config": resolved})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
