"""python -m higgs_lora.evaluate --pred out/ [--asr LOCAL_ASR_DIR] [--compare out_base/] [--out DIR]

Scores an inference output folder (written by `python -m higgs_lora.infer --out out/`): speaker similarity
(resemblyzer), Arabic CER/WER (a local ASR checkpoint, optional), DNSMOS SIG/BAK/OVRL, speaking rate, silence,
clipping, real-time factor and latency. Writes metrics.json, samples.csv and a self-contained report.html into
--out (default: the --pred folder itself, so the report's audio players find the generated wavs next to it).
Offline: every model is inside an installed wheel or a directory you give. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from higgs_lora import startup
from higgs_lora.eval.asr import load_asr
from higgs_lora.eval.predictions import read_predictions
from higgs_lora.eval.report import write_report
from higgs_lora.eval.scoring import Scorers, compare, default_embedder, per_speaker, score_folder, summarise
from higgs_lora.logs import get_logger

log = get_logger("evaluate")

ASR_SKIPPED = (
    "CER/WER skipped: no --asr given. Pass --asr DIR, a local Whisper or CTC (wav2vec2) checkpoint "
    "directory, to score intelligibility (docs/evaluation.md, 'ASR')."
)
VERSIONED = ("higgs-lora", "resemblyzer", "speechmos", "onnxruntime", "jiwer", "transformers", "torch")


def _versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _printer(quiet: bool, label: str):
    def progress(done: int, total: int, row: dict) -> None:
        if quiet:
            return
        similarity = row.get("similarity_reference")
        ovrl = row.get("dnsmos_ovrl")
        status = row.get("error") or (f"similarity {similarity:.3f}" if similarity is not None else "similarity -") + (
            f" | OVRL {ovrl:.2f}" if ovrl is not None else ""
        ) + (f" | CER {row['cer']:.3f}" if row.get("cer") is not None else "")
        log.info(f"{label} {done}/{total} {row['id']}: {status}")

    return progress


def _problems(folder, rows: list[dict]) -> list[str]:
    """Everything that went wrong in a folder, one line each: unreadable manifest lines, failed generations,
    generated audio that could not be read."""
    problems = list(folder.problems)
    problems += [
        f"{e.get('id', e.get('index'))}: generation failed: {e.get('error')}" for e in folder.generation_errors
    ]
    return problems + [f"{r['id']}: {r['error']}" for r in rows if r.get("error")]


def evaluate(
    pred: str | Path,
    *,
    asr: str | Path | None = None,
    compare_with: str | Path | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    dnsmos: bool = True,
    quiet: bool = False,
) -> dict:
    """Evaluate the inference output folder ``pred`` and write the report files; returns the metrics dict.

    ``asr``: a local Whisper/CTC checkpoint directory for CER/WER (skipped, with a message, when None).
    ``compare_with``: a second prediction folder for the same sample ids (e.g. the base model's); its samples are
    scored with the same models and the report shows both side by side with deltas (this - base).
    ``out``: where metrics.json, samples.csv and report.html go (default: ``pred``). Raises PredictionsError when
    a folder has no manifest.jsonl and AsrError when ``asr`` is not a usable checkpoint (both UserErrors); a bad
    sample never raises.
    """
    started = time.perf_counter()
    folder = read_predictions(pred)
    base_folder = read_predictions(compare_with) if compare_with is not None else None
    out = Path(out).resolve() if out is not None else folder.path
    transcriber = load_asr(asr, device) if asr is not None else None
    if transcriber is None and not quiet:
        log.info(ASR_SKIPPED)
    scorers = Scorers(default_embedder(device), transcriber, use_dnsmos=dnsmos)

    rows = score_folder(folder, scorers, _printer(quiet, folder.path.name))
    base_rows = score_folder(base_folder, scorers, _printer(quiet, base_folder.path.name)) if base_folder else None
    problems = _problems(folder, rows)
    if base_folder is not None:
        problems += [f"base {p}" for p in _problems(base_folder, base_rows)]
    metrics = {
        "tool": "higgs_lora.eval.cli",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pred": str(folder.path),
        "num_samples": len(rows),
        "num_scored": sum(1 for r in rows if not r.get("error")),
        "num_failed_generation": len(folder.generation_errors),
        "num_failed_scoring": sum(1 for r in rows if r.get("error")),
        "asr": (
            {"model": str(transcriber.path), "kind": transcriber.kind} if transcriber else {"skipped": ASR_SKIPPED}
        ),
        "dnsmos": dnsmos,
        "summary": summarise(rows),
        "per_speaker": per_speaker(rows),
        "run": folder.run,
        "compare": None,
        "problems": problems,
        "versions": _versions(),
    }
    if base_rows is not None:
        metrics["compare"] = {"pred": str(base_folder.path), **compare(rows, base_rows)}
        metrics["base_per_speaker"] = per_speaker(base_rows)
    metrics["evaluation_seconds"] = time.perf_counter() - started
    metrics["evaluation_seconds_per_sample"] = metrics["evaluation_seconds"] / max(1, len(rows) + len(base_rows or []))
    metrics["files"] = {k: str(v) for k, v in write_report(out, metrics, rows, base_rows).items()}
    return metrics


def _print_summary(metrics: dict) -> None:
    """The command's output (printed even with --quiet): one line per metric, the problems, where the report is."""
    for metric, stats in metrics["summary"].items():
        line = f"[evaluate] {metric:22s} {stats['value']:.4f}  (n={stats['n']})"
        if metrics["compare"] and metric in metrics["compare"]["delta"]:
            line += f"  delta vs base {metrics['compare']['delta'][metric]:+.4f}"
        print(line)
    for problem in metrics["problems"]:
        print(f"[evaluate] problem: {problem}")
    print(
        f"[evaluate] {metrics['num_scored']}/{metrics['num_samples']} samples scored in "
        f"{metrics['evaluation_seconds']:.1f} s; report: {metrics['files']['report']}"
    )


def _run(args: argparse.Namespace) -> int:
    """Exit codes: 0 when at least one sample was scored, 1 when none was, 2 (a UserError) for unusable input."""
    metrics = evaluate(
        args.pred,
        asr=args.asr,
        compare_with=args.compare,
        out=args.out,
        device=args.device,
        dnsmos=not args.no_dnsmos,
        quiet=args.quiet,
    )
    _print_summary(metrics)
    return 0 if metrics["num_scored"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="higgs-lora evaluate",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pred", required=True, help="inference output folder (manifest.jsonl, wavs, run.json)")
    parser.add_argument("--asr", help="local Whisper or CTC checkpoint directory for CER/WER (skipped without it)")
    parser.add_argument("--compare", help="a second output folder for the same samples (e.g. the base model's)")
    parser.add_argument("--out", help="where metrics.json, samples.csv and report.html go (default: --pred)")
    parser.add_argument("--device", default="cpu", help="torch device for the speaker encoder and the ASR")
    parser.add_argument(
        "--no-dnsmos", action="store_true", help="skip DNSMOS (about half of the time per sample on a CPU)"
    )
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return startup.run_command(args, lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
