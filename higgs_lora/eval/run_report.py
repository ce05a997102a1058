"""The run report: `<output_dir>/report.html`, a training run's curves on one self-contained page.

Read from `<output_dir>/metrics.jsonl` (what rank 0 logged): the training loss beside the held-out loss, the loss
of each codebook, learning rate, gradient norm and throughput, and every score of the evaluations (speaker
similarity, DNSMOS, CER/WER when an ASR is given, ...) over steps, each with its ground-truth line when one was
scored, plus a table of the evaluations linking their clips. Training writes it at its end (`train.run`) and logs
its address; `python -m higgs_lora.eval.run_report RUN_DIR` (or `higgs-lora report RUN_DIR`) writes it again at
any time, during a run too. Inline SVG, no script, no network, like the evaluation report
(`higgs_lora.eval.report`). Imports no torch. See docs/training.md (Curves).
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from urllib.parse import quote

from higgs_lora import startup
from higgs_lora.constants import STEP_NAME
from higgs_lora.eval import plots
from higgs_lora.eval.report import STYLE
from higgs_lora.files import atomic_write_text
from higgs_lora.logs import get_logger

log = get_logger("report")

METRICS = "metrics.jsonl"
REPORT = "report.html"
EVAL_SAMPLES = "eval_samples"
GROUND_TRUTH = "_ground_truth"
BOOKKEEPING = {
    "step",
    "epoch",
    "positions",
    "generate_seconds",
    "score_seconds",
    "num_scored",
    "num_failed",
    "num_silent",
}
"""Eval record keys that are not scores of the model (counts and timings): left out of the score plots."""
TRAIN_CURVES = [
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("audio_seconds_per_s", "throughput: target audio seconds per second"),
]
LABELS = {
    "similarity": "speaker similarity to the reference (cosine)",
    "dnsmos_ovrl": "DNSMOS OVRL (1-5)",
    "dnsmos_sig": "DNSMOS SIG (1-5)",
    "dnsmos_bak": "DNSMOS BAK (1-5)",
    "cer": "CER (normalised)",
    "wer": "WER (normalised)",
    "eos_fraction": "clips ended by the model (EOS)",
    "generated_seconds": "mean generated clip length (s)",
}


def read_records(path: Path) -> tuple[list[dict], list[dict], int]:
    """(train records, eval records, unreadable lines) of a metrics.jsonl; a line cut by a kill is counted, not
    fatal. A step logged twice (a resumed run re-logging) keeps its last record."""
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    bad = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            bad += 1
            continue
        if record.get("kind") in by_kind:
            by_kind[record["kind"]][record["step"]] = record
    train = [by_kind["train"][s] for s in sorted(by_kind["train"])]
    evals = [by_kind["eval"][s] for s in sorted(by_kind["eval"])]
    return train, evals, bad


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _points(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], v) for r in records if (v := _number(r.get(key))) is not None]


def _codebook_points(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        for index, value in enumerate(record.get("per_codebook_loss") or []):
            if (value := _number(value)) is not None:
                series.setdefault(f"cb{index}", []).append((record["step"], value))
    return series


def score_keys(evals: list[dict]) -> list[str]:
    """The numeric scores the evaluations logged, in first-seen order, without bookkeeping, losses handled
    elsewhere and the ground-truth lines (drawn on their score's plot)."""
    keys: list[str] = []
    for record in evals:
        for key, value in record.items():
            if key in BOOKKEEPING or key in ("kind", "loss", "per_codebook_loss") or key.endswith(GROUND_TRUTH):
                continue
            if _number(value) is not None and key not in keys:
                keys.append(key)
    return keys


def _plots(train: list[dict], evals: list[dict]) -> list[str]:
    figures = []
    loss = {"training": _points(train, "loss"), "held-out": _points(evals, "loss")}
    loss = {label: points for label, points in loss.items() if points}
    if loss:
        figures.append(plots.line_chart("loss", "loss (training vs held-out speakers)", loss))
    if codebooks := _codebook_points(train):
        figures.append(plots.line_chart("per_codebook_loss", "training loss per codebook", codebooks))
    if codebooks := _codebook_points(evals):
        figures.append(plots.line_chart("eval_per_codebook_loss", "held-out loss per codebook", codebooks))
    for key, title in TRAIN_CURVES:
        if points := _points(train, key):
            figures.append(plots.line_chart(key, title, {key: points}))
    for key in score_keys(evals):
        series = {"generated": _points(evals, key)}
        if truth := _points(evals, key + GROUND_TRUTH):
            series["ground truth"] = truth
        figures.append(plots.line_chart(f"eval_{key}", f"evaluation: {LABELS.get(key, key)}", series))
    return figures


def _cell(value) -> str:
    number = _number(value)
    if number is None:
        return '<td class="num">-</td>'
    return f'<td class="num">{number:.4g}</td>'


def _eval_table(evals: list[dict], keys: list[str], out: Path) -> str:
    header = ["step", "held-out loss", *[LABELS.get(k, k) for k in keys], "clips"]
    rows = []
    for record in evals:
        folder = out / EVAL_SAMPLES / STEP_NAME.format(record["step"])
        clips = (
            f'<a href="{escape(quote(folder.relative_to(out).as_posix()))}/">{escape(folder.name)}</a>'
            if folder.is_dir()
            else "-"
        )
        cells = [f'<td class="num">{record["step"]}</td>', _cell(record.get("loss"))]
        cells += [_cell(record.get(k)) for k in keys] + [f"<td>{clips}</td>"]
        rows.append(f'<tr data-step="{record["step"]}">{"".join(cells)}</tr>')
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return f'<table id="evaluations"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render_run_report(out: Path, train: list[dict], evals: list[dict], bad_lines: int = 0) -> str:
    """The page as a string for the run folder `out`."""
    best = out / "best" / "best.json"
    info = [
        ("run folder", str(out.resolve())),
        ("training steps logged", f"{len(train)} (last step {train[-1]['step']})" if train else "none yet"),
        ("evaluations", str(len(evals))),
        ("best checkpoint", best.read_text(encoding="utf-8").strip() if best.is_file() else "-"),
        ("unreadable metrics.jsonl lines", str(bad_lines)),
        ("written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    info_rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in info)
    figures = "".join(_plots(train, evals)) or '<p class="note">nothing logged yet</p>'
    keys = score_keys(evals)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>higgs-lora run: {escape(out.name)}</title>
<style>{STYLE}</style></head><body>
<h1>Run: {escape(out.name)}</h1>
<table id="run">{info_rows}</table>
<h2>Curves</h2><div class="plots">{figures}</div>
<h2>Evaluations</h2>{_eval_table(evals, keys, out)}
<p class="note">From {METRICS} in this folder; TensorBoard: <code>tensorboard --logdir {escape(str(out))}</code></p>
</body></html>
"""


def write_run_report(output_dir: str | Path) -> Path:
    """Write `<output_dir>/report.html` from its metrics.jsonl (a page saying nothing was logged if there is none)."""
    out = Path(output_dir)
    metrics = out / METRICS
    train, evals, bad = read_records(metrics) if metrics.is_file() else ([], [], 0)
    return atomic_write_text(out / REPORT, render_run_report(out, train, evals, bad))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m higgs_lora.eval.run_report",
        description="Write a training run's report.html (curves of loss, per-codebook loss, held-out loss and the "
        "evaluation scores over steps) from its metrics.jsonl.",
    )
    parser.add_argument("run", help="the run folder (train's output_dir), holding metrics.jsonl")
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)

    def work() -> int:
        from higgs_lora.errors import UserError

        run = Path(args.run)
        if not (run / METRICS).is_file():
            raise UserError(f"{run / METRICS} does not exist: give the output_dir of a training run")
        path = write_run_report(run)
        log.info(f"run report: {path.resolve().as_uri()}")
        return 0

    return startup.run_command(args, work)


if __name__ == "__main__":
    raise SystemExit(main())
