"""The run report: curves from metrics.jsonl, drawn where the data is, with the evaluations' table."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

from higgs_lora.constants import STEP_NAME
from higgs_lora.eval import plots, run_report


def _metrics(folder, records, extra_lines=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _run(tmp_path):
    out = tmp_path / "run"
    records = []
    for step in (10, 20, 30):
        records.append(
            {
                "kind": "train",
                "step": step,
                "loss": 8.0 - step / 100,
                "per_codebook_loss": [7.5 + i / 10 - step / 100 for i in range(8)],
                "lr": 1e-4,
                "grad_norm": 0.5,
                "audio_seconds_per_s": 3.0,
            }
        )
    for step in (10, 30):
        records.append(
            {
                "kind": "eval",
                "step": step,
                "loss": 8.2 - step / 100,
                "per_codebook_loss": [8.0] * 8,
                "positions": 400.0,
                "similarity": 0.5 + step / 100,
                "similarity_ground_truth": 0.9,
                "dnsmos_ovrl": 2.5,
                "generate_seconds": 4.0,
            }
        )
    # a resumed run re-logged step 30 (the last record wins), and a kill cut one line
    records.append({**records[2], "loss": 7.6})
    _metrics(out, records, extra_lines=['{"kind": "train", "st'])
    (out / "eval_samples" / STEP_NAME.format(10)).mkdir(parents=True)
    return out


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.plot, self.lines, self.points, self.eval_rows, self.links = None, {}, {}, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.plot = attrs["data-plot"]
            self.lines[self.plot], self.points[self.plot] = [], 0
        elif tag == "polyline" and self.plot:
            self.lines[self.plot].append(attrs["points"])
        elif tag == "circle" and self.plot:
            self.points[self.plot] += 1
        elif tag == "tr" and "data-step" in attrs:
            self.eval_rows.append(int(attrs["data-step"]))
        elif tag == "a":
            self.links.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "figure":
            self.plot = None


def test_records_are_read_last_one_wins_cut_line_counted(tmp_path):
    out = _run(tmp_path)
    train, evals, bad = run_report.read_records(out / "metrics.jsonl")
    assert [r["step"] for r in train] == [10, 20, 30] and train[-1]["loss"] == 7.6
    assert [r["step"] for r in evals] == [10, 30] and bad == 1
    assert run_report.score_keys(evals) == ["similarity", "dnsmos_ovrl"]  # no bookkeeping, no ground truth


def test_report_draws_every_curve_and_links_the_clips(tmp_path):
    out = _run(tmp_path)
    path = run_report.write_run_report(out)
    assert path == out / "report.html"
    html = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    assert len(page.lines["loss"]) == 2  # training and held-out
    assert len(page.lines["per_codebook_loss"]) == 8  # one line per codebook
    assert len(page.lines["eval_per_codebook_loss"]) == 8
    assert len(page.lines["eval_similarity"]) == 2  # generated + ground truth
    assert len(page.lines["eval_dnsmos_ovrl"]) == 1
    assert {"lr", "grad_norm", "audio_seconds_per_s"} <= set(page.lines)
    assert page.eval_rows == [10, 30]
    assert page.links == [f"eval_samples/{STEP_NAME.format(10)}/"]  # step 30 wrote no clips folder
    assert "<script" not in html.lower() and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "unreadable metrics.jsonl lines</th><td>1<" in html


def test_line_chart_axes_start_where_the_data_does():
    svg = plots.line_chart("x", "loss", {"a": [(0, 7.2), (10, 6.9)]})
    ticks = [float(t) for t in re.findall(r'text-anchor="end">([-0-9.e]+)<', svg)]
    assert min(ticks) > 6.8 and max(ticks) < 7.3  # not from 0
    (points,) = re.findall(r'points="([^"]+)"', svg)
    ys = [float(p.split(",")[1]) for p in points.split()]
    top, bottom = plots.MARGIN_TOP, plots.HEIGHT - plots.MARGIN_BOTTOM
    # the falling loss goes down the page over the plot's whole height but the 5% padding either side
    assert abs((ys[1] - ys[0]) - (bottom - top) / 1.1) < 1.0
    one = plots.line_chart("y", "one point", {"a": [(5, 1.0)]})
    assert one.count('class="point"') == 1 and "polyline" not in one


def test_cli_writes_the_report_and_refuses_a_folder_without_metrics(tmp_path, capsys):
    out = _run(tmp_path)
    assert run_report.main([str(out), "--quiet"]) == 0 and (out / "report.html").is_file()
    assert run_report.main([str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
