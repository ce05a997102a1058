"""Speaker similarity on the demo corpus voices: same-speaker pairs score higher than cross-speaker pairs."""

from __future__ import annotations

import numpy as np
import pytest

from higgs_lora.eval.predictions import read_predictions
from higgs_lora.eval.scoring import Scorers, default_embedder, score_folder
from higgs_lora.eval.speaker import cosine
from tests.eval_folders import by_speaker, make_prediction_folder


def test_same_speaker_similarity_beats_cross_speaker(demo_rows, tmp_path):
    """Through the real pipeline (folder -> rows): each of the 5 demo voices, generated = one of its utterances,
    scored against a reference of the same voice and against a reference of every other voice."""
    groups = by_speaker(demo_rows)
    speakers = sorted(groups)
    samples = []
    for speaker in speakers:
        for reference_speaker in speakers:
            samples.append(
                {
                    "id": f"{speaker}<-{reference_speaker}",
                    "generated": groups[speaker][1],
                    "reference": groups[reference_speaker][0],
                }
            )
    rows = score_folder(
        read_predictions(make_prediction_folder(tmp_path / "pred", samples)),
        Scorers(default_embedder(), use_dnsmos=False),
    )
    assert all(r["error"] is None and r["notes"] is None for r in rows)
    same = {
        r["id"].split("<-")[0]: r["similarity_reference"]
        for r in rows
        if r["id"].split("<-")[0] == r["id"].split("<-")[1]
    }
    cross = [r for r in rows if r["id"].split("<-")[0] != r["id"].split("<-")[1]]
    assert len(same) == 5 and len(cross) == 20
    for r in cross:  # a voice is closer to its own reference than to any other voice's reference
        generated_speaker = r["id"].split("<-")[0]
        assert same[generated_speaker] > r["similarity_reference"], r["id"]
    assert np.mean(list(same.values())) > np.mean([r["similarity_reference"] for r in cross]) + 0.1
    assert all(0.0 <= r["similarity_reference"] <= 1.0 for r in rows)


def test_embedding_is_unit_norm_and_identical_audio_scores_one(demo_rows):
    from higgs_lora.data.audio import load_audio

    audio = load_audio(demo_rows[0]["audio"], 24000)
    embedding = default_embedder().embed(audio, 24000)
    assert embedding.shape == (256,) and np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)
    assert cosine(embedding, default_embedder().embed(audio, 24000)) == pytest.approx(1.0, abs=1e-6)


def test_unembeddable_audio_is_a_clear_error():
    with pytest.raises(ValueError, match="too short"):
        default_embedder().embed(np.zeros(100, np.float32), 24000)
    with pytest.raises(ValueError, match="digital silence"):
        default_embedder().embed(np.zeros(24000, np.float32), 24000)


def test_near_silent_clips_are_flagged_not_scored_as_perfect_clones():
    import numpy as np

    from higgs_lora.eval.scoring import score_generated

    class NoEmbedding:
        def embed(self, samples, sample_rate):
            raise AssertionError("a near-silent pair must not be embedded")

    rate = 24000
    hush = 1e-5 * np.random.default_rng(0).standard_normal(2 * rate).astype(np.float32)  # -100 dBFS: silence
    voice = 0.1 * np.sin(2 * np.pi * 220 * np.arange(2 * rate) / rate).astype(np.float32)
    out = score_generated([(hush, rate, hush, rate), (voice, rate, hush, rate)], embedder=NoEmbedding(), dnsmos=False)
    assert out == {"num_scored": 0.0, "num_failed": 2.0, "num_silent": 2.0}  # no "similarity": nothing scored
