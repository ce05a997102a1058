"""The clips training generates and scores at evaluation steps (higgs_lora.eval.probe), in one process on the tiny
model; the two-rank ZeRO-2/3 runs are in tests/e2e/test_train.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from higgs_lora.data.sampler import Sample
from higgs_lora.eval.probe import GenerationProbe, ProbeSettings, choose_pairs
from higgs_lora.generation import Decoder
from higgs_lora.sampling import SamplingParams
from higgs_lora.tiny import REPO_ROOT


def sample(target, reference=99):
    return Sample(target=target, reference=reference, num_positions=100)


@pytest.mark.parametrize("count,max_frames,expected", [
    # speakers a (0, 1, 2), b (3, 4), c (5): each speaker's first pair before anyone's second
    (3, 1000, [0, 3, 5]),
    (5, 1000, [0, 3, 5, 1, 4]),
    (10, 1000, [0, 3, 5, 1, 4, 2]),
    # 0 and 3 are too long (200 frames > 150): the others first, the long ones only when nothing else is left
    (4, 150, [1, 4, 5, 2]),
    (6, 150, [1, 4, 5, 2, 3, 0]),
    (0, 1000, []),
])
def test_choose_pairs_takes_speakers_in_turn_and_short_targets_first(count, max_frames, expected):
    speakers = ["a", "a", "a", "b", "b", "c"]
    frames = [200, 100, 100, 200, 100, 100]
    samples = [sample(t) for t in (5, 4, 3, 2, 1, 0)]  # order of the input does not matter
    chosen = choose_pairs(samples, speakers, frames, count, max_frames)
    assert [s.target for s in chosen] == expected


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, demo_cache):
    """The demo run's TrainData (held-out speaker, eval micro-batches) and the tiny model with a fresh LoRA."""
    from higgs_lora.config import load_config
    from higgs_lora.model import apply_lora, load_base_model, load_processor
    from higgs_lora.train import build_data

    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", demo_cache)
    processor = load_processor(cfg.model)
    plan = SimpleNamespace(micro_batch_tokens=1024, world_size=1, accumulation=1)
    data = build_data(cfg, processor, plan, cfg.data.cache_dir)
    torch.manual_seed(0)
    model = apply_lora(load_base_model(cfg.model), cfg.lora, cfg.model)
    return cfg, data, model


class EndsEarly(torch.nn.Module):
    """The model with its audio EOS logit raised after the 10th decode step, so that a greedy stream ends early
    (the tiny random model may not stop by itself before its length limit)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0

    def forward(self, **inputs):
        out = self.model(**inputs)
        self.calls = 0 if "input_ids" in inputs else self.calls + 1  # the prefill starts a new stream
        if self.calls > 10:
            logits = out.logits.unflatten(-1, (self.config.num_codebooks, self.config.codebook_size)).clone()
            logits[..., self.config.audio_stream_eos_id] += 1e4
            out.logits = logits.flatten(-2)
        return out


def test_lockstep_keeps_a_finished_batch_stepping_until_every_rank_is_done(setup):
    """`all_done` stands for the all-reduce of ZeRO-3: the batch here ends by EOS, but the "other ranks" are not
    done for five more steps; it must keep stepping (EOS columns, one forward pass each) and change nothing else."""
    _, data, model = setup
    from higgs_lora.data.collate import build_prompt

    pair = [s for mb in data.eval_batches for s in mb][0]
    prompt = build_prompt(data.processor, data.texts[pair.reference],
                          torch.from_numpy(data.cache[pair.reference]["codes"]), data.texts[pair.target])
    decoder = Decoder(EndsEarly(model), inference_mode=False)
    params = [SamplingParams(temperature=0, max_seconds=4)]
    alone = torch.stack([c.codes for c in decoder.run([prompt], params, [None])])
    assert alone.shape[0] < params[0].max_columns(), "the greedy run should end by EOS before its limit"
    assert (alone[-1] == decoder.spec.eos_id).all()

    calls = []

    def all_done(done: bool) -> bool:
        calls.append(done)
        return len(calls) >= alone.shape[0] + 5

    locked = torch.stack([c.codes for c in decoder.run([prompt], params, [None], all_done)])
    assert locked.shape[0] == alone.shape[0] + 5
    assert torch.equal(locked[: alone.shape[0]], alone)
    assert (locked[alone.shape[0]:] == decoder.spec.eos_id).all()
    assert calls == [False] * (alone.shape[0] - 1) + [True] * 6


def run_probe(setup, tmp_path, count=3, **settings):
    cfg, data, model = setup
    samples = [s for mb in data.eval_batches for s in mb]
    utterances = data.utterances
    pairs = choose_pairs(samples, [u.speaker for u in utterances], [u.num_frames for u in utterances], count, 50)
    probe = GenerationProbe(pairs, data, ProbeSettings(count=count, max_seconds=1.0, seed=7, **settings),
                            tmp_path, rank=0, world_size=1)
    lines = []
    first = probe.run(model, 0, torch.device("cpu"), log=lines.append)
    second = probe.run(model, 5, torch.device("cpu"), log=lines.append)
    return probe, pairs, first, second, lines


def test_probe_generates_scores_and_writes_an_inference_folder(setup, tmp_path):
    from higgs_lora.eval.predictions import read_predictions

    _, data, model = setup
    assert model.training  # the probe puts the model in eval mode and back
    probe, pairs, first, second, lines = run_probe(setup, tmp_path)
    assert model.training
    assert len(pairs) == 3
    for metrics in (first, second):
        assert metrics["num_scored"] + metrics["num_failed"] == 3
        assert metrics["num_scored"] >= 1 and -1 <= metrics["similarity"] <= 1
        assert 1 <= metrics["dnsmos_ovrl"] <= 5 and 0 <= metrics["eos_fraction"] <= 1
        assert 0 < metrics["generated_seconds"] <= 1.0 + 0.04 + 1e-9  # max_seconds, give or take one frame
        assert "similarity_ground_truth" in metrics and "num_scored_ground_truth" not in metrics
    # Same pairs, seeds and weights at both steps: the same clips and scores.
    assert first["similarity"] == second["similarity"]
    for index in range(3):
        assert ((tmp_path / "eval_samples/step_000000" / f"{index:02d}.wav").read_bytes()
                == (tmp_path / "eval_samples/step_000005" / f"{index:02d}.wav").read_bytes())

    folder = read_predictions(tmp_path / "eval_samples" / "step_000005")
    assert not folder.problems and [p.id for p in folder.predictions] == ["00", "01", "02"]
    for p, pair in zip(folder.predictions, pairs):
        assert p.wav.is_file() and p.reference_audio.is_file() and p.target_audio.is_file()
        assert p.target_text == data.texts[pair.target] and p.reference_text == data.texts[pair.reference]
        assert p.speaker == data.utterances[pair.target].speaker
    manifest = [json.loads(line) for line in
                (tmp_path / "eval_samples/step_000005/manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["seed"] for m in manifest] == [7, 8, 9] and all(m["step"] == 5 for m in manifest)
    assert len(lines) == 2 and "similarity" in lines[0] and "step_000000" in lines[0]


def test_probe_without_the_eval_extras_writes_the_clips_and_says_why_they_are_unscored(setup, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "resemblyzer" else real(name, *a))
    _, _, first, second, lines = run_probe(setup, tmp_path, count=1, dnsmos=False)
    assert "similarity" not in first and "num_scored" not in first
    assert first["generated_seconds"] > 0
    assert (tmp_path / "eval_samples/step_000005/00.wav").is_file()
    warnings = [line for line in lines if "not installed" in line]
    assert len(warnings) == 1 and "resemblyzer" in warnings[0] and "higgs-lora[eval]" in warnings[0]
