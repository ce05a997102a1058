"""slurm/submit (higgs_lora/slurm.py): the scripts' requests read as sbatch reads them, checked against what sinfo
says of the partitions, with the flags that make them fit. No cluster needed: sinfo's answer is given."""

from __future__ import annotations

import pytest

from higgs_lora import slurm
from higgs_lora.tiny import REPO_ROOT

TRAIN = str(REPO_ROOT / "slurm" / "train.sbatch")
PREPARE = str(REPO_ROOT / "slurm" / "prepare.sbatch")
INFER = str(REPO_ROOT / "slurm" / "infer.sbatch")
SINFO = """gpu*|up|2-00:00:00|4|64|gpu:a100:8(S:0-1)
gpu*|up|2-00:00:00|2|32|gpu:a100:4
small|up|4:00:00|8|16|gpu:t4:1
cpu|up|infinite|10|32|(null)
old|down|infinite|2|64|gpu:8
"""
GROUPS = slurm.parse_sinfo(SINFO)


def check(*argv, environ=None):
    name, request, problems = slurm.check(list(argv), environ or {}, GROUPS)
    return name, request, [p.message for p in problems]


def test_the_scripts_requests_are_read_as_sbatch_reads_them():
    train = slurm.read_request([TRAIN, "configs/x.yaml"], {})[0]
    assert train == slurm.Request(nodes=2, tasks_per_node=8, gpus_per_node=8, cpus_per_node=64, minutes=1440,
                                  partition=None)  # fmt: skip
    assert slurm.read_request([PREPARE], {})[0] == slurm.Request(1, 1, 1, 8, 720, None)
    assert slurm.read_request([INFER, "s.json", "out"], {})[0] == slurm.Request(1, 1, 1, 4, 720, None)
    # The command line beats SBATCH_* variables, which beat the #SBATCH lines; every spelling of an option counts.
    assert slurm.read_request([TRAIN], {"SBATCH_PARTITION": "cpu"})[0].partition == "cpu"
    assert slurm.read_request(["-p", "gpu", TRAIN], {"SBATCH_PARTITION": "cpu"})[0].partition == "gpu"
    for nodes in (["-N3"], ["-N", "3"], ["--nodes", "3"], ["--nodes=3-5"]):
        assert slurm.read_request([*nodes, TRAIN], {})[0].nodes == 3
    given = slurm.read_request(["--gpus-per-task=0", "-c", "2", "--time", "30", PREPARE, "a=b"], {})[0]
    assert (given.gpus_per_node, given.cpus_per_node, given.minutes) == (0, 2, 30)


def test_the_script_is_the_first_batch_script_among_the_arguments(tmp_path):
    log = tmp_path / "old.log"
    log.write_text("not a script\n")
    options, script, args = slurm.split_command_line(["--output", str(log), "-p", "gpu", TRAIN, "c.yaml", "x=1"])
    assert (options, str(script), args) == (["--output", str(log), "-p", "gpu"], TRAIN, ["c.yaml", "x=1"])


def test_script_options_stop_at_the_first_command():
    text = "#!/bin/bash\n# about\n#SBATCH --nodes=2  # two\n\n#SBATCH -p gpu\nset -e\n#SBATCH --nodes=9\n"
    assert slurm.script_options(text) == ["--nodes=2", "-p", "gpu"]


@pytest.mark.parametrize(
    "text, expected",
    [("30", 30), ("30:30", 30.5), ("2:00:00", 120), ("1-00:00:00", 1440), ("2-12", 3600), ("1-0:30", 1470),
     ("infinite", None), ("UNLIMITED", None)],
)  # fmt: skip
def test_slurm_times(text, expected):
    assert slurm.minutes(text) == expected


@pytest.mark.parametrize(
    "gres, gpus",
    [("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:4,gpu:v100:2", 6), ("(null)", 0), ("shard:8", 0)],
)
def test_gpus_in_gres(gres, gpus):
    assert slurm.gres_gpus(gres) == gpus


def test_a_request_that_fits_the_default_partition_has_no_problems():
    assert check(TRAIN, "configs/x.yaml") == ("gpu", slurm.Request(2, 8, 8, 64, 1440, None), [])
    assert check("-p", "small,gpu", TRAIN)[0::2] == ("gpu", [])  # a list fits when one partition does


def test_each_thing_a_partition_cannot_give_is_named_with_its_flag():
    _, _, problems = check("-p", "cpu", TRAIN)
    assert problems == [
        'partition cpu has no GPUs, the job asks for 8 per node (sbatch: "Invalid generic resource (gres) '
        'specification"): --gpus-per-node=0 for a CPU run, or a GPU partition',
        "nodes of cpu have at most 32 CPUs, the job asks for 64 per node (8 task(s) x 8): --cpus-per-task=4",
    ]
    assert "--gpus-per-task=0 for a CPU run" in check("-p", "cpu", PREPARE)[2][0]  # per-task scripts
    small = check("-p", "small", TRAIN)[2]
    assert "at most 1 GPUs, the job asks for 8 per node: --gpus-per-node=1 --ntasks-per-node=1" in small[0]
    assert "at most 16 CPUs, the job asks for 64 per node (8 task(s) x 8): --cpus-per-task=2" in small[1]
    assert "time limit of small is 0-04:00:00, the job asks for 1-00:00:00" in small[2]
    assert "with Reason=PartitionTimeLimit): --time=0-04:00:00" in small[2]
    assert "has 4 node(s) with 64 CPUs and 8 GPUs, the job asks for 5" in check("--nodes=5", TRAIN)[2][0]
    assert "partition old is not up" in check("-p", "old", TRAIN)[2][0]
    assert check("-p", "a100", TRAIN)[2] == ["there is no partition 'a100'; --partition= one of gpu*, small, cpu, old "
                                             "(* the default)"]  # fmt: skip


@pytest.mark.parametrize(
    "argv, fixed",
    [
        (["-p", "cpu", TRAIN, "c.yaml"], ["-p", "cpu", "--gpus-per-node=0", "--cpus-per-task=4", TRAIN, "c.yaml"]),
        # One fix at a time: 1 GPU per node -> 1 rank, whose 8 CPUs then fit; then the time limit.
        (
            ["--partition", "small", TRAIN],
            ["--partition", "small", "--gpus-per-node=1", "--ntasks-per-node=1", "--time=0-04:00:00", TRAIN],
        ),  # fmt: skip
        (["-N", "5", "-p", "gpu", TRAIN], ["-p", "gpu", "--nodes=4", TRAIN]),  # the replaced option goes
        (["-p", "old", TRAIN], None),  # a partition that is down: no flag helps
    ],
)
def test_the_suggested_command_fits(argv, fixed):
    assert slurm.fixed_command(argv, {}, GROUPS) == fixed
    if fixed is not None:
        assert check(*fixed)[2] == []


def test_submit_refuses_checks_or_hands_over_to_sbatch(monkeypatch, capsys):
    execs = []
    monkeypatch.setattr(slurm.os, "execvp", lambda file, args: execs.append(args))
    monkeypatch.setattr(slurm, "run_sinfo", lambda: (GROUPS, ""))
    assert slurm.main(["-p", "cpu", PREPARE, "c.yaml"], {}) == 2 and execs == []
    err = capsys.readouterr().err
    assert (
        "partition cpu cannot give it" in err and "partitions that fit as asked: gpu (--partition=NAME)" in err
    )  # small: 4 h
    assert f"this fits cpu: slurm/submit -p cpu --gpus-per-task=0 {PREPARE} c.yaml" in err
    assert slurm.main(["--check", "-p", "cpu", "--gpus-per-task=0", PREPARE], {}) == 0 and execs == []
    assert "fits partition cpu" in capsys.readouterr().err
    assert slurm.main(["--array=0-3", INFER, "s.json", "out"], {}) == 0
    assert execs == [["sbatch", "--array=0-3", INFER, "s.json", "out"]]  # exactly what was given
    monkeypatch.setattr(slurm, "run_sinfo", lambda: ([], "sinfo failed: not found"))
    assert slurm.main([TRAIN], {}) == 0 and execs[-1] == ["sbatch", TRAIN]
    assert "cannot check the request (sinfo failed: not found); submitting as is" in capsys.readouterr().err
    assert slurm.main(["--nodes=2"], {}) == 2
    assert "no batch script among the arguments" in capsys.readouterr().err
