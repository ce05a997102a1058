"""Batch voice cloning from a file of samples: `python -m higgs_lora.infer --chatml samples.json --out out/`.

Input (paths inside are relative to the input file):
- the seed design's ChatML JSON: a list of samples whose user message holds the reference transcript (text), the
  reference recording (`{"type": "audio", "audio_url": ...}`) and the target text; an assistant audio after it,
  when present, is the ground-truth target recording (kept for evaluation);
- or JSONL, one `{"reference_audio", "reference_text", "target_text"[, "target_audio", "id", "speaker"]}` per line.

Output in `--out`: `NNN.wav` (24 kHz mono PCM16) per sample, `manifest.jsonl` (one line per generated sample: texts,
paths, duration, seconds taken, real-time factor; the contract `higgs_lora.eval.cli` reads), `errors.jsonl` (samples
that could not be generated, with the reason) and `run.json` (model, adapter, device, sampling settings, totals).
A bad sample is reported and skipped; the others are generated. Exit codes: 0 every sample generated, 3
(`errors.PARTLY_FAILED`) some failed, 1 none was, 2 unusable input; a `--shard` task exits 0 once its shard is in
place (the join reports the failures).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from higgs_lora import startup
from higgs_lora.data.chatml import audio_of, message_parts, resolve_path
from higgs_lora.errors import PARTLY_FAILED, UserError
from higgs_lora.infer.options import add_model_arguments, add_sampling_arguments, load_cloner, sampling_from_args
from higgs_lora.infer.sampling import SamplingParams
from higgs_lora.logs import get_logger

log = get_logger("infer")


@dataclass
class Sample:
    """One line of work: who speaks (reference), what to say (target), and the ground truth if known."""

    index: int
    id: str
    reference_audio: str
    reference_text: str
    target_text: str
    target_audio: str | None = None
    speaker: str | None = None


class SampleError(UserError, ValueError):
    """A samples file or one of its records that cannot be used; the message names it."""


def _chatml_sample(index: int, record: dict, base: Path) -> Sample:
    """The seed format: texts and audios in turn order; the last text not followed by audio is the target."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise SampleError("no 'messages' list")
    texts_audio: list[tuple[str, str | None]] = []
    for message in record["messages"]:
        if message.get("role") == "system":
            continue
        for part in message_parts(message):
            audio = audio_of(part)
            if audio is not None:
                if texts_audio and texts_audio[-1][1] is None:
                    texts_audio[-1] = (texts_audio[-1][0], audio)
                else:
                    raise SampleError("an audio part without a transcript before it")
            elif part.get("type") == "text":
                texts_audio.append((str(part.get("text", "")), None))
    if len(texts_audio) < 2 or texts_audio[0][1] is None:
        raise SampleError("expected a reference transcript, the reference audio and a target text")
    reference_text, reference_audio = texts_audio[0]
    target_text, target_audio = texts_audio[1]
    misc = record.get("misc") or {}
    return Sample(
        index,
        str(record.get("id") or misc.get("id") or f"{index:03d}"),
        resolve_path(base, reference_audio),
        reference_text,
        target_text,
        resolve_path(base, target_audio) if target_audio else None,
        record.get("speaker") or misc.get("speaker"),
    )


def _jsonl_sample(index: int, record: dict, base: Path) -> Sample:
    if not isinstance(record, dict):
        raise SampleError("not a JSON object")
    if "messages" in record:
        return _chatml_sample(index, record, base)
    missing = [k for k in ("reference_audio", "reference_text", "target_text") if not record.get(k)]
    if missing:
        raise SampleError(f"missing {', '.join(missing)}")
    target = record.get("target_audio")
    return Sample(
        index,
        str(record.get("id") or f"{index:03d}"),
        resolve_path(base, record["reference_audio"]),
        record["reference_text"],
        record["target_text"],
        resolve_path(base, target) if target else None,
        record.get("speaker"),
    )


def read_samples(path: str | Path) -> tuple[list[Sample], list[dict]]:
    """(samples, problems) of a ChatML JSON or a JSONL file; a malformed record is a problem, not a failure."""
    path = Path(path)
    base = path.parent
    samples, problems = [], []
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                records.append(SampleError(f"line {number + 1} is not JSON: {err}"))
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else data.get("samples") or [data]
    for index, record in enumerate(records):
        try:
            if isinstance(record, SampleError):
                raise record
            samples.append(_jsonl_sample(index, record, base))
        except SampleError as err:
            problems.append({"index": index, "id": f"{index:03d}", "error": str(err)})
    return samples, problems


def write_wav(path: Path, samples, sample_rate: int) -> None:
    """A 16-bit PCM WAV, written to a temporary name and renamed (atomic)."""
    from higgs_lora.data.audio import wav_bytes
    from higgs_lora.files import atomic_write_bytes

    atomic_write_bytes(path, wav_bytes(samples, sample_rate))


def run(
    cloner,
    samples: list[Sample],
    problems: list[dict],
    out: Path,
    params: SamplingParams,
    adapter: str | None,
    progress: bool = True,
) -> dict:
    """Generate every sample (batched), write wavs, manifest, errors and run record; return the run record."""
    from tqdm import tqdm

    from higgs_lora.files import atomic_write_json, atomic_write_text
    from higgs_lora.infer.cloner import InferenceError

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    requests, kept = [], []
    for sample in samples:
        try:
            sample_params = replace(params, seed=params.seed + sample.index) if params.seed is not None else params
            request = cloner.request(
                sample.reference_audio, sample.reference_text, sample.target_text, sample_params, adapter
            )
            cloner.prepare(request)
        except InferenceError as err:
            problems.append({"index": sample.index, "id": sample.id, "error": str(err)})
            continue
        requests.append(request)
        kept.append(sample)
    lines = []
    bar = tqdm(total=len(requests), unit="sample", disable=not progress or not sys.stderr.isatty())
    for group in cloner.batches(range(len(requests)), [r.adapter for r in requests]):
        results = cloner.clone_batch([requests[i] for i in group])
        for i, result in zip(group, results):
            bar.update(1)
            sample = kept[i]
            wav = f"{sample.index:03d}.wav"
            write_wav(out / wav, result.waveform, result.sample_rate)
            lines.append(
                {
                    "index": sample.index,
                    "id": sample.id,
                    "wav": wav,
                    "reference_audio": sample.reference_audio,
                    "reference_text": sample.reference_text,
                    "target_text": sample.target_text,
                    "target_audio": sample.target_audio,
                    "speaker": sample.speaker,
                    "duration_s": round(result.duration, 4),
                    "seconds": round(result.seconds_taken, 4),
                    "rtf": round(result.real_time_factor, 4),
                    "first_audio_s": None,
                    "frames": result.frames,
                    "stop": "eos" if all(s == "eos" for s in result.stops) else "max_seconds",
                    "batch_size": len(group),
                    "adapter": adapter,
                    "seed": result.seed,
                    "context_pieces": result.context_pieces,
                    "prompt_positions": result.prompt_positions,
                }
            )
    bar.close()
    lines.sort(key=lambda line: line["index"])
    atomic_write_text(out / "manifest.jsonl", "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    problems.sort(key=lambda p: p["index"])
    if problems:
        atomic_write_text(out / "errors.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in problems))
    elif (out / "errors.jsonl").exists():
        (out / "errors.jsonl").unlink()
    record = {
        **cloner.describe(),
        "adapter": adapter,
        "params": params.to_dict(),
        "samples": len(lines),
        "failed": len(problems),
        "seconds": round(time.perf_counter() - started, 3),
        "audio_seconds": round(sum(line["duration_s"] for line in lines), 3),
    }
    atomic_write_json(out / "run.json", record)
    return record


def _inputs(args: argparse.Namespace) -> tuple[SamplingParams, Path, list[Sample], list[dict]]:
    """The sampling settings, the samples file, its samples and its malformed records; UserErrors for bad input."""
    from higgs_lora.infer.requests import InferenceError  # not cloner's: a skipped shard or the join needs no torch

    params = sampling_from_args(args)
    if params.problems():
        raise InferenceError("; ".join(params.problems()))
    input_path = Path(args.chatml or args.jsonl)
    if not input_path.is_file():
        raise SampleError(f"{input_path}: no such file")
    try:
        samples, problems = read_samples(input_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(f"{input_path} is not valid JSON: {err}") from err
    return params, input_path, samples, problems


def _load(args: argparse.Namespace):
    """(cloner, the adapter to use) as the model options say."""
    from higgs_lora.infer.cloner import InferenceError

    try:
        cloner = load_cloner(args)
    except OSError as err:  # transformers' "not a model directory" and unreadable files: the input's problem too
        raise InferenceError(str(err)) from err
    return cloner, args.use_adapter or (cloner.adapters[0] if cloner.adapters else None)


def _summary(record: dict, out, seconds: float | None, problems: list[dict]) -> None:
    taken = f" in {seconds:.1f} s" if seconds is not None else ""
    log.info(
        f"{record['samples']} samples -> {out} ({record['audio_seconds']:.1f} s of audio{taken}); "
        f"{record['failed']} failed" + (" (see errors.jsonl)" if record["failed"] else "")
    )
    for problem in problems:
        log.warning(f"sample {problem['id']}: {problem['error']}")


def exit_code(record: dict) -> int:
    """0: every sample generated; errors.PARTLY_FAILED (3): some failed (errors.jsonl says which); 1: none was."""
    if not record["samples"]:
        return 1
    return PARTLY_FAILED if record["failed"] else 0


def _run(args: argparse.Namespace) -> int:
    """Exit codes: `exit_code`'s, or 2 (a UserError) for unusable input."""
    params, _, samples, problems = _inputs(args)
    cloner, adapter = _load(args)
    record = run(cloner, samples, problems, Path(args.out), params, adapter, progress=not args.quiet)
    _summary(record, args.out, record["seconds"], problems)
    return exit_code(record)


class _NoModel:
    """Stands in for the cloner of a shard with nothing to generate (more tasks than samples, or only malformed
    records): `run` then writes its manifest and errors without a model being loaded."""

    adapters: list[str] = []

    def batches(self, indices, adapters) -> list[list[int]]:
        return []

    def describe(self) -> dict:
        return {}


def _run_shard(args: argparse.Namespace) -> int:
    """One array task: generate shard I of N into out/shards/ (docs/inference.md#on-a-slurm-cluster).

    Exit 0 once the shard is in place, even when some or all of its samples failed (errors.jsonl says which; the
    join reports them), or at once when an earlier run finished it. The model is loaded only for real work."""
    from higgs_lora.infer import shards

    shard = shards.parse_shard(args.shard)
    params, input_path, samples, problems = _inputs(args)
    out = Path(args.out)
    shards.claim_plan(out, shards.shard_plan(input_path, len(samples) + len(problems), shard.count, vars(args)))
    if shards.done(out, shard):
        log.info(f"shard {shard.index}/{shard.count} already done ({out / shards.SHARDS / shard.name}): skipped")
        return 0
    mine = [sample for sample in samples if shard.owns(sample.index)]
    my_problems = [problem for problem in problems if shard.owns(problem["index"])]
    cloner, adapter = _load(args) if mine else (_NoModel(), args.use_adapter)
    record = shards.write_shard(
        out, shard, lambda folder: run(cloner, mine, my_problems, folder, params, adapter, progress=not args.quiet)
    )
    _summary(record, out / shards.SHARDS / shard.name, record["seconds"], my_problems)
    return 0


def _join(args: argparse.Namespace) -> int:
    """The array's last step: every shard of --out joined into --out; exit codes as for one unsharded run (3 when
    some samples failed: the join job then shows FAILED with exit code 3, and errors.jsonl says which)."""
    from higgs_lora.infer import shards

    out = Path(args.out)
    plan, _ = shards.missing_shards(out)
    _, input_path, samples, problems = _inputs(args)
    shards.claim_plan(out, shards.shard_plan(input_path, len(samples) + len(problems), plan["shards"], vars(args)))
    record = shards.join(out)
    _summary(record, out, None, [])  # the tasks ran side by side: no one figure is "the time it took"
    log.info(
        f"joined {plan['shards']} shards: {record['task_seconds']:.1f} s of task time, the slowest task "
        f"{record['slowest_task_seconds']:.1f} s"
    )
    return exit_code(record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="higgs-lora infer", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--chatml", help="seed-format ChatML JSON (or JSONL) of samples")
    source.add_argument("--jsonl", help="JSONL of {reference_audio, reference_text, target_text} records")
    parser.add_argument("--out", required=True, help="output directory (wavs, manifest.jsonl, run.json)")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--use-adapter", default=None, help="name of the loaded adapter to use (default: the first)")
    sharded = parser.add_mutually_exclusive_group()
    sharded.add_argument(
        "--shard",
        metavar="I/N",
        help="generate only shard I of N (samples I, I+N, ...) into OUT/shards/, e.g. from an array task; a "
        "finished shard is skipped",
    )
    sharded.add_argument("--join", action="store_true", help="join the N finished shards of OUT/shards/ into OUT")
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    work = _join if args.join else _run_shard if args.shard else _run
    return startup.run_command(args, lambda: work(args))


if __name__ == "__main__":
    raise SystemExit(main())
