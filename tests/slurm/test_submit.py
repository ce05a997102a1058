"""slurm/submit against a real SLURM (CPU-only nodes): it refuses what sbatch refuses, says which flags fit, and the
command it suggests is one sbatch accepts. `sbatch --test-only` submits nothing, so no job runs."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from tests.conftest import REPO_ROOT
from tests.slurm.jobs import job_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]  # first: skip fast


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=job_env(), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script, args", [("train.sbatch", ["configs/demo.yaml"]), ("infer.sbatch", ["s.json", "out"])])
def test_submit_refuses_what_sbatch_refuses_and_its_suggestion_is_accepted(script, args):
    # The GPU defaults on GPU-less nodes: sbatch itself refuses them at submission.
    refused = run("sbatch", "--test-only", f"slurm/{script}", *args)
    assert refused.returncode != 0 and "Invalid generic resource" in refused.stderr, refused.stderr

    checked = run("slurm/submit", "--test-only", f"slurm/{script}", *args)
    assert checked.returncode == 2, checked.stderr
    assert "partition debug has no GPUs" in checked.stderr and '(sbatch: "Invalid generic resource' in checked.stderr
    suggested = checked.stderr.split("this fits debug: ", 1)[1].splitlines()[0]
    command = shlex.split(suggested)
    assert command[:2] == ["slurm/submit", "--test-only"] and command[-len(args) :] == args

    accepted = run(*command)  # the wrapper checks again, then execs `sbatch --test-only ...`
    assert accepted.returncode == 0, accepted.stderr
    assert "fits partition debug" in accepted.stderr and "to start at" in accepted.stderr, accepted.stderr
