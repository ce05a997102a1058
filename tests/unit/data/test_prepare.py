"""prepare: five input formats into one cache, bad files reported (never fatal), resumable and shardable."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from higgs_lora.config import build_config
from higgs_lora.data.audio import read_audio
from higgs_lora.data.cache import CacheError, load_cache, read_pairs
from higgs_lora.data.prepare import condition_for_codec, join, run_prepare
from tests.conftest import DEMO_CORPUS, REPO_ROOT

TEXTS = ["ذهب الولد إلى المدرسة", "الجو جميل اليوم", "قرأت كتابا مفيدا"]


def speech_like(seconds: float, rate: int, seed: int, pitch: float = 140.0) -> np.ndarray:
    """A voiced, amplitude-modulated harmonic signal with 0.2 s of silence on both sides."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    voice = sum(np.sin(2 * np.pi * pitch * h * t + rng.uniform(0, 6)) / h for h in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    signal = 0.2 * voice * envelope + 0.005 * rng.standard_normal(len(t))
    silence = np.zeros(int(0.2 * rate))
    return np.concatenate([silence, signal, silence]).astype(np.float32)


def write_audio(path: Path, seconds=1.2, rate=22050, seed=0, fmt=None, channels=1, subtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = speech_like(seconds, rate, seed)
    if channels == 2:
        samples = np.stack([samples, 0.5 * samples], axis=1)
    sf.write(path, samples, rate, format=fmt, subtype=subtype)
    return path


def make_cfg(tiny, corpus, cache, *overrides):
    return build_config(
        {},
        [
            f"model.path={tiny.model_dir}",
            f"model.codec_path={tiny.codec_dir}",
            f"data.corpus={corpus}",
            f"data.cache_dir={cache}",
            "data.min_seconds=0.5",
            "data.max_seconds=6",
            "prepare.shard_size=2",
            "prepare.num_workers=2",
            "prepare.device=cpu",
            *overrides,
        ],
    )


def encode_single(tiny, audio_path: str, cfg) -> torch.Tensor:
    """What the codec gives for this file after the same conditioning, encoded alone."""
    from transformers import HiggsAudioV2TokenizerModel

    codec = HiggsAudioV2TokenizerModel.from_pretrained(str(tiny.codec_dir)).eval()
    conditioned = condition_for_codec(*read_audio(audio_path), cfg)
    with torch.no_grad():
        return codec.encode(torch.from_numpy(conditioned.samples)[None, None]).audio_codes[0]


# --------------------------------------------------------------------------------------------- fixtures


def corpus_manifest(root: Path) -> Path:
    lines = []
    for i, text in enumerate(TEXTS):
        write_audio(root / "audio" / f"u{i}.wav", seed=i)
        lines.append({"audio": f"audio/u{i}.wav", "text": text, "speaker": "a" if i < 2 else "b"})
    (root / "manifest.jsonl").write_text(
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), "utf-8"
    )
    return root / "manifest.jsonl"


def corpus_chatml(root: Path) -> Path:
    for i in range(3):
        write_audio(root / f"{i}.wav", seed=i)
    samples = [
        {
            "messages": [
                {"role": "system", "content": "Generate audio following instruction."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": TEXTS[0]},
                        {"type": "audio", "audio_url": "0.wav"},
                        {"type": "text", "text": TEXTS[1]},
                    ],
                },
                {"role": "assistant", "content": [{"type": "audio", "audio_url": "1.wav"}]},
            ],
            "speaker": "a",
        },
        {
            "messages": [  # inference-style sample: no target recording; its reference is still an utterance
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": TEXTS[2]},
                        {"type": "audio", "audio_url": "2.wav"},
                        {"type": "text", "text": "نص جديد"},
                    ],
                },
            ],
            "speaker": "b",
        },
    ]
    (root / "samples.json").write_text(json.dumps(samples, ensure_ascii=False), "utf-8")
    return root / "samples.json"


def corpus_boson_jsonl(root: Path) -> Path:
    for i in range(3):
        write_audio(root / f"{i}.wav", seed=i)
    conversations = [
        {
            "messages": [
                {"role": "system", "content": "Generate audio following instruction."},
                {"role": "user", "content": TEXTS[0]},
                {"role": "assistant", "content": {"type": "audio", "audio_url": "0.wav"}},
                {"role": "user", "content": TEXTS[1]},
                {"role": "assistant", "content": {"type": "audio", "audio_url": "1.wav"}},
            ],
            "speaker": "a",
        },
        {
            "messages": [
                {"role": "user", "content": TEXTS[2]},
                {"role": "assistant", "content": [{"type": "audio", "audio_url": "2.wav"}]},
            ],
            "speaker": "b",
        },
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations), "utf-8")
    return root / "train.jsonl"


def corpus_ljspeech(root: Path) -> Path:
    rows = []
    for i, text in enumerate(TEXTS):
        write_audio(root / "wavs" / f"LJ{i:03d}.wav", seed=i)
        rows.append(f"LJ{i:03d}|{text}|{text}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n", "utf-8")
    return root


def corpus_commonvoice(root: Path) -> Path:
    root.mkdir(parents=True)
    with (root / "validated.tsv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["client_id", "path", "sentence", "up_votes", "locale"])
        for i, text in enumerate(TEXTS):
            write_audio(root / "clips" / f"cv_{i}.mp3", rate=24000, seed=i, fmt="MP3")
            writer.writerow(["speakerA" if i < 2 else "speakerB", f"cv_{i}.mp3", text, 2, "ar"])
    return root


def corpus_hf(root: Path) -> Path:
    from datasets import Audio, Dataset

    paths = [str(write_audio(root / "src" / f"{i}.flac", seed=i)) for i in range(3)]
    dataset = Dataset.from_dict(
        {
            "audio": [{"path": p, "bytes": Path(p).read_bytes()} for p in paths],
            "sentence": TEXTS,
            "speaker_id": ["a", "a", "b"],
        }
    )
    dataset = dataset.cast_column("audio", Audio(decode=False))
    dataset.save_to_disk(str(root / "hf"))
    return root / "hf"


def corpus_audiofolder(root: Path) -> Path:
    rows = []
    for i, text in enumerate(TEXTS):
        write_audio(root / f"{i}.ogg", seed=i, fmt="OGG", subtype="VORBIS")
        rows.append({"file_name": f"{i}.ogg", "transcription": text, "speaker_id": "a" if i < 2 else "b"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return root


FORMATS = {  # builder, rows, fixed pairs, speakers
    "manifest": (corpus_manifest, 3, 0, 2),
    "chatml": (corpus_chatml, 3, 1, 2),
    "boson_jsonl": (corpus_boson_jsonl, 3, 1, 2),
    "ljspeech": (corpus_ljspeech, 3, 0, 1),
    "commonvoice": (corpus_commonvoice, 3, 0, 2),
    "hf_save_to_disk": (corpus_hf, 3, 0, 2),
    "hf_audiofolder": (corpus_audiofolder, 3, 0, 2),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_goes_into_the_cache(name, tiny_checkpoint, tmp_path):
    build, expected_rows, expected_pairs, expected_speakers = FORMATS[name]
    corpus = build(tmp_path / "corpus")
    cfg = make_cfg(tiny_checkpoint, corpus, tmp_path / "cache")
    run_prepare(cfg, quiet=True)
    report = join(cfg)
    assert report["kept"] == expected_rows, report["rejected"]
    cache = load_cache(tmp_path / "cache")
    assert len(cache) == expected_rows
    assert sorted(cache["text_normalized"]) == sorted(TEXTS)
    assert len(set(cache["speaker"])) == expected_speakers
    assert len(read_pairs(tmp_path / "cache")) == expected_pairs
    row = cache[0]
    codes = torch.tensor(row["codes"])
    assert codes.shape == (8, row["num_frames"])
    assert cache.features["codes"].feature.feature.dtype == "int16"  # stored as int16: codes are < 1024
    assert 1.0 < row["duration"] < 1.6  # 1.2 s of signal, the 0.2 s silences trimmed (50 ms kept each side)
    if not row["audio"].startswith("hf-dataset://"):
        assert torch.equal(codes.long(), encode_single(tiny_checkpoint, row["audio"], cfg))


def test_cached_codes_equal_single_codec_calls_with_batching(tiny_checkpoint, tmp_path):
    # Four clips of identical length are encoded in one batch; each must equal its own single call.
    lines = []
    for i in range(4):
        write_audio(tmp_path / f"{i}.wav", seconds=1.0, seed=10 + i)
        lines.append(json.dumps({"audio": f"{i}.wav", "text": TEXTS[i % 3], "speaker": "s"}, ensure_ascii=False))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    cfg = make_cfg(
        tiny_checkpoint,
        tmp_path / "m.jsonl",
        tmp_path / "cache",
        "prepare.shard_size=8",
        "prepare.codec_batch_size=4",
        "audio.trim_silence=false",
    )
    run_prepare(cfg, quiet=True)
    cache = load_cache(tmp_path / "cache")
    assert len(set(cache["num_frames"])) == 1
    for row in cache:
        assert torch.equal(torch.tensor(row["codes"]).long(), encode_single(tiny_checkpoint, row["audio"], cfg))


# -------------------------------------------------------------------------------------------- bad input


def test_bad_files_are_reported_with_reasons_and_good_files_cached(tiny_checkpoint, tmp_path):
    root = tmp_path / "corpus"
    good = {
        "good.wav": write_audio(root / "good.wav", seed=1),
        "good.flac": write_audio(root / "good.flac", seed=2),
        "good.ogg": write_audio(root / "good.ogg", seed=3, fmt="OGG", subtype="VORBIS"),
        "good.mp3": write_audio(root / "good.mp3", seed=4, rate=24000, fmt="MP3"),
        "stereo_8k.wav": write_audio(root / "stereo_8k.wav", rate=8000, channels=2, seed=5),
    }
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage that is not a header")
    (root / "empty.wav").write_bytes(b"")
    write_audio(root / "short.wav", seconds=0.1, seed=6)
    sf.write(root / "long.wav", speech_like(180, 8000, 7), 8000)
    nan = speech_like(1.2, 16000, 8)
    nan[100:200] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(root / "silent.wav", np.zeros(24000, dtype=np.float32), 24000)
    sf.write(root / "clipped.wav", np.clip(speech_like(1.2, 24000, 9) * 20, -1, 1), 24000)
    write_audio(root / "empty_text.wav", seed=10)
    write_audio(root / "latin.wav", seed=11)
    write_audio(root / "wordy.wav", seed=12)
    entries = [(name, TEXTS[i % 3]) for i, name in enumerate(good)] + [
        ("corrupt.wav", TEXTS[0]),
        ("empty.wav", TEXTS[0]),
        ("short.wav", TEXTS[0]),
        ("long.wav", TEXTS[0]),
        ("nan.wav", TEXTS[0]),
        ("missing.wav", TEXTS[0]),
        ("silent.wav", TEXTS[0]),
        ("clipped.wav", TEXTS[0]),
        ("empty_text.wav", "   "),
        ("latin.wav", "only latin letters here"),
        ("wordy.wav", "كلمة " * 40),
        ("good.wav", TEXTS[1]),  # listed twice
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"audio": a, "text": t, "speaker": "s" + str(i % 2)}, ensure_ascii=False) + "\n"
            for i, (a, t) in enumerate(entries)
        )
        + "this line is not json\n",
        "utf-8",
    )
    cfg = make_cfg(tiny_checkpoint, manifest, tmp_path / "cache", "prepare.shard_size=4")
    run_prepare(cfg, quiet=True)
    report = join(cfg)

    reasons = {}
    for reason, entry in report["rejected"].items():
        for example in entry["examples"]:
            reasons[Path(example.get("audio", example["source_id"])).name] = reason
    assert reasons == {
        "corrupt.wav": "unreadable",
        "empty.wav": "unreadable",
        "short.wav": "too_short",
        "long.wav": "too_long",
        "nan.wav": "non_finite",
        "missing.wav": "missing",
        "silent.wav": "silent",
        "clipped.wav": "clipped",
        "empty_text.wav": "empty_text",
        "latin.wav": "no_arabic_letters",
        "wordy.wav": "text_too_long_for_audio",
        "good.wav": "duplicate",
        f"manifest.jsonl:{len(entries) + 1}": "malformed_record",
    }
    assert report["kept"] == len(good)
    assert report["items_in"] == len(entries) + 1
    cache = load_cache(tmp_path / "cache")
    assert sorted(Path(a).name for a in cache["audio"]) == sorted(good)
    stereo = next(r for r in cache if r["audio"].endswith("stereo_8k.wav"))
    assert stereo["source_sample_rate"] == 8000


# ---------------------------------------------------------------------------------- resume and sharding


def demo_cfg_overrides(tiny, cache):
    return [
        f"model.path={tiny.model_dir}",
        f"model.codec_path={tiny.codec_dir}",
        f"data.corpus={DEMO_CORPUS / 'manifest.jsonl'}",
        f"data.cache_dir={cache}",
        "prepare.device=cpu",
    ]


def cache_rows(cache_dir):
    return [{k: v for k, v in row.items()} for row in load_cache(cache_dir)]


def test_settings_change_refuses_the_cache(tiny_checkpoint, tmp_path):
    corpus = corpus_manifest(tmp_path / "corpus")
    run_prepare(make_cfg(tiny_checkpoint, corpus, tmp_path / "cache"), quiet=True)
    with pytest.raises(CacheError, match="settings.max_seconds"):
        run_prepare(make_cfg(tiny_checkpoint, corpus, tmp_path / "cache", "data.max_seconds=5"), quiet=True)


def test_array_tasks_then_join_equal_a_single_run(tiny_checkpoint, tmp_path):
    corpus = corpus_manifest(tmp_path / "corpus")
    whole = make_cfg(tiny_checkpoint, corpus, tmp_path / "whole", "prepare.shard_size=1")
    run_prepare(whole, quiet=True)
    split = make_cfg(tiny_checkpoint, corpus, tmp_path / "split", "prepare.shard_size=1")
    run_prepare(split, array_size=2, array_index=1, quiet=True)
    with pytest.raises(CacheError, match="incomplete: 2 of 3 shards missing"):
        join(split)
    run_prepare(split, array_size=2, array_index=0, quiet=True)
    assert join(split)["kept"] == 3
    assert cache_rows(tmp_path / "split") == cache_rows(tmp_path / "whole")
    assert run_prepare(split, quiet=True) == {"done": 0, "skipped": 3}


# `python -m higgs_lora.prepare` that SIGKILLs itself at a set point, so no timing is involved: after it published
# three shards, when the fourth is written in full to its staging directory and about to be renamed into place.
KILLED_AFTER_THREE_SHARDS = """
import os, signal, sys

from higgs_lora.data.prepare import main

publish, published = os.replace, []


def replace(src, dst):  # prepare publishes a finished shard by renaming its staging directory into place
    if os.path.basename(dst).startswith("shard-"):
        if len(published) == 3:  # the 4th shard is complete in staging: die before it is published
            os.kill(os.getpid(), signal.SIGKILL)
        published.append(dst)
    publish(src, dst)


os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(tiny_checkpoint, tmp_path):
    overrides = demo_cfg_overrides(tiny_checkpoint, tmp_path / "killed") + ["prepare.shard_size=1"]
    command = [sys.executable, "-m", "higgs_lora.prepare", "--quiet", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_THREE_SHARDS, "--quiet", *overrides],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, (
        f"prepare was not killed at the fourth shard (exit {killed.returncode}; does it still publish shards with "
        f"os.replace?):\n{killed.stderr[-2000:]}"
    )
    shards = tmp_path / "killed" / "shards"
    written = sorted(p.name for p in shards.iterdir() if p.name.startswith("shard-"))
    assert written == [f"shard-{k:05d}-of-00040" for k in range(3)]
    staging = [p.name for p in shards.iterdir() if p.name.startswith(".")]
    assert len(staging) == 1 and staging[0].startswith(".shard-00003-of-00040.staging-")
    with pytest.raises(CacheError, match="incomplete: 37 of 40 shards missing"):
        join(build_config({}, overrides))

    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already done: 3" in rerun.stdout
    assert not [p for p in shards.iterdir() if p.name.startswith(".")]  # no staging leftovers

    clean = build_config({}, demo_cfg_overrides(tiny_checkpoint, tmp_path / "clean") + ["prepare.shard_size=1"])
    run_prepare(clean, quiet=True)
    killed_rows, clean_rows = cache_rows(tmp_path / "killed"), cache_rows(tmp_path / "clean")
    assert len(killed_rows) == 40 and len({r["source_id"] for r in killed_rows}) == 40
    assert killed_rows == clean_rows


def test_a_corpus_with_nothing_kept_exits_2_after_its_report(tiny_checkpoint, tmp_path, capsys):
    from higgs_lora.data.prepare import main

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"audio": "missing.flac", "text": "مرحبا", "speaker": "a"}\n{broken\n', encoding="utf-8")
    overrides = demo_cfg_overrides(tiny_checkpoint, tmp_path / "cache")[:2] + [
        f"data.corpus={manifest}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "prepare.device=cpu",
    ]
    assert main(["--quiet", *overrides]) == 2
    captured = capsys.readouterr()
    assert "2 in, 0 kept" in captured.out  # the report is printed first: it says why
    assert captured.err.startswith("error: no utterance of data.corpus=") and "Traceback" not in captured.err
    assert json.loads((tmp_path / "cache" / "report.json").read_text())["kept"] == 0
