"""The training loop: LoRA/QLoRA Higgs Audio v2 inside a DeepSpeed ZeRO-2/3 engine.

`launch/train.py` is the face (parse -> plan -> build -> train -> save); this module does the work:

- `TrainData`: the cache (read only, the codec never runs here), held-out speakers, the epoch sampler.
- `build_engine`: torch AdamW (fused on GPU) + warm-up/cosine schedule inside `deepspeed.initialize`.
- `Trainer.train`: one optimizer step = the sampler's micro-batches for this rank; the loss of every micro-batch is
  divided by the labelled target positions of the whole step over all ranks (one small all-reduce before the
  first backward), see `higgs_lora.train.loss`. A step whose loss is not finite on any rank is skipped (the optimizer
  does not move); `train.max_nonfinite_steps` in a row stop the run.
- Checkpoints every `train.save_every` steps and at the end (`higgs_lora.train.checkpoint`); `train.resume=auto` picks the
  newest complete one up again, sampler position and RNG included. SIGTERM / SIGUSR1 finish the current step,
  checkpoint and exit 0 (a requeued job then resumes by itself).
- Every `train.eval_every` steps: the loss on held-out speakers, and a few held-out clips generated with the model
  and scored (speaker similarity, DNSMOS; `higgs_lora.eval.probe`), written to <output_dir>/eval_samples/.
- Rank 0 logs one line per `train.log_every` steps (loss, per-codebook losses, lr, grad norm, positions/s, target
  audio seconds/s, MFU, memory) to stdout, `<output_dir>/metrics.jsonl` and TensorBoard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from higgs_lora import stop
from higgs_lora.train import checkpoint
from higgs_lora.constants import FRAMES_PER_SECOND
from higgs_lora.config import RunConfig, save_config
from higgs_lora.data.collate import build_example, collate, prompt_overhead_tokens
from higgs_lora.data.sampler import (
    DataError,
    EpochSampler,
    SamplerState,
    Pair,
    UtteranceInfo,
    eval_assignment,
    eval_micro_batches,
    split_speakers,
)
from higgs_lora.distributed import Topology, all_reduce_sum, device_for
from higgs_lora.train.loss import label_counts, micro_batch_loss_sums, normalised_loss, to_device
from higgs_lora.train.flops import FlopCounter, peak_flops
from higgs_lora.plan import Plan


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a NaN/inf loss."""


# ------------------------------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """The cache and the schedules built from it."""

    cache: object
    """The cache as a datasets.Dataset (numpy format, codes only)."""
    texts: list[str]
    source_ids: list[str]
    utterances: list[UtteranceInfo]
    sampler: EpochSampler
    eval_batches: list[list[Pair]]
    eval_speakers: list[str]
    processor: object
    scene: str

    def collate(self, samples: list[Pair]) -> dict:
        """Model inputs and loss targets of one micro-batch (codes read from the memory-mapped cache)."""
        examples = []
        for sample in samples:
            reference = torch.from_numpy(self.cache[sample.reference]["codes"])
            target = torch.from_numpy(self.cache[sample.target]["codes"])
            examples.append(build_example(self.processor, self.texts[sample.reference], reference,
                                          self.texts[sample.target], target, self.scene))
        tokenizer = self.processor.tokenizer
        return collate(examples, tokenizer.pad_token_id, self.processor.audio_stream_eos_id)


def build_data(cfg: RunConfig, processor, plan: Plan, cache_dir: Path) -> TrainData:
    """Read the cache's metadata, hold out evaluation speakers, and set up the epoch sampler."""
    from higgs_lora.data.prepare import load_cache, read_pairs

    cache = load_cache(cache_dir)
    if len(cache) == 0:
        raise ValueError(f"the cache {cache_dir} has no utterances: run `python -m higgs_lora.prepare` first")
    meta = cache.select_columns(["source_id", "speaker", "num_frames", "text_normalized"]).to_dict()
    texts = meta["text_normalized"]
    token_counts = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    utterances = [UtteranceInfo(s, n, t) for s, n, t in zip(meta["speaker"], meta["num_frames"], token_counts)]
    held_out = split_speakers(meta["speaker"], cfg.data.eval_speakers, cfg.data.num_eval_speakers, cfg.seed)
    index_of = {source_id: i for i, source_id in enumerate(meta["source_id"])}
    pairs_file = Path(cache_dir) / "pairs.jsonl"
    fixed = {}
    if pairs_file.is_file():
        fixed = {index_of[t]: index_of[r] for r, t in read_pairs(cache_dir) if r in index_of and t in index_of}
    frames = (round(cfg.data.reference_min_seconds * FRAMES_PER_SECOND),
              round(cfg.data.reference_max_seconds * FRAMES_PER_SECOND))
    overhead = prompt_overhead_tokens(processor, cfg.data.scene)

    def sampler_for(targets: list[int], world_size: int, accumulation: int) -> EpochSampler:
        return EpochSampler(utterances=utterances, targets=targets, prompt_overhead=overhead,
                            micro_batch_tokens=plan.micro_batch_tokens, reference_frames=frames, seed=cfg.seed,
                            world_size=world_size, accumulation=accumulation, fixed_references=fixed)

    train_targets = [i for i, u in enumerate(utterances) if u.speaker not in held_out]
    eval_targets = [i for i, u in enumerate(utterances) if u.speaker in held_out]
    eval_batches = eval_micro_batches(sampler_for(eval_targets, 1, 1)) if eval_targets else []
    codes = cache.with_format("numpy", columns=["codes"])
    return TrainData(
        cache=codes, texts=texts, source_ids=meta["source_id"], utterances=utterances,
        sampler=sampler_for(train_targets, plan.world_size, plan.accumulation),
        eval_batches=eval_batches, eval_speakers=sorted(held_out), processor=processor, scene=cfg.data.scene,
    )


# ------------------------------------------------------------------------------------------------ engine


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next `step` can be turned into a no-op (a step with a non-finite loss must not move weights).

    DeepSpeed's ZeRO optimizers call `step` on this inner optimizer; skipping it leaves the fp32 master weights and
    the Adam moments untouched, and ZeRO clears the gradients as after any step.
    """

    skip_next: bool = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up from 1/warmup to 1 over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_engine(model, cfg: RunConfig, ds_config: dict, total_steps: int):
    """(engine, inner optimizer) from the PEFT model and the resolved DeepSpeed config."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.cuda.is_available() and ds_config["zero_optimization"].get("offload_optimizer", {}).get(
        "device", "none") == "none"
    optimizer = SkippableAdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.train.warmup_steps, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine, optimizer


# ------------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Owns the engine, the data and the loop; `launch/train.py` builds one and calls `train()`."""

    def __init__(self, cfg: RunConfig, plan: Plan, ds_config: dict, topology: Topology, model, data: TrainData,
                 model_config: dict):
        self.cfg, self.plan, self.topology, self.data = cfg, plan, topology, data
        self.ds_config = ds_config
        self.device = device_for(topology)
        self.steps_per_epoch = len(data.sampler.plan(0).steps)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the corpus gives fewer micro-batches than one optimizer step needs ({plan.world_size} ranks x "
                f"{plan.accumulation} accumulation): add data, lower train.micro_batch_tokens or use fewer ranks"
            )
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.engine, self.optimizer = build_engine(model, cfg, ds_config, self.total_steps)
        self.flops = FlopCounter.from_model_config(model_config, cfg.lora.target_modules, cfg.lora.r)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.peak = peak_flops(cfg.train.peak_tflops, name)
        self.step = 0
        self.state = SamplerState(world_size=plan.world_size, accumulation=plan.accumulation,
                                  micro_batch_tokens=plan.micro_batch_tokens)
        self.nonfinite_in_a_row = 0
        self.output = Path(cfg.output_dir)
        self.writer = None
        self.probe = self._build_probe()

    def _build_probe(self):
        """The held-out clips generated and scored at each evaluation (None when train.eval_samples is 0 or there
        are no held-out speakers)."""
        from higgs_lora.eval.probe import GenerationProbe, ProbeSettings, choose_pairs

        train = self.cfg.train
        samples = [s for micro_batch in self.data.eval_batches for s in micro_batch]
        if not (train.eval_every and train.eval_samples and samples):
            return None
        utterances = self.data.utterances
        pairs = choose_pairs(samples, [u.speaker for u in utterances], [u.num_frames for u in utterances],
                             train.eval_samples, round(train.eval_sample_seconds * FRAMES_PER_SECOND))
        settings = ProbeSettings(count=train.eval_samples, max_seconds=train.eval_sample_seconds,
                                 dnsmos=train.eval_dnsmos, seed=self.cfg.seed)
        return GenerationProbe(pairs, self.data, settings, self.output, self.topology.rank,
                               self.topology.world_size)

    # ----------------------------------------------------------------------------------------- logging

    def log(self, message: str) -> None:
        if self.topology.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def start_logs(self, resumed: bool) -> None:
        """Make metrics.jsonl and TensorBoard show this run only (rank 0).

        A run resumed from step S keeps what was logged up to S (the checkpoint was written after S's logs) and
        drops what a killed attempt logged after it, which the resumed run logs again: TensorBoard hides those
        events (`purge_step`), metrics.jsonl is rewritten without them (and without a line cut by the kill). A run
        starting from scratch moves an old metrics.jsonl aside to metrics.jsonl.old and hides old TensorBoard events.
        """
        from higgs_lora.files import atomic_write_text

        path = self.output / "metrics.jsonl"
        if path.is_file():
            if resumed:
                kept, dropped = _records_up_to(path.read_text(encoding="utf-8"), self.step)
                if dropped:
                    atomic_write_text(path, "".join(kept))
                    self.log(f"[train] metrics.jsonl: dropped {dropped} records logged after step {self.step} by "
                             "the interrupted attempt")
            else:
                path.replace(path.with_name(path.name + ".old"))
                self.log(f"[train] starting from scratch: the previous metrics.jsonl is now {path.name}.old")
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=self.step + 1 if resumed else 0)

    def record(self, kind: str, metrics: dict) -> None:
        """Append one record to metrics.jsonl and TensorBoard (rank 0)."""
        if not self.topology.is_main:
            return
        with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None:
                    self.writer.add_scalar(f"{kind}/{key}", value, metrics["step"])
                elif isinstance(value, list):
                    for k, v in enumerate(value):
                        self.writer.add_scalar(f"{kind}/{key}/{k}", v, metrics["step"])

    # ----------------------------------------------------------------------------------------- resume

    def resume(self) -> bool:
        """Load the checkpoint `train.resume` names, if any; returns whether it did.

        Rank 0 decides which checkpoint (ranks reading a lagging shared filesystem could disagree) and the
        compatibility checks run before DeepSpeed touches its partitioned state.
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
        if decision is None:
            self.log("[train] starting from scratch (no checkpoint to resume)")
            return False
        path = Path(decision)
        state = checkpoint.load_checkpoint(self.engine, path, self.topology.rank)
        self.step = state["step"]
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        saved = SamplerState.from_dict(state["sampler"])
        if (saved.accumulation, saved.micro_batch_tokens) != (self.state.accumulation, self.state.micro_batch_tokens):
            self.log(f"[train] warning: the checkpoint was written with {saved.accumulation} accumulation x "
                     f"{saved.micro_batch_tokens} tokens; this run's epoch schedule differs, so the epoch continues "
                     "from the same step index of a different order")
        self.state.epoch, self.state.step = saved.epoch, saved.step
        self.log(f"[train] resumed from {path} at step {self.step} (epoch {saved.epoch}, step {saved.step} of it)")
        return True

    def save(self) -> Path:
        trainer_state = {"step": self.step, "sampler": self.state.to_dict(),
                         "nonfinite_in_a_row": self.nonfinite_in_a_row, "time": time.time()}
        path = checkpoint.save_checkpoint(self.engine, self.cfg, self.step, trainer_state, self.topology.rank,
                                          self.cfg.train.keep_last, run_files={"ds_config.json": self.ds_config,
                                                                               "plan.json": self.plan.to_dict()})
        self.log(f"[train] checkpoint {path}")
        return path

    # ----------------------------------------------------------------------------------------- the loop

    def train(self) -> dict:
        """Run to train.max_steps (or train.epochs); returns the last logged metrics."""
        from tqdm import tqdm

        stop.catch()
        resumed = self.resume()
        if self.topology.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            self.start_logs(resumed)
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.topology.is_main and sys.stderr.isatty()))
        last: dict = {}
        epoch_plan = self.data.sampler.plan(self.state.epoch)
        self.engine.train()
        last_saved = self.step if resumed else -1
        eval_enabled = bool(self.cfg.train.eval_every and self.data.eval_batches)
        if eval_enabled and self.step == 0:
            self.evaluate()  # the untrained baseline the later evaluations compare with
        window = _Window()
        while self.step < self.total_steps:
            if self.state.step >= len(epoch_plan.steps):
                self.state.epoch, self.state.step = self.state.epoch + 1, 0
                epoch_plan = self.data.sampler.plan(self.state.epoch)
                self.log(f"[train] epoch {self.state.epoch}: {len(epoch_plan.steps)} steps, "
                         f"{epoch_plan.num_samples} samples, padding {epoch_plan.padding_fraction:.1%}")
                if not epoch_plan.steps:
                    raise DataError(f"epoch {self.state.epoch} has no full optimizer step: the corpus is too small "
                                    "for this many ranks x accumulation; add data or use fewer ranks")
                continue
            micro_batches = epoch_plan.rank_micro_batches(self.state.step, self.topology.rank, self.plan.accumulation)
            batches = [self.data.collate(mb) for mb in micro_batches]
            counts = [label_counts(b) for b in batches]
            audio_total, text_total, stopping = all_reduce_sum(
                [sum(a for a, _ in counts), sum(t for _, t in counts), float(stop.received() is not None)],
                self.device)
            if stopping:
                self.log(f"[train] stop signal received: checkpointing at step {self.step} and exiting")
                if last_saved != self.step:
                    self.save()
                bar.close()
                if self.writer is not None:
                    self.writer.close()
                return last
            metrics = self._step(batches, micro_batches, int(audio_total), int(text_total), window)
            self.step += 1
            self.state.step += 1
            bar.update(1)
            if metrics is not None:
                last = metrics
            # The last step's evaluation comes before its checkpoint, as every other's: a run resumed from the
            # final checkpoint has nothing left to do but export the adapter.
            if eval_enabled and (self.step % self.cfg.train.eval_every == 0 or self.step == self.total_steps):
                self.evaluate()
                window.reset()  # rates measure training, not evaluation
            if self.step % self.cfg.train.save_every == 0 or self.step == self.total_steps:
                self.save()
                last_saved = self.step
                window.reset()
        if last_saved != self.step:
            self.save()
        self.export_final()
        bar.close()
        if self.writer is not None:
            self.writer.close()
        return last

    def _step(self, batches: list[dict], micro_batches: list[list[Pair]], audio_total: int, text_total: int,
              window: "_Window") -> dict | None:
        """Forward/backward over this rank's micro-batches and one optimizer step; logs on logging steps."""
        cfg, engine = self.cfg, self.engine
        num_codebooks = engine.module.config.num_codebooks
        audio_sums = torch.zeros(num_codebooks, dtype=torch.float64)
        audio_counts = torch.zeros(num_codebooks, dtype=torch.float64)
        text_sum = text_count = 0.0
        positions = target_frames = flops = 0.0
        text_loss = cfg.train.text_loss_weight > 0
        for i, (batch, samples) in enumerate(zip(batches, micro_batches)):
            sums = micro_batch_loss_sums(engine, to_device(batch, self.device), text_loss)
            audio_sums += sums.audio.detach().double().cpu()
            audio_counts += sums.audio_counts.double()
            text_sum += float(sums.text.detach())
            text_count += float(sums.text_count)
            real = batch["attention_mask"].sum(1)
            positions += float(real.sum())
            target_frames += sum(self.data.utterances[s.target].num_frames for s in samples)
            flops += self.flops.step_flops(int(real.sum()), int(batch["loss_mask"].sum()), int((real ** 2).sum()))
            loss = normalised_loss(sums, audio_total, text_total, cfg.train.text_loss_weight, self.plan.world_size)
            if i == len(batches) - 1:
                local_bad = float(not torch.isfinite(audio_sums).all() or not math.isfinite(text_sum))
                reduced = all_reduce_sum(
                    audio_sums.tolist() + audio_counts.tolist() + [text_sum, text_count, local_bad, positions,
                                                                   target_frames, flops], self.device)
                bad = reduced[2 * num_codebooks + 2] > 0
                self.optimizer.skip_next = bad
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
        # DeepSpeed skips a step by itself when the gradient norm is not finite (then our flag stays unused and is
        # overwritten next step): count that as a non-finite step too.
        bad = bad or not engine.was_step_applied()
        k = num_codebooks
        global_sums, global_counts = reduced[:k], reduced[k:2 * k]
        global_text, global_text_count = reduced[2 * k], reduced[2 * k + 1]
        window.add(positions=reduced[2 * k + 3], frames=reduced[2 * k + 4], flops=reduced[2 * k + 5])
        if bad:
            self.nonfinite_in_a_row += 1
            self.log(f"[train] warning: step {self.step + 1} has a non-finite loss on at least one rank; skipped "
                     f"({self.nonfinite_in_a_row} in a row, limit train.max_nonfinite_steps="
                     f"{cfg.train.max_nonfinite_steps})")
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} optimizer steps in a row had a NaN/inf loss (last: step "
                    f"{self.step + 1}). Lower train.lr, check the data (python -m higgs_lora.prepare report), "
                    f"or resume from the last checkpoint in {checkpoint.checkpoints_root(cfg.output_dir)}"
                )
            return None
        self.nonfinite_in_a_row = 0
        step = self.step + 1
        if step % cfg.train.log_every and step != self.total_steps:
            return None
        positions_per_codebook = global_counts[0] or 1.0
        per_codebook = [s / max(c, 1.0) for s, c in zip(global_sums, global_counts)]
        metrics = {
            "step": step,
            "epoch": self.state.epoch,
            "loss": sum(global_sums) / positions_per_codebook,
            "per_codebook_loss": per_codebook,
            "lr": self.engine.get_lr()[0],
            "grad_norm": _float_or_none(self.engine.get_global_grad_norm()),
        }
        if cfg.train.text_loss_weight > 0:
            metrics["text_loss"] = global_text / max(global_text_count, 1.0)
        metrics.update(window.rates(self.device, self.peak, self.plan.world_size))
        self.record("train", metrics)
        self.log(_format_line(metrics, self.total_steps))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss on the held-out speakers, then the generated held-out clips' similarity and DNSMOS
        (`higgs_lora.eval.probe`); all ranks take part, rank 0 logs."""
        engine = self.engine
        engine.eval()
        k = engine.module.config.num_codebooks
        sums = torch.zeros(k, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64)
        for index, counted in eval_assignment(len(self.data.eval_batches), self.plan.world_size, self.topology.rank):
            batch = self.data.collate(self.data.eval_batches[index])
            result = micro_batch_loss_sums(engine, to_device(batch, self.device))
            if counted:
                sums += result.audio.double().cpu()
                counts += result.audio_counts.double()
        reduced = all_reduce_sum(sums.tolist() + counts.tolist(), self.device)
        metrics = {
            "step": self.step,
            "loss": sum(reduced[:k]) / max(reduced[k], 1.0),
            "per_codebook_loss": [s / max(c, 1.0) for s, c in zip(reduced[:k], reduced[k:])],
            "positions": reduced[k],
        }
        self.log(f"[eval] step {self.step} | held-out speakers {','.join(self.data.eval_speakers)} | "
                 f"loss {metrics['loss']:.4f} over {int(reduced[k])} target positions")
        if self.probe is not None:
            metrics.update(self.probe.run(engine.module, self.step, self.device, self.writer, self.log))
        engine.train()
        self.record("eval", metrics)
        return metrics

    def export_final(self) -> Path:
        """The final adapter at <output_dir>/adapter (a copy of the last checkpoint's, for convenience)."""
        from higgs_lora.distributed import barrier
        from higgs_lora.files import replace_directory

        latest = checkpoint.latest_checkpoint(self.cfg.output_dir)
        final = self.output / checkpoint.ADAPTER
        if self.topology.is_main and latest is not None:
            import shutil

            staging = self.output / ".adapter.partial"
            if staging.exists():
                shutil.rmtree(staging)
            shutil.copytree(latest / checkpoint.ADAPTER, staging)
            replace_directory(staging, final)
            self.log(f"[train] adapter: {final}")
        barrier()
        return final


def _records_up_to(text: str, step: int) -> tuple[list[str], int]:
    """(lines of metrics.jsonl logged at or before `step`, how many others: later, or cut off by a kill)."""
    kept, dropped = [], 0
    for line in text.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
        else:
            dropped += 1
    return kept, dropped


def _float_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _Window:
    """Work done since the last logging step, for rates."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.started = time.perf_counter()
        self.positions = self.frames = self.flops = 0.0

    def add(self, positions: float, frames: float, flops: float) -> None:
        self.positions += positions
        self.frames += frames
        self.flops += flops

    def rates(self, device, peak: float | None, world_size: int) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = max(time.perf_counter() - self.started, 1e-9)
        rates = {
            "positions_per_s": self.positions / seconds,
            "audio_seconds_per_s": self.frames / FRAMES_PER_SECOND / seconds,
            "mfu": (self.flops / seconds / (peak * world_size)) if peak else None,
        }
        if device.type == "cuda":
            rates["memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            rates["memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        else:
            import resource

            rates["host_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.reset()
        return rates


def _format_line(m: dict, total_steps: int) -> str:
    codebooks = " ".join(f"{x:.2f}" for x in m["per_codebook_loss"])
    grad = f"{m['grad_norm']:.3f}" if m["grad_norm"] is not None else "n/a"
    parts = [
        f"step {m['step']}/{total_steps}",
        f"loss {m['loss']:.4f}",
        f"codebooks [{codebooks}]",
        f"lr {m['lr']:.2e}",
        f"grad {grad}",
        f"{m['positions_per_s']:,.0f} pos/s",
        f"{m['audio_seconds_per_s']:.1f} audio s/s",
    ]
    if "text_loss" in m:
        parts.insert(2, f"text {m['text_loss']:.4f}")
    if m.get("mfu") is not None:
        parts.append(f"MFU {m['mfu']:.1%}")
    if "memory_gib" in m:
        parts.append(f"mem {m['memory_gib']:.1f}/{m['memory_reserved_gib']:.1f} GiB")
    else:
        parts.append(f"host RSS {m['host_rss_gib']:.1f} GiB")
    return "[train] " + " | ".join(parts)


# ------------------------------------------------------------------------------------------- entry point


def plan_run(cfg: RunConfig, ds_config_path: str, topology: Topology) -> tuple[RunConfig, Plan, dict, dict]:
    """(config with the planned checkpointing, plan, resolved DeepSpeed config, model config.json), before any model
    is loaded.

    Rank 0 plans and the others take its plan: GPUs that differ between nodes (or a GPU shared with another job)
    must not give ranks different micro-batches, which would hang the collectives. A plan error is raised on every
    rank.
    """
    from higgs_lora.data.prepare import cache_dir_of
    from higgs_lora.distributed import broadcast_object
    from higgs_lora.plan import PlanError, cache_sequence_stats, detect_hardware, load_ds_config, make_plan, read_model_config, resolve_ds_config

    outcome: tuple = (None, None)
    if topology.is_main:
        try:
            ds_config = load_ds_config(ds_config_path)
            model_config = read_model_config(cfg.model.path)
            hardware = detect_hardware(cfg, world_size=topology.world_size)
            plan = make_plan(cfg, ds_config, hardware, model_config, cache_sequence_stats(cfg, cache_dir_of(cfg)))
            planned = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, gradient_checkpointing=plan.gradient_checkpointing))
            outcome = ((planned, plan, resolve_ds_config(ds_config, planned, plan, model_config), model_config), None)
        except PlanError as err:
            outcome = (None, str(err))
    result, error = broadcast_object(outcome)
    if error is not None:
        raise PlanError(error)
    return result


def run(cfg: RunConfig, ds_config_path: str) -> dict:
    """parse -> plan -> build -> train -> save, for `launch/train.py`. Returns the last logged train metrics."""
    from higgs_lora.data.prepare import cache_dir_of
    from higgs_lora.distributed import init_distributed
    from higgs_lora.model.lora import apply_lora
    from higgs_lora.model.loading import load_base_model, load_processor
    stop.catch()  # before the (long) model load: see higgs_lora/stop.py
    topology = init_distributed()
    cfg, plan, resolved, model_config = plan_run(cfg, ds_config_path, topology)
    if topology.is_main:
        print(f"[train] resolved config:\n{cfg.to_yaml()}", flush=True)
        print(f"[train] plan:\n{plan.describe()}", flush=True)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        from higgs_lora.files import atomic_write_json

        atomic_write_json(out / "ds_config.json", resolved)
        atomic_write_json(out / "plan.json", plan.to_dict())
    device = device_for(topology)
    processor = load_processor(cfg.model)
    data = build_data(cfg, processor, plan, cache_dir_of(cfg))
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every rank
    # Straight onto the GPU (ZeRO-3 partitions it at initialize) unless parameters are offloaded to host memory:
    # loading on the CPU would hold a full bf16 copy per rank in host RAM (11.5 GB each).
    on_gpu = device.type == "cuda" and plan.offload != "optimizer+params"
    model = apply_lora(load_base_model(cfg.model, device if on_gpu else None), cfg.lora, cfg.model)
    torch.manual_seed(cfg.seed + topology.rank)  # ranks draw different dropout masks
    trainer = Trainer(cfg, plan, resolved, topology, model, data, model_config)
    first = data.sampler.plan(0)
    trainer.log(
        f"[train] data: {len(data.utterances)} utterances, {len(data.sampler.targets)} training targets, "
        f"held-out speakers: {', '.join(data.eval_speakers) or 'none'} ({len(data.eval_batches)} eval micro-batches); "
        f"epoch 0: {len(first.steps)} steps, padding {first.padding_fraction:.1%}, "
        f"{first.num_without_reference} targets without a reference, {first.num_dropped} samples past the last step"
    )
    return trainer.train()
