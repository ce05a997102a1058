"""`python -m higgs_lora.evaluate --checkpoint`: a checkpoint evaluated on its own, without training.

The adapter is made here (LoRA on the tiny model, B drawn at random so it changes the model) and laid out as a
training run lays out a checkpoint; the merged model is PEFT's own merge of it. The held-out loss of the adapter
over its base and of the merged model are computed through two different loading paths and must agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from higgs_lora.config import load_config, save_config
from higgs_lora.constants import RUN_CONFIG, STEP_NAME
from higgs_lora.evaluate import main
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # loads the tiny model three times and generates clips

EVAL = ["train.eval_samples=2", "train.eval_sample_seconds=0.5", "train.eval_dnsmos=false"]


@pytest.fixture(scope="module")
def run(demo_cache, tmp_path_factory):
    """runs/x/checkpoints/step_00000004/{adapter/, trainer_state.json} and the merged model of that adapter."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_lora.model.lora import apply_lora

    root = tmp_path_factory.mktemp("evaluate-checkpoint")
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [*demo_cache, f"output_dir={root / 'run'}"])
    cfg.model.dtype = "fp32"
    cfg.model.gradient_checkpointing = False
    base = HiggsAudioV2ForConditionalGeneration.from_pretrained(cfg.model.path, dtype=torch.float32)
    model = apply_lora(base, cfg.lora, cfg.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    checkpoint = root / "run" / "checkpoints" / STEP_NAME.format(4)
    adapter = checkpoint / "adapter"
    model.save_pretrained(str(adapter))
    save_config(cfg, adapter / RUN_CONFIG)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 4}))
    merged = root / "merged"
    model.merge_and_unload().save_pretrained(str(merged))
    # tokenizer, chat template, processor config (naming the codec): everything of the base but its weights
    for item in Path(cfg.model.path).iterdir():
        if item.is_file() and not (merged / item.name).exists() and item.suffix != ".safetensors":
            shutil.copy(item, merged / item.name)
    config_file = root / "run.yaml"
    save_config(cfg, config_file)
    return {"checkpoint": checkpoint, "merged": merged, "config": config_file, "cfg": cfg}


def _result(out):
    return json.loads((out / "evaluation.json").read_text())


def test_a_checkpoint_is_evaluated_without_training(run, tmp_path):
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(run["checkpoint"]), "--out", str(out), "--quiet", *EVAL]) == 0
    result = _result(out)
    assert result["step"] == 4 and result["checkpoint"].endswith("adapter")
    assert result["held_out_speakers"] and torch.isfinite(torch.tensor(result["metrics"]["loss"]))
    assert len(result["metrics"]["per_codebook_loss"]) == 8
    clips = out / "eval_samples" / STEP_NAME.format(4)
    assert len((clips / "manifest.jsonl").read_text().splitlines()) == 2
    assert (clips / "report.html").is_file() and result["report"] == str((clips / "report.html").resolve())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in logged] == [("eval", 4)]
    assert logged[0]["loss"] == pytest.approx(result["metrics"]["loss"])

    # The same adapter, merged into its base by PEFT and loaded as a plain checkpoint, has the same held-out loss;
    # the base without it does not (the adapter is in effect).
    merged_out = tmp_path / "merged-eval"
    args = ["--config", str(run["config"]), "--no-report", "--quiet", "train.eval_samples=0"]
    assert main(["--model", str(run["merged"]), "--out", str(merged_out), *args]) == 0
    assert _result(merged_out)["metrics"]["loss"] == pytest.approx(result["metrics"]["loss"], rel=1e-4)
    base_out = tmp_path / "base-eval"
    assert main(["--model", run["cfg"].model.path, "--out", str(base_out), *args]) == 0
    assert abs(_result(base_out)["metrics"]["loss"] - result["metrics"]["loss"]) > 1e-3


def test_what_cannot_be_evaluated_is_a_clear_error(run, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path)]) == 2
    assert "holds no adapter" in capsys.readouterr().err
    assert main(["--model", str(run["merged"])]) == 2
    assert "--model needs --config" in capsys.readouterr().err
    out = tmp_path / "x"
    assert main(["--checkpoint", str(run["checkpoint"]), "--out", str(out), "data.cache_dir=/nonexistent/c"]) == 2
    assert "does not exist" in capsys.readouterr().err
