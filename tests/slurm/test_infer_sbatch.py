"""`sbatch --array=0-1 slurm/infer.sbatch` on a real SLURM: one shard per task, the join writes the folder that
`evaluate` reads, and resubmitting the same command skips the finished shard and redoes a half-written one."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from higgs_lora.eval.predictions import read_predictions
from tests.conftest import DEMO_CORPUS
from tests.slurm.jobs import read, wait_until_done

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]  # first: skip fast


def run_array(slurm_jobs, tmp_path, args: list[str], round_: int) -> str:
    """Submit the array of two CPU tasks, wait for both and for the join; returns the join's log."""
    logs = tmp_path / f"logs-{round_}"
    logs.mkdir()
    array = slurm_jobs.submit(
        "infer.sbatch",
        ["--array=0-1", "--gpus-per-task=0", "--cpus-per-task=1", "--time=15", f"--output={logs}/task-%a.log"],
        args,
    )
    for task in ("0", "1"):
        state = wait_until_done(f"{array}_{task}", logs / f"task-{task}.log")
        assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), read(logs / f"task-{task}.log")
    submitted = re.search(r"join job (\d+) starts when every task of array job (\d+)", read(logs / "task-0.log"))
    assert submitted and submitted.group(2) == array, read(logs / "task-0.log")
    join = slurm_jobs.adopt(submitted.group(1))
    join_log = logs / f"slurm-higgs-lora-infer-join-{join}.log"  # beside the tasks' logs
    state = wait_until_done(join, join_log)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), read(join_log)
    return read(logs / "task-0.log"), read(logs / "task-1.log"), read(join_log)


def test_an_array_job_clones_one_shard_per_task_joins_them_and_resumes(tiny_checkpoint, slurm_jobs, tmp_path):
    rows = [json.loads(line) for line in (DEMO_CORPUS / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"s{i}",
                    "reference_audio": str(DEMO_CORPUS / rows[i]["audio"]),
                    "reference_text": rows[i]["text"],
                    "target_text": rows[i + 1]["text"],
                },
                ensure_ascii=False,
            )
            + "\n"
            for i in range(3)
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = [str(samples), str(out), "--model", str(tiny_checkpoint.model_dir), "--max-seconds", "0.5", "--seed", "1"]
    _, _, join_log = run_array(slurm_jobs, tmp_path, args, 1)

    # Task 0 took samples 0 and 2, task 1 sample 1; the join put them in one folder, as one run writes it.
    shard1 = (out / "shards" / "shard-00001-of-00002" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["index"] for line in shard1] == [1]
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(line["index"], line["id"], line["wav"], line["seed"]) for line in lines] == [
        (0, "s0", "000.wav", 1),
        (1, "s1", "001.wav", 2),
        (2, "s2", "002.wav", 3),
    ]
    folder = read_predictions(out)
    assert [p.id for p in folder.predictions] == ["s0", "s1", "s2"] and not folder.problems
    assert all(p.wav.stat().st_size > 44 and p.duration_s > 0 for p in folder.predictions)
    assert json.loads((out / "run.json").read_text())["samples"] == 3 and "3 samples" in join_log
    first = {line["wav"]: (out / line["wav"]).read_bytes() for line in lines}

    # Shard 1's task "killed half-way": its folder gone, its staging left behind. The same command again skips
    # shard 0 and generates shard 1 anew (same seed: same audio), then joins again.
    shutil.rmtree(out / "shards" / "shard-00001-of-00002")
    (out / "shards" / ".shard-00001-of-00002.killed.partial").mkdir()
    task0, task1, _ = run_array(slurm_jobs, tmp_path, args, 2)
    assert "shard 0/2 already done" in task0, task0
    assert "removed .shard-00001-of-00002.killed.partial" in task1 and "1 samples" in task1, task1
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "plan.json",
        "shard-00000-of-00002",
        "shard-00001-of-00002",
    ]
    assert {wav: (out / wav).read_bytes() for wav in first} == first
