"""prepare under abuse: each class of bad corpus line from issue 17 is one rejected item with its line and reason,
the good files around it are cached, and the exit codes are the documented ones (0 ran, 2 nothing usable).

Every input is generated here: bytes that are not UTF-8, JSON lone surrogates, symlink loops, empty manifests,
in the manifest, LJSpeech and Common Voice layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from higgs_lora.data.cache import load_cache
from higgs_lora.data.prepare import Item, Outcome, join, main, run_prepare, write_shard
from higgs_lora.data.sources import CorpusFormatError, Utterance, read_corpus
from tests.unit.data.test_prepare import TEXTS, make_cfg, write_audio


def manifest_line(audio: str, text: str, speaker: str = "s") -> bytes:
    return (json.dumps({"audio": audio, "text": text, "speaker": speaker}, ensure_ascii=False) + "\n").encode()


def reasons_by_id(report: dict) -> dict[str, str]:
    return {
        example["source_id"]: reason for reason, entry in report["rejected"].items() for example in entry["examples"]
    }


def abusive_manifest(root: Path) -> tuple[Path, list[str], dict[str, str]]:
    """A manifest mixing good lines with each bad class; (path, good audio names, expected reason by source id)."""
    good = []
    for i in range(3):
        write_audio(root / f"good{i}.wav", seed=20 + i)
        good.append(f"good{i}.wav")
    write_audio(root / "surrogate.wav", seed=30)
    write_audio(root / "surrogate_speaker.wav", seed=31)
    (root / "loop_a.wav").symlink_to("loop_b.wav")
    (root / "loop_b.wav").symlink_to("loop_a.wav")
    lines = [
        manifest_line("good0.wav", TEXTS[0]),  # 1
        b'{"audio": "x.wav", "text": "\xff\xfe bad bytes"}\n',  # 2: not UTF-8
        manifest_line("good1.wav", TEXTS[1]),  # 3
        b'{"audio": "surrogate.wav", "text": "\\ud800 ' + TEXTS[2].encode() + b'"}\n',  # 4: a lone surrogate
        manifest_line("loop_a.wav", TEXTS[0]),  # 5: a symlink loop
        b'{"audio": "surrogate_speaker.wav", "text": "' + TEXTS[0].encode() + b'", "speaker": "\\udfff"}\n',  # 6
        b"\n",  # 7: blank lines are skipped, not problems
        manifest_line("good2.wav", TEXTS[2]),  # 8
        b'{"audio": "trunc',  # 9: truncated last line, no newline
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_bytes(b"".join(lines))
    expected = {
        "manifest.jsonl:2": "bad_encoding",
        "manifest.jsonl:4": "bad_text",
        "manifest.jsonl:5": "symlink_loop",
        "manifest.jsonl:6": "bad_text",
        "manifest.jsonl:9": "malformed_record",
    }
    return manifest, good, expected


def test_abusive_manifest_rejects_each_bad_line_with_its_reason(tiny_checkpoint, tmp_path, capsys):
    manifest, good, expected = abusive_manifest(tmp_path / "corpus")
    cache = tmp_path / "cache"
    rc = main(["--quiet", *make_cfg_overrides(tiny_checkpoint, manifest, cache)])
    assert rc == 0, capsys.readouterr()
    report = json.loads((cache / "report.json").read_text("utf-8"))
    assert reasons_by_id(report) == expected
    assert report["kept"] == len(good) and report["items_in"] == len(good) + len(expected)
    assert sorted(Path(a).name for a in load_cache(cache)["audio"]) == good
    details = {e["source_id"]: e["detail"] for entry in report["rejected"].values() for e in entry["examples"]}
    assert "0xff at column" in details["manifest.jsonl:2"]
    assert "'\\ud800'" in details["manifest.jsonl:4"] and details["manifest.jsonl:4"].startswith("text:")
    assert details["manifest.jsonl:6"].startswith("speaker:")
    # A rerun with the same inputs finds every shard done and gives the same report.
    assert main(["--quiet", *make_cfg_overrides(tiny_checkpoint, manifest, cache)]) == 0
    assert json.loads((cache / "report.json").read_text("utf-8")) == report


def make_cfg_overrides(tiny, corpus, cache) -> list[str]:
    return [
        f"model.path={tiny.model_dir}",
        f"model.codec_path={tiny.codec_dir}",
        f"data.corpus={corpus}",
        f"data.cache_dir={cache}",
        "data.min_seconds=0.5",
        "data.max_seconds=6",
        "prepare.shard_size=2",
        "prepare.num_workers=2",
        "prepare.device=cpu",
    ]


def test_ljspeech_and_commonvoice_lines_that_are_not_utf8_are_single_problems(tmp_path):
    lj = tmp_path / "lj"
    (lj / "wavs").mkdir(parents=True)
    (lj / "metadata.csv").write_bytes(
        b"a|" + TEXTS[0].encode() + b"|\n" + b"b|caf\xe9 latin-1|\n" + b"c|" + TEXTS[1].encode() + b"|\n"
    )
    corpus = read_corpus(lj, "ljspeech")
    assert [u.source_id for u in corpus.utterances] == ["a", "c"]
    assert [(p.source_id, p.reason) for p in corpus.problems] == [("metadata.csv:2", "bad_encoding")]

    cv = tmp_path / "cv"
    (cv / "clips").mkdir(parents=True)
    (cv / "validated.tsv").write_bytes(
        b"client_id\tpath\tsentence\n"
        + b"spk1\t1.mp3\t"
        + TEXTS[0].encode()
        + b"\n"
        + b"spk1\t2.mp3\t\x80\x81\n"
        + b"spk2\t3.mp3\t"
        + TEXTS[1].encode()
        + b"\n"
    )
    corpus = read_corpus(cv, "commonvoice")
    assert [(u.source_id, u.speaker) for u in corpus.utterances] == [("1.mp3", "spk1"), ("3.mp3", "spk2")]
    assert [(p.source_id, p.reason) for p in corpus.problems] == [("validated.tsv:3", "bad_encoding")]


def test_symlink_loop_as_the_corpus_path_is_a_user_error(tmp_path):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    with pytest.raises(CorpusFormatError):
        read_corpus(tmp_path / "a", "manifest")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_manifest_exits_2_before_the_codec_loads(tiny_checkpoint, tmp_path, capsys, content):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(content)
    rc = main(["--quiet", *make_cfg_overrides(tiny_checkpoint, manifest, tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "holds no records" in err and str(manifest) in err
    assert not (tmp_path / "cache" / "shards").exists()


def test_corpus_where_everything_is_rejected_exits_2_after_the_report(tiny_checkpoint, tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(b'{"audio": "gone.wav", "text": "\xff"}\n' + manifest_line("missing.wav", TEXTS[0]))
    cache = tmp_path / "cache"
    rc = main(["--quiet", *make_cfg_overrides(tiny_checkpoint, manifest, cache)])
    captured = capsys.readouterr()
    assert rc == 2
    assert "was kept: all 2 items were rejected" in captured.err
    report = json.loads((cache / "report.json").read_text("utf-8"))
    assert reasons_by_id(report) == {"manifest.jsonl:1": "bad_encoding", "manifest.jsonl:2": "missing"}


def good_outcome(index: int, **row_changes) -> Outcome:
    utterance = Utterance(f"/x/{index}.wav", TEXTS[0], "s", "ar", f"m:{index}")
    row = {
        "source_id": utterance.source_id,
        "audio": utterance.audio,
        "speaker": "s",
        "language": "ar",
        "text": TEXTS[0],
        "text_normalized": TEXTS[0],
        "duration": 1.0,
        "num_frames": 2,
        "source_sample_rate": 24000,
        "loudness_lufs": -20.0,
        "codes": np.arange(16, dtype=np.int16).reshape(8, 2),
    }
    row.update(row_changes)
    return Outcome(Item(index, utterance), row=row)


def test_write_shard_rejects_one_unwritable_row_and_writes_the_rest(tmp_path):
    outcomes = [
        good_outcome(0),
        good_outcome(1, text="\udcff"),  # would fail Arrow's UTF-8 encoding
        good_outcome(2, codes="not a code matrix"),  # fails the table's types
        good_outcome(3),
    ]
    missing_codes = good_outcome(4)
    del missing_codes.row["codes"]
    outcomes.append(missing_codes)
    shard = write_shard(tmp_path, "shard-00000-of-00001", outcomes)
    from datasets import load_from_disk

    table = load_from_disk(str(shard))
    assert table["source_id"] == ["m:0", "m:3"]
    assert np.array_equal(np.array(table[0]["codes"]), np.arange(16).reshape(8, 2))
    rejected = [json.loads(line) for line in (shard / "rejected.jsonl").read_text("utf-8").splitlines()]
    assert [(r["source_id"], r["reason"]) for r in rejected] == [
        ("m:1", "unserialisable"),
        ("m:2", "unserialisable"),
        ("m:4", "unserialisable"),
    ]
    assert "text:" in rejected[0]["detail"] and rejected[2]["detail"] == "no codes"
    assert json.loads((shard / "summary.json").read_text("utf-8"))["kept"] == 2


def test_an_unexpected_error_for_one_item_is_its_rejection(tiny_checkpoint, tmp_path, monkeypatch):
    from higgs_lora.data import prepare

    root = tmp_path / "corpus"
    for i in range(3):
        write_audio(root / f"u{i}.wav", seed=40 + i)
    manifest = root / "manifest.jsonl"
    manifest.write_bytes(b"".join(manifest_line(f"u{i}.wav", TEXTS[i]) for i in range(3)))
    real = prepare.prepare_item

    def flaky(item, cfg):
        if item.utterance.source_id == "manifest.jsonl:2":
            raise TypeError("simulated bug for one record")
        return real(item, cfg)

    monkeypatch.setattr(prepare, "prepare_item", flaky)
    cfg = make_cfg(tiny_checkpoint, manifest, tmp_path / "cache")
    run_prepare(cfg, quiet=True)
    report = join(cfg)
    assert report["kept"] == 2
    assert reasons_by_id(report) == {"manifest.jsonl:2": "internal_error"}
    assert report["rejected"]["internal_error"]["examples"][0]["detail"] == "TypeError: simulated bug for one record"
