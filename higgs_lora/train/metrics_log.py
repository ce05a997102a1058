"""What rank 0 records of a run: `<output_dir>/metrics.jsonl`, TensorBoard, and the `[train] step ...` line.

Also the work done between two logging steps (`RateWindow`: positions/s, audio s/s, MFU, memory), and log lines
written above the progress bar. Imports torch (TensorBoard when enabled). See docs/training.md (What rank 0 prints).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from higgs_lora.constants import FRAMES_PER_SECOND
from higgs_lora.files import atomic_write_text
from higgs_lora.logs import ROOT, get_logger

METRICS = "metrics.jsonl"
log = get_logger("train")


class MetricsLog:
    """metrics.jsonl and TensorBoard of a run; writes nothing unless `enabled` (rank 0)."""

    def __init__(self, output: Path, tensorboard: bool, enabled: bool):
        self.output, self.tensorboard, self.enabled = output, tensorboard, enabled
        self.writer = None
        """The TensorBoard SummaryWriter once started (None: not rank 0, or train.tensorboard=false)."""

    def start(self, step: int, resumed: bool) -> None:
        """Make metrics.jsonl and TensorBoard show this run only.

        A run resumed from step S keeps what was logged up to S (the checkpoint was written after S's logs) and
        drops what a killed attempt logged after it, which the resumed run logs again: TensorBoard hides those
        events (`purge_step`), metrics.jsonl is rewritten without them (and without a line cut by the kill). A run
        starting from scratch moves an old metrics.jsonl aside to metrics.jsonl.old and hides old TensorBoard events.
        """
        if not self.enabled:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        path = self.output / METRICS
        if path.is_file():
            if resumed:
                kept, dropped = records_up_to(path.read_text(encoding="utf-8"), step)
                if dropped:
                    atomic_write_text(path, "".join(kept))
                    log.info(
                        f"metrics.jsonl: dropped {dropped} records logged after step {step} by the interrupted attempt"
                    )
            else:
                path.replace(path.with_name(path.name + ".old"))
                log.info(f"starting from scratch: the previous metrics.jsonl is now {path.name}.old")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=step + 1 if resumed else 0)

    def record(self, kind: str, metrics: dict) -> None:
        """Append one record to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        with open(self.output / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None:
                    self.writer.add_scalar(f"{kind}/{key}", value, metrics["step"])
                elif isinstance(value, list):
                    for k, v in enumerate(value):
                        self.writer.add_scalar(f"{kind}/{key}/{k}", v, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def records_up_to(text: str, step: int) -> tuple[list[str], int]:
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


def float_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class RateWindow:
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


def format_train_line(m: dict, total_steps: int) -> str:
    """`step 10/30 | loss ... | codebooks [...] | lr ... | grad ... | pos/s | audio s/s [| MFU] | memory`."""
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
    return " | ".join(parts)


class _AboveTheBar(logging.Handler):
    """Hands records to `inner` with the progress bars cleared first and redrawn after (what tqdm.write does)."""

    def __init__(self, inner: logging.Handler):
        super().__init__(inner.level)
        self.inner = inner

    def handle(self, record: logging.LogRecord) -> bool:
        from tqdm import tqdm

        with tqdm.external_write_mode():
            return self.inner.handle(record)


@contextmanager
def lines_above(bar):
    """While the tqdm `bar` is drawn, the package's log lines are written above it, not into it."""
    root = logging.getLogger(ROOT)
    handlers = root.handlers[:]
    if not bar.disable:
        root.handlers = [_AboveTheBar(handler) for handler in handlers]
    try:
        yield bar
    finally:
        root.handlers = handlers
