"""`sbatch --array=0-1 slurm/prepare.sbatch` on a real SLURM: one cache shard per task, then the join job."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import DEMO_CORPUS
from tests.slurm.jobs import read, wait_until_done

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]  # first: skip fast


def test_an_array_job_writes_one_shard_per_task_and_the_join_writes_the_report(tiny_checkpoint, slurm_jobs, tmp_path):
    # Eight demo utterances, four per shard: two shards for two tasks (the codec on CPU is the slow part).
    rows = [json.loads(line) for line in (DEMO_CORPUS / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "".join(json.dumps({**r, "audio": str(DEMO_CORPUS / r["audio"])}, ensure_ascii=False) + "\n" for r in rows[:8]),
        encoding="utf-8",
    )
    cache = tmp_path / "cache"
    array = slurm_jobs.submit(
        "prepare.sbatch",
        ["--array=0-1", "--gpus-per-task=0", "--cpus-per-task=1", "--time=15", f"--output={tmp_path}/task-%a.log"],
        [
            "configs/demo.yaml",
            f"model.path={tiny_checkpoint.model_dir}",
            f"model.codec_path={tiny_checkpoint.codec_dir}",
            f"data.corpus={manifest}",
            f"data.cache_dir={cache}",
            "prepare.shard_size=4",
        ],
    )
    first_log = tmp_path / "task-0.log"
    for task in ("0", "1"):
        state = wait_until_done(f"{array}_{task}", tmp_path / f"task-{task}.log")
        assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), read(tmp_path / f"task-{task}.log")
        assert "shards written: 1, already done: 0" in read(tmp_path / f"task-{task}.log")
    submitted = re.search(r"join job (\d+) starts when every task of array job (\d+)", read(first_log))
    assert submitted and submitted.group(2) == array, read(first_log)
    join = slurm_jobs.adopt(submitted.group(1))
    join_log = tmp_path / f"slurm-higgs-lora-prepare-join-{join}.log"  # beside the tasks' logs
    state = wait_until_done(join, join_log)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), read(join_log)

    assert sorted(p.name for p in (cache / "shards").iterdir()) == ["shard-00000-of-00002", "shard-00001-of-00002"]
    report = json.loads((cache / "report.json").read_text(encoding="utf-8"))
    assert (report["items_in"], report["kept"], report["num_shards"]) == (8, 8, 2)
    assert sum(s["utterances"] for s in report["speakers"].values()) == 8
    assert "8 kept" in read(join_log)
