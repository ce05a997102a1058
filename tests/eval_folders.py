"""Builds inference output folders (the `higgs_lora.infer.batch --out` layout) from demo-corpus recordings, for the
evaluation tests: the "generated" audio is a real recording, resampled to 24 kHz PCM16 as inference writes it, so
the metrics have known answers (same speaker as its reference, or not) without running any model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from higgs_lora.data.audio import load_audio

GENERATED_RATE = 24000


def write_wav(path: Path, samples: np.ndarray, rate: int = GENERATED_RATE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(samples, -1, 1), rate, subtype="PCM_16")
    return path


def make_prediction_folder(
    out: Path,
    samples: list[dict],
    *,
    seconds_per_audio_second: float = 0.5,
    run: dict | None = None,
    errors: list[dict] | None = None,
) -> Path:
    """Write ``out/`` with NNN.wav, manifest.jsonl, run.json (and errors.jsonl when given).

    Each sample dict has ``generated`` (a demo row whose audio becomes the generated wav), ``reference`` (a demo row:
    reference_audio/reference_text), optional ``target`` (demo row: target_audio; default: no ground truth),
    ``target_text`` (default: the generated row's text), optional ``id``; ``seconds`` = duration x
    ``seconds_per_audio_second`` unless the sample gives ``seconds``.
    """
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, sample in enumerate(samples):
        audio = load_audio(sample["generated"]["audio"], GENERATED_RATE)
        wav = f"{index:03d}.wav"
        write_wav(out / wav, audio)
        duration = len(audio) / GENERATED_RATE
        seconds = sample.get("seconds", duration * seconds_per_audio_second)
        target = sample.get("target")
        lines.append(
            {
                "index": index,
                "id": sample.get("id", f"s{index:03d}"),
                "wav": wav,
                "reference_audio": sample["reference"]["audio"],
                "reference_text": sample["reference"]["text"],
                "target_text": sample.get("target_text", sample["generated"]["text"]),
                "target_audio": target["audio"] if target else None,
                "speaker": sample["generated"]["speaker"],
                "duration_s": duration,
                "seconds": seconds,
                "rtf": seconds / duration,
                "first_audio_s": sample.get("first_audio_s"),
                "frames": int(duration * 25),
                "stop": "eos",
                "batch_size": 1,
                "adapter": None,
            }
        )
    (out / "manifest.jsonl").write_text(
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8"
    )
    run = run or {
        "model": "tiny",
        "adapter": None,
        "device": "cpu",
        "dtype": "float32",
        "params": {},
        "samples": len(lines),
        "failed": len(errors or []),
        "seconds": sum(line["seconds"] for line in lines),
    }
    (out / "run.json").write_text(json.dumps(run), encoding="utf-8")
    if errors:
        (out / "errors.jsonl").write_text("".join(json.dumps(e) + "\n" for e in errors), encoding="utf-8")
    return out


def by_speaker(demo_rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in demo_rows:
        groups.setdefault(row["speaker"], []).append(row)
    return groups


def same_speaker_samples(demo_rows: list[dict], per_speaker: int = 2) -> list[dict]:
    """Per speaker: generated = utterance k+1, reference = utterance 0, ground-truth target = the generated one."""
    samples = []
    for speaker, rows in sorted(by_speaker(demo_rows).items()):
        for k in range(per_speaker):
            samples.append(
                {"id": f"{speaker}-{k}", "generated": rows[k + 1], "reference": rows[0], "target": rows[k + 1]}
            )
    return samples
