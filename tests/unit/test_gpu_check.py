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


def _runner(tmp_path, budget_s=60.0):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import gpu_check

    return gpu_check, gpu_check.Runner(tmp_path, budget_s, {"device": "test"})


def test_a_section_past_its_limit_is_killed_with_its_children_and_keeps_what_it_printed(tmp_path):
    gpu_check, runner = _runner(tmp_path)
    # Prints a figure, starts a grandchild that holds the pipes open for a minute, then hangs: the whole process
    # group must die at the 2 s limit (else reading the pipes would wait for the grandchild).
    script = (
        "import subprocess, time; print('{\"rtf_batch1\": 0.5}', flush=True); "
        "subprocess.Popen(['sleep', '60']); time.sleep(60)"
    )
    runner.run("hangs", [sys.executable, "-c", script], 2, gpu_check.last_json)
    result = runner.results["hangs"]
    assert result["status"] == "timeout" and result["seconds"] < 10
    assert result["figures"] == {"rtf_batch1": 0.5}
    saved = json.loads((tmp_path / "gpu_check.json").read_text())  # written after the section, not only at the end
    assert saved["sections"]["hangs"]["figures"] == {"rtf_batch1": 0.5}
    assert "| hangs | timeout |" in (tmp_path / "gpu_check.md").read_text()


def test_a_failed_section_says_why_and_the_next_one_still_runs(tmp_path):
    gpu_check, runner = _runner(tmp_path)
    runner.run("breaks", [sys.executable, "-c", "raise SystemExit('no CUDA here')"], 30, gpu_check.last_json)
    runner.run("works", [sys.executable, "-c", "print('{\"x\": 2}')"], 30, gpu_check.last_json)
    assert runner.results["breaks"] == {**runner.results["breaks"], "status": "failed", "reason": "no CUDA here"}
    assert runner.results["works"]["status"] == "ok" and runner.results["works"]["figures"] == {"x": 2}
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(saved["sections"]) == ["breaks", "works"]


def test_a_section_that_no_longer_fits_the_budget_is_skipped_saying_so(tmp_path):
    gpu_check, runner = _runner(tmp_path, budget_s=5.0)
    runner.run("late", [sys.executable, "-c", "print('{}')"], 60, gpu_check.last_json)
    assert runner.results["late"]["status"] == "skipped" and "out of time" in runner.results["late"]["reason"]


def test_planner_rows_printed_before_a_cut_are_kept(tmp_path):
    gpu_check, _ = _runner(tmp_path)
    parse = gpu_check.partial_json_lines(tmp_path / "absent.json")
    stdout = 'loading\n{"cap_gib": 16, "fits": true}\nwarning: x\n{"cap_gib": 24, "oom": true}\n'
    assert parse(stdout) == {"partial_rows": [{"cap_gib": 16, "fits": True}, {"cap_gib": 24, "oom": True}]}
