"""`infer --shard I/N` and `infer --join` (the array job of slurm/infer.sbatch) with a stand-in cloner: which
samples a shard takes, the joined folder equals one unsharded run, resume skips finished shards and redoes
unfinished ones, and a folder of another run is refused."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from higgs_lora.errors import PARTLY_FAILED
from higgs_lora.eval.predictions import read_predictions
from higgs_lora.infer import batch
from higgs_lora.infer.requests import CloneResult, InferenceError
from higgs_lora.infer.shards import ShardError, parse_shard

RATE = 24000


@dataclass
class _Request:
    target_text: str
    seed: int
    adapter: str | None


class FakeCloner:
    """Speech whose length is set by the text and whose value by the seed: equal inputs, equal wavs."""

    adapters: list[str] = []

    def __init__(self, crash_on: str | None = None):
        self.crash_on = crash_on
        self.generated: list[str] = []

    def request(self, reference_audio, reference_text, target_text, params, adapter):
        return _Request(target_text, params.seed, adapter)

    def prepare(self, request):
        if request.target_text == "FAIL":
            raise InferenceError("target text is empty")

    def batches(self, indices, adapters):
        indices = list(indices)
        return [indices[s : s + 2] for s in range(0, len(indices), 2)]

    def clone_batch(self, requests):
        results = []
        for request in requests:
            if request.target_text == self.crash_on:
                raise RuntimeError("CUDA out of memory (as if)")
            self.generated.append(request.target_text)
            wave = np.full(RATE // 10 * len(request.target_text), (request.seed % 7) / 10, dtype=np.float32)
            results.append(CloneResult(wave, RATE, 0.05, None, 10, ["eos"], [request.target_text], request.seed))
        return results

    def describe(self):
        return {"model": "fake", "device": "cpu", "dtype": "fp32"}


@pytest.fixture
def samples_file(tmp_path):
    """Seven records: five good, one that fails to generate (index 3), one malformed (index 5)."""
    texts = ["a", "bb", "ccc", "FAIL", "dd", None, "e"]
    lines = [
        "not json"
        if text is None
        else json.dumps({"id": f"s{i}", "reference_audio": "ref.wav", "reference_text": "r", "target_text": text})
        for i, text in enumerate(texts)
    ]
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def cloners(monkeypatch):
    """Each model load returns a new FakeCloner (recorded); `cloners.crash_on` makes the next one crash there."""
    made: list[FakeCloner] = []

    class Loads(list):
        crash_on: str | None = None

    loads = Loads()

    def load(args):
        cloner = FakeCloner(loads.crash_on)
        made.append(cloner)
        return cloner

    monkeypatch.setattr(batch, "load_cloner", load)
    loads.made = made
    return loads


def infer(samples_file, out, *extra) -> int:
    return batch.main(["--jsonl", str(samples_file), "--out", str(out), "--model", "m", "--seed", "3", "-q", *extra])


def manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(
    "text, expected", [("0/1", (0, 1)), ("2/8", (2, 8)), ("7/8", (7, 8))] + [(t, None) for t in ("8/8", "-1/4", "3")]
)
def test_shard_values(text, expected):
    if expected is None:
        with pytest.raises(ShardError, match="expected I/N"):
            parse_shard(text)
    else:
        shard = parse_shard(text)
        assert (shard.index, shard.count) == expected
        assert [i for i in range(20) if shard.owns(i)] == list(range(expected[0], 20, expected[1]))


def test_shards_joined_equal_one_unsharded_run_and_evaluate_reads_them(samples_file, cloners, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert infer(samples_file, single) == PARTLY_FAILED  # samples 3 and 5 fail
    for i in range(3):
        assert infer(samples_file, sharded, "--shard", f"{i}/3") == 0
    # Shard 1 of 3 holds samples 1 and 4 (5, malformed, is its error); shard 0 holds 0, 3 (failed) and 6.
    assert [line["index"] for line in manifest(sharded / "shards" / "shard-00001-of-00003")] == [1, 4]
    assert sorted(cloners.made[2].generated) == ["bb", "dd"]
    assert infer(samples_file, sharded, "--join") == PARTLY_FAILED

    varying = {"seconds", "rtf", "batch_size"}  # timing and batch composition differ; nothing else may
    assert [{k: v for k, v in line.items() if k not in varying} for line in manifest(sharded)] == [
        {k: v for k, v in line.items() if k not in varying} for line in manifest(single)
    ]
    for line in manifest(single):
        assert (sharded / line["wav"]).read_bytes() == (single / line["wav"]).read_bytes()
    assert (sharded / "errors.jsonl").read_text() == (single / "errors.jsonl").read_text()
    record = json.loads((sharded / "run.json").read_text())
    assert (record["samples"], record["failed"], record["model"], record["devices"]) == (5, 2, "fake", ["cpu"])
    assert [s["shard"] for s in record["shards"]] == [f"shard-0000{i}-of-00003" for i in range(3)]
    assert "seconds" not in record and record["task_seconds"] >= record["slowest_task_seconds"]

    folder = read_predictions(sharded)
    assert [p.id for p in folder.predictions] == ["s0", "s1", "s2", "s4", "s6"] and not folder.problems
    assert [e["index"] for e in folder.generation_errors] == [3, 5]
    assert infer(samples_file, sharded, "--join") == PARTLY_FAILED  # joining again changes nothing
    assert [line["id"] for line in manifest(sharded)] == ["s0", "s1", "s2", "s4", "s6"]


def test_a_rerun_skips_finished_shards_and_redoes_an_unfinished_one(samples_file, cloners, tmp_path, capsys):
    out = tmp_path / "out"
    assert infer(samples_file, out, "--shard", "0/2") == 0
    cloners.crash_on = "bb"  # shard 1 (samples 1, 3, 5) dies in generation: no shard, nothing half-written kept
    with pytest.raises(RuntimeError, match="out of memory"):
        infer(samples_file, out, "--shard", "1/2")
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["plan.json", "shard-00000-of-00002"]
    assert infer(samples_file, out, "--join") == 2
    assert "1 of 2 shards are not finished" in capsys.readouterr().err and not (out / "manifest.jsonl").exists()

    # A task killed outright leaves its staging folder: the next run deletes it and generates the shard again.
    leftover = out / "shards" / ".shard-00001-of-00002.x1y2.partial"
    leftover.mkdir()
    (leftover / "001.wav").write_bytes(b"half")
    cloners.crash_on = None
    loads = len(cloners.made)
    assert infer(samples_file, out, "--shard", "0/2") == 0
    assert len(cloners.made) == loads  # finished: skipped without loading the model
    assert infer(samples_file, out, "--shard", "1/2") == 0
    assert cloners.made[-1].generated == ["bb"] and not leftover.exists()
    assert infer(samples_file, out, "--join") == PARTLY_FAILED
    assert [line["index"] for line in manifest(out)] == [0, 1, 2, 4, 6]


def test_a_folder_of_another_run_is_refused(samples_file, cloners, tmp_path, capsys):
    out = tmp_path / "out"
    assert infer(samples_file, out, "--shard", "0/2") == 0
    assert infer(samples_file, out, "--shard", "1/2", "--temperature", "0") == 2
    assert "holds shards of another run (different settings" in capsys.readouterr().err
    assert infer(samples_file, out, "--shard", "1/3") == 2
    assert "different shards" in capsys.readouterr().err
    samples_file.write_text(samples_file.read_text() + samples_file.read_text().splitlines()[0] + "\n")
    assert infer(samples_file, out, "--join") == 2
    assert "different input_sha1, records" in capsys.readouterr().err
    assert infer(samples_file, tmp_path / "none", "--join") == 2
    assert "--join needs the folder" in capsys.readouterr().err


def test_more_tasks_than_samples_leave_empty_shards_without_loading_a_model(samples_file, cloners, tmp_path):
    out = tmp_path / "out"
    for i in range(9):
        assert infer(samples_file, out, "--shard", f"{i}/9") == 0
    assert len(cloners.made) == 6  # shard 5 holds only a malformed record, 7 and 8 nothing: no model for those
    assert manifest(out / "shards" / "shard-00008-of-00009") == []
    assert infer(samples_file, out, "--join") == PARTLY_FAILED
    assert [line["index"] for line in manifest(out)] == [0, 1, 2, 4, 6]
