"""Experiment trackers a run reports to (`train.report_to`): TensorBoard, Weights & Biases, MLflow.

metrics.jsonl is always written (`higgs_lora.train.metrics_log`); the trackers here get the same records. Each is
an optional package imported only when named, so none is ever required: TensorBoard comes with the base install,
`pip install 'higgs-lora[wandb]'` / `'higgs-lora[mlflow]'` add the others. Only rank 0 reports. A tracker that is
named but not installed is a config error found before the model loads (`check_installed`). Imports torch only for
TensorBoard's writer. See docs/training.md (Curves).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from higgs_lora.config import ConfigError
from higgs_lora.config.validate import TRACKERS

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
INSTALL = {
    "tensorboard": "pip install tensorboard",
    "wandb": "pip install 'higgs-lora[wandb]'",
    "mlflow": "pip install 'higgs-lora[mlflow]'",
}


def check_installed(report_to: list[str]) -> None:
    """Raise a ConfigError naming the install command for every tracker in `report_to` that is not installed."""
    missing = [name for name in report_to if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        fixes = "; ".join(f"{name}: {INSTALL[name]}" for name in missing)
        raise ConfigError(
            [f"train.report_to names {', '.join(missing)}, not installed here: {fixes}; or drop it from the list"]
        )


def flatten(kind: str, metrics: dict) -> dict[str, float]:
    """`{kind/key: value}` for the numbers of one record; a list becomes `kind/key/0`, `kind/key/1`, ...

    `step` itself and values that are not numbers (None, text) are left out: trackers take scalars only.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "step":
            continue
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)):
            flat[f"{kind}/{key}"] = float(value)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, (int, float)) and not isinstance(item, bool):
                    flat[f"{kind}/{key}/{index}"] = float(item)
    return flat


class TensorBoard:
    """`<output_dir>/tensorboard`; a resumed run hides the events a killed attempt logged after its checkpoint."""

    name = "tensorboard"

    def __init__(self, output: Path):
        self.output = output
        self.writer = None

    def start(self, step: int, resumed: bool, run_name: str, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.output / "tensorboard"), purge_step=step + 1 if resumed else 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandB:
    """A Weights & Biases run. Its id is kept in `<output_dir>/wandb_run_id` so a resumed run continues the same
    W&B run. Offline use: `WANDB_MODE=offline` (W&B's own setting); project: `WANDB_PROJECT` (default higgs-lora)."""

    name = "wandb"

    def __init__(self, output: Path):
        self.output = output
        self.run = None

    def start(self, step: int, resumed: bool, run_name: str, config: dict) -> None:
        import wandb

        id_file = self.output / "wandb_run_id"
        run_id = id_file.read_text(encoding="utf-8").strip() if resumed and id_file.is_file() else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "higgs-lora"),
            name=run_name,
            id=run_id,
            resume="allow" if run_id else None,
            config=config,
            dir=str(self.output),
        )
        id_file.write_text(str(self.run.id) + "\n", encoding="utf-8")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


class MLflow:
    """An MLflow run in the tracking server of `MLFLOW_TRACKING_URI` (MLflow's own setting, e.g. a tracking
    server's http://host:5000; unset: a local file store, `<output_dir>/mlruns`). Experiment:
    `MLFLOW_EXPERIMENT_NAME` (default higgs-lora). The run's id is kept in `<output_dir>/mlflow_run_id` so a resumed
    run continues it."""

    name = "mlflow"

    def __init__(self, output: Path):
        self.output = output
        self.mlflow = None

    def start(self, step: int, resumed: bool, run_name: str, config: dict) -> None:
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless allowed; its SQLite store needs
            # the full mlflow package (SQLAlchemy), which the extra does not pull in. A local run without a server
            # is what the file store is still for, so it is allowed for this default only.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((self.output / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "higgs-lora"))
        id_file = self.output / "mlflow_run_id"
        run_id = id_file.read_text(encoding="utf-8").strip() if resumed and id_file.is_file() else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        id_file.write_text(run.info.run_id + "\n", encoding="utf-8")
        if run_id is None:
            # MLflow params are strings of at most a few hundred characters: the flattened top-level config.
            mlflow.log_params({key: str(value)[:250] for key, value in flatten_config(config).items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def finish(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()


def flatten_config(config: dict, prefix: str = "") -> dict[str, object]:
    """`{"train.lr": 1e-4, ...}` from the nested resolved config."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def build(report_to: list[str], output: Path) -> list:
    """The tracker objects for `train.report_to`, in its order."""
    classes = {tracker.name: tracker for tracker in (TensorBoard, WandB, MLflow)}
    assert set(classes) == set(TRACKERS)
    return [classes[name](output) for name in report_to]
