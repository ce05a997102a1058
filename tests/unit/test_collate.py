"""Delay pattern, its inverse, and zero-shot labels: target audio only, one EOS per codebook."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from higgs_lora.data.collate import (
    IGNORE_INDEX,
    build_delay_pattern,
    build_example,
    collate,
    revert_delay_pattern,
    target_audio_labels,
)

BOS, EOS, K = 1024, 1025, 8


def random_codes(num_frames: int, seed: int = 0, num_codebooks: int = K) -> torch.Tensor:
    return torch.randint(0, 1024, (num_codebooks, num_frames), generator=torch.Generator().manual_seed(seed))


def test_delay_pattern_rows_match_the_released_format():
    codes = random_codes(5)
    delayed = build_delay_pattern(codes, BOS, EOS)
    assert delayed.shape == (8, 5 + 9)  # T frames take T + 9 positions
    for k in range(8):
        expected = [BOS] * k + [BOS] + codes[k].tolist() + [EOS] + [EOS] * (7 - k)
        assert delayed[k].tolist() == expected


@settings(max_examples=60, deadline=None)
@given(num_frames=st.integers(0, 60), num_codebooks=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_revert_recovers_the_codes(num_frames, num_codebooks, seed):
    codes = random_codes(num_frames, seed, num_codebooks)
    delayed = build_delay_pattern(codes, BOS, EOS)
    assert delayed.shape == (num_codebooks, num_frames + num_codebooks + 1)
    assert torch.equal(revert_delay_pattern(delayed), codes)


@settings(max_examples=60, deadline=None)
@given(num_frames=st.integers(1, 60), seed=st.integers(0, 10_000))
def test_target_labels_codes_and_one_eos_per_codebook(num_frames, seed):
    codes = random_codes(num_frames, seed)
    delayed = build_delay_pattern(codes, BOS, EOS)
    labels = target_audio_labels(delayed, EOS, BOS)
    for k in range(K):
        row = labels[k]
        # Codes sit at k+1 .. k+T, the single EOS right after the last code, everything else ignored.
        assert row[k + 1 : k + 1 + num_frames].tolist() == codes[k].tolist()
        assert row[k + 1 + num_frames].item() == EOS
        assert (row == EOS).sum().item() == 1
        assert (row[: k + 1] == IGNORE_INDEX).all() and (row[k + 2 + num_frames :] == IGNORE_INDEX).all()
    assert (labels != IGNORE_INDEX).sum().item() == K * (num_frames + 1)
    assert not (labels == BOS).any()


def test_labels_refuse_a_segment_without_eos():
    with pytest.raises(ValueError, match="no EOS"):
        target_audio_labels(random_codes(4), EOS, BOS)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from higgs_lora.config import ModelConfig
    from higgs_lora.model import load_processor

    return load_processor(ModelConfig(path=str(tiny_checkpoint.model_dir), codec_path=str(tiny_checkpoint.codec_dir)))


@pytest.mark.parametrize("ref_frames, target_frames", [(1, 1), (30, 12), (7, 75)])
def test_example_labels_only_the_target(processor, ref_frames, target_frames):
    ref, target = random_codes(ref_frames, 1), random_codes(target_frames, 2)
    example = build_example(processor, "نص المرجع", ref, "النص الهدف", target)
    tok = processor.tokenizer
    audio_id = tok.convert_tokens_to_ids(processor.audio_token)
    delay_id = tok.convert_tokens_to_ids(processor.audio_delay_token)
    audio_positions = (example.input_ids == audio_id) | (example.input_ids == delay_id)
    # One audio row per audio position: reference T+9 then target T+9.
    assert audio_positions.sum().item() == example.audio_input_ids.shape[0] == ref_frames + target_frames + 18
    assert (example.input_ids == delay_id).sum().item() == 2 * 7
    reference_rows = ref_frames + 9
    assert (example.audio_labels[:reference_rows] == IGNORE_INDEX).all()
    assert torch.equal(example.audio_labels[reference_rows:].T, target_audio_labels(
        build_delay_pattern(target, 1024, 1025), 1025, 1024))
    assert torch.equal(revert_delay_pattern(example.audio_input_ids[reference_rows:].T), target)
    assert torch.equal(revert_delay_pattern(example.audio_input_ids[:reference_rows].T), ref)
    text = tok.decode(example.input_ids)
    assert text.index("نص المرجع") < text.index("النص الهدف")
    assert text.endswith("<|audio_eos|><|eot_id|>")


def test_collate_pads_and_masks(processor):
    short = build_example(processor, "أ", random_codes(3, 1), "ب", random_codes(4, 2))
    long = build_example(processor, "نص أطول قليلا", random_codes(20, 3), "هدف أطول", random_codes(30, 4))
    batch = collate([short, long], pad_token_id=processor.tokenizer.pad_token_id, audio_pad_id=1025)
    assert batch["input_ids"].shape == (2, long.num_positions)
    assert batch["attention_mask"][0].sum().item() == short.num_positions
    assert batch["attention_mask"][1].all()
    assert batch["audio_input_ids_mask"][0].sum().item() == short.audio_input_ids.shape[0]
    assert (batch["audio_labels"][0, short.audio_input_ids.shape[0]:] == IGNORE_INDEX).all()
    assert torch.equal(batch["audio_labels"][1], long.audio_labels)
