"""The README's "Training on your data" block, run exactly as written apart from its two paths.

The tiny model stands in for /models/higgs and the demo corpus for /data/ar/manifest.jsonl. The commands are read
from README.md, so the test follows the README. The demo corpus (40 short clips) is far too small for the shipped
config's optimizer step (train.global_batch_tokens=65536), which is what a user with a small corpus meets: prepare
must succeed, and training must stop at planning, before any model is loaded, with exit code 2 and the knob that
helps.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEMO_CORPUS, REPO_ROOT

MODEL_PLACEHOLDER = "/models/higgs"
CORPUS_PLACEHOLDER = "/data/ar/manifest.jsonl"


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```bash block under `heading` in README.md (backslash continuations joined)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_block_is_the_one_the_test_runs():
    commands = readme_block("Training on your data")
    assert [shlex.split(c)[0] for c in commands] == ["python", "deepspeed"]
    assert all(MODEL_PLACEHOLDER in c and CORPUS_PLACEHOLDER in c for c in commands)


@pytest.mark.slow
def test_training_on_your_data_as_written(tmp_path, tiny_checkpoint):
    commands = [
        c.replace(MODEL_PLACEHOLDER, str(tiny_checkpoint.model_dir)).replace(
            CORPUS_PLACEHOLDER, str(DEMO_CORPUS / "manifest.jsonl")
        )
        for c in readme_block("Training on your data")
    ]
    work = tmp_path / "checkout"  # the commands' relative paths (configs/, launch/, runs/) resolve here
    work.mkdir()
    for name in ("configs", "ds_configs", "launch"):
        (work / name).symlink_to(REPO_ROOT / name)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python`, `deepspeed`
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
    }

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=600)

    prepare = run(commands[0])
    assert prepare.returncode == 0, prepare.stdout + prepare.stderr
    report = json.loads((work / "runs" / "arabic_lora" / "cache" / "report.json").read_text())
    assert (report["items_in"], report["kept"], report["rejected_total"]) == (40, 40, 0)
    cache = json.loads((work / "runs" / "arabic_lora" / "cache" / "plan.json").read_text())
    assert Path(cache["settings"]["codec"]) == tiny_checkpoint.codec_dir.resolve()  # derived from the model

    train = run(commands[1])
    output = train.stdout + train.stderr
    assert train.returncode == 2, output
    error = [line for line in train.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, output
    assert "lower train.global_batch_tokens to " in error[0]
    assert "train.micro_batch_tokens" not in error[0]
    assert "Traceback" not in output
    assert "Loading weights" not in output  # found at planning time: no model (nor codec) was loaded
    assert not (work / "runs" / "arabic_lora" / "checkpoints").exists()
    suggested = int(re.search(r"global_batch_tokens to ([\d,]+)", error[0]).group(1).replace(",", ""))
    assert 0 < suggested < 65536
