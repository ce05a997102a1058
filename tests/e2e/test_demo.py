"""The README's main command (`make demo` -> python -m higgs_lora.demo) trains end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from higgs_lora.config import load_config
from tests.conftest import REPO_ROOT
from tests.e2e.launch import adapter_tensors


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    out, tiny = tmp_path / "run", tmp_path / "tiny"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "higgs_lora.demo",
            "--config",
            "configs/demo.yaml",
            "--tiny-dir",
            str(tiny),
            f"output_dir={out}",
            f"model.path={tiny / 'model'}",
            f"model.codec_path={tiny / 'codec'}",
            "train.max_steps=10",
            "train.eval_every=5",
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "deepspeed --num_gpus 2" in result.stdout and "[train] step 10/10" in result.stdout
    report = json.loads((out / "demo_report.json").read_text())
    assert report["steps"] == 10 and report["last_loss"] < report["first_loss"]
    assert report["last_eval_loss"] < report["first_eval_loss"]  # step-0 baseline vs after training
    assert adapter_tensors(out / "adapter")
    assert load_config(out / "demo_config.yaml").output_dir == str(out)
    assert (tiny / "model" / "model.safetensors").is_file()  # built because it was missing
    # The demo ends by cloning the held-out speaker's voice with the adapter it trained.
    lines = [json.loads(line) for line in (out / "clone" / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["adapter"] == "demo" for line in lines)
    assert (out / "clone" / lines[0]["wav"]).stat().st_size > 44 and "[demo] cloned voice:" in result.stdout
    # Training listened to the held-out speaker at each evaluation (steps 0, 5, 10): clips, scores, folders.
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [0, 5, 10]
    # Each clip is scored, or flagged near-silent and left unscored (what the tiny random model mostly makes): never
    # a similarity of silence against silence.
    for e in evals:
        assert e["num_scored"] + e["num_failed"] == 2
        assert ("similarity" in e and "dnsmos_ovrl" in e) if e["num_scored"] else e["num_silent"] == 2
    assert sorted(p.name for p in (out / "eval_samples").glob("step_*")) == [
        "step_00000000",
        "step_00000005",
        "step_00000010",
    ]
    # The best evaluation's adapter (no ASR in the demo: similarity decides), and CER said to be skipped.
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] in (5, 10) and (out / "best" / "adapter_model.safetensors").is_file()
    assert "CER/WER skipped: no train.eval_asr given" in result.stdout
    # ... and ends with the evaluation report of the clones.
    evaluation = json.loads((out / "clone" / "metrics.json").read_text())
    assert evaluation["num_scored"] == 2 and evaluation["summary"]["similarity_reference"]["n"] == 2
    assert f"report: {out / 'clone' / 'report.html'}" in result.stdout
    assert "<table" in (out / "clone" / "report.html").read_text()


def test_demo_command_reports_config_errors(capsys):
    from higgs_lora.demo import main

    assert main(["--config", str(REPO_ROOT / "configs" / "demo.yaml"), "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().err
