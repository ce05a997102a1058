"""train.report_to: metrics.jsonl always, then TensorBoard / W&B / MLflow with the same numbers.

W&B and MLflow are optional extras that are not installed here: stand-in modules record the calls, so these tests
check what higgs-lora hands each tracker (keys, values, steps, resume of the same run), not the trackers themselves.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

from higgs_lora.config import ConfigError, build_config
from higgs_lora.train import trackers
from higgs_lora.train.metrics_log import MetricsLog

RECORDS = [
    ("train", {"step": 1, "loss": 7.5, "per_codebook_loss": [7.0, 8.0], "lr": 1e-4, "grad_norm": None}),
    ("eval", {"step": 1, "loss": 7.7, "similarity": 0.61, "similarity_ground_truth": 0.83, "note": "text"}),
    ("train", {"step": 2, "loss": 7.1, "per_codebook_loss": [6.8, 7.4], "lr": 2e-4, "grad_norm": 1.25}),
]


def test_flatten_keeps_numbers_under_kind_and_index():
    flat = trackers.flatten("train", RECORDS[0][1])
    assert flat == {
        "train/loss": 7.5,
        "train/per_codebook_loss/0": 7.0,
        "train/per_codebook_loss/1": 8.0,
        "train/lr": 1e-4,
    }
    assert trackers.flatten("eval", RECORDS[1][1]) == {
        "eval/loss": 7.7,
        "eval/similarity": 0.61,
        "eval/similarity_ground_truth": 0.83,
    }


def test_report_to_is_validated():
    assert build_config().train.report_to == ["tensorboard"]
    assert build_config(overrides=["train.report_to=[]"]).train.report_to == []
    with pytest.raises(ConfigError, match="unknown tracker comet"):
        build_config(overrides=["train.report_to=tensorboard,comet"])
    with pytest.raises(ConfigError, match="twice"):
        build_config(overrides=["train.report_to=wandb,wandb"])


def test_a_missing_tracker_is_a_config_error_naming_the_extra(monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(ConfigError, match=r"higgs-lora\[wandb\]"):
        trackers.check_installed(["tensorboard", "wandb"])
    trackers.check_installed(["tensorboard"])


class _FakeWandbRun:
    def __init__(self, calls, run_id):
        self.calls, self.id = calls, run_id

    def log(self, values, step):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))


def _fake_wandb(calls):
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _FakeWandbRun(calls, kwargs["id"] or "run-abc")

    module.init = init
    return module


def _fake_mlflow(calls):
    module = types.ModuleType("mlflow")
    module.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    module.set_experiment = lambda name: calls.append(("experiment", name))

    def start_run(run_id=None, run_name=None):
        calls.append(("start", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "ml-123"))

    module.start_run = start_run
    module.log_params = lambda params: calls.append(("params", dict(params)))
    module.log_metrics = lambda values, step: calls.append(("log", dict(values), step))
    module.end_run = lambda: calls.append(("end",))
    return module


def _log_all(log: MetricsLog, records) -> None:
    for kind, metrics in records:
        log.record(kind, metrics)


def test_every_tracker_gets_what_metrics_jsonl_gets(tmp_path, monkeypatch):
    wandb_calls, mlflow_calls = [], []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(wandb_calls))
    monkeypatch.setitem(sys.modules, "mlflow", _fake_mlflow(mlflow_calls))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "run"
    config = {"train": {"lr": 1e-4, "report_to": ["tensorboard", "wandb", "mlflow"]}, "seed": 3}
    log = MetricsLog(out, ["tensorboard", "wandb", "mlflow"], enabled=True, config=config)
    log.start(0, resumed=False)
    _log_all(log, RECORDS)
    log.close()

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r.pop("kind"), r) for r in lines] == RECORDS
    expected = [("log", trackers.flatten(kind, m), m["step"]) for kind, m in RECORDS]

    assert wandb_calls[0][0] == "init" and wandb_calls[0][1]["name"] == "run"
    assert wandb_calls[0][1]["config"] == config and wandb_calls[0][1]["id"] is None
    assert wandb_calls[1:] == [*expected, ("finish",)]
    assert (out / "wandb_run_id").read_text().strip() == "run-abc"

    assert mlflow_calls[0] == ("uri", (out / "mlruns").resolve().as_uri())
    assert ("start", None, "run") in mlflow_calls
    params = next(c[1] for c in mlflow_calls if c[0] == "params")
    assert params["train.lr"] == "0.0001" and params["seed"] == "3"
    assert [c for c in mlflow_calls if c[0] == "log"] == expected and mlflow_calls[-1] == ("end",)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([7.5, 7.1])
    assert [e.step for e in events.Scalars("train/per_codebook_loss/1")] == [1, 2]
    assert events.Scalars("eval/similarity_ground_truth")[0].value == pytest.approx(0.83)
    assert "train/grad_norm" in events.Tags()["scalars"]  # logged at step 2 only (None at step 1)
    assert [e.step for e in events.Scalars("train/grad_norm")] == [2]


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path, monkeypatch):
    wandb_calls, mlflow_calls = [], []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(wandb_calls))
    monkeypatch.setitem(sys.modules, "mlflow", _fake_mlflow(mlflow_calls))
    out = tmp_path / "run"
    out.mkdir()
    (out / "wandb_run_id").write_text("run-abc\n")
    (out / "mlflow_run_id").write_text("ml-123\n")
    log = MetricsLog(out, ["wandb", "mlflow"], enabled=True)
    log.start(5, resumed=True)
    assert wandb_calls[0][1]["id"] == "run-abc" and wandb_calls[0][1]["resume"] == "allow"
    assert ("start", "ml-123", None) in mlflow_calls
    assert not any(c[0] == "params" for c in mlflow_calls)  # the run has its params already


def test_other_ranks_and_an_empty_list_report_nowhere(tmp_path):
    silent = MetricsLog(tmp_path / "a", ["tensorboard"], enabled=False)
    silent.start(0, resumed=False)
    silent.record("train", RECORDS[0][1])
    assert not (tmp_path / "a").exists() and silent.writer is None
    plain = MetricsLog(tmp_path / "b", [], enabled=True)
    plain.start(0, resumed=False)
    plain.record("train", RECORDS[0][1])
    plain.close()
    assert (tmp_path / "b" / "metrics.jsonl").is_file() and not (tmp_path / "b" / "tensorboard").exists()
