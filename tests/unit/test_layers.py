"""The layer contracts of pyproject.toml ([tool.importlinter]) hold, and they fail on an upward import."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is a dev dependency: make install")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_package_keeps_every_layer_contract():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout and "KEPT" in done.stdout


def test_an_upward_import_breaks_the_build(tmp_path):
    shutil.copytree(REPO / "higgs_lora", tmp_path / "higgs_lora", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    sampler = tmp_path / "higgs_lora" / "data" / "sampler.py"
    sampler.write_text(sampler.read_text() + "\n\ndef _upward():\n    from higgs_lora.train import loop  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "higgs_lora.data is not allowed to import higgs_lora.train" in done.stdout
    assert "higgs_lora.data.sampler -> higgs_lora.train.loop" in done.stdout
