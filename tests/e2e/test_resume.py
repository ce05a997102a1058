"""Resume and preemption: a killed or signalled run, resumed, ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from higgs_lora.run_folder import ADAPTER
from tests.e2e.launch import adapter_tensors, metrics, start, train

pytestmark = pytest.mark.slow  # every test trains through a real launcher

# Dropout on, so the result depends on the RNG state being restored too, not only weights and optimizer.
RUN = [
    "train.lr=5e-3",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=3",
    "train.max_steps=8",
    "train.save_every=3",
    "lora.dropout=0.1",
    "train.eval_samples=0",
]


def wait_for(path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {process.returncode}) before {path} appeared:\n{process.stdout.read()[-4000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def worker_pids(launcher_pid: int) -> list[int]:
    """The training processes torchrun started (its children)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def assert_same_adapter(a, b, atol=1e-6):
    ta, tb = adapter_tensors(a / ADAPTER), adapter_tensors(b / ADAPTER)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.allclose(ta[key], tb[key], atol=atol, rtol=0), (key, (ta[key] - tb[key]).abs().max())


@pytest.fixture(scope="module")
def uninterrupted(demo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(out, [*demo_cache, *RUN])
    return out


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(demo_cache, uninterrupted, tmp_path):
    out = tmp_path / "run"
    process = start(out, [*demo_cache, *RUN])
    wait_for(out / "checkpoints" / "step_00000003" / "trainer_state.json", process)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, no chance to clean up
    process.wait()
    assert not (out / "adapter").exists()
    resumed = train(out, [*demo_cache, *RUN])
    assert "resumed from" in resumed.stdout
    assert_same_adapter(out, uninterrupted)
    # The resumed run's logged losses continue the uninterrupted run's exactly.
    reference = {m["step"]: m["loss"] for m in metrics(uninterrupted)}
    for m in metrics(out):
        assert m["loss"] == pytest.approx(reference[m["step"]], abs=1e-5)
    # ... and the logs read as one run: what the killed attempt logged after step 3 is gone, not doubled.
    assert [m["step"] for m in metrics(out)] == list(range(1, 9))
    assert [m["step"] for m in metrics(out, "eval")] == [0, 3, 6, 8]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([m["loss"] for m in metrics(out)])


def test_resuming_from_the_final_checkpoint_only_exports_the_adapter(demo_cache, uninterrupted, tmp_path):
    """Killed after the last checkpoint, before the adapter was exported: the resume neither trains nor evaluates
    again (the last evaluation comes before the last checkpoint) and writes the adapter."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / ADAPTER)
    before = (out / "metrics.jsonl").read_text()
    resumed = train(out, [*demo_cache, *RUN])
    assert "resumed from" in resumed.stdout and "at step 8" in resumed.stdout
    assert (out / "metrics.jsonl").read_text() == before
    assert_same_adapter(out, uninterrupted, atol=0)


def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(demo_cache, uninterrupted, tmp_path):
    out = tmp_path / "run"
    process = start(out, [*demo_cache, *RUN])
    wait_for(out / "checkpoints" / "step_00000003" / "trainer_state.json", process)
    for pid in worker_pids(process.pid):  # what SLURM does on preemption: every task gets the signal
        os.kill(pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    assert "stop signal received" in output
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest >= "step_00000003"
    stopped_at = int(latest.split("_")[1])
    assert stopped_at < 8 and max(m["step"] for m in metrics(out)) == stopped_at
    train(out, [*demo_cache, *RUN])
    assert_same_adapter(out, uninterrupted)


def test_two_ranks_equal_one_rank_with_twice_the_accumulation(demo_cache, tmp_path):
    """The loss is normalised over the global batch: splitting a step's micro-batches over ranks changes nothing."""
    common = [
        *demo_cache,
        "train.lr=5e-3",
        "train.warmup_steps=1",
        "train.max_steps=4",
        "train.save_every=4",
        "train.eval_every=0",
        "train.micro_batch_tokens=1024",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, [*common, "train.global_batch_tokens=2048"], launcher="python", num_ranks=1)
    train(two, [*common, "train.global_batch_tokens=2048"], num_ranks=2)
    assert [m["loss"] for m in metrics(one)] == pytest.approx([m["loss"] for m in metrics(two)], abs=1e-4)
    assert_same_adapter(one, two, atol=1e-5)


def harness_command(launcher: str, poisoned: str, ds: str, overrides: list[str]) -> list[str]:
    from tests.conftest import REPO_ROOT
    from tests.e2e.launch import free_port, launcher_command

    harness = str(REPO_ROOT / "tests" / "e2e" / "nan_harness.py")
    return launcher_command(
        launcher, 1 if launcher == "python" else 2, ds, overrides, free_port(), script=harness, script_args=(poisoned,)
    )


@pytest.mark.parametrize("launcher,ds", [("python", "zero2.json"), ("torchrun", "zero3.json")])
def test_a_nan_loss_skips_the_step_and_training_goes_on(demo_cache, tmp_path, launcher, ds):
    from tests.conftest import REPO_ROOT
    from tests.e2e.launch import train_env

    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        *demo_cache,
        "train.max_steps=5",
        "train.save_every=1",
        "train.keep_last=10",
        "train.eval_every=0",
        "train.log_every=1",
        "train.lr=5e-3",
    ]
    result = subprocess.run(
        harness_command(launcher, "3", ds, overrides),
        cwd=REPO_ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "step 3 has a non-finite loss" in result.stdout
    assert [m["step"] for m in metrics(out)] == [1, 2, 4, 5]
    step = lambda n: out / "checkpoints" / f"step_{n:08d}"  # noqa: E731
    assert_same_adapter(step(2), step(3), atol=0)  # the skipped step did not move the weights
    after = adapter_tensors(step(4) / ADAPTER)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(after[k], v) for k, v in adapter_tensors(step(3) / ADAPTER).items())


def test_k_nan_steps_in_a_row_stop_the_run_with_a_clear_error(demo_cache, tmp_path):
    from tests.conftest import REPO_ROOT
    from tests.e2e.launch import train_env

    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        *demo_cache,
        "train.max_steps=6",
        "train.eval_every=0",
        "train.max_nonfinite_steps=2",
    ]
    result = subprocess.run(
        harness_command("python", "2,3", "zero2.json", overrides),
        cwd=REPO_ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert "2 optimizer steps in a row had a NaN/inf loss" in result.stderr


def test_a_damaged_newest_checkpoint_is_skipped_and_an_explicit_resume_of_it_exits_2(
    demo_cache, uninterrupted, tmp_path
):
    """Issue 17.6: the newest checkpoint's model states cut short (a full disk). train.resume=<it> is exit 2 naming
    the file; train.resume=auto says it skips it, resumes from the one before and still ends where an uninterrupted
    run ends."""
    import shutil

    from tests.e2e.launch import REPO_ROOT, free_port, launcher_command, train_env

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / ADAPTER)
    newest = out / "checkpoints" / "step_00000008"
    assert (newest / "manifest.json").is_file()
    states = next((newest / "deepspeed").rglob("mp_rank_00_model_states.pt"))
    states.write_bytes(states.read_bytes()[:1000])

    command = launcher_command("python", 1, "zero2.json", [f"output_dir={out}", *demo_cache, *RUN], free_port())
    explicit = subprocess.run(
        [*command, f"train.resume={newest}"], cwd=REPO_ROOT, env=train_env(), capture_output=True, text=True
    )
    assert explicit.returncode == 2, explicit.stderr[-3000:]
    assert f"error: train.resume={newest} is damaged: {states} has 1000 bytes" in explicit.stderr
    assert "Traceback" not in explicit.stderr

    resumed = train(out, [*demo_cache, *RUN])
    assert f"skipping checkpoint {newest}: {states} has 1000 bytes" in resumed.stderr
    assert f"resumed from {out / 'checkpoints' / 'step_00000006'} at step 6" in resumed.stdout
    assert "was not loaded" not in resumed.stderr  # the RNG files were read (weights_only), not refused
    assert_same_adapter(out, uninterrupted)
