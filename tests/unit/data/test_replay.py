"""data.replay: an English corpus (espeak-ng, made here) prepared beside the Arabic demo cache and mixed into the
training steps; its records keep their language and their text only the language-neutral normalisation."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from higgs_lora.config import load_config
from higgs_lora.data.cache import REPLAY, load_cache
from tests.conftest import REPO_ROOT
from tests.replay_corpus import SENTENCES


@pytest.fixture(scope="module")
def replay_setup(replay_cache):
    return replay_cache


def test_prepare_caches_the_replay_corpus_with_its_language_and_no_arabic_rules(replay_setup):
    _, cache = replay_setup
    rows = load_cache(cache / REPLAY).select_columns(["language", "text_normalized", "speaker"]).to_dict()
    assert set(rows["language"]) == {"en"} and len(rows["language"]) == 12
    assert set(rows["text_normalized"]) == set(SENTENCES)  # digits kept as digits, no Arabic spelling or folding
    assert set(load_cache(cache).select_columns(["language"]).to_dict()["language"]) == {"ar"}


def test_training_data_mixes_replay_into_every_step_and_holds_out_replay_speakers(replay_setup, tiny_checkpoint):
    from higgs_lora.model.loading import load_processor
    from higgs_lora.train.data import build_data, describe

    overrides, cache = replay_setup
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", overrides)
    plan = SimpleNamespace(micro_batch_tokens=1024, world_size=1, accumulation=2)
    data = build_data(cfg, load_processor(cfg.model), plan, cache)
    replay = [i for i, u in enumerate(data.utterances) if u.speaker.startswith("replay:")]
    assert len(replay) == 12 and all(data.languages[i] == "en" for i in replay)
    assert all(data.source_ids[i].startswith("replay:") for i in replay)
    assert len(data.replay_eval_speakers) == 1 and data.replay_eval_speakers[0].startswith("replay:en_")
    held_out = [s.target for mb in data.replay_eval_batches for s in mb]
    assert held_out and all(data.utterances[t].speaker == data.replay_eval_speakers[0] for t in held_out)
    assert not set(held_out) & set(data.sampler.replay_targets)
    steps = data.sampler.plan(0).steps
    assert steps
    for step in steps:
        samples = [s for mb in step for s in mb]
        replayed = [s for s in samples if s.target in set(replay)]
        assert abs(len(replayed) - 0.25 * len(samples)) < 1.5
        assert all(data.utterances[s.reference].speaker == data.utterances[s.target].speaker for s in samples)
    assert "replay: 8 training targets at 25% of every step" in describe(data)


def test_replay_without_its_cache_says_to_run_prepare(replay_setup, tmp_path):
    from higgs_lora.data.sampler import DataError
    from higgs_lora.model.loading import load_processor
    from higgs_lora.train.data import build_data

    overrides, cache = replay_setup
    bare = tmp_path / "cache"
    shutil.copytree(cache, bare, ignore=shutil.ignore_patterns(REPLAY))
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [*overrides, f"data.cache_dir={bare}"])
    plan = SimpleNamespace(micro_batch_tokens=1024, world_size=1, accumulation=1)
    with pytest.raises(DataError, match="run `python -m higgs_lora.prepare` with data.replay set"):
        build_data(cfg, load_processor(cfg.model), plan, bare)
