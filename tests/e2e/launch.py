"""Running launch/train.py through the real launchers in tests (CPU, gloo, one torch thread per rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

TRAIN = str(REPO_ROOT / "launch" / "train.py")
DEMO_CONFIG = str(REPO_ROOT / "configs" / "demo.yaml")


def launcher_command(
    launcher: str,
    num_ranks: int,
    ds: str,
    overrides: list[str],
    port: int,
    script: str = TRAIN,
    script_args: tuple[str, ...] = (),
) -> list[str]:
    """`script` (launch/train.py, or a test harness wrapping it) under `launcher` with the demo config."""
    ds_path = str(REPO_ROOT / "ds_configs" / ds)
    args = [script, *script_args, "--ds", ds_path, "--config", DEMO_CONFIG, *overrides]
    bin_dir = Path(sys.executable).parent
    if launcher == "python":
        assert num_ranks == 1
        return [sys.executable, *args]
    if launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nproc_per_node", str(num_ranks), "--master_port", str(port), *args]
    if launcher == "deepspeed":
        return [str(bin_dir / "deepspeed"), "--num_gpus", str(num_ranks), "--master_port", str(port), *args]
    raise ValueError(launcher)


def train_env() -> dict:
    # One thread per rank: two ranks on two busy cores with two threads each are many times slower (CPU_NOTES).
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(
    out: Path,
    overrides: list[str],
    ds: str = "zero2.json",
    launcher: str = "torchrun",
    num_ranks: int = 2,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run a training job to completion; raises with its output when it fails."""
    cmd = launcher_command(launcher, num_ranks, ds, [f"output_dir={out}", *overrides], free_port())
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=train_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def start(
    out: Path, overrides: list[str], ds: str = "zero2.json", launcher: str = "torchrun", num_ranks: int = 2
) -> subprocess.Popen:
    cmd = launcher_command(launcher, num_ranks, ds, [f"output_dir={out}", *overrides], free_port())
    return subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def metrics(out: Path, kind: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))
