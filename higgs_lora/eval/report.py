"""The evaluation's files: metrics.json (summaries), samples.csv (one row per sample) and report.html.

The HTML page is one self-contained file: inline CSS, inline SVG plots (:mod:`higgs_lora.eval.plots`), no script, no
CDN. Audio players point at the wav/flac files by paths *relative to the report*, so the page plays them when
opened from disk and keeps working when the prediction folder and the report move together (references outside
the folder, e.g. a corpus elsewhere, must then move too).
"""

from __future__ import annotations

import csv
import io
import math
import os
from html import escape
from pathlib import Path
from urllib.parse import quote

from higgs_lora.eval import plots
from higgs_lora.eval.scoring import COLUMNS, HIGHER_IS_BETTER, LOWER_IS_BETTER, SUMMARY_METRICS
from higgs_lora.files import atomic_write_json, atomic_write_text

METRIC_LABELS = {
    "similarity_reference": "speaker similarity, generated vs reference (cosine)",
    "similarity_target": "speaker similarity, generated vs ground-truth target (cosine)",
    "dnsmos_sig": "DNSMOS SIG (speech, 1-5)",
    "dnsmos_bak": "DNSMOS BAK (background, 1-5)",
    "dnsmos_ovrl": "DNSMOS OVRL (overall, 1-5)",
    "cer": "CER (corpus, normalised)",
    "wer": "WER (corpus, normalised)",
    "duration_ratio": "speech duration / expected at the reference's pace",
    "silence_ratio": "silence ratio (20 ms frames < -40 dBFS)",
    "clipped_fraction": "clipped samples (fraction)",
    "audio_seconds": "generated audio (s)",
    "seconds": "latency: generation wall time per sample (s)",
    "first_audio_s": "time to first audio chunk (s)",
    "rtf": "real-time factor (total generation s / total audio s)",
}


def clean_for_json(value):
    """``value`` with NaN/inf floats replaced by None (JSON has no NaN) and Paths made strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_for_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_for_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics_json(path: Path, metrics: dict) -> Path:
    return atomic_write_json(path, clean_for_json(metrics))


def write_samples_csv(path: Path, rows: list[dict]) -> Path:
    """One line per sample, columns :data:`higgs_lora.eval.scoring.COLUMNS`; floats to 6 significant digits."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------ HTML

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:0.5em 0 1.5em;max-width:100%}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#1d7a1d}.worse{color:#b22}.note{color:#666;font-size:90%}.plots{display:flex;flex-wrap:wrap;gap:1em}
figure.plot{margin:0}figcaption{display:none}audio{width:170px;height:30px;display:block}
td.text{direction:rtl;min-width:8em;max-width:18em;overflow-wrap:anywhere}td.note{max-width:14em;
overflow-wrap:anywhere}.players span{display:block;font-size:80%;color:#666}
"""
"""The page's CSS. The samples table fits a 1280 px window: the players of a sample are stacked in one cell and
the Arabic text wraps (tests/e2e/test_evaluate.py renders it at that width)."""


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def _delta_cell(metric: str, delta: float | None) -> str:
    if delta is None:
        return '<td class="num">-</td>'
    good = (metric in HIGHER_IS_BETTER and delta > 0) or (metric in LOWER_IS_BETTER and delta < 0)
    bad = (metric in HIGHER_IS_BETTER and delta < 0) or (metric in LOWER_IS_BETTER and delta > 0)
    css = "better" if good else "worse" if bad else ""
    return f'<td class="num {css}">{delta:+.3f}</td>'


def _table(table_id: str, header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _summary_table(metrics: dict) -> str:
    comparison = metrics.get("compare")
    # "value" is the mean, except CER/WER (the corpus rate) and RTF (total time / total audio), whose per-sample
    # mean is shown under it: no column repeats another.
    header = ["metric", "value", "median", "p10", "p90", "n"]
    if comparison:
        header += ["fine-tuned (common ids)", "base (common ids)", "delta"]
    rows = []
    for metric in SUMMARY_METRICS:
        stats = metrics["summary"].get(metric)
        if stats is None and not (comparison and metric in comparison["base_summary"]):
            continue
        stats = stats or {}
        cells = [f"<td>{escape(METRIC_LABELS.get(metric, metric))}</td>"]
        value = _number(stats.get("value"))
        if metric in ("cer", "wer", "rtf") and stats.get("mean") is not None:
            value += f'<br><span class="note">mean {_number(stats["mean"])}</span>'
        cells.append(f'<td class="num">{value}</td>')
        cells += [f'<td class="num">{_number(stats.get(k))}</td>' for k in ("median", "p10", "p90")]
        cells.append(f'<td class="num">{_number(stats.get("n"))}</td>')
        if comparison:
            cells.append(f'<td class="num">{_number(comparison["summary"].get(metric))}</td>')
            cells.append(f'<td class="num">{_number(comparison["base_summary"].get(metric))}</td>')
            cells.append(_delta_cell(metric, comparison["delta"].get(metric)))
        rows.append(f'<tr data-metric="{metric}">{"".join(cells)}</tr>')
    return _table("summary", header, rows)


def _speed_table(metrics: dict) -> str:
    summary, run = metrics["summary"], metrics.get("run") or {}
    rows = []
    for metric in ("rtf", "seconds", "first_audio_s"):
        if metric in summary:
            s = summary[metric]
            rows.append(
                f'<tr data-metric="{metric}"><td>{escape(METRIC_LABELS[metric])}</td>'
                + "".join(f'<td class="num">{_number(s[k])}</td>' for k in ("value", "median", "p90", "max"))
                + "</tr>"
            )
    if "seconds" in run:
        rows.append(
            f'<tr><td>whole inference run, from run.json (s)</td><td class="num">{_number(run["seconds"])}'
            "</td><td></td><td></td><td></td></tr>"
        )
    return _table("speed", ["measure", "value", "median", "p90", "max"], rows)


def _speaker_table(metrics: dict) -> str:
    columns = ["similarity_reference", "similarity_target", "cer", "dnsmos_ovrl", "duration_ratio"]
    present = [c for c in columns if any(c in v for v in metrics["per_speaker"].values())]
    rows = [
        f'<tr data-speaker="{escape(speaker)}"><td>{escape(speaker)}</td><td class="num">{values["n"]}</td>'
        + "".join(f'<td class="num">{_number(values.get(c))}</td>' for c in present)
        + "</tr>"
        for speaker, values in metrics["per_speaker"].items()
    ]
    return _table("speakers", ["speaker", "samples", *present], rows)


def _audio(path: str | None, pred: Path, out: Path) -> str:
    if not path:
        return "-"
    absolute = Path(path) if Path(path).is_absolute() else pred / path
    if not absolute.is_file():
        return '<span class="note">missing</span>'
    relative = os.path.relpath(absolute, out)
    return f'<audio controls preload="none" src="{escape(quote(relative))}"></audio>'


def _samples_table(metrics: dict, rows: list[dict], pred: Path, out: Path) -> str:
    comparison = metrics.get("compare")
    base_wavs = {e["id"]: e.get("base_wav") for e in comparison["per_sample"]} if comparison else {}
    base_folder = Path(comparison["pred"]) if comparison else None
    header = ["id", "speaker", "audio", "target text", "ASR", "similarity", "CER", "OVRL", "duration ratio", "RTF"]
    header.append("problems")
    html_rows = []
    for row in rows:
        players = [
            ("reference", _audio(row.get("reference_audio"), pred, out)),
            ("generated", _audio(row.get("wav"), pred, out)),
            ("target", _audio(row.get("target_audio"), pred, out)),
        ]
        if comparison:
            players.append(("base generated", _audio(base_wavs.get(row["id"]), base_folder, out)))
        stacked = "".join(f"<span>{escape(label)}</span>{player}" for label, player in players)
        cells = [
            f"<td>{escape(str(row['id']))}</td><td>{escape(str(row.get('speaker') or '-'))}</td>",
            f'<td class="players">{stacked}</td>',
        ]
        cells += [
            f'<td class="text">{escape(row.get("target_text") or "")}</td>',
            f'<td class="text">{escape(row.get("asr_text") or "-")}</td>',
        ]
        cells += [
            f'<td class="num">{_number(row.get(c))}</td>'
            for c in ("similarity_reference", "cer", "dnsmos_ovrl", "duration_ratio", "rtf")
        ]
        problems = "; ".join(p for p in (row.get("error"), row.get("notes")) if p)
        cells.append(f'<td class="note">{escape(problems)}</td>')
        html_rows.append(f'<tr data-id="{escape(str(row["id"]))}">{"".join(cells)}</tr>')
    return _table("samples", header, html_rows)


def _plots(metrics: dict, rows: list[dict], base_rows: list[dict] | None) -> str:
    def series(column: str) -> dict[str, list[float]]:
        out = {
            "fine-tuned" if base_rows is not None else "generated": [
                r[column] for r in rows if r.get(column) is not None
            ]
        }
        if base_rows is not None:
            out["base"] = [r[column] for r in base_rows if r.get(column) is not None]
        return out

    figures = []
    specs = [
        ("similarity_reference", "speaker similarity to reference", (-1.0, 1.0)),
        ("dnsmos_ovrl", "DNSMOS OVRL", (1.0, 5.0)),
        ("cer", "CER per sample", None),
        ("duration_ratio", "duration / expected", None),
        ("rtf", "real-time factor per sample", None),
    ]
    for column, title, bounds in specs:
        data = series(column)
        if any(data.values()):
            figures.append(plots.histogram(column, f"distribution: {title}", data, bounds=bounds))
    speaker_similarity = {
        "generated": {
            s: v["similarity_reference"] for s, v in metrics["per_speaker"].items() if "similarity_reference" in v
        }
    }
    if base_rows is not None and metrics.get("base_per_speaker"):
        speaker_similarity = {
            "fine-tuned": speaker_similarity["generated"],
            "base": {
                s: v["similarity_reference"]
                for s, v in metrics["base_per_speaker"].items()
                if "similarity_reference" in v
            },
        }
    if any(speaker_similarity.values()):
        figures.insert(0, plots.bar_chart("speaker_similarity", "speaker similarity by speaker", speaker_similarity))
    return f'<div class="plots">{"".join(figures)}</div>'


def render_html(metrics: dict, rows: list[dict], out: Path, base_rows: list[dict] | None = None) -> str:
    """The report page as a string; ``out`` is the folder it will be written to (for relative audio paths)."""
    pred = Path(metrics["pred"])
    run = metrics.get("run") or {}
    info = [
        ("predictions", metrics["pred"]),
        ("model", run.get("model")),
        ("adapter", run.get("adapter")),
        ("device / dtype", f"{run.get('device', '-')} / {run.get('dtype', '-')}"),
        ("samples generated", metrics["num_samples"]),
        ("failed to generate", metrics["num_failed_generation"]),
        ("failed to score", metrics["num_failed_scoring"]),
        ("ASR", metrics["asr"].get("model") or metrics["asr"].get("skipped")),
        ("evaluated", f"{metrics['date']} in {metrics['evaluation_seconds']:.1f} s"),
    ]
    if metrics.get("compare"):
        c = metrics["compare"]
        info.append(("compared with", f"{c['pred']} ({c['num_common']} common samples)"))
    info_rows = [f"<tr><th>{escape(k)}</th><td>{escape(str(v if v is not None else '-'))}</td></tr>" for k, v in info]
    problems = metrics.get("problems") or []
    problem_list = "".join(f"<li>{escape(p)}</li>" for p in problems) or "<li>none</li>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>higgs-lora evaluation: {escape(pred.name)}</title>
<style>{STYLE}</style></head><body>
<h1>Evaluation: {escape(pred.name)}</h1>
<table id="run">{"".join(info_rows)}</table>
<h2>Summary</h2>{_summary_table(metrics)}
<h2>Speed</h2>{_speed_table(metrics)}
<h2>Per speaker</h2>{_speaker_table(metrics)}
<h2>Plots</h2>{_plots(metrics, rows, base_rows)}
<h2>Samples</h2>{_samples_table(metrics, rows, pred, out)}
<h2>Problems</h2><ul id="problems">{problem_list}</ul>
</body></html>
"""


def write_report(out: Path, metrics: dict, rows: list[dict], base_rows: list[dict] | None = None) -> dict[str, Path]:
    """Write metrics.json, samples.csv and report.html into ``out``; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    return {
        "metrics": write_metrics_json(out / "metrics.json", metrics),
        "samples": write_samples_csv(out / "samples.csv", rows),
        "report": atomic_write_text(out / "report.html", render_html(metrics, rows, out, base_rows)),
    }
