"""Submitting to, and watching, the test SLURM cluster (tests/slurm/local_slurm.sh) from tests.

Polls `scontrol show job` every half second instead of `sbatch --wait` (which notices the end ~10 s late), and
keeps every job it submitted so a fixture can cancel what is left when a test ends, passed or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO_ROOT

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
"""What the scripts' GPU-cluster #SBATCH defaults become on the CPU test cluster (options on the line win)."""


def slurm_ok() -> tuple[bool, str]:
    """Whether a SLURM controller answers, and what was tried when none does."""
    try:
        result = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        return False, f"`scontrol ping` failed: {err}"
    if result.returncode != 0 or "UP" not in result.stdout:
        return (
            False,
            f"`scontrol ping` (SLURM_CONF={os.environ.get('SLURM_CONF', 'unset')}): "
            f"{(result.stdout + result.stderr).strip()}",
        )
    return True, ""


def job_env() -> dict:
    """The environment a job inherits (sbatch exports it): this Python, one torch thread per rank."""
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


class Jobs:
    """The jobs one test submitted."""

    def __init__(self):
        self.ids: list[str] = []

    def submit(self, script: str, options: list[str], args: list[str]) -> str:
        """`sbatch --parsable OPTIONS slurm/SCRIPT ARGS` from the repository root; returns the job id."""
        command = ["sbatch", "--parsable", *options, str(REPO_ROOT / "slurm" / script), *args]
        result = subprocess.run(command, cwd=REPO_ROOT, env=job_env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        job = result.stdout.strip().split(";")[0]
        self.ids.append(job)
        return job

    def adopt(self, job: str) -> str:
        """A job submitted by a job (so that cleanup cancels it too)."""
        self.ids.append(job)
        return job

    def cancel_all(self, timeout: float = 120) -> None:
        """Cancel what is still queued or running and wait until SLURM has let go of it."""
        alive = [j for j in self.ids if j in queued()]
        if alive:
            subprocess.run(["scancel", *alive], capture_output=True, timeout=60)
        deadline = time.monotonic() + timeout
        while any(j in queued() for j in alive) and time.monotonic() < deadline:
            time.sleep(0.5)


def queued() -> set[str]:
    """Ids of the jobs SLURM still holds (pending, running, completing); array tasks by their array id too."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %A %F"], capture_output=True, text=True, timeout=60).stdout
    return {part for line in out.splitlines() for part in line.split()}


def show(job: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as a dict (JobState, ExitCode, Restarts, StdOut, ...); {} once it is forgotten."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return {}
    fields = {}
    for token in result.stdout.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def wait_until_done(job: str, log: Path | None = None, timeout: float = 420, restarts: int = 0) -> dict[str, str]:
    """Poll until `job` is in a final state after at least `restarts` requeues; returns its `show` fields.

    A requeued job is PENDING between its runs, never final, so the wait goes on through a requeue.
    """
    deadline = time.monotonic() + timeout
    state: dict[str, str] = {}
    while time.monotonic() < deadline:
        state = show(job)
        if state.get("JobState") in TERMINAL and int(state.get("Restarts", "0")) >= restarts:
            return state
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else "(no log)"
    raise AssertionError(f"job {job} did not finish in {timeout:.0f} s (state {state.get('JobState')}):\n{tail}")


def wait_for(condition, what: str, job: str, log: Path, timeout: float = 300) -> None:
    """Poll `condition()` while `job` runs; fails with the job's log if the job ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        state = show(job).get("JobState")
        if state in TERMINAL:
            raise AssertionError(f"job {job} ended ({state}) before {what}:\n{read(log)[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout:.0f} s:\n{read(log)[-4000:]}")
        time.sleep(0.2)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
