"""Reading an inference output folder, as `python -m higgs_lora.infer --out out/` writes it.

    out/manifest.jsonl   one object per generated sample: index, id, wav (relative to out/), reference_audio,
                         reference_text, target_text, and optionally target_audio, speaker, duration_s, seconds,
                         rtf, first_audio_s, frames, stop, batch_size, adapter
    out/errors.jsonl     (optional) {"index", "id", "error"} per sample that failed to generate
    out/run.json         (optional) model, adapter, device, dtype, sampling params, counts, total seconds

Only ``id``, ``wav`` and ``target_text`` are required; every other field may be missing or null and the metric that
needs it is then left out for that sample. A manifest line that is not JSON or lacks a required key is reported as
a problem and skipped; the rest of the folder is still evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from higgs_lora.errors import UserError

REQUIRED_KEYS = ("id", "wav", "target_text")


class PredictionsError(UserError, FileNotFoundError):
    """A folder that is not an inference output folder (no manifest.jsonl); the message says what to give."""


@dataclass(frozen=True)
class Prediction:
    """One generated sample from manifest.jsonl, paths resolved to absolute."""

    id: str
    index: int | None
    wav: Path
    target_text: str
    reference_audio: Path | None = None
    reference_text: str | None = None
    target_audio: Path | None = None
    speaker: str | None = None
    duration_s: float | None = None
    seconds: float | None = None
    """Wall time to generate this sample (s)."""
    rtf: float | None = None
    first_audio_s: float | None = None
    stop: str | None = None
    batch_size: int | None = None


@dataclass
class PredictionFolder:
    """A whole inference output folder."""

    path: Path
    predictions: list[Prediction]
    generation_errors: list[dict] = field(default_factory=list)
    """errors.jsonl lines: samples that inference could not generate."""
    run: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Lines of manifest.jsonl/errors.jsonl/run.json that could not be read, with the reason."""


def _optional_path(value, base: Path) -> Path | None:
    if value in (None, ""):
        return None
    path = Path(value)
    return path if path.is_absolute() else base / path


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _prediction(row: dict, folder: Path) -> Prediction:
    index = row.get("index")
    return Prediction(
        id=str(row["id"]),
        index=None if index is None else int(index),
        wav=_optional_path(row["wav"], folder),
        target_text=str(row["target_text"]),
        reference_audio=_optional_path(row.get("reference_audio"), folder),
        reference_text=row.get("reference_text"),
        target_audio=_optional_path(row.get("target_audio"), folder),
        speaker=row.get("speaker"),
        duration_s=_optional_float(row.get("duration_s")),
        seconds=_optional_float(row.get("seconds")),
        rtf=_optional_float(row.get("rtf")),
        first_audio_s=_optional_float(row.get("first_audio_s")),
        stop=row.get("stop"),
        batch_size=row.get("batch_size"),
    )


def _read_jsonl(path: Path, problems: list[str]) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path.name}:{number}: not JSON ({err})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path.name}:{number}: expected a JSON object, got {type(row).__name__}")
            continue
        rows.append(row)
    return rows


def read_predictions(folder: str | Path) -> PredictionFolder:
    """Read manifest.jsonl (required), errors.jsonl and run.json (optional) of an inference output folder.

    Raises PredictionsError (a FileNotFoundError) when there is no manifest.jsonl (nothing to evaluate); everything
    else that is wrong is collected in ``problems``. A sample id that appears twice keeps its first line.
    """
    folder = Path(folder).resolve()
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise PredictionsError(
            f"{manifest} not found: --pred must be a folder written by `python -m higgs_lora.infer --out DIR`"
        )
    problems: list[str] = []
    predictions: list[Prediction] = []
    seen: set[str] = set()
    for number, row in enumerate(_read_jsonl(manifest, problems), start=1):
        missing = [k for k in REQUIRED_KEYS if row.get(k) in (None, "")]
        if missing:
            problems.append(f"manifest.jsonl: entry {number} (id {row.get('id')!r}) lacks {', '.join(missing)}")
            continue
        try:
            prediction = _prediction(row, folder)
        except (TypeError, ValueError) as err:
            problems.append(f"manifest.jsonl: entry {number} (id {row.get('id')!r}): {err}")
            continue
        if prediction.id in seen:
            problems.append(f"manifest.jsonl: id {prediction.id!r} appears again in entry {number}; kept the first")
            continue
        seen.add(prediction.id)
        predictions.append(prediction)
    errors_file = folder / "errors.jsonl"
    generation_errors = _read_jsonl(errors_file, problems) if errors_file.is_file() else []
    run: dict = {}
    run_file = folder / "run.json"
    if run_file.is_file():
        try:
            run = json.loads(run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            problems.append(f"run.json: not JSON ({err})")
    return PredictionFolder(folder, predictions, generation_errors, run, problems)
