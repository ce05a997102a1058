"""One training run, as `launch/train.py` starts it on every rank: plan -> build -> train -> save.

Rank 0 plans before any model is loaded and writes the run's files; every rank then loads the data and the model,
builds the `Trainer` and trains. Imports the planner; the model loaders and DeepSpeed only once planned. See
docs/training.md.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from higgs_lora import stop
from higgs_lora.config import RunConfig, save_config
from higgs_lora.data.cache import cache_dir_of
from higgs_lora.distributed import Topology
from higgs_lora.eval.run_report import write_run_report
from higgs_lora.logs import get_logger
from higgs_lora.plan import Plan
from higgs_lora.train import trackers
from higgs_lora.train.data import build_data, describe
from higgs_lora.train.loop import Trainer

log = get_logger("train")


def run(cfg: RunConfig, ds_config_path: str) -> dict:
    """plan -> build -> train -> save, for `launch/train.py`. Returns the last logged train metrics."""
    from higgs_lora.distributed import init_distributed

    stop.catch()  # before the (long) model load: see higgs_lora/stop.py
    trackers.check_installed(cfg.train.report_to)  # a tracker that is not installed fails now, not after loading
    topology = init_distributed()
    cfg, plan, ds_config, model_config = plan_run(cfg, ds_config_path, topology)
    from higgs_lora.model.lora import check_targets_early

    check_targets_early(cfg.model, cfg.lora)  # every rank, the same answer: a typo is exit 2 before the weights load
    if topology.is_main:
        write_run_files(cfg, plan, ds_config)
    trainer = build_trainer(cfg, plan, ds_config, model_config, topology)
    metrics = trainer.train()
    if not trainer.stopped:  # a stopped run is resumed later; its adapter comes at its real end
        trainer.export_final()
    if topology.is_main:
        report = write_run_report(cfg.output_dir)
        log.info(f"run report: {report.resolve().as_uri()}")
    return metrics


def plan_run(cfg: RunConfig, ds_config_path: str, topology: Topology) -> tuple[RunConfig, Plan, dict, dict]:
    """(config with the planned checkpointing, plan, resolved DeepSpeed config, model config.json), before any model
    is loaded.

    Rank 0 plans and the others take its plan: GPUs that differ between nodes (or a GPU shared with another job)
    must not give ranks different micro-batches, which would hang the collectives. A plan error is raised on every
    rank.
    """
    from higgs_lora.data.schedule import check_one_step
    from higgs_lora.distributed import broadcast_object
    from higgs_lora.errors import UserError
    from higgs_lora.plan import (
        PROMPT_OVERHEAD_TOKENS,
        PlanError,
        cache_sequence_stats,
        detect_hardware,
        load_ds_config,
        make_plan,
        read_model_config,
        resolve_ds_config,
    )

    outcome: tuple = (None, None)
    if topology.is_main:
        try:
            ds_config = load_ds_config(ds_config_path)
            model_config = read_model_config(cfg.model.path)  # an unconverted checkpoint: the convert command
            hardware = detect_hardware(cfg, world_size=topology.world_size)
            plan = make_plan(cfg, ds_config, hardware, model_config, cache_sequence_stats(cfg, cache_dir_of(cfg)))
            # A corpus too small for one optimizer step is found here, before any model is loaded.
            check_one_step(
                cfg,
                cache_dir_of(cfg),
                plan.micro_batch_tokens,
                plan.world_size,
                plan.accumulation,
                PROMPT_OVERHEAD_TOKENS,
            )
            planned = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=plan.gradient_checkpointing)
            )
            outcome = ((planned, plan, resolve_ds_config(ds_config, planned, plan, model_config), model_config), None)
        except UserError as err:  # every rank raises it (the others would wait for a plan forever)
            outcome = (None, str(err))
    result, error = broadcast_object(outcome)
    if error is not None:
        raise PlanError(error)
    return result


def write_run_files(cfg: RunConfig, plan: Plan, ds_config: dict) -> None:
    """Rank 0: log the resolved config and the plan, and write them (config.yaml, ds_config.json, plan.json)."""
    from higgs_lora.files import atomic_write_json

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    # The whole resolved config is in the run folder (python -m higgs_lora.config prints one); the log says what
    # matters at a glance.
    log.info(f"config: {out / 'config.yaml'} (resolved); {config_summary(cfg)}")
    log.info(f"plan:\n{plan.describe()}")
    atomic_write_json(out / "ds_config.json", ds_config)
    atomic_write_json(out / "plan.json", plan.to_dict())


def config_summary(cfg: RunConfig) -> str:
    """One line of what the run is: model, adapter, data, optimisation (the schedule in epochs comes once the data is
    read)."""
    m, lora, t = cfg.model, cfg.lora, cfg.train
    quant = f", {m.quantization}" if m.quantization != "none" else ""
    length = f"max_steps {t.max_steps}" if t.max_steps else f"epochs {t.epochs}"
    return (
        f"model {m.path} ({m.dtype}{quant}); LoRA r={lora.r} alpha={lora.alpha} on {','.join(lora.target_modules)}; "
        f"corpus {cfg.data.corpus}; lr {t.lr:g}, warmup {t.warmup_steps}, {length}"
    )


def build_trainer(cfg: RunConfig, plan: Plan, ds_config: dict, model_config: dict, topology: Topology) -> Trainer:
    """Every rank: the processor, the data, the base model with fresh LoRA weights (the same on every rank) and the
    DeepSpeed engine around it."""
    import torch

    from higgs_lora.distributed import device_for
    from higgs_lora.model.loading import load_base_model, load_processor
    from higgs_lora.model.lora import apply_lora

    device = device_for(topology)
    if topology.is_main:
        log.info("loading the processor, the codec-token cache and the base model")
    processor = load_processor(cfg.model)
    data = build_data(cfg, processor, plan, cache_dir_of(cfg))
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every rank
    # Straight onto the GPU (ZeRO-3 partitions it at initialize) unless parameters are offloaded to host memory:
    # loading on the CPU would hold a full bf16 copy per rank in host RAM (11.5 GB each).
    on_gpu = device.type == "cuda" and plan.offload != "optimizer+params"
    model = apply_lora(load_base_model(cfg.model, device if on_gpu else None), cfg.lora, cfg.model)
    torch.manual_seed(cfg.seed + topology.rank)  # ranks draw different dropout masks
    if topology.is_main:  # the next half minute or more is DeepSpeed's: process group, ops, optimizer, buckets
        log.info(
            f"starting the DeepSpeed engine (ZeRO-{plan.zero_stage} over {plan.world_size} ranks): optimizer and "
            "gradient buckets; this can take a minute"
        )
    trainer = Trainer(cfg, plan, ds_config, topology, model, data, model_config)
    trainer.say(describe(data))
    return trainer
