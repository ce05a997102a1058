"""`sbatch slurm/train.sbatch` on a real SLURM: two slurmd "nodes" on localhost, two CPU ranks over gloo.

One job trains to the end on one node and writes an adapter; another runs across both nodes, gets the time-limit
warning mid-run (sent the way `#SBATCH --signal=B:USR1@T` sends it), checkpoints, requeues itself and resumes.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.e2e.launch import adapter_tensors, metrics
from tests.slurm.jobs import CPU_JOB, read, wait_for, wait_until_done

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]  # first: skip fast

DEMO = "configs/demo.yaml"
QUIET = ["train.eval_every=0", "train.log_every=1"]


def plan_ranks(log: str) -> list[str]:
    """The planner's "ranks" rows in a job log: what it saw of the job (e.g. '2 (2 nodes)')."""
    return re.findall(r"^ranks\s+(\d+ \(\d+ nodes?\))", log, flags=re.M)


def test_a_submitted_job_trains_on_two_ranks_and_writes_an_adapter(demo_cache, slurm_jobs, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    job = slurm_jobs.submit(
        "train.sbatch",
        [*CPU_JOB, "--nodes=1", "--ntasks-per-node=2", f"--output={log}"],
        [DEMO, *demo_cache, f"output_dir={out}", "train.max_steps=4", "train.save_every=2", *QUIET],
    )
    state = wait_until_done(job, log)
    text = read(log)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    assert plan_ranks(text) == ["2 (1 node)"]
    tensors = adapter_tensors(out / "adapter")
    assert tensors and all("lora_" in key for key in tensors)
    assert any(t.abs().sum() > 0 for key, t in tensors.items() if "lora_B" in key)  # trained, not the zero init
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_the_warning_signal_checkpoints_requeues_and_the_job_resumes_across_two_nodes(demo_cache, slurm_jobs, tmp_path):
    out, log = tmp_path / "run", tmp_path / "job.log"
    steps = 40  # long enough that the warning lands mid-run; no periodic checkpoint before the end
    job = slurm_jobs.submit(
        "train.sbatch",
        [*CPU_JOB, "--nodes=2", "--ntasks-per-node=1", f"--output={log}"],
        [DEMO, *demo_cache, f"output_dir={out}", f"train.max_steps={steps}", "train.save_every=1000", *QUIET],
    )
    wait_for(lambda: (out / "metrics.jsonl").exists() and metrics(out), "the first training step", job, log)
    # What `#SBATCH --signal=B:USR1@300` does 300 s before the time limit: SIGUSR1 to the batch shell only.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=60)
    state = wait_until_done(job, log, restarts=1)
    text = read(log)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]

    stopped = re.search(r"stop signal received: checkpointing at step (\d+)", text)
    assert stopped, text[-4000:]
    stopped_at = int(stopped.group(1))
    assert 1 <= stopped_at < steps
    checkpoint = out / "checkpoints" / f"step_{stopped_at:08d}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == stopped_at
    assert "requeueing job" in text
    assert re.search(rf"\[slurm\] job {job} \(restart 1\)", text)
    assert f"resumed from {checkpoint} at step {stopped_at}" in text
    # Every step trained exactly once over the two runs: the second continued where the first stopped.
    assert [m["step"] for m in metrics(out)] == list(range(1, steps + 1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert adapter_tensors(out / "adapter")
    assert plan_ranks(text) == ["2 (2 nodes)", "2 (2 nodes)"]  # both runs planned for the whole job
