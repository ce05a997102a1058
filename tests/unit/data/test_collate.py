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
    from higgs_lora.model.loading import load_processor

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
    assert torch.equal(
        example.audio_labels[reference_rows:].T,
        target_audio_labels(build_delay_pattern(target, 1024, 1025), 1025, 1024),
    )
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
    assert (batch["audio_labels"][0, short.audio_input_ids.shape[0] :] == IGNORE_INDEX).all()
    assert torch.equal(batch["audio_labels"][1], long.audio_labels)


@settings(max_examples=25, deadline=None)
@given(ref_frames=st.integers(1, 80), target_frames=st.integers(1, 80), seed=st.integers(0, 1000))
def test_shifted_loss_labels_line_up_with_the_audio_labels(processor, ref_frames, target_frames, seed):
    example = build_example(
        processor, "مرجع", random_codes(ref_frames, seed), "هدف", random_codes(target_frames, seed + 1)
    )
    ids = example.input_ids
    is_audio = (ids == processor.audio_token_id) | (ids == processor.audio_delay_token_id)
    position_labels = torch.full((len(ids), K), IGNORE_INDEX)
    position_labels[is_audio] = example.audio_labels
    # Position i predicts position i + 1: its loss label is the next position's audio label.
    assert torch.equal(example.loss_labels[:-1], position_labels[1:])
    assert (example.loss_labels[-1] == IGNORE_INDEX).all()
    # Each codebook: T codes + one EOS labelled, nothing else.
    assert ((example.loss_labels != IGNORE_INDEX).sum(0) == target_frames + 1).all()
    assert ((example.loss_labels == EOS).sum(0) == 1).all()


def test_text_labels_are_the_target_turns_closing_tokens_only(processor):
    example = build_example(processor, "مرجع", random_codes(5, 1), "هدف", random_codes(6, 2))
    tok = processor.tokenizer
    labelled = example.text_loss_labels[example.text_loss_labels != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(labelled.tolist()) == ["<|audio_eos|>", "<|eot_id|>"]
    # Shifted: the last audio position predicts <|audio_eos|>, which predicts <|eot_id|>.
    last_audio = int(
        (
            (example.input_ids == processor.audio_token_id) | (example.input_ids == processor.audio_delay_token_id)
        ).nonzero()[-1, 0]
    )
    assert example.text_loss_labels[last_audio].item() == tok.convert_tokens_to_ids("<|audio_eos|>")
    delay_id = processor.audio_delay_token_id
    assert delay_id not in example.text_loss_labels.tolist()


def test_collated_loss_targets_follow_the_masks(processor):
    a = build_example(processor, "أ", random_codes(3, 1), "ب", random_codes(4, 2))
    b = build_example(processor, "نص أطول", random_codes(9, 3), "هدف أطول", random_codes(11, 4))
    batch = collate([a, b], pad_token_id=processor.tokenizer.pad_token_id, audio_pad_id=1025)
    assert batch["loss_labels"].shape == (int(batch["loss_mask"].sum()), K)
    expected = torch.cat(
        [a.loss_labels[(a.loss_labels != IGNORE_INDEX).any(-1)], b.loss_labels[(b.loss_labels != IGNORE_INDEX).any(-1)]]
    )
    assert torch.equal(batch["loss_labels"], expected)
    assert batch["text_loss_labels"].tolist() == [
        x for e in (a, b) for x in e.text_loss_labels.tolist() if x != IGNORE_INDEX
    ]


@pytest.mark.parametrize("scene", ["", "Audio is recorded in a quiet room."])
def test_sample_length_estimate_is_exact(processor, scene):
    from higgs_lora.data.collate import prompt_overhead_tokens
    from higgs_lora.data.sampler import UtteranceInfo, sample_positions

    overhead = prompt_overhead_tokens(processor, scene)
    for i, (ref_text, target_text) in enumerate([("نص المرجع", "النص الهدف"), ("كلمة", "جملة أطول من ذلك بكثير ١٢")]):
        ref, target = random_codes(10 + i, i), random_codes(20 + 3 * i, i + 5)
        example = build_example(processor, ref_text, ref, target_text, target, scene)
        count = lambda t: len(processor.tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
        estimate = sample_positions(
            UtteranceInfo("s", target.shape[1], count(target_text)),
            UtteranceInfo("s", ref.shape[1], count(ref_text)),
            overhead,
        )
        assert estimate == example.num_positions


def test_generation_prompt_is_the_training_sample_cut_before_the_target_audio(processor):
    from higgs_lora.data.collate import build_prompt

    ref, target = random_codes(12, 1), random_codes(7, 2)
    example = build_example(processor, "مرجع", ref, "هدف", target)
    prompt = build_prompt(processor, "مرجع", ref, "هدف")
    n = len(prompt.input_ids)
    assert torch.equal(example.input_ids[:n], prompt.input_ids)
    assert processor.tokenizer.convert_ids_to_tokens(int(prompt.input_ids[-1])) == "<|audio_out_bos|>"
    assert torch.equal(prompt.audio_input_ids, example.audio_input_ids[: 12 + 9])
