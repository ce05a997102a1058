"""Config edges (issue 17.8): non-finite numbers, files that are not YAML text, output folders that cannot be
written. Each is a ConfigError (exit 2) with the key or the file named, before anything heavy is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from higgs_lora.config import ConfigError, build_config, load_config
from higgs_lora.files import writable_dir_problem
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", ".inf", "NaN"])
def test_non_finite_numbers_are_refused_on_the_command_line(value):
    with pytest.raises(ConfigError, match=r"train\.lr=\S+ is not a finite number"):
        build_config({}, [f"train.lr={value}"])


def test_non_finite_numbers_are_refused_in_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  lr: .nan\ndata:\n  max_seconds: .inf\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "train.lr=nan is not a finite number" in str(caught.value)
    assert "data.max_seconds=inf is not a finite number" in str(caught.value)


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text (byte 0x89 at offset 0)"),
        (b"train:\n  lr: 1e-4\n  name: caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 29)"),
        (b"train: \x00\x01\x02", "is not valid YAML"),
        (b"[" * 5000, "is n"),  # deeply nested: a YAML error or "nested too deeply", never a traceback
    ],
    ids=["binary", "latin-1", "control-bytes", "nested"],
)
def test_a_file_that_is_not_yaml_text_is_a_config_error(tmp_path, content, expected):
    config = tmp_path / "run.yaml"
    config.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert str(config) in str(caught.value) and expected in str(caught.value)


def test_a_directory_given_as_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)


def test_writable_dir_problem(tmp_path):
    assert writable_dir_problem(tmp_path / "new" / "deeper") is None
    assert not (tmp_path / "new").exists()  # nothing is created or left behind
    assert os.listdir(tmp_path) == []
    (tmp_path / "a_file").write_text("x")
    assert writable_dir_problem(tmp_path / "a_file" / "run") == (
        f"{tmp_path / 'a_file'} is not a directory, so {tmp_path / 'a_file' / 'run'} cannot be created"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; needs a non-root user")
def test_a_read_only_output_dir_is_named(tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        assert "is not writable" in writable_dir_problem(readonly / "run")
    finally:
        readonly.chmod(0o755)


def test_train_refuses_an_uncreatable_output_dir_before_loading_anything(tmp_path):
    (tmp_path / "a_file").write_text("x")
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['launch/train.py', '--ds', 'ds_configs/zero2.json', '--config', 'configs/demo.yaml',"
        f" 'output_dir={tmp_path / 'a_file' / 'run'}']\n"
        "try:\n"
        "    runpy.run_path('launch/train.py', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print('torch' in sys.modules, 'transformers' in sys.modules)\n"
        "    raise\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert f"  - output_dir={tmp_path / 'a_file' / 'run'}: " in result.stderr
    assert "is not a directory" in result.stderr
    assert result.stdout.strip() == "False False"
