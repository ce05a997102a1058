"""What rank 0 records of a run: `<output_dir>/metrics.jsonl`, the trackers (TensorBoard, ...), and the
`[train] step ...` line.

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
from higgs_lora.train import trackers

METRICS = "metrics.jsonl"
log = get_logger("train")


class MetricsLog:
    """metrics.jsonl and the trackers of `train.report_to` (TensorBoard by default); writes nothing unless
    `enabled` (rank 0)."""

    def __init__(
        self, output: Path, report_to: list[str], enabled: bool, run_name: str = "", config: dict | None = None
    ):
        self.output, self.enabled = output, enabled
        self.run_name, self.config = run_name or output.name, config or {}
        self.trackers = trackers.build(report_to, output) if enabled else []

    @property
    def writer(self):
        """The TensorBoard SummaryWriter once started (None: not rank 0, or tensorboard not in train.report_to);
        the evaluation adds its clips' audio to it."""
        return next((t.writer for t in self.trackers if t.name == "tensorboard"), None)

    def start(self, step: int, resumed: bool) -> None:
        """Make metrics.jsonl and the trackers show this run only.

        A run resumed from step S keeps what was logged up to S (the checkpoint was written after S's logs) and
        drops what a killed attempt logged after it, which the resumed run logs again: TensorBoard hides those
        events (`purge_step`), metrics.jsonl is rewritten without them (and without a line cut by the kill); W&B
        and MLflow continue the same run (its id is kept in the run folder). A run starting from scratch moves an
        old metrics.jsonl aside to metrics.jsonl.old and hides old TensorBoard events.
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
        for tracker in self.trackers:
            tracker.start(step, resumed, self.run_name, self.config)
        if self.trackers:
            log.info(f"reporting to {', '.join(t.name for t in self.trackers)} besides {path}")

    def record(self, kind: str, metrics: dict) -> None:
        """Append one record to metrics.jsonl and hand its numbers to every tracker."""
        if not self.enabled:
            return
        with open(self.output / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, **metrics}) + "\n")
        values = trackers.flatten(kind, metrics)
        for tracker in self.trackers:
            tracker.log(values, metrics["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


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
