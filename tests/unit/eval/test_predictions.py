"""Reading inference output folders: required and optional fields, bad lines reported; summaries and plots on
hand-made rows."""

from __future__ import annotations

import json
import re

import pytest

from higgs_lora.eval import plots
from higgs_lora.eval.predictions import read_predictions
from higgs_lora.eval.scoring import compare, per_speaker, summarise


def _write(folder, lines, run=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.jsonl").write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8"
    )
    if run is not None:
        (folder / "run.json").write_text(run, encoding="utf-8")
    return folder


def test_only_id_wav_and_target_text_are_required(tmp_path):
    folder = _write(
        tmp_path / "out",
        [
            {"id": "a", "wav": "a.wav", "target_text": "نص"},  # minimal
            {
                "id": "b",
                "wav": "b.wav",
                "target_text": "نص",
                "reference_audio": "/abs/ref.flac",
                "target_audio": None,
                "speaker": None,
                "duration_s": 2.0,
                "seconds": 1.0,
                "rtf": None,
                "first_audio_s": None,
                "index": 1,
            },
            {"id": "c", "wav": "c.wav"},  # no target_text
            {"id": "a", "wav": "again.wav", "target_text": "x"},  # duplicate id
            "[1, 2]",  # JSON but not an object
            "",  # blank lines are fine
        ],
        run="{broken",
    )
    result = read_predictions(folder)
    assert [p.id for p in result.predictions] == ["a", "b"]
    a, b = result.predictions
    assert a.wav == folder / "a.wav" and a.reference_audio is None and a.index is None and a.duration_s is None
    assert b.reference_audio.as_posix() == "/abs/ref.flac" and b.target_audio is None and b.seconds == 1.0
    assert result.run == {} and result.generation_errors == []
    problems = "\n".join(result.problems)
    assert "entry 3 (id 'c') lacks target_text" in problems
    assert "id 'a' appears again in entry 4; kept the first" in problems
    assert "manifest.jsonl:5: expected a JSON object, got list" in problems
    assert "run.json: not JSON" in problems


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m higgs_lora.infer --out"):
        read_predictions(tmp_path)


ROWS = [
    {
        "id": "1",
        "speaker": "x",
        "similarity_reference": 0.9,
        "seconds": 1.0,
        "duration_s": 2.0,
        "rtf": 0.5,
        "char_edits": 1,
        "num_ref_chars": 10,
        "word_edits": 1,
        "num_ref_words": 2,
        "cer": 0.1,
        "wer": 0.5,
    },
    {
        "id": "2",
        "speaker": "x",
        "similarity_reference": 0.7,
        "seconds": 3.0,
        "duration_s": 2.0,
        "rtf": 1.5,
        "char_edits": 0,
        "num_ref_chars": 30,
        "word_edits": 0,
        "num_ref_words": 6,
        "cer": 0.0,
        "wer": 0.0,
    },
    {"id": "3", "speaker": None, "similarity_reference": None, "seconds": 2.0, "duration_s": 4.0, "rtf": 0.5},
]


def test_summary_headline_values():
    summary = summarise(ROWS)
    assert summary["similarity_reference"]["value"] == pytest.approx(0.8) and summary["similarity_reference"]["n"] == 2
    assert summary["rtf"]["value"] == pytest.approx(6.0 / 8.0)  # total seconds / total audio, not mean(0.5,1.5,0.5)
    assert summary["rtf"]["mean"] == pytest.approx(2.5 / 3)
    assert summary["cer"]["value"] == pytest.approx(1 / 40) and summary["cer"]["mean"] == pytest.approx(0.05)
    assert summary["wer"]["value"] == pytest.approx(1 / 8)
    assert "dnsmos_ovrl" not in summary
    assert per_speaker(ROWS) == {"x": {"n": 2, **{m: s["value"] for m, s in summarise(ROWS[:2]).items()}}}


def test_compare_matches_ids_and_subtracts():
    base = [{**ROWS[0], "similarity_reference": 0.5, "rtf": 1.0, "seconds": 2.0}, {"id": "9", "rtf": 1.0}]
    result = compare(ROWS, base)
    assert result["num_common"] == 1 and result["only_in_pred"] == ["2", "3"] and result["only_in_base"] == ["9"]
    assert result["delta"]["similarity_reference"] == pytest.approx(0.9 - 0.5)
    assert result["delta"]["rtf"] == pytest.approx(1.0 / 2.0 - 2.0 / 2.0)
    assert result["per_sample"][0]["similarity_reference"] == pytest.approx(0.4)


def test_plots_are_svg_with_one_bar_per_bin_and_series():
    svg = plots.histogram("h", "title <&>", {"a": [0.1, 0.2, 0.2], "b": [0.9]}, bins=5, bounds=(0, 1))
    assert svg.startswith('<figure class="plot" data-plot="h"><svg') and "title &lt;&amp;&gt;" in svg
    assert svg.count('class="bar"') == 10
    bars = plots.bar_chart("b", "t", {"s": {"x": 0.5, "y": 1.0}})
    assert bars.count('class="bar"') == 2
    assert plots.histogram("e", "same values", {"a": [2.0, 2.0]}).count('class="bar"') == 10
    # the x axis spans the data (0.62 .. 0.8), clipped to the bounds, not the bounds themselves
    ticks = re.findall(
        r'text-anchor="middle">([-0-9.e]+)<', plots.histogram("s", "t", {"a": [0.62, 0.8]}, bounds=(0, 1))
    )
    assert float(ticks[0]) == pytest.approx(0.62) and float(ticks[-1]) == pytest.approx(0.8)
    flat = plots.histogram("d", "t", {"a": [5.0, 5.0]}, bounds=(1, 5))
    assert "5.5" not in flat and ">4.5<" in flat  # a flat series is widened inside the bounds only
