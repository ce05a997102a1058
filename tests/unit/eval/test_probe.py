"""The clips training generates and scores at evaluation steps (higgs_lora.eval.probe), in one process on the tiny
model; the two-rank ZeRO-2/3 runs are in tests/e2e/test_train.py."""

from __future__ import annotations

import contextlib
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from higgs_lora.data.sampler import Pair
from higgs_lora.eval.probe import GenerationProbe, ProbeSettings, choose_pairs
from higgs_lora.infer.decode import DecodeLoop
from higgs_lora.infer.sampling import SamplingParams
from higgs_lora.tiny import REPO_ROOT


def sample(target, reference=99):
    return Pair(target=target, reference=reference, num_positions=100)


@pytest.mark.parametrize(
    "count,max_frames,expected",
    [
        # speakers a (0, 1, 2), b (3, 4), c (5): each speaker's first pair before anyone's second
        (3, 1000, [0, 3, 5]),
        (5, 1000, [0, 3, 5, 1, 4]),
        (10, 1000, [0, 3, 5, 1, 4, 2]),
        # 0 and 3 are too long (200 frames > 150): the others first, the long ones only when nothing else is left
        (4, 150, [1, 4, 5, 2]),
        (6, 150, [1, 4, 5, 2, 3, 0]),
        (0, 1000, []),
    ],
)
def test_choose_pairs_takes_speakers_in_turn_and_short_targets_first(count, max_frames, expected):
    speakers = ["a", "a", "a", "b", "b", "c"]
    frames = [200, 100, 100, 200, 100, 100]
    samples = [sample(t) for t in (5, 4, 3, 2, 1, 0)]  # order of the input does not matter
    chosen = choose_pairs(samples, speakers, frames, count, max_frames)
    assert [s.target for s in chosen] == expected


def build_setup(overrides):
    from higgs_lora.config import load_config
    from higgs_lora.model.loading import load_base_model, load_processor
    from higgs_lora.model.lora import apply_lora
    from higgs_lora.train.data import build_data

    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides)
    processor = load_processor(cfg.model)
    plan = SimpleNamespace(micro_batch_tokens=1024, world_size=1, accumulation=1)
    data = build_data(cfg, processor, plan, cfg.data.cache_dir)
    torch.manual_seed(0)
    model = apply_lora(load_base_model(cfg.model), cfg.lora, cfg.model)
    return cfg, data, model


def held_out_pairs(data, count, max_frames=50):
    samples = [s for mb in data.eval_batches for s in mb]
    utterances = data.utterances
    return choose_pairs(samples, [u.speaker for u in utterances], [u.num_frames for u in utterances], count, max_frames)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, demo_cache):
    """The demo run's TrainData (held-out speaker, eval micro-batches) and the tiny model with a fresh LoRA."""
    return build_setup(demo_cache)


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


@pytest.mark.slow
def test_lockstep_keeps_a_finished_batch_stepping_until_every_rank_is_done(setup):
    """`all_done` stands for the all-reduce of ZeRO-3: the batch here ends by EOS, but the "other ranks" are not
    done for five more steps; it must keep stepping (EOS columns, one forward pass each) and change nothing else."""
    _, data, model = setup
    from higgs_lora.data.collate import build_prompt

    pair = [s for mb in data.eval_batches for s in mb][0]
    prompt = build_prompt(
        data.processor,
        data.texts[pair.reference],
        torch.from_numpy(data.cache[pair.reference]["codes"]),
        data.texts[pair.target],
    )
    decoder = DecodeLoop(EndsEarly(model), inference_mode=False)
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
    assert (locked[alone.shape[0] :] == decoder.spec.eos_id).all()
    assert calls == [False] * (alone.shape[0] - 1) + [True] * 6


def run_probe(setup, tmp_path, count=3, **settings):
    cfg, data, model = setup
    pairs = held_out_pairs(data, count)
    probe = GenerationProbe(
        pairs, data, ProbeSettings(count=count, max_seconds=1.0, seed=7, **settings), tmp_path, rank=0, world_size=1
    )
    with eval_lines() as lines:
        first = probe.run(model, 0, torch.device("cpu"))
        second = probe.run(model, 5, torch.device("cpu"))
    return probe, pairs, first, second, lines


@contextlib.contextmanager
def eval_lines():
    """The `eval` logger's lines as the user sees them (`[eval] ...`, `[eval] warning: ...`), collected."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            prefix = "[eval] warning: " if record.levelno >= logging.WARNING else "[eval] "
            lines.append(prefix + record.getMessage())

    logger, handler = logging.getLogger("higgs_lora.eval"), Collect()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def audible(monkeypatch):
    """Score every clip: the tiny random model's clips are near-silent, which training flags instead of scoring
    (tests/unit/eval/test_speaker.py and the e2e training tests check that gate); here the scoring path is tested."""
    from higgs_lora.eval import scoring

    monkeypatch.setattr(scoring, "MIN_SPEECH_SECONDS", 0.0)


@pytest.mark.slow
def test_probe_generates_scores_and_writes_an_inference_folder(setup, tmp_path, audible):
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
        assert (tmp_path / "eval_samples/step_00000000" / f"{index:02d}.wav").read_bytes() == (
            tmp_path / "eval_samples/step_00000005" / f"{index:02d}.wav"
        ).read_bytes()

    folder = read_predictions(tmp_path / "eval_samples" / "step_00000005")
    assert not folder.problems and [p.id for p in folder.predictions] == ["00", "01", "02"]
    for p, pair in zip(folder.predictions, pairs):
        assert p.wav.is_file() and p.reference_audio.is_file() and p.target_audio.is_file()
        assert p.target_text == data.texts[pair.target] and p.reference_text == data.texts[pair.reference]
        assert p.speaker == data.utterances[pair.target].speaker
    manifest = [
        json.loads(line)
        for line in (tmp_path / "eval_samples/step_00000005/manifest.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [m["seed"] for m in manifest] == [7, 8, 9] and all(m["step"] == 5 for m in manifest)
    assert [m["target_source_id"] for m in manifest] == [data.source_ids[p.target] for p in pairs]
    # The references are the codec's resynthesis of the cached codes, named by source id.
    from higgs_lora.data.audio import read_audio
    from higgs_lora.infer.streaming_codec import decode_codes

    expected = decode_codes(data.processor.audio_tokenizer, torch.from_numpy(data.cache[pairs[0].reference]["codes"]))
    samples, rate = read_audio(str(folder.predictions[0].reference_audio))
    assert rate == 24000 and len(samples) == len(expected)
    assert abs(samples - expected).max() <= 1 / 32767 + 1e-6  # PCM16 rounding
    assert data.source_ids[pairs[0].reference].replace(":", "_") in folder.predictions[0].reference_audio.name
    assert len(lines) == 2 and "similarity" in lines[0] and "step_00000000" in lines[0]


@pytest.mark.slow
def test_probe_without_the_eval_extras_writes_the_clips_and_says_why_they_are_unscored(setup, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "resemblyzer" else real(name, *a))
    _, _, first, second, lines = run_probe(setup, tmp_path, count=1, dnsmos=False)
    assert "similarity" not in first and "num_scored" not in first
    assert first["generated_seconds"] > 0
    assert (tmp_path / "eval_samples/step_00000005/00.wav").is_file()
    warnings = [line for line in lines if "not installed" in line]
    assert len(warnings) == 1 and "resemblyzer" in warnings[0] and "higgs-lora[eval]" in warnings[0]


@pytest.mark.slow
def test_probe_without_dnsmos_installed_still_scores_similarity(setup, tmp_path, monkeypatch, audible):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "speechmos" else real(name, *a))
    _, _, first, second, lines = run_probe(setup, tmp_path, count=1)
    assert "similarity" in second and "dnsmos_ovrl" not in second and second["num_scored"] == 1
    warnings = [line for line in lines if "not installed" in line]
    assert len(warnings) == 1 and "speechmos" in warnings[0] and "without DNSMOS" in warnings[0]


# ------------------------------------------------------------------------------------ two processes (gloo)


class Collective(torch.nn.Module):
    """Stands in for a ZeRO-3 model: every forward pass is a collective (an all-reduce), so two processes that do
    not make the same number of them hang (here: fail at the process group's timeout). Optionally ends early."""

    def __init__(self, model, ends_early: bool):
        super().__init__()
        self.inner = EndsEarly(model) if ends_early else model
        self.config, self.forwards = model.config, 0

    def forward(self, **inputs):
        import torch.distributed as dist

        dist.all_reduce(torch.ones(1))
        self.forwards += 1
        return self.inner(**inputs)


def _two_rank_worker(rank, port, overrides, out_dir):
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        _, data, model = build_setup(overrides)
        results = {}
        for count in (3, 1):  # 3 pairs: 2 + 1, the second rank ends early; 1 pair: the second rank has none
            wrapped = Collective(model, ends_early=rank == 1)
            pairs = held_out_pairs(data, count)
            probe = GenerationProbe(
                pairs,
                data,
                ProbeSettings(count=count, max_seconds=1.0, seed=7, temperature=0),
                out_dir,
                rank=rank,
                world_size=2,
            )
            clips = probe.generate(wrapped, torch.device("cpu"))
            from higgs_lora.distributed import gather_objects

            gathered = gather_objects(clips)
            results[count] = {
                "forwards": wrapped.forwards,
                "mine": [(c.index, c.codes, c.stop) for c in clips],
                "gathered": None
                if gathered is None
                else [(c.index, c.codes, c.stop) for part in gathered for c in part],
            }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_decode_in_lockstep_when_one_finishes_early_or_has_no_pair(demo_cache, setup, tmp_path):
    import multiprocessing

    from tests.e2e.launch import free_port

    context = multiprocessing.get_context("spawn")
    port = free_port()
    workers = [
        context.Process(target=_two_rank_worker, args=(rank, port, demo_cache, str(tmp_path))) for rank in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0], "a rank failed or hung (see its output above)"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # The same number of collective forward passes on both ranks, though rank 1's stream ends early.
    assert ranks[0][3]["forwards"] == ranks[1][3]["forwards"]
    assert ranks[0][1]["forwards"] == ranks[1][1]["forwards"]
    assert [stop for _, _, stop in ranks[1][3]["mine"]] == ["eos"]
    assert [stop for _, _, stop in ranks[0][3]["mine"]] == ["max_seconds", "max_seconds"]
    assert [i for i, _, _ in ranks[0][3]["gathered"]] == [0, 2, 1] and ranks[1][3]["gathered"] is None
    # With one pair, rank 1 decoded a stand-in and kept nothing.
    assert [i for i, _, _ in ranks[0][1]["mine"]] == [0] and ranks[1][1]["mine"] == []

    # Rank 0's clips are exactly what one process makes of the same pairs: the split and the extra lockstep
    # steps change nothing (greedy; batched greedy equals unbatched on this model, see test_inference).
    _, data, model = setup
    pairs = held_out_pairs(data, 3)
    alone = GenerationProbe(
        pairs, data, ProbeSettings(count=3, max_seconds=1.0, seed=7, temperature=0), tmp_path, rank=0, world_size=1
    ).generate(model, torch.device("cpu"))
    for index, codes, _ in ranks[0][3]["mine"]:
        assert torch.equal(codes, alone[index].codes), index


@pytest.mark.slow
def test_probe_scores_cer_with_the_asr_and_transcribes_the_ground_truth_once(setup, tmp_path, tiny_whisper):
    from higgs_lora.eval.asr import Transcriber
    from higgs_lora.eval.text import corpus_rates, error_counts

    heard: list[str] = []
    real = Transcriber.transcribe

    def spy(self, samples, rate, language="ar"):
        assert language == "ar"
        heard.append(real(self, samples, rate, language))
        return heard[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Transcriber, "transcribe", spy)
        probe, pairs, first, second, lines = run_probe(setup, tmp_path, count=2, dnsmos=False, asr=str(tiny_whisper))
    _, data, _ = setup
    texts = [data.texts[p.target] for p in pairs]
    # step 0: the 2 clips, then the 2 real targets (once); step 5: the 2 clips again
    assert len(heard) == 6
    for metrics, hypotheses in ((first, heard[0:2]), (second, heard[4:6])):
        expected = corpus_rates([error_counts(t, h) for t, h in zip(texts, hypotheses)])
        assert metrics["cer"] == pytest.approx(expected["cer"]) and metrics["wer"] == pytest.approx(expected["wer"])
        assert metrics["asr_seconds_per_clip"] > 0
    truth = corpus_rates([error_counts(t, h) for t, h in zip(texts, heard[2:4])])
    assert first["cer_ground_truth"] == second["cer_ground_truth"] == pytest.approx(truth["cer"])
    assert second["wer_ground_truth"] == pytest.approx(truth["wer"])
    assert all("CER " in line and "ground truth" in line for line in lines)


@pytest.mark.slow
def test_probe_without_asr_says_once_that_cer_is_skipped(setup, tmp_path):
    _, _, first, second, lines = run_probe(setup, tmp_path, count=1, dnsmos=False)
    assert "cer" not in first and "cer" not in second
    assert [("CER/WER skipped: no train.eval_asr given" in line) for line in lines] == [True, False]
