"""Evaluate a checkpoint on its own, without training: `python -m higgs_lora.evaluate --checkpoint runs/x`.

The same evaluation a training run does at every `train.eval_every` (`Trainer.evaluate`): the loss on the held-out
speakers of the run's cache, then the held-out clips generated, scored (speaker similarity, DNSMOS, and whatever
else training scores) and written as an inference folder, plus that folder's evaluation report. What it takes:

- an adapter folder (has `adapter_config.json`), a checkpoint (`runs/x/checkpoints/step_N`, its `adapter/`) or a
  run folder (`runs/x`: its final `adapter/`). The run config saved with the adapter says which base, cache and
  held-out speakers, so nothing else is needed; `key=value` overrides change it (`data.cache_dir=...` to evaluate on
  another cache, `train.eval_samples=16` for more clips);
- or a merged model (`--model merged/ --config X.yaml`): the config names the cache.

One process (the GPU of LOCAL_RANK 0 when there is one, else the CPU), no DeepSpeed. Writes into `--out` (default
`<run>/evaluation/step_N/`): `evaluation.json` (what was evaluated and every number), `metrics.jsonl` (the same
record training logs), `eval_samples/step_N/` (clips + `report.html`). Imports training's loop and data (torch,
transformers, PEFT); see docs/evaluation.md (Evaluating a checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

from higgs_lora import run_folder, startup
from higgs_lora.config import RunConfig, load_config
from higgs_lora.constants import RUN_CONFIG, STEP_NAME
from higgs_lora.data.cache import cache_dir_of
from higgs_lora.distributed import Topology
from higgs_lora.errors import UserError
from higgs_lora.files import atomic_write_json
from higgs_lora.logs import get_logger

log = get_logger("evaluate")
RESULT = "evaluation.json"


class EvaluationError(UserError):
    """What to evaluate cannot be found or does not fit together."""


@dataclass
class Target:
    """What is evaluated: an adapter over its base, or a merged model alone."""

    cfg: RunConfig
    adapter: Path | None
    step: int
    """Optimizer steps the adapter was trained for (0 when not known, e.g. a merged model)."""
    run: Path | None
    """The run folder the adapter came from, when there is one."""


def _step_of_adapter(adapter: Path) -> tuple[int, Path | None]:
    """(training step, run folder) of an adapter folder inside a run, else (0, None)."""
    parent = adapter.parent
    state = parent / run_folder.TRAINER_STATE
    if state.is_file():  # runs/x/checkpoints/step_N/adapter
        return int(json.loads(state.read_text(encoding="utf-8"))["step"]), parent.parent.parent
    best = adapter / "best.json"
    if best.is_file():  # runs/x/best (the best checkpoint's adapter)
        return int(json.loads(best.read_text(encoding="utf-8"))["step"]), parent
    latest = run_folder.latest_checkpoint(parent)
    if adapter.name == run_folder.ADAPTER and latest is not None:  # runs/x/adapter: a copy of the newest checkpoint's
        return run_folder.step_of(latest), parent
    return 0, None


def find_target(
    checkpoint: str | Path | None, model: str | Path | None, config: str | Path | None, overrides
) -> Target:
    """Resolve `--checkpoint` (adapter, checkpoint or run folder) or `--model` + `--config` to a Target."""
    if (checkpoint is None) == (model is None):
        raise EvaluationError("give either --checkpoint (an adapter, checkpoint or run folder) or --model + --config")
    if model is not None:
        if config is None:
            raise EvaluationError(
                "--model needs --config: the run config that names the cache and the held-out speakers"
            )
        cfg = load_config(config, overrides)
        cfg.model.path = str(model)
        return Target(cfg, None, 0, None)
    path = Path(checkpoint).expanduser()
    candidates = [path, path / run_folder.ADAPTER]
    adapter = next((p for p in candidates if (p / "adapter_config.json").is_file()), None)
    if adapter is None:
        raise EvaluationError(
            f"{path} holds no adapter: give an adapter folder (with adapter_config.json), a checkpoint "
            "(runs/x/checkpoints/step_N) or a run folder with a final adapter/"
        )
    if config is not None:
        cfg = load_config(config, overrides)
    elif (adapter / RUN_CONFIG).is_file():
        cfg = load_config(adapter / RUN_CONFIG, overrides)
    else:
        raise EvaluationError(f"{adapter} has no {RUN_CONFIG} (not written by higgs-lora): pass --config X.yaml")
    step, run = _step_of_adapter(adapter)
    return Target(cfg, adapter, step, run)


def default_out(target: Target) -> Path:
    if target.run is not None:
        return target.run / "evaluation" / STEP_NAME.format(target.step)
    if target.adapter is not None:
        return target.adapter.parent / f"{target.adapter.name}-evaluation"
    return Path(target.cfg.model.path).parent / f"{Path(target.cfg.model.path).name}-evaluation"


class _Engine:
    """The loaded model where training has its DeepSpeed engine: what `Trainer.evaluate` calls on."""

    def __init__(self, model):
        self.module = model

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.eval()  # evaluating only: the model never goes back to training mode (no dropout)


def evaluate_checkpoint(target: Target, out: Path, report: bool = True) -> dict:
    """Held-out loss and scored clips of `target`, written into `out`; returns the evaluation record."""
    import torch

    from higgs_lora.distributed import device_for
    from higgs_lora.model.loading import load_base_model, load_processor
    from higgs_lora.train.data import build_data, describe
    from higgs_lora.train.loop import Trainer

    started = time.perf_counter()
    cfg = copy.deepcopy(target.cfg)
    cfg.output_dir = str(out)
    if not cfg.train.eval_every:
        cfg.train.eval_every = 1  # a run that never evaluated still has held-out speakers to evaluate on
    cache = cache_dir_of(cfg)
    if not Path(cache).is_dir():
        raise EvaluationError(f"the cache {cache} does not exist: set data.cache_dir=DIR (or run prepare first)")
    topology = Topology(rank=0, local_rank=0, world_size=1)
    device = device_for(topology)
    plan = _evaluation_plan(target, cfg)
    processor = load_processor(cfg.model)
    data = build_data(cfg, processor, plan, cache)
    if not data.eval_batches:
        raise EvaluationError(
            f"the cache {cache} has no held-out speakers for this config: set data.eval_speakers=A,B or "
            "data.num_eval_speakers=N"
        )
    log.info(describe(data))
    model = load_base_model(cfg.model, device if device.type == "cuda" else None)
    if target.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(target.adapter), is_trainable=False)
    model.eval()
    torch.manual_seed(cfg.seed)
    from higgs_lora.plan import read_model_config

    model_config = read_model_config(cfg.model.path)
    trainer = Trainer(cfg, plan, {}, topology, model, data, model_config, engine=_Engine(model))
    trainer.step = target.step
    trainer.metrics_log.start(target.step, resumed=False)
    try:
        metrics = trainer.evaluate()
    finally:
        trainer.metrics_log.close()
    record = {
        "checkpoint": str(target.adapter.resolve()) if target.adapter else None,
        "model": str(Path(cfg.model.path).resolve()),
        "cache": str(Path(cache).resolve()),
        "held_out_speakers": data.eval_speakers,
        "step": target.step,
        "device": str(device),
        "seconds": time.perf_counter() - started,
        "metrics": metrics,
    }
    clips = out / "eval_samples" / STEP_NAME.format(target.step)
    if report and (clips / "manifest.jsonl").is_file():
        from higgs_lora.eval.cli import evaluate

        scored = evaluate(clips, dnsmos=cfg.train.eval_dnsmos, device=str(device), quiet=True)
        record["report"] = str((clips / "report.html").resolve())
        record["num_scored"] = scored.get("num_samples")
    atomic_write_json(out / RESULT, record)
    return record


def _evaluation_plan(target: Target, cfg: RunConfig):
    """One rank, one micro-batch per step, at the run's micro-batch budget when it planned one (the held-out loss is
    a sum over positions, so the batching does not change it; the budget bounds memory)."""
    from higgs_lora.plan import Plan

    tokens = cfg.train.micro_batch_tokens
    plan_file = (target.run / "plan.json") if target.run is not None else None
    if plan_file is not None and plan_file.is_file():
        tokens = int(json.loads(plan_file.read_text(encoding="utf-8"))["micro_batch_tokens"])
    return Plan(
        world_size=1,
        zero_stage=0,
        offload="none",
        micro_batch_tokens=tokens or 4096,
        accumulation=1,
        gradient_checkpointing=False,
        dtype=cfg.model.dtype,
        quantization=cfg.model.quantization,
        trainable_parameters=0,
    )


def summary_line(record: dict) -> str:
    m = record["metrics"]
    parts = [f"step {record['step']}", f"held-out loss {m['loss']:.4f}"]
    for key, label in (("similarity", "similarity"), ("dnsmos_ovrl", "DNSMOS OVRL"), ("cer", "CER")):
        if m.get(key) is not None:
            parts.append(f"{label} {m[key]:.3f}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m higgs_lora.evaluate --checkpoint",
        description="Evaluate a checkpoint without training: held-out loss on the run's held-out speakers, then the "
        "held-out clips generated, scored and written with their report (docs/evaluation.md).",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--checkpoint", help="an adapter folder, a checkpoint (runs/x/checkpoints/step_N) or a run folder"
    )
    what.add_argument("--model", help="a merged model folder (needs --config)")
    parser.add_argument("--config", help="run config (default: the one saved with the adapter)")
    parser.add_argument("--out", help="output folder (default: <run>/evaluation/step_N)")
    parser.add_argument("--no-report", action="store_true", help="skip report.html of the clips")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.cache_dir=D")
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)

    def work() -> int:
        target = find_target(args.checkpoint, args.model, args.config, args.overrides)
        out = Path(args.out) if args.out else default_out(target)
        what = target.adapter or target.cfg.model.path
        log.info(f"evaluating {what} (step {target.step}) on {cache_dir_of(target.cfg)} -> {out}")
        record = evaluate_checkpoint(target, out, report=not args.no_report)
        log.info(summary_line(record))
        log.info(f"written: {out / RESULT}" + (f", report {record['report']}" if record.get("report") else ""))
        return 0

    return startup.run_command(args, work)
