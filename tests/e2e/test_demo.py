"""The README's main command (`make demo` -> python -m higgs_lora.demo) runs end to end on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from higgs_lora.config import load_config
from higgs_lora.demo import demo_pairs, foundation_step

from tests.conftest import REPO_ROOT


def demo_config(tiny, tmp_path, *overrides):
    return load_config(REPO_ROOT / "configs" / "demo.yaml", [
        f"model.path={tiny.model_dir}", f"model.codec_path={tiny.codec_dir}", f"output_dir={tmp_path}",
        f"data.corpus={REPO_ROOT / 'examples' / 'demo_corpus' / 'manifest.jsonl'}", *overrides,
    ])


def test_pairs_are_same_speaker_and_distinct(demo_rows):
    pairs = demo_pairs(demo_rows, 10)
    assert len(pairs) == len({r["speaker"] for r in demo_rows})
    for reference, target in pairs:
        assert reference["speaker"] == target["speaker"] and reference["audio"] != target["audio"]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_foundation_step_loss_and_gradients(tiny_checkpoint, tmp_path, checkpointing):
    cfg = demo_config(tiny_checkpoint, tmp_path, f"model.gradient_checkpointing={str(checkpointing).lower()}")
    summary = foundation_step(cfg)
    # The model's loss is the sum of 8 per-codebook cross-entropies; a random model is near uniform over 1026.
    assert summary["loss"] == pytest.approx(sum(summary["per_codebook_loss"]), rel=1e-4)
    assert summary["loss"] == pytest.approx(8 * math.log(1026), rel=0.1)
    assert summary["adapter_grad_norm"] > 0 and math.isfinite(summary["adapter_grad_norm"])
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"] / 10


@pytest.mark.slow
def test_demo_command_end_to_end(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "higgs_lora.demo", "--config", "configs/demo.yaml", "--tiny-dir", str(tmp_path / "tiny"),
         f"output_dir={out}", f"model.path={tmp_path / 'tiny' / 'model'}", f"model.codec_path={tmp_path / 'tiny' / 'codec'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[demo] loss" in result.stdout and str(out) in result.stdout
    report = json.loads((out / "demo_report.json").read_text())
    assert math.isfinite(report["loss"]) and report["labelled_positions"] > 0
    assert load_config(out / "config.yaml").output_dir == str(out)
    assert (tmp_path / "tiny" / "model" / "model.safetensors").is_file()  # built because it was missing


def test_demo_command_reports_config_errors(capsys):
    from higgs_lora.demo import main

    assert main(["--config", str(REPO_ROOT / "configs" / "demo.yaml"), "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().err
