"""Every entry point that takes a model directory detects Boson's original (unconverted) layout first and prints
the convert command: exit 2, `error: ...`, no traceback (issue: plan and train used to die with KeyError)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEMO_CORPUS, REPO_ROOT
from tests.original_layout import write_original_model

CONFIG = str(REPO_ROOT / "configs" / "arabic_lora.yaml")


@pytest.fixture(scope="module")
def original_model(tiny_checkpoint, tmp_path_factory):
    return write_original_model(tiny_checkpoint.model_dir, tmp_path_factory.mktemp("original") / "higgs")


def _assert_convert_hint(code: int, err: str, model) -> None:
    assert code == 2, err
    assert f"python -m higgs_lora.convert --src {model} --out {model}-hf" in err
    assert err.startswith("error: ")
    assert "Traceback" not in err and "KeyError" not in err


def test_plan(original_model, tmp_path, capsys):
    from higgs_lora.plan.cli import main

    code = main(["--config", CONFIG, f"model.path={original_model}", f"output_dir={tmp_path}", "--gpus", "1"])
    _assert_convert_hint(code, capsys.readouterr().err, original_model)


def test_plan_with_model_flag(original_model, tmp_path, capsys):
    from higgs_lora.plan.cli import main

    code = main(["--config", CONFIG, "--model", str(original_model), f"output_dir={tmp_path}", "--gpus", "1"])
    _assert_convert_hint(code, capsys.readouterr().err, original_model)


def test_prepare(original_model, tmp_path, capsys):
    from higgs_lora.data.prepare import main

    args = ["--config", CONFIG, f"model.path={original_model}", f"data.corpus={DEMO_CORPUS / 'manifest.jsonl'}"]
    code = main([*args, f"output_dir={tmp_path}"])
    _assert_convert_hint(code, capsys.readouterr().err, original_model)
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_infer_and_serve(original_model, tmp_path, capsys):
    from higgs_lora.infer.batch import main as infer
    from higgs_lora.serve.app import main as serve

    samples = tmp_path / "samples.jsonl"
    wav = sorted(DEMO_CORPUS.rglob("*.flac"))[0]
    record = {"reference_audio": str(wav), "reference_text": "مرحبا", "target_text": "مرحبا بكم"}
    samples.write_text(json.dumps(record, ensure_ascii=False) + "\n")
    code = infer(["--jsonl", str(samples), "--out", str(tmp_path / "out"), "--model", str(original_model)])
    _assert_convert_hint(code, capsys.readouterr().err, original_model)
    code = serve(["--model", str(original_model), "--port", "0"])
    _assert_convert_hint(code, capsys.readouterr().err, original_model)


def test_merge(original_model, tmp_path, capsys):
    from higgs_lora.deploy.merge import main
    from higgs_lora.files import atomic_write_text

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    atomic_write_text(adapter / "adapter_model.safetensors", "")
    code = main(["--adapter", str(tmp_path / "run"), "--base", str(original_model)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"python -m higgs_lora.convert --src {original_model}" in err


def test_train_planning(original_model, tmp_path):
    """What launch/train.py runs first on every rank (rank 0 plans, the others take its answer): the layout is refused
    with a UserError (exit 2 through startup.run_command) before anything is loaded."""
    from higgs_lora.config import load_config
    from higgs_lora.distributed import Topology
    from higgs_lora.errors import UserError
    from higgs_lora.train.run import plan_run

    cfg = load_config(CONFIG, [f"model.path={original_model}", f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match=f"python -m higgs_lora.convert --src {original_model} --out"):
        plan_run(cfg, str(REPO_ROOT / "ds_configs" / "zero2.json"), Topology(rank=0, local_rank=0, world_size=1))
