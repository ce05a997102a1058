"""The offline ASR route: tiny random Whisper and wav2vec2-CTC checkpoints built here, saved to disk, loaded back
through higgs_lora.eval.asr (local_files_only), and run through `python -m higgs_lora.evaluate --asr`.

A random model transcribes garbage; what is checked is the plumbing and the arithmetic: the CER/WER in the outputs
are exactly what jiwer gives for the transcript the model produced, against the normalised target text.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jiwer
import numpy as np
import pytest

from higgs_lora.eval.asr import AsrError, asr_kind, load_asr
from higgs_lora.eval.cli import main
from higgs_lora.eval.text import scoring_text
from higgs_lora.tiny import write_tiny_whisper
from tests.eval_folders import make_prediction_folder, same_speaker_samples


def write_tiny_ctc(out: Path) -> Path:
    """A 1-layer wav2vec2 CTC model whose vocabulary is the Arabic letters (so its garbage is Arabic garbage)."""
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    letters = [chr(c) for c in range(0x0621, 0x064B)]
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{ch: i + 3 for i, ch in enumerate(letters)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(
        str(out / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
    )
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        pad_token_id=0,
        do_stable_layer_norm=False,
    )
    torch.manual_seed(0)
    model_dir = out / "ctc"
    Wav2Vec2ForCTC(config).save_pretrained(model_dir)
    Wav2Vec2Processor(
        feature_extractor=Wav2Vec2FeatureExtractor(sampling_rate=16000), tokenizer=tokenizer
    ).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def asr_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr")
    return {"whisper": write_tiny_whisper(root / "w"), "ctc": write_tiny_ctc(root / "c")}


@pytest.mark.parametrize("kind", ["whisper", "ctc"])
def test_asr_loads_offline_and_transcribes(asr_dirs, kind, demo_rows):
    from higgs_lora.data.audio import load_audio

    transcriber = load_asr(asr_dirs[kind])
    assert transcriber.kind == kind == asr_kind(asr_dirs[kind])
    if kind == "whisper":
        assert transcriber._language_options == {"language": "ar", "task": "transcribe"}
    audio = load_audio(demo_rows[0]["audio"], 24000)
    text = transcriber.transcribe(audio, 24000)
    assert isinstance(text, str)
    assert transcriber.transcribe(audio, 24000) == text  # greedy: deterministic
    if kind == "ctc":
        assert set(text) <= {chr(c) for c in range(0x0621, 0x064B)} | {" "}


@pytest.mark.parametrize("kind", [pytest.param("whisper", marks=pytest.mark.slow), "ctc"])
def test_evaluate_with_asr_scores_cer_consistently_with_jiwer(asr_dirs, kind, demo_rows, tmp_path):
    pred = make_prediction_folder(tmp_path / "pred", same_speaker_samples(demo_rows, 1)[:2])
    assert main(["--pred", str(pred), "--asr", str(asr_dirs[kind]), "--no-dnsmos", "--quiet"]) == 0
    metrics = json.loads((pred / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["asr"] == {"model": str(asr_dirs[kind]), "kind": kind}
    with open(pred / "samples.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    edits = chars = word_edits = words = 0
    for row in rows:
        reference, hypothesis = scoring_text(row["target_text"]), scoring_text(row["asr_text"])
        if hypothesis:
            assert float(row["cer"]) == pytest.approx(jiwer.cer(reference, hypothesis), rel=1e-5)
            assert float(row["wer"]) == pytest.approx(jiwer.wer(reference, hypothesis), rel=1e-5)
        else:  # nothing recognised: all deletions
            assert float(row["cer"]) == 1.0 and float(row["wer"]) == 1.0
        assert int(row["num_ref_chars"]) == len(reference)
        edits += int(row["char_edits"])
        chars += int(row["num_ref_chars"])
        word_edits += int(row["word_edits"])
        words += int(row["num_ref_words"])
    assert metrics["summary"]["cer"]["value"] == pytest.approx(edits / chars)
    assert metrics["summary"]["wer"]["value"] == pytest.approx(word_edits / words)
    assert metrics["summary"]["cer"]["n"] == 2


def test_asr_directory_errors_say_what_to_do(tmp_path, capsys, demo_rows):
    with pytest.raises(AsrError, match="no config.json"):
        asr_kind(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(AsrError, match="supported are Whisper"):
        asr_kind(tmp_path)
    pred = make_prediction_folder(tmp_path / "pred", same_speaker_samples(demo_rows, 1)[:1])
    assert main(["--pred", str(pred), "--asr", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (pred / "metrics.json").exists()


def test_without_asr_cer_is_skipped_with_a_message(tmp_path, capsys, demo_rows):
    pred = make_prediction_folder(tmp_path / "pred", same_speaker_samples(demo_rows, 1)[:1])
    assert main(["--pred", str(pred), "--no-dnsmos"]) == 0
    out = capsys.readouterr().out
    assert "CER/WER skipped: no --asr given" in out
    metrics = json.loads((pred / "metrics.json").read_text(encoding="utf-8"))
    assert "no --asr given" in metrics["asr"]["skipped"]
    assert "cer" not in metrics["summary"] and "wer" not in metrics["summary"]
    assert (pred / "report.html").is_file()
    assert "CER/WER skipped" in (pred / "report.html").read_text(encoding="utf-8")
    assert np.isfinite(metrics["summary"]["similarity_reference"]["value"])
