"""The training loop: optimizer steps of a LoRA/QLoRA Higgs Audio v2 model inside a DeepSpeed ZeRO-2/3 engine.

`Trainer.train` runs the steps, with evaluations, checkpoints, resume and stop signals; `StepTotals` is what one
step adds up over its micro-batches and ranks. `higgs_lora.train.run` builds the Trainer. Imports torch and the
other train/ modules. What a step does and how resume works: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

from higgs_lora import run_folder, stop
from higgs_lora.config import RunConfig
from higgs_lora.constants import FRAMES_PER_SECOND
from higgs_lora.data.sampler import DataError, Pair, SamplerState, eval_assignment
from higgs_lora.distributed import Topology, all_reduce_sum, device_for
from higgs_lora.logs import get_logger, is_quiet
from higgs_lora.plan import Plan
from higgs_lora.train import checkpoint
from higgs_lora.train.data import TrainData
from higgs_lora.train.flops import FlopCounter, peak_flops
from higgs_lora.train.loss import label_counts, micro_batch_loss_sums, normalised_loss, to_device
from higgs_lora.train.metrics_log import MetricsLog, RateWindow, float_or_none, format_train_line, lines_above
from higgs_lora.train.optim import build_engine
from higgs_lora.train.step_totals import StepTotals

log = get_logger("train")
eval_log = get_logger("eval")


def schedule_line(cfg: RunConfig, total_steps: int, steps_per_epoch: int) -> str:
    """How long the run is, in steps and in epochs over this corpus (train.epochs counts only when max_steps is 0)."""
    source = f"train.max_steps={cfg.train.max_steps}" if cfg.train.max_steps else f"train.epochs={cfg.train.epochs}"
    return (
        f"schedule: {total_steps} optimizer steps ({source}) = {total_steps / steps_per_epoch:.1f} epochs of "
        f"{steps_per_epoch} steps; warmup {cfg.train.warmup_steps} steps"
    )


def side_by_side(step: int, metrics: dict, language: str, replay_language: str) -> str:
    """One line with the main and the replay held-out scores next to each other (those both have)."""
    parts = [f"step {step} | main ({language}) / replay ({replay_language}):"]
    for key, label, digits in (("loss", "loss", 4), ("similarity", "similarity", 3), ("cer", "CER", 3)):
        if metrics.get(key) is not None and metrics.get(f"replay_{key}") is not None:
            parts.append(f"{label} {metrics[key]:.{digits}f} / {metrics[f'replay_{key}']:.{digits}f}")
    return " ".join(parts[:1]) + " " + " | ".join(parts[1:])


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss."""


class Trainer:
    """Owns the engine, the data and the loop; `higgs_lora.train.run` builds one and calls `train()`."""

    def __init__(
        self,
        cfg: RunConfig,
        plan: Plan,
        ds_config: dict,
        topology: Topology,
        model,
        data: TrainData,
        model_config: dict,
        engine=None,
    ):
        """`engine`: one to use instead of building the DeepSpeed engine and optimizer; given only to evaluate a
        checkpoint without training (`higgs_lora.train.evaluate_checkpoint`), where `train()` is never called."""
        self.cfg, self.plan, self.topology, self.data = cfg, plan, topology, data
        self.ds_config = ds_config
        self.device = device_for(topology)
        self.steps_per_epoch = len(data.sampler.plan(0).steps)
        # Planning checks this with estimated text lengths; here they are exact (no check when only evaluating).
        if self.steps_per_epoch == 0 and engine is None:
            from dataclasses import replace

            from higgs_lora.data.schedule import one_step_problem

            micro_batches = len(replace(data.sampler, world_size=1, accumulation=1).plan(0).steps)
            problem = one_step_problem(
                micro_batches,
                plan.world_size,
                plan.accumulation,
                plan.micro_batch_tokens,
                cfg.train.global_batch_tokens,
            )
            raise DataError(problem or "the corpus gives no optimizer step: add data")
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        if topology.is_main:
            log.info(schedule_line(cfg, self.total_steps, self.steps_per_epoch))
            if cfg.train.warmup_steps > self.total_steps:
                log.warning(
                    f"train.warmup_steps={cfg.train.warmup_steps} is more than the {self.total_steps} steps of the "
                    "run: the learning rate never reaches train.lr; lower train.warmup_steps"
                )
        self.engine, self.optimizer = (
            (engine, None) if engine else build_engine(model, cfg, ds_config, self.total_steps)
        )
        self.flops = FlopCounter.from_model_config(model_config, cfg.lora.target_modules, cfg.lora.r)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak = peak_flops(cfg.train.peak_tflops, name)
        self.step = 0
        self.state = SamplerState(
            world_size=plan.world_size, accumulation=plan.accumulation, micro_batch_tokens=plan.micro_batch_tokens
        )
        self.epoch_plan = None
        self.nonfinite_in_a_row = 0
        self.last_saved = -1
        self.stopped = False
        """Set when a stop signal ended `train()` early (after a checkpoint)."""
        self.output = Path(cfg.output_dir)
        self.metrics_log = MetricsLog(
            self.output, cfg.train.report_to, enabled=topology.is_main, config=dataclasses.asdict(cfg)
        )
        self.window = RateWindow()
        self.eval_enabled = bool(cfg.train.eval_every and data.eval_batches)
        self.probe = self._build_probe()
        self.replay_probe = self._build_probe(replay=True) if data.replay_eval_batches else None
        self.best_scores: dict | None = None
        """The scores of the best evaluation so far (rank 0; `higgs_lora.train.best`), None before the first."""
        self.best_step: int | None = None

    def _build_probe(self, replay: bool = False):
        """The held-out clips generated and scored at each evaluation (None when train.eval_samples is 0 or there
        are no held-out speakers); `replay`: those of the replay corpus's held-out speakers."""
        from higgs_lora.eval.probe import FOLDER, GenerationProbe, ProbeSettings, choose_pairs

        train = self.cfg.train
        batches = self.data.replay_eval_batches if replay else self.data.eval_batches
        samples = [s for micro_batch in batches or [] for s in micro_batch]
        if not (train.eval_every and train.eval_samples and samples):
            return None
        utterances = self.data.utterances
        pairs = choose_pairs(
            samples,
            [u.speaker for u in utterances],
            [u.num_frames for u in utterances],
            train.eval_samples,
            round(train.eval_sample_seconds * FRAMES_PER_SECOND),
        )
        settings = ProbeSettings(
            count=train.eval_samples,
            max_seconds=train.eval_sample_seconds,
            dnsmos=train.eval_dnsmos,
            seed=self.cfg.seed,
            asr=train.eval_asr,
            language=self.cfg.data.replay_language if replay else self.cfg.data.language,
        )
        probe = GenerationProbe(
            pairs,
            self.data,
            settings,
            self.output,
            self.topology.rank,
            self.topology.world_size,
            folder=f"{FOLDER}_replay" if replay else FOLDER,
        )
        self._load_asr(probe)
        return probe

    def _load_asr(self, probe) -> None:
        """Rank 0 loads train.eval_asr before the first step: an unusable directory stops every rank now, not at the
        first evaluation."""
        from higgs_lora.distributed import raise_if_any_failed
        from higgs_lora.errors import UserError

        error = None
        if self.topology.is_main and self.cfg.train.eval_asr:
            try:
                probe.load_asr()
                self.say(f"train.eval_asr: {self.cfg.train.eval_asr} transcribes the evaluation clips", eval_log)
            except UserError as err:
                error = err
        raise_if_any_failed(error, "loading train.eval_asr")

    def say(self, message: str, stage_log=log) -> None:
        """A `[train]` (or `stage_log`'s) line, from rank 0 only: the other ranks would repeat it."""
        if self.topology.is_main:
            stage_log.info(message)

    # ----------------------------------------------------------------------------------------- resume

    def resume(self) -> bool:
        """Load the checkpoint `train.resume` names, if any; returns whether it did."""
        path = self._checkpoint_to_resume()
        if path is None:
            self.say("starting from scratch (no checkpoint to resume)")
            return False
        state = checkpoint.load_checkpoint(self.engine, path, self.topology.rank)
        self.step = state["step"]
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        saved = SamplerState.from_dict(state["sampler"])
        saved_total = state.get("total_steps")
        if saved_total is not None and saved_total != self.total_steps:
            from higgs_lora.train.optim import warmup_cosine

            schedule = (warmup_cosine(self.cfg.train.warmup_steps, t) for t in (saved_total, self.total_steps))
            before, after = (self.cfg.train.lr * f(self.step) for f in schedule)
            self.say(
                f"warning: the checkpoint's run was {saved_total} steps, this one is {self.total_steps} "
                f"(train.max_steps changed): the learning-rate schedule is recomputed for {self.total_steps} steps, "
                f"so at step {self.step} the rate goes from {before:.2e} to {after:.2e}"
            )
        if (saved.accumulation, saved.micro_batch_tokens) != (self.state.accumulation, self.state.micro_batch_tokens):
            # On stdout with the other lines, as always (a log.warning would go to stderr).
            self.say(
                f"warning: the checkpoint was written with {saved.accumulation} accumulation x "
                f"{saved.micro_batch_tokens} tokens; this run's epoch schedule differs, so the epoch continues "
                "from the same step index of a different order"
            )
        self.state.epoch, self.state.step = saved.epoch, saved.step
        self.say(f"resumed from {path} at step {self.step} (epoch {saved.epoch}, step {saved.step} of it)")
        return True

    def _checkpoint_to_resume(self) -> Path | None:
        """The checkpoint to resume, the same on every rank.

        Rank 0 decides (ranks reading a lagging shared filesystem could disagree), and the compatibility checks run
        before DeepSpeed touches its partitioned state.
        """
        from higgs_lora.distributed import broadcast_object, raise_if_any_failed

        decision, error = None, None
        if self.topology.is_main:
            try:
                path = checkpoint.resolve_resume(self.cfg)
                if path is not None:
                    checkpoint.check_compatible(path, self.cfg, self.plan.world_size)
                decision = str(path) if path is not None else None
            except checkpoint.ResumeError as err:
                error = err
        raise_if_any_failed(error, "choosing the checkpoint to resume")
        decision = broadcast_object(decision)
        return Path(decision) if decision is not None else None

    def save(self) -> Path:
        trainer_state = {
            "step": self.step,
            "sampler": self.state.to_dict(),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "total_steps": self.total_steps,  # a resume with another train.max_steps warns that the schedule moves
            "time": time.time(),
        }
        path = checkpoint.save_checkpoint(
            self.engine,
            self.cfg,
            self.step,
            trainer_state,
            self.topology.rank,
            self.cfg.train.keep_last,
            run_files={"ds_config.json": self.ds_config, "plan.json": self.plan.to_dict()},
            keep_step=self.best_step,
        )
        self.say(f"checkpoint {path}")
        self.last_saved = self.step
        return path

    # ----------------------------------------------------------------------------------------- the loop

    def train(self) -> dict:
        """Run to train.max_steps (or train.epochs), checkpointing on the way and at the end; returns the last
        logged metrics. A stop signal on any rank ends it early, after a checkpoint, with `stopped` set."""
        from tqdm import tqdm

        stop.catch()
        resumed = self.resume()
        self.metrics_log.start(self.step, resumed)
        self._restore_best(resumed)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.topology.is_main and sys.stderr.isatty()) or is_quiet(),
        )
        with bar, lines_above(bar):
            last = self._run_steps(resumed, bar)
        self.metrics_log.close()
        return last

    def _run_steps(self, resumed: bool, bar) -> dict:
        last: dict = {}
        self.epoch_plan = self.data.sampler.plan(self.state.epoch)
        self.engine.train()
        self.last_saved = self.step if resumed else -1
        if self.eval_enabled and self.step == 0:
            self.evaluate()  # the untrained baseline the later evaluations compare with
        self.window = RateWindow()
        while self.step < self.total_steps:
            micro_batches = self._next_micro_batches()
            batches = [self.data.collate(mb) for mb in micro_batches]
            audio_total, text_total, stopping = self._step_positions(batches)
            if stopping:
                self._stop()
                return last
            metrics = self._step(batches, micro_batches, audio_total, text_total)
            self.step += 1
            self.state.step += 1
            bar.update(1)
            if metrics is not None:
                last = metrics
            self._evaluate_and_save_when_due()
        if self.last_saved != self.step:
            self.save()
        return last

    def _next_micro_batches(self) -> list[list[Pair]]:
        """This rank's micro-batches of the next optimizer step (the next epoch starts when this one is done)."""
        if self.state.step >= len(self.epoch_plan.steps):
            self.state.epoch, self.state.step = self.state.epoch + 1, 0
            self.epoch_plan = self.data.sampler.plan(self.state.epoch)
            self.say(
                f"epoch {self.state.epoch}: {len(self.epoch_plan.steps)} steps, "
                f"{self.epoch_plan.num_samples} samples, padding {self.epoch_plan.padding_fraction:.1%}"
            )
            if not self.epoch_plan.steps:
                raise DataError(
                    f"epoch {self.state.epoch} has no full optimizer step: the corpus is too small "
                    "for this many ranks x accumulation; add data or use fewer ranks"
                )
        return self.epoch_plan.rank_micro_batches(self.state.step, self.topology.rank, self.plan.accumulation)

    def _step_positions(self, batches: list[dict]) -> tuple[int, int, bool]:
        """(labelled audio positions, labelled text positions) of the whole step over all ranks, and whether any
        rank received a stop signal: one all-reduce before the first forward."""
        counts = [label_counts(b) for b in batches]
        audio, text, stopping = all_reduce_sum(
            [sum(a for a, _ in counts), sum(t for _, t in counts), float(stop.received() is not None)], self.device
        )
        return int(audio), int(text), bool(stopping)

    def _stop(self) -> None:
        self.say(f"stop signal received: checkpointing at step {self.step} and exiting")
        if self.last_saved != self.step:
            self.save()
        self.stopped = True

    def _evaluate_and_save_when_due(self) -> None:
        # The last step's evaluation comes before its checkpoint, as every other's: a run resumed from the final
        # checkpoint has nothing left to do but export the adapter.
        last_step = self.step == self.total_steps
        if self.eval_enabled and (self.step % self.cfg.train.eval_every == 0 or last_step):
            self.evaluate()
            self.window.reset()  # rates measure training, not evaluation
        if self.step % self.cfg.train.save_every == 0 or last_step:
            self.save()
            self.window.reset()

    # ----------------------------------------------------------------------------------------- one step

    def _step(
        self, batches: list[dict], micro_batches: list[list[Pair]], audio_total: int, text_total: int
    ) -> dict | None:
        """Forward/backward over this rank's micro-batches and one optimizer step; the metrics on logging steps."""
        totals, skipped = self._forward_backward(batches, micro_batches, audio_total, text_total)
        self.window.add(positions=totals.positions, frames=totals.target_frames, flops=totals.flops)
        if skipped:
            self._count_nonfinite_step()
            return None
        self.nonfinite_in_a_row = 0
        step = self.step + 1
        if step % self.cfg.train.log_every and step != self.total_steps:
            return None
        return self._log_step(step, totals)

    def _forward_backward(
        self, batches: list[dict], micro_batches: list[list[Pair]], audio_total: int, text_total: int
    ) -> tuple[StepTotals, bool]:
        """(the step's totals over all ranks, whether its optimizer step was skipped for a non-finite loss).

        The loss of every micro-batch is divided by the step's labelled positions over all ranks (`audio_total`,
        `text_total`). The totals are reduced before the last backward, so that every rank's optimizer knows in
        time whether any rank's loss is not finite and skips the step.
        """
        cfg, engine = self.cfg, self.engine
        totals = StepTotals.zeros(engine.module.config.num_codebooks)
        text_loss = cfg.train.text_loss_weight > 0
        for i, (batch, samples) in enumerate(zip(batches, micro_batches)):
            sums = micro_batch_loss_sums(engine, to_device(batch, self.device), text_loss)
            totals.add_loss(sums)
            totals.add_work(*self._work_of(batch, samples))
            loss = normalised_loss(sums, audio_total, text_total, cfg.train.text_loss_weight, self.plan.world_size)
            if i == len(batches) - 1:
                totals.mark_finiteness()
                reduced = totals.reduced(self.device)
                self.optimizer.skip_next = reduced.nonfinite_ranks > 0
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
        # DeepSpeed skips a step by itself when the gradient norm is not finite (then our flag stays unused and is
        # overwritten next step): count that as a non-finite step too.
        return reduced, reduced.nonfinite_ranks > 0 or not engine.was_step_applied()

    def _work_of(self, batch: dict, samples: list[Pair]) -> tuple[float, float, float]:
        """(real positions, target audio frames, model FLOPs) of one micro-batch, for the rates."""
        real = batch["attention_mask"].sum(1)
        frames = sum(self.data.utterances[s.target].num_frames for s in samples)
        flops = self.flops.step_flops(int(real.sum()), int(batch["loss_mask"].sum()), int((real**2).sum()))
        return float(real.sum()), frames, flops

    def _count_nonfinite_step(self) -> None:
        """One more skipped step; `train.max_nonfinite_steps` in a row stop the run."""
        self.nonfinite_in_a_row += 1
        limit = self.cfg.train.max_nonfinite_steps
        # On stdout with the step lines, as always (a log.warning would go to stderr).
        self.say(
            f"warning: step {self.step + 1} has a non-finite loss on at least one rank; skipped "
            f"({self.nonfinite_in_a_row} in a row, limit train.max_nonfinite_steps={limit})"
        )
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a NaN/inf loss (last: step "
                f"{self.step + 1}). Lower train.lr, check the data (python -m higgs_lora.prepare report), "
                f"or resume from the last checkpoint in {run_folder.checkpoints_root(self.cfg.output_dir)}"
            )

    def _log_step(self, step: int, totals: StepTotals) -> dict:
        """The metrics of a logging step: recorded, printed (rank 0) and returned (every rank)."""
        metrics = {
            "step": step,
            "epoch": self.state.epoch,
            "loss": totals.loss(),
            "per_codebook_loss": totals.per_codebook_loss(),
            "lr": self.engine.get_lr()[0],
            "grad_norm": float_or_none(self.engine.get_global_grad_norm()),
        }
        if self.cfg.train.text_loss_weight > 0:
            metrics["text_loss"] = totals.text_loss()
        metrics.update(self.window.rates(self.device, self.peak, self.plan.world_size))
        self.metrics_log.record("train", metrics)
        self.say(format_train_line(metrics, self.total_steps))
        return metrics

    # ----------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss on the held-out speakers, then the generated held-out clips' similarity, DNSMOS and CER
        (`higgs_lora.eval.probe`); the same for the replay corpus's held-out speakers (`replay_*` keys) when there
        is one. All ranks take part, rank 0 logs."""
        engine = self.engine
        engine.eval()
        metrics = {"step": self.step, **self._held_out_loss(self.data.eval_batches)}
        self.say(
            f"step {self.step} | held-out speakers {','.join(self.data.eval_speakers)} | "
            f"loss {metrics['loss']:.4f} over {int(metrics['positions'])} target positions",
            eval_log,
        )
        if self.probe is not None:
            metrics.update(self.probe.run(engine.module, self.step, self.device, self.metrics_log.writer))
        if self.data.replay_eval_batches:
            replay = self._held_out_loss(self.data.replay_eval_batches)
            self.say(
                f"step {self.step} | replay held-out speakers {','.join(self.data.replay_eval_speakers or [])} | "
                f"loss {replay['loss']:.4f} over {int(replay['positions'])} target positions",
                eval_log,
            )
            if self.replay_probe is not None:
                replay.update(self.replay_probe.run(engine.module, self.step, self.device, self.metrics_log.writer))
            metrics.update({f"replay_{key}": value for key, value in replay.items()})
            self.say(side_by_side(self.step, metrics, self.cfg.data.language, self.cfg.data.replay_language), eval_log)
        engine.train()
        self.metrics_log.record("eval", metrics)
        if self.optimizer is not None:  # a checkpoint evaluated on its own (no optimizer) has no best/ to keep
            self._update_best(metrics)
        return metrics

    def _held_out_loss(self, micro_batches: list[list[Pair]]) -> dict:
        """Loss, per-codebook losses and target positions over `micro_batches`, split over the ranks."""
        engine = self.engine
        totals = StepTotals.zeros(engine.module.config.num_codebooks)
        for index, counted in eval_assignment(len(micro_batches), self.plan.world_size, self.topology.rank):
            batch = self.data.collate(micro_batches[index])
            result = micro_batch_loss_sums(engine, to_device(batch, self.device))
            if counted:
                totals.add_loss(result)
        totals = totals.reduced(self.device)
        return {
            "loss": totals.loss(),
            "per_codebook_loss": totals.per_codebook_loss(),
            "positions": totals.audio_counts.tolist()[0],
        }

    # ----------------------------------------------------------------------------------------- best adapter

    def _restore_best(self, resumed: bool) -> None:
        """Rank 0: take up best.json when resuming (if it is not from past the resumed step, which this run will
        evaluate again); a run from scratch moves an old best/ aside to best.previous_run/."""
        import json
        import shutil

        from higgs_lora.train.best import BEST, BEST_JSON

        best = self.output / BEST
        if not (self.topology.is_main and (best / BEST_JSON).is_file()):
            return
        record = json.loads((best / BEST_JSON).read_text(encoding="utf-8"))
        if resumed and record["step"] <= self.step:
            self.best_scores, self.best_step = record["scores"], record["step"]
            self.say(f"best adapter so far: step {self.best_step} ({best})")
        elif not resumed:
            old = self.output / f"{BEST}.previous_run"
            if old.exists():
                shutil.rmtree(old)
            best.rename(old)
            self.say(f"starting from scratch: the previous best/ is now {old.name}/")

    def _update_best(self, metrics: dict) -> None:
        """After an evaluation past step 0: rank 0 applies the rule; when this one wins, every rank takes part in
        exporting the adapter (gathered under ZeRO-3) to <output_dir>/best/, with best.json."""
        import shutil

        from higgs_lora.distributed import broadcast_object, raise_if_any_failed
        from higgs_lora.files import atomic_write_json, replace_directory
        from higgs_lora.train.best import BEST, BEST_JSON, best_record, is_better, scores_of

        decision = None
        if self.topology.is_main and self.step > 0 and is_better(scores_of(metrics), self.best_scores):
            decision = best_record(self.step, metrics)
        decision = broadcast_object(decision)
        if decision is None:
            return
        staging, error = self.output / f".{BEST}.partial", None
        if self.topology.is_main and staging.exists():
            shutil.rmtree(staging)
        try:
            checkpoint.export_adapter(self.engine.module, staging, self.cfg, self.step, self.topology.is_main)
            if self.topology.is_main:
                atomic_write_json(staging / BEST_JSON, decision)
                replace_directory(staging, self.output / BEST)
        except (OSError, RuntimeError) as err:
            error = err
        raise_if_any_failed(error, f"writing {self.output / BEST}")
        if self.topology.is_main:
            self.best_scores, self.best_step = decision["scores"], self.step
            scores = ", ".join(f"{k} {v:.4f}" for k, v in decision["scores"].items())
            self.say(f"best so far: step {self.step} ({scores}) -> {self.output / BEST}")

    def export_final(self) -> Path:
        """The final adapter at <output_dir>/adapter (a copy of the last checkpoint's, for convenience)."""
        from higgs_lora.distributed import barrier
        from higgs_lora.files import replace_directory

        latest = run_folder.latest_checkpoint(self.cfg.output_dir)
        final = self.output / run_folder.ADAPTER
        if self.topology.is_main and latest is not None:
            import shutil

            staging = self.output / ".adapter.partial"
            if staging.exists():
                shutil.rmtree(staging)
            shutil.copytree(latest / run_folder.ADAPTER, staging)
            replace_directory(staging, final)
            self.say(f"adapter: {final}")
        barrier()
        return final
