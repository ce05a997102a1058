"""Pure pieces of the training run: launcher environment, LR schedule, checkpoint discovery, FLOP counting."""

from __future__ import annotations

import json
import math

import pytest

from higgs_lora.config import load_config
from higgs_lora.distributed import cuda_index, first_slurm_host, launcher_environment
from higgs_lora.run_folder import latest_checkpoint, list_checkpoints
from higgs_lora.train.checkpoint import ResumeError, resolve_resume
from higgs_lora.train.flops import FlopCounter, peak_flops
from tests.conftest import FULL_SIZE_CONFIG, REPO_ROOT


def test_launcher_variables_are_kept():
    assert launcher_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == {}


def test_slurm_variables_are_mapped():
    env = launcher_environment(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[03-04]",
            "SLURM_JOB_ID": "1234",
        }
    )
    assert env == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu03", "MASTER_PORT": "29734"}


def test_a_plain_process_is_a_single_rank():
    env = launcher_environment({})
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "0", "1", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536


@pytest.mark.parametrize(
    "nodelist,first", [("gpu[03-05,07],cpu1", "gpu03"), ("a1,a2", "a1"), ("n[7]", "n7"), ("single", "single")]
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_cuda_index_of_a_rank_that_sees_all_or_only_its_own_gpu():
    assert [cuda_index(r, 8) for r in (0, 7)] == [0, 7]
    assert cuda_index(5, 1) == 0  # srun bound one GPU to the task
    with pytest.raises(RuntimeError, match="one process per GPU"):
        cuda_index(5, 4)


def test_warmup_then_cosine_to_zero():
    from higgs_lora.train.optim import warmup_cosine

    f = warmup_cosine(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 30))


def make_step(root, name, complete=True):
    step = root / "checkpoints" / name
    (step / "deepspeed").mkdir(parents=True)
    if complete:
        (step / "trainer_state.json").write_text("{}")
    return step


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}"])
    assert resolve_resume(cfg) is None
    never = load_config(REPO_ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}", "train.resume=never"])
    assert resolve_resume(never) is None
    make_step(tmp_path, "step_00000010")
    newest = make_step(tmp_path, "step_00000020")
    make_step(tmp_path, "step_00000030", complete=False)  # killed while writing
    (tmp_path / "checkpoints" / ".step_00000040.partial").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010", "step_00000020"]
    assert latest_checkpoint(tmp_path) == newest  # no pointer: newest complete
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010\n")
    assert latest_checkpoint(tmp_path).name == "step_00000010"  # the pointer wins when it names a complete one
    (tmp_path / "checkpoints" / "latest").write_text("step_00000030\n")
    assert latest_checkpoint(tmp_path) == newest
    explicit = load_config(REPO_ROOT / "configs" / "demo.yaml", [f"train.resume={tmp_path}/checkpoints/step_00000030"])
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        resolve_resume(explicit)


def test_flops_per_position_of_the_released_size():
    config = {**FULL_SIZE_CONFIG, "num_codebooks": 8, "codebook_size": 1026}
    counter = FlopCounter.from_model_config(config, [], r=16)
    # Attention + one MLP per layer: ~2.82B parameters on a position's path, plus the 25M audio head.
    assert counter.path_parameters == 28 * (2 * 3072 * 3072 + 2 * 3072 * 1024 + 3 * 3072 * 8192)
    assert counter.head_parameters == 3072 * 8208
    per_position = counter.step_flops(1, 1, 0)
    assert per_position == pytest.approx(4 * (counter.path_parameters + counter.head_parameters))
    assert 11.2e9 < per_position < 11.6e9  # docs/benchmarks.md: ~11.4 GFLOP per position
    assert math.isclose(counter.step_flops(2, 0, 2 * 100**2) - counter.step_flops(2, 0, 0), 12 * 28 * 3072 * 2 * 100**2)


def test_peak_flops_only_for_measured_or_configured():
    assert peak_flops(0, "NVIDIA H200") == 790e12
    assert peak_flops(0, "cpu") is None
    assert peak_flops(100, "cpu") == 100e12


def test_pruning_never_touches_the_new_checkpoint_or_newer_ones(tmp_path):
    from higgs_lora.train.checkpoint import prune

    for step in (3, 6, 9, 12):
        make_step(tmp_path, f"step_{step:08d}")
    # A run restarted at an older checkpoint writes step 7: steps 9 and 12 belong to the future it replaces.
    make_step(tmp_path, "step_00000007")
    deleted = prune(tmp_path, newest_step=7, keep_last=2)
    assert [p.name for p in deleted] == ["step_00000003"]
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000006",
        "step_00000007",
        "step_00000009",
        "step_00000012",
    ]


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path):
    make_step(tmp_path, "step_00000010")
    never = load_config(REPO_ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}", "train.resume=never"])
    with pytest.raises(ResumeError, match="already holds 1 checkpoints"):
        resolve_resume(never)


def test_resume_checks_ranks_and_adapter_settings_before_loading(tmp_path):
    import json

    from higgs_lora.config import save_config
    from higgs_lora.constants import RUN_CONFIG
    from higgs_lora.run_folder import ADAPTER
    from higgs_lora.train.checkpoint import check_compatible

    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}"])
    step = make_step(tmp_path, "step_00000010")
    (step / "trainer_state.json").write_text(json.dumps({"step": 10, "sampler": {"world_size": 2}}))
    save_config(cfg, step / ADAPTER / RUN_CONFIG)
    assert check_compatible(step, cfg, world_size=2)["step"] == 10
    with pytest.raises(ResumeError, match="written by 2 ranks and this run has 4"):
        check_compatible(step, cfg, world_size=4)
    changed = load_config(
        REPO_ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}", "lora.r=16", "model.quantization=nf4"]
    )
    with pytest.raises(ResumeError, match=r"r, model.quantization"):
        check_compatible(step, changed, world_size=2)


def test_a_stop_signal_is_recorded_and_a_second_one_is_left_to_kill():
    """higgs_lora.stop in a fresh process (its handlers are process-wide): SIGUSR1 is recorded, not fatal."""
    import subprocess
    import sys

    code = (
        "import os, signal; from higgs_lora import stop; stop.catch(); os.kill(os.getpid(), signal.SIGUSR1); "
        "assert stop.received() == signal.SIGUSR1; assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL; "
        "stop.catch(); assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


def test_metrics_records_up_to_the_resumed_step_drop_later_and_cut_lines():
    from higgs_lora.train.metrics_log import records_up_to

    text = "".join(
        json.dumps({"kind": k, "step": n}) + "\n"
        for k, n in [("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3)]
    )
    text += '{"kind": "train", "st'  # the line a SIGKILL cut
    kept, dropped = records_up_to(text, 2)
    assert [json.loads(line) for line in kept] == [
        {"kind": "eval", "step": 0},
        {"kind": "train", "step": 1},
        {"kind": "train", "step": 2},
        {"kind": "eval", "step": 2},
    ]
    assert dropped == 2 and all(line.endswith("\n") for line in kept)


def test_step_totals_round_trip_through_one_tensor_and_give_the_logged_losses():
    import torch

    from higgs_lora.train.loss import LossSums
    from higgs_lora.train.step_totals import StepTotals

    totals = StepTotals.zeros(3)
    totals.add_loss(
        LossSums(
            audio=torch.tensor([6.0, 9.0, 12.0]),
            audio_counts=torch.tensor([3, 3, 3]),
            text=torch.tensor(5.0),
            text_count=torch.tensor(2),
        )
    )
    totals.add_loss(
        LossSums(
            audio=torch.tensor([2.0, 3.0, 4.0]),
            audio_counts=torch.tensor([1, 1, 1]),
            text=torch.tensor(1.0),
            text_count=torch.tensor(1),
        )
    )
    totals.add_work(positions=40.0, target_frames=7.0, flops=1e9)
    totals.mark_finiteness()
    tensor = totals.to_tensor()
    assert tensor.dtype == torch.float64 and tensor.shape == (2 * 3 + 6,)
    back = StepTotals.from_tensor(tensor.tolist(), 3)  # what the all-reduce hands back: a list of floats
    assert back.audio_sums.tolist() == [8.0, 12.0, 16.0] and back.audio_counts.tolist() == [4.0, 4.0, 4.0]
    assert (back.text_sum, back.text_count, back.nonfinite_ranks) == (6.0, 3.0, 0.0)
    assert (back.positions, back.target_frames, back.flops) == (40.0, 7.0, 1e9)
    assert torch.equal(back.to_tensor(), tensor)
    # Losses per labelled position: audio sums over the positions one codebook labels, text over text positions;
    # the work (positions, frames, FLOPs) and the non-finite count play no part.
    assert back.loss() == pytest.approx((8 + 12 + 16) / 4)
    assert back.per_codebook_loss() == pytest.approx([2.0, 3.0, 4.0])
    assert back.text_loss() == pytest.approx(6.0 / 3.0)
    # Two ranks: the all-reduce sums the tensors; one rank's NaN is counted once.
    other = StepTotals.zeros(3)
    other.add_loss(
        LossSums(
            audio=torch.tensor([float("nan"), 0.0, 0.0]),
            audio_counts=torch.tensor([2, 2, 2]),
            text=torch.tensor(0.0),
            text_count=torch.tensor(0),
        )
    )
    other.mark_finiteness()
    both = StepTotals.from_tensor(tensor + other.to_tensor(), 3)
    assert both.nonfinite_ranks == 1.0 and both.audio_counts.tolist() == [6.0, 6.0, 6.0]
    assert StepTotals.zeros(2).loss() == 0.0 and StepTotals.zeros(2).text_loss() == 0.0  # nothing labelled


def test_schedule_line_says_epochs_of_max_steps():
    from higgs_lora.config import load_config
    from higgs_lora.train.loop import schedule_line

    demo = load_config(None, ["train.max_steps=30", "train.warmup_steps=2"])
    assert schedule_line(demo, 30, 5) == (
        "schedule: 30 optimizer steps (train.max_steps=30) = 6.0 epochs of 5 steps; warmup 2 steps"
    )
    by_epochs = load_config(None, ["train.max_steps=0", "train.epochs=3"])
    assert schedule_line(by_epochs, 15, 5).startswith("schedule: 15 optimizer steps (train.epochs=3) = 3.0 epochs")
