"""The best adapter of a run: the rule on scripted scores, the trainer's best/ folder, and pruning that keeps it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from higgs_lora.config import load_config
from higgs_lora.run_folder import list_checkpoints
from higgs_lora.train import checkpoint
from higgs_lora.train.best import RULE, is_better, scores_of
from higgs_lora.train.loop import Trainer
from tests.conftest import REPO_ROOT


def evaluation(loss, similarity=None, cer=None, truth=0.8):
    metrics = {"loss": loss}
    if similarity is not None:
        metrics.update(similarity=similarity, similarity_ground_truth=truth)
    if cer is not None:
        metrics["cer"] = cer
    return metrics


@pytest.mark.parametrize(
    "candidate,incumbent,better",
    [
        (evaluation(2.0, 0.5, cer=0.30), evaluation(1.0, 0.7, cer=0.40), True),  # CER first: loss and similarity lose
        (evaluation(1.0, 0.7, cer=0.40), evaluation(2.0, 0.5, cer=0.30), False),
        (evaluation(2.0, 0.6, cer=0.30), evaluation(1.0, 0.5, cer=0.30), True),  # CER tie: similarity decides
        (evaluation(1.0, 0.6), evaluation(0.5, 0.5), True),  # no ASR: similarity, then loss
        (evaluation(0.9, 0.6), evaluation(1.0, 0.6), True),  # similarity tie: the lower loss
        (evaluation(1.0, 0.6), evaluation(1.0, 0.6), False),  # a full tie keeps the earlier step
        (evaluation(0.9), evaluation(1.0), True),  # loss only (train.eval_samples=0)
        (evaluation(0.9, cer=0.5), evaluation(1.0, 0.6), True),  # only scores both have are compared: loss
    ],
)
def test_the_rule(candidate, incumbent, better):
    assert is_better(scores_of(candidate), scores_of(incumbent)) is better


def test_similarity_is_relative_to_the_ground_truth():
    assert scores_of(evaluation(1.0, 0.6, truth=0.8)) == {"similarity_relative": pytest.approx(0.75), "loss": 1.0}
    assert is_better(scores_of(evaluation(1.0)), None)


def make_step(root, step):
    path = root / "checkpoints" / f"step_{step:08d}"
    (path / "deepspeed").mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")


def test_the_trainer_keeps_the_best_evaluation_in_best_and_pruning_never_deletes_it(tmp_path, monkeypatch):
    """Scripted evaluations at steps 10..60 (CER given): best/ follows the rule, best.json says why, and a
    checkpoint at the best step survives keep_last=2."""
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}", "train.keep_last=2"])
    trainer = Trainer.__new__(Trainer)  # the loop's own methods, without an engine
    trainer.cfg, trainer.output = cfg, tmp_path
    trainer.topology = SimpleNamespace(is_main=True, rank=0)
    trainer.engine = SimpleNamespace(module="model")
    trainer.best_scores = trainer.best_step = None

    def export(model, out, cfg, step, is_main):  # stands in for the gathered PEFT export
        out.mkdir(parents=True, exist_ok=True)
        (out / "adapter_config.json").write_text(json.dumps({"step": step}))

    monkeypatch.setattr(checkpoint, "export_adapter", export)
    scripted = {
        0: evaluation(3.0, 0.1, cer=0.10),  # the untrained base: never a candidate
        10: evaluation(2.0, 0.3, cer=0.90),
        20: evaluation(1.5, 0.4, cer=0.60),
        30: evaluation(1.2, 0.5, cer=0.60),  # CER tie with 20, higher similarity: best
        40: evaluation(1.0, 0.7, cer=0.70),  # better loss and similarity, worse CER: not best
        50: evaluation(0.9, 0.6, cer=0.65),
        60: evaluation(0.8, 0.6, cer=0.61),
    }
    chosen = []
    for step, metrics in scripted.items():
        trainer.step = step
        trainer._update_best(metrics)
        chosen.append(trainer.best_step)
        if step:
            make_step(tmp_path, step)
            checkpoint.prune(tmp_path, step, cfg.train.keep_last, trainer.best_step)
    assert chosen == [None, 10, 20, 30, 30, 30, 30]
    record = json.loads((tmp_path / "best" / "best.json").read_text(encoding="utf-8"))
    assert record["step"] == 30 and record["rule"] == RULE
    assert record["scores"] == {"cer": 0.6, "similarity_relative": pytest.approx(0.5 / 0.8), "loss": 1.2}
    assert record["ground_truth"] == {"similarity_ground_truth": 0.8}
    assert json.loads((tmp_path / "best" / "adapter_config.json").read_text()) == {"step": 30}
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000050", "step_00000060"]
    assert not (tmp_path / ".best.partial").exists()

    # Resumed at step 40: best.json is taken up; a run from scratch moves it aside.
    resumed = Trainer.__new__(Trainer)
    resumed.cfg, resumed.output, resumed.topology, resumed.step = cfg, tmp_path, trainer.topology, 40
    resumed.best_scores = resumed.best_step = None
    resumed._restore_best(resumed=True)
    assert resumed.best_step == 30 and resumed.best_scores == record["scores"]
    resumed._restore_best(resumed=False)
    assert not (tmp_path / "best").exists() and (tmp_path / "best.previous_run" / "best.json").is_file()


def test_merge_infer_and_serve_say_which_adapter_of_a_run_folder_they_take(tmp_path):
    from higgs_lora.deploy.merge_plan import locate_adapter
    from higgs_lora.infer.options import parse_adapters

    run = tmp_path / "runs" / "x"
    for folder in ("adapter", "best"):
        (run / folder).mkdir(parents=True)
        (run / folder / "adapter_config.json").write_text("{}")
    (run / "best" / "best.json").write_text(json.dumps({"step": 30, "scores": {}, "rule": RULE}))

    assert parse_adapters([str(run)]) == {"x": str(run / "adapter")}  # the run folder: its final adapter
    assert parse_adapters([str(run / "best")]) == {"x-best": str(run / "best")}
    assert parse_adapters([f"mine={run / 'best'}"]) == {"mine": str(run / "best")}
    final, best = locate_adapter(run), locate_adapter(run / "best")
    assert final.path == (run / "adapter").resolve() and final.step is None and "best evaluation's" in final.how
    assert best.path == (run / "best").resolve() and best.step == 30 and "best adapter" in best.how
    assert best.run_dir == run.resolve()
