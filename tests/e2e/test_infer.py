"""`python -m higgs_lora.infer` on a seed-format ChatML file: wavs, manifest, errors, run record."""

import json
import subprocess
import sys

import pytest
import soundfile as sf

from higgs_lora.errors import PARTLY_FAILED
from higgs_lora.tiny import REPO_ROOT

pytestmark = pytest.mark.slow
CORPUS = REPO_ROOT / "examples" / "demo_corpus"


def test_cli_writes_wavs_and_manifest_and_reports_bad_samples(tiny_checkpoint, tmp_path):
    def sample(reference, target_text, target=None):
        user = [
            {"type": "text", "text": "نص التسجيل المرجعي"},
            {"type": "audio", "audio_url": reference},
            {"type": "text", "text": target_text},
        ]
        messages = [
            {"role": "system", "content": "Generate audio following instruction."},
            {"role": "user", "content": user},
        ]
        if target:
            messages.append({"role": "assistant", "content": [{"type": "audio", "audio_url": target}]})
        return {"messages": messages, "speaker": reference.split("/")[-2]}

    samples = [
        sample(
            str(CORPUS / "spk_f1" / "spk_f1_01.flac"), "الطقس اليوم معتدل", str(CORPUS / "spk_f1" / "spk_f1_02.flac")
        ),
        sample("missing/ref.wav", "نص"),  # a reference that does not exist: reported, skipped
        {"messages": "not a list"},  # malformed: reported, skipped
        sample(str(CORPUS / "spk_m1" / "spk_m1_01.flac"), "مرحبا بكم، كيف حالكم؟ " * 10),  # two pieces
    ]
    source = tmp_path / "samples.json"
    source.write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "higgs_lora.infer.batch",
            "--chatml",
            str(source),
            "--out",
            str(out),
            "--model",
            str(tiny_checkpoint.model_dir),
            "--max-seconds",
            "1.5",
            "--seed",
            "5",
            "--context-pieces",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == PARTLY_FAILED, result.stderr  # 2 of 4 samples failed: said in the exit code
    assert "2 samples" in result.stdout and "2 failed" in result.stdout
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["index"] for line in lines] == [0, 3]
    assert [line["wav"] for line in lines] == ["000.wav", "003.wav"]
    for line in lines:
        samples_, rate = sf.read(out / line["wav"])
        assert rate == 24000 and abs(len(samples_) / rate - line["duration_s"]) < 1e-3
        assert line["rtf"] == pytest.approx(line["seconds"] / line["duration_s"], rel=1e-2)
        assert line["reference_text"] == "نص التسجيل المرجعي"
    assert lines[0]["target_audio"] == str(CORPUS / "spk_f1" / "spk_f1_02.flac") and lines[0]["speaker"] == "spk_f1"
    assert lines[0]["seed"] == 5 and lines[1]["seed"] == 8  # sample i uses seed + i
    assert lines[0]["context_pieces"] == [0] and lines[1]["context_pieces"] == [0, 1]  # piece 2 saw piece 1
    assert lines[1]["prompt_positions"][1] > lines[1]["prompt_positions"][0]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["index"] for e in errors] == [1, 2]
    assert "file not found" in errors[0]["error"] and "messages" in errors[1]["error"]
    record = json.loads((out / "run.json").read_text())
    assert record["samples"] == 2 and record["failed"] == 2 and record["params"]["temperature"] == 0.3
    assert record["params"]["context_pieces"] == 1 and record["params"]["context_positions"] == 4096
