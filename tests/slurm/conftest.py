"""The `slurm` tests need a running cluster: `tests/slurm/local_slurm.sh start` (what .ci/run does).

Without one they skip, with the reason. Where HIGGS_LORA_REQUIRE_SLURM=1 (set by .ci/run, which has just started
the cluster) a missing cluster fails them instead: CI must never pass by skipping its SLURM tests.
"""

from __future__ import annotations

import os

import pytest

from tests.slurm.jobs import Jobs, slurm_ok


@pytest.fixture(scope="session")
def slurm_cluster():
    ok, why = slurm_ok()
    if not ok:
        message = (
            f"no SLURM cluster answers ({why}); start one with `tests/slurm/local_slurm.sh start` and "
            "export the SLURM_CONF it prints"
        )
        if os.environ.get("HIGGS_LORA_REQUIRE_SLURM") == "1":
            pytest.fail(f"HIGGS_LORA_REQUIRE_SLURM=1 but {message}")
        pytest.skip(message)


@pytest.fixture
def slurm_jobs(slurm_cluster):
    """Submits jobs for one test; cancels whatever is left of them afterwards."""
    jobs = Jobs()
    yield jobs
    jobs.cancel_all()
