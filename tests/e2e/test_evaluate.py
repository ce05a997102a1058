"""`python -m higgs_lora.evaluate` end to end on prediction folders built from the demo corpus: the files it
writes, bad samples reported without stopping, speed aggregation, --compare deltas, and the report rendered in
headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from higgs_lora.eval.cli import main
from tests.eval_folders import by_speaker, make_prediction_folder, same_speaker_samples, write_wav

FINE_TUNED_RTF, BASE_RTF = 0.5, 2.0


def _append_broken_samples(pred: Path, reference: str) -> None:
    """A corrupt wav, a missing wav, a line that is not JSON, a sample that failed to generate, and a readable
    clip too short to embed or rate (50 ms, as a broken generation might stop)."""
    (pred / "corrupt.wav").write_bytes(b"RIFF not really a wav file")
    write_wav(pred / "short.wav", np.full(1200, 0.1, np.float32))
    lines = [
        {
            "index": 5,
            "id": "corrupt",
            "wav": "corrupt.wav",
            "reference_audio": None,
            "reference_text": None,
            "target_text": "نص",
            "duration_s": 2.0,
            "seconds": 2.0 * FINE_TUNED_RTF,
            "rtf": FINE_TUNED_RTF,
        },
        {
            "index": 6,
            "id": "missing",
            "wav": "nope.wav",
            "target_text": "نص",
            "duration_s": 1.0,
            "seconds": 1.0 * FINE_TUNED_RTF,
        },
        {
            "index": 8,
            "id": "short",
            "wav": "short.wav",
            "reference_audio": str(reference),
            "target_text": "نص",
            "duration_s": 0.05,
            "seconds": 0.05 * FINE_TUNED_RTF,
        },
    ]
    with open(pred / "manifest.jsonl", "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        handle.write("{this is not json\n")
    (pred / "errors.jsonl").write_text(json.dumps({"index": 7, "id": "oom", "error": "CUDA out of memory"}) + "\n")


@pytest.fixture(scope="module")
def folders(demo_rows, tmp_path_factory):
    """Fine-tuned: each voice cloned perfectly (generated = a recording of the reference's voice), plus broken
    entries. Base: the same ids, but generated in the *next* voice, 4x slower; plus one id of its own."""
    root = tmp_path_factory.mktemp("evaluate")
    samples = same_speaker_samples(demo_rows, per_speaker=1)
    for sample in samples[:2]:
        sample["first_audio_s"] = 0.25
    fine_tuned = make_prediction_folder(root / "out", samples, seconds_per_audio_second=FINE_TUNED_RTF)
    _append_broken_samples(fine_tuned, samples[0]["reference"]["audio"])
    groups = by_speaker(demo_rows)
    speakers = sorted(groups)
    base_samples = [{**s, "generated": groups[speakers[(i + 1) % 5]][2]} for i, s in enumerate(samples)]
    base_samples.append({"id": "extra-base", "generated": groups[speakers[0]][3], "reference": groups[speakers[0]][0]})
    base = make_prediction_folder(root / "out_base", base_samples, seconds_per_audio_second=BASE_RTF)
    assert main(["--pred", str(fine_tuned), "--quiet"]) == 0
    assert main(["--pred", str(base), "--quiet", "--no-dnsmos"]) == 0
    compared = root / "compared"
    assert (
        main(["--pred", str(fine_tuned), "--compare", str(base), "--out", str(compared), "--quiet", "--no-dnsmos"]) == 0
    )
    return {"fine_tuned": fine_tuned, "base": base, "compared": compared}


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))


def _csv(folder: Path) -> dict[str, dict]:
    with open(folder / "samples.csv", encoding="utf-8", newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


@pytest.mark.slow  # the `folders` fixture runs three evaluations
def test_metrics_json(folders):
    metrics = _metrics(folders["fine_tuned"])
    assert metrics["num_samples"] == 8 and metrics["num_scored"] == 6
    assert metrics["num_failed_generation"] == 1 and metrics["num_failed_scoring"] == 2
    summary = metrics["summary"]
    # generated == the ground-truth target recording (resampled to 24 kHz PCM16): the same voice, almost exactly
    assert summary["similarity_target"]["value"] > 0.99 and summary["similarity_target"]["n"] == 5
    assert 0.7 < summary["similarity_reference"]["value"] < summary["similarity_target"]["value"]
    for key in ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"):
        assert summary[key]["n"] == 5 and 1.0 <= summary[key]["min"] <= summary[key]["max"] <= 5.0
    assert summary["clipped_fraction"]["max"] == 0.0  # peak-normalised to -3 dBFS: nothing clipped
    assert 0.0 < summary["silence_ratio"]["mean"] < 0.5
    assert 0.5 < summary["duration_ratio"]["mean"] < 2.0  # the same voices at their own pace
    assert sorted(metrics["per_speaker"]) == ["spk_f1", "spk_f2", "spk_m1", "spk_m2", "spk_m3"]
    assert all(v["n"] == 1 for v in metrics["per_speaker"].values())
    assert metrics["run"]["model"] == "tiny" and metrics["compare"] is None
    assert metrics["versions"]["resemblyzer"] == "0.1.4"


@pytest.mark.slow
def test_speed_is_aggregated_from_the_manifest(folders):
    metrics = _metrics(folders["fine_tuned"])
    rows = [
        json.loads(line)
        for line in (folders["fine_tuned"] / "manifest.jsonl").read_text().splitlines()
        if line.startswith('{"')
    ]
    total_seconds = sum(r["seconds"] for r in rows)
    total_audio = sum(r["duration_s"] for r in rows)
    assert metrics["summary"]["rtf"]["value"] == pytest.approx(total_seconds / total_audio) == pytest.approx(0.5)
    assert metrics["summary"]["rtf"]["n"] == 8  # speed comes from the manifest, even for unreadable wavs
    assert metrics["summary"]["seconds"]["mean"] == pytest.approx(total_seconds / 8)
    assert metrics["summary"]["seconds"]["max"] == pytest.approx(max(r["seconds"] for r in rows))
    assert metrics["summary"]["first_audio_s"] == pytest.approx(
        {"value": 0.25, "mean": 0.25, "median": 0.25, "p10": 0.25, "p90": 0.25, "min": 0.25, "max": 0.25, "n": 2}
    )


@pytest.mark.slow
def test_bad_samples_are_reported_not_fatal(folders):
    metrics = _metrics(folders["fine_tuned"])
    problems = "\n".join(metrics["problems"])
    assert "manifest.jsonl:9: not JSON" in problems
    assert "oom: generation failed: CUDA out of memory" in problems
    assert "corrupt: generated audio:" in problems and "cannot read audio" in problems
    assert "missing: generated audio:" in problems and "file not found" in problems
    rows = _csv(folders["fine_tuned"])
    assert list(rows) == ["spk_f1-0", "spk_f2-0", "spk_m1-0", "spk_m2-0", "spk_m3-0", "corrupt", "missing", "short"]
    assert rows["corrupt"]["similarity_reference"] == "" and "cannot read audio" in rows["corrupt"]["error"]
    assert rows["spk_f1-0"]["error"] == "" and float(rows["spk_f1-0"]["similarity_target"]) > 0.99
    assert rows["spk_f1-0"]["wav"] == "000.wav" and rows["spk_f1-0"]["first_audio_s"] == "0.25"
    # readable but too short: no error, the metrics that need more audio are missing with the reason, the rest kept
    short = rows["short"]
    assert short["error"] == "" and short["similarity_reference"] == "" and short["dnsmos_ovrl"] == ""
    assert "speaker similarity: 0.050 s of audio is too short" in short["notes"] and "DNSMOS:" in short["notes"]
    assert float(short["silence_ratio"]) == 0.0 and float(short["audio_seconds"]) == pytest.approx(0.05)


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    assert main(["--pred", str(tmp_path)]) == 2
    assert "manifest.jsonl not found" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_deltas_are_differences_of_the_two_folders(folders):
    compared = _metrics(folders["compared"])["compare"]
    assert compared["num_common"] == 5
    assert compared["only_in_pred"] == ["corrupt", "missing", "short"] and compared["only_in_base"] == ["extra-base"]
    fine_tuned, base = _csv(folders["fine_tuned"]), _csv(folders["base"])
    common = [i for i in fine_tuned if i in base]
    for metric in ("similarity_reference", "similarity_target", "silence_ratio", "duration_ratio"):
        mine = sum(float(fine_tuned[i][metric]) for i in common) / len(common)
        theirs = sum(float(base[i][metric]) for i in common) / len(common)
        assert compared["summary"][metric] == pytest.approx(mine, abs=1e-5)
        assert compared["base_summary"][metric] == pytest.approx(theirs, abs=1e-5)
        assert compared["delta"][metric] == pytest.approx(mine - theirs, abs=1e-5)
    assert compared["delta"]["rtf"] == pytest.approx(FINE_TUNED_RTF - BASE_RTF)
    assert compared["delta"]["similarity_reference"] > 0.1  # the right voice beats the wrong one
    per_sample = {e["id"]: e for e in compared["per_sample"]}
    for sample_id in common:
        assert per_sample[sample_id]["similarity_reference"] == pytest.approx(
            float(fine_tuned[sample_id]["similarity_reference"]) - float(base[sample_id]["similarity_reference"]),
            abs=1e-5,
        )
    assert "dnsmos_ovrl" not in compared["delta"]  # --no-dnsmos: nothing to compare


# ------------------------------------------------------------------------------------------ rendered report


class _DomSummary(HTMLParser):
    """Counts what the rendered DOM holds: tables (rows per table id), plots (bars per plot), audio sources."""

    def __init__(self):
        super().__init__()
        self.table_rows: dict[str, int] = {}
        self.plot_bars: dict[str, int] = {}
        self.audio_sources: list[str] = []
        self.metric_rows: list[str] = []
        self.headers: list[str] = []
        self._table: str | None = None
        self._plot: str | None = None
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            self.table_rows[self._table] = 0
        elif tag == "tr" and self._table and {"data-metric", "data-id", "data-speaker"} & set(attrs):
            self.table_rows[self._table] += 1
            if self._table == "summary":
                self.metric_rows.append(attrs["data-metric"])
        elif tag == "th":
            self._in_th = True
        elif tag == "figure" and "plot" in (attrs.get("class") or ""):
            self._plot = attrs["data-plot"]
            self.plot_bars[self._plot] = 0
        elif tag == "rect" and "bar" in (attrs.get("class") or "") and self._plot:
            self.plot_bars[self._plot] += 1 if float(attrs["height"]) > 0 else 0
        elif tag == "audio":
            self.audio_sources.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "figure":
            self._plot = None
        elif tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self._in_th and self._table == "summary":
            self.headers.append(data)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("HIGGS_LORA_CI"):
        pytest.fail("chromium is not installed, but CI must render the report: .ci/run installs Debian's chromium")
    pytest.skip("needs headless Chromium to render the report (apt-get install chromium); CI installs it")


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-extensions",
    "--mute-audio",
]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(folders, tmp_path):
    chromium = _chromium()
    report = folders["compared"] / "report.html"
    env = {**os.environ, "HOME": str(tmp_path)}  # a fresh profile; nothing from the machine's own
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=True,
    ).stdout
    page = _DomSummary()
    page.feed(dom)
    assert {"run", "summary", "speed", "speakers", "samples"} <= set(page.table_rows)
    assert {"similarity_reference", "similarity_target", "silence_ratio", "rtf"} <= set(page.metric_rows)
    assert "delta" in page.headers and "base (common ids)" in page.headers
    assert page.table_rows["samples"] == 8 and page.table_rows["speed"] >= 1 and page.table_rows["speakers"] == 5
    # plots drawn with visible bars: per-speaker similarity (5 speakers x fine-tuned/base) and distributions
    assert page.plot_bars["speaker_similarity"] == 10
    assert {"similarity_reference", "rtf", "duration_ratio"} <= set(page.plot_bars)
    assert all(bars > 0 for bars in page.plot_bars.values()), page.plot_bars
    # players for reference / generated / target / base generated, by paths relative to the report that exist
    assert len(page.audio_sources) >= 5 * 4
    for source in page.audio_sources:
        assert not source.startswith(("http:", "https:", "/")), source
        assert (report.parent / unquote(source)).resolve().is_file(), source
    assert "cdn" not in dom.lower() and "<script" not in dom.lower()


@pytest.mark.slow
def test_report_screenshot_shows_the_plots(folders, tmp_path):
    """What a person sees: the bars' colour is on the rendered bitmap (only the plots use it)."""
    chromium = _chromium()
    from PIL import Image  # Pillow is installed with tensorboard (pinned in constraints.txt)

    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1400,2400",
            (folders["compared"] / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=180,
        env={**os.environ, "HOME": str(tmp_path)},
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    bar_blue = sum(count for count, colour in image.getcolors(maxcolors=1 << 20) if colour == (0x3B, 0x6E, 0xA5))
    assert bar_blue > 2000, "no plot bars visible in the rendered page"


@pytest.mark.slow
def test_report_fits_a_1280_px_window(folders, tmp_path):
    """No sideways scrolling at 1280 px: the page's widest element fits, Arabic text wraps in its cells.

    The report has no script of its own; a copy gets one line that writes the page's scroll width into the DOM,
    which Chromium's --dump-dom then shows (layout is computed at the --window-size given)."""
    chromium = _chromium()
    report = folders["compared"] / "report.html"
    probe = report.with_name("report_width_probe.html")
    script = (
        "<script>document.body.setAttribute('data-width', document.documentElement.scrollWidth + ' '"
        " + document.getElementById('samples').scrollWidth)</script>"
    )
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    try:
        dom = subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                "--window-size=1280,900",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "HOME": str(tmp_path)},
            check=True,
        ).stdout
    finally:
        probe.unlink()
    page_width, table_width = map(int, re.search(r'data-width="(\d+) (\d+)"', dom).groups())
    assert page_width <= 1280 and table_width <= 1280 - 2 * 16, (page_width, table_width)
    summary = _DomSummary()
    summary.feed(dom)
    assert len(summary.headers) == len(set(summary.headers)), summary.headers  # no column twice
    assert "mean" not in summary.headers  # "value" is the mean (CER/WER/RTF: the corpus figure, mean beneath)
