"""bench/gpu_check.py at tiny size on the CPU: every section runs or says why not, and the JSON and table are
written (so the one GPU run cannot rot)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_at_tiny_size(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--size", "tiny"]
        + ["--out", str(out), "--budget-s", "500"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert set(sections) >= {"gpu_tests", "train", "planner_and_qlora", "decode_eager", "decode_compiled", "codec"}
    assert sections["planner_and_qlora"]["status"] == "skipped" and "CUDA" in sections["planner_and_qlora"]["reason"]
    assert sections["decode_compiled"]["status"] == "skipped"
    for name in ("gpu_tests", "train", "decode_eager", "codec"):
        assert sections[name]["status"] == "ok", (name, sections[name], (out / f"{name}.log").read_text()[-2000:])
    assert sections["gpu_tests"]["figures"].get("skipped", 0) > 0  # no CUDA: every GPU test skips with its reason
    train = sections["train"]["figures"]["results"]
    assert train["ours"]["target_audio_s_per_s"] > 0 and train["baseline"]["target_audio_s_per_s"] > 0
    assert set(train["ours"]["step_breakdown_s"]) == {"data", "forward", "backward", "optimiser", "logging"}
    assert sections["decode_eager"]["figures"]["results"]["ours"]["rtf_batch1"] > 0
    assert sections["codec"]["figures"]["encode_audio_h_per_h"] > 0
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("| section | status |") and "planner_and_qlora | skipped" in table
    assert "skipped decode_compiled" in done.stdout
