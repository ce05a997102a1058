"""docs/python_api.md's examples, run as written, so the docs cannot rot (the API itself: tests/unit/test_api.py).

Each ```python block runs in its own interpreter, in order, in a folder laid out like a checkout (configs/,
ds_configs/, examples/ from the repository, build/tiny/ the session's tiny checkpoint): prepare -> train -> clone.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import soundfile as sf

from tests.conftest import REPO_ROOT

DOC = REPO_ROOT / "docs" / "python_api.md"


def doc_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", DOC.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.mark.slow
def test_the_documented_examples_run_in_order(tiny_checkpoint, tmp_path):
    blocks = doc_blocks()
    assert len(blocks) == 3, "docs/python_api.md: one example each for prepare, train and clone"
    for name in ("configs", "ds_configs", "examples"):
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "tiny").symlink_to(tiny_checkpoint.model_dir.parent)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2"}

    outputs = []
    for block in blocks:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{block}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        outputs.append(done.stdout)
        print(f"block {len(outputs)}: {time.perf_counter() - started:.1f} s")  # shown with -s; asserted nowhere
    prepared, trained, cloned = outputs

    run = tmp_path / "runs" / "api_demo"
    report = json.loads((run / "cache" / "report.json").read_text(encoding="utf-8"))
    kept, total = map(int, re.search(r"kept (\d+) of (\d+) utterances", prepared).groups())
    assert (kept, total) == (report["kept"], report["items_in"]) and kept > 0

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["step"] == 4
    assert f"step 4: loss {last['loss']:.3f}" in trained
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "adapter" / "higgs_lora.yaml").is_file()

    samples, rate = sf.read(tmp_path / "clone.wav")
    assert rate == 24000 and samples.ndim == 1 and len(samples) > 0
    assert f"{len(samples) / rate:.2f} s of audio" in cloned and "seed 1" in cloned
