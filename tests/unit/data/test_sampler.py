"""The sampler: reference draws, token-budget micro-batches, steps split evenly over ranks, evaluation split."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from higgs_lora.data.sampler import (
    DataError,
    EpochSampler,
    Pair,
    SamplerState,
    UtteranceInfo,
    draw_pairs,
    eval_assignment,
    eval_micro_batches,
    pack_micro_batches,
    sample_positions,
    split_speakers,
)


def corpus(num_speakers=4, per_speaker=6, seed=0):
    rng = random.Random(seed)
    return [
        UtteranceInfo(f"spk{s}", rng.randint(20, 200), rng.randint(5, 40))
        for s in range(num_speakers)
        for _ in range(per_speaker)
    ]


def test_references_are_other_utterances_of_the_same_speaker_within_bounds():
    utterances = corpus()
    pairs, missing = draw_pairs(utterances, list(range(len(utterances))), {}, (30, 150), seed=1, epoch=0)
    assert missing + len(pairs) == len(utterances)
    for target, reference in pairs:
        assert target != reference
        assert utterances[target].speaker == utterances[reference].speaker
        assert 30 <= utterances[reference].num_frames <= 150


def test_reference_draws_are_seeded_by_seed_and_epoch():
    utterances = corpus(num_speakers=2, per_speaker=20)
    targets = list(range(len(utterances)))
    draw = lambda seed, epoch: draw_pairs(utterances, targets, {}, (0, 10_000), seed, epoch)[0]  # noqa: E731
    assert draw(1, 0) == draw(1, 0)
    assert draw(1, 0) != draw(1, 1)  # anew each epoch
    assert draw(1, 0) != draw(2, 0)
    # Over epochs a target meets many different references, not one.
    assert len({dict(draw(1, e))[0] for e in range(20)}) > 5


def test_fixed_pairs_are_honoured_and_lonely_targets_counted():
    utterances = [UtteranceInfo("a", 50, 5), UtteranceInfo("a", 60, 5), UtteranceInfo("b", 70, 5)]
    pairs, missing = draw_pairs(utterances, [0, 1, 2], {2: 0}, (0, 1000), seed=0, epoch=3)
    assert dict(pairs) == {0: 1, 1: 0, 2: 0}  # the fixed pair crosses speakers because the data said so
    pairs, missing = draw_pairs(utterances, [0, 1, 2], {}, (0, 1000), seed=0, epoch=3)
    assert missing == 1 and 2 not in dict(pairs)  # speaker b has no second utterance


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(10, 500), min_size=1, max_size=200),
    budget=st.integers(500, 3000),
    seed=st.integers(0, 1000),
)
def test_micro_batches_respect_the_budget_and_hold_every_sample_once(lengths, budget, seed):
    samples = [Pair(i, i, n) for i, n in enumerate(lengths)]
    micro_batches = pack_micro_batches(samples, budget, random.Random(seed), pool_size=64)
    assert sorted(s.target for mb in micro_batches for s in mb) == list(range(len(lengths)))
    for mb in micro_batches:
        assert len(mb) * max(s.num_positions for s in mb) <= budget


def test_bucketing_keeps_padding_low_on_mixed_lengths():
    rng = random.Random(0)
    samples = [Pair(i, i, rng.randint(100, 1000)) for i in range(2000)]
    micro_batches = pack_micro_batches(samples, 4096, random.Random(0))
    used = sum(s.num_positions for mb in micro_batches for s in mb)
    budgeted = sum(len(mb) * max(s.num_positions for s in mb) for mb in micro_batches)
    assert 1 - used / budgeted < 0.05


def test_a_sample_longer_than_the_budget_is_an_error_naming_the_setting():
    with pytest.raises(DataError, match="train.micro_batch_tokens=100"):
        pack_micro_batches([Pair(0, 1, 150)], 100, random.Random(0))


@pytest.mark.parametrize("world_size,accumulation", [(1, 1), (2, 1), (2, 3), (4, 2)])
def test_every_rank_gets_the_same_number_of_micro_batches_per_step(world_size, accumulation):
    utterances = corpus(num_speakers=5, per_speaker=30)
    sampler = EpochSampler(
        utterances,
        list(range(len(utterances))),
        prompt_overhead=30,
        micro_batch_tokens=1500,
        reference_frames=(20, 200),
        seed=7,
        world_size=world_size,
        accumulation=accumulation,
    )
    plan = sampler.plan(0)
    assert plan.steps
    for s in range(len(plan.steps)):
        per_rank = [plan.rank_micro_batches(s, r, accumulation) for r in range(world_size)]
        assert all(len(mbs) == accumulation for mbs in per_rank)
    placed = [x.target for step in plan.steps for mb in step for x in mb]
    assert len(placed) == len(set(placed)) == plan.num_samples
    assert plan.num_samples + plan.num_dropped + plan.num_without_reference == len(utterances)
    assert plan.num_dropped <= max(len(mb) for step in plan.steps for mb in step) * world_size * accumulation


def test_the_schedule_is_a_pure_function_of_seed_epoch_and_world():
    utterances = corpus()

    def make():
        return EpochSampler(
            utterances,
            list(range(len(utterances))),
            30,
            1200,
            (20, 200),
            seed=3,
            world_size=2,
        )

    assert make().plan(4).steps == make().plan(4).steps  # a resumed run recomputes the same epoch
    assert make().plan(4).steps != make().plan(5).steps


def test_sampler_state_round_trips():
    state = SamplerState(epoch=3, step=17, world_size=8, accumulation=2, micro_batch_tokens=16384)
    assert SamplerState.from_dict(state.to_dict()) == state


def test_held_out_speakers():
    speakers = ["a", "b", "c", "d", "a"]
    assert split_speakers(speakers, ["b"], 1, seed=0) == {"b"}
    chosen = split_speakers(speakers, [], 1, seed=0)
    assert len(chosen) == 1 and chosen == split_speakers(speakers, [], 1, seed=0)
    assert split_speakers(["a", "b"], [], 1, seed=0) == set()  # too few speakers to hold one out
    assert len(split_speakers(speakers, [], 10, seed=0)) == 2  # always at least two speakers left to train
    with pytest.raises(DataError, match="zz"):
        split_speakers(speakers, ["zz"], 1, seed=0)
    with pytest.raises(DataError, match="every speaker"):
        split_speakers(speakers, ["a", "b", "c", "d"], 1, seed=0)
    with pytest.raises(DataError, match="zz"):
        split_speakers(speakers, ["zz"], 1, seed=0)


@pytest.mark.parametrize("num_batches,world_size", [(5, 2), (4, 2), (1, 4), (7, 3)])
def test_eval_assignment_covers_each_batch_once_with_equal_work(num_batches, world_size):
    assignments = [eval_assignment(num_batches, world_size, r) for r in range(world_size)]
    assert len({len(a) for a in assignments}) == 1
    counted = Counter(i for a in assignments for i, counts in a if counts)
    assert counted == Counter(range(num_batches))


def test_eval_batches_hold_every_evaluation_target():
    utterances = corpus(num_speakers=2, per_speaker=5)
    sampler = EpochSampler(utterances, [0, 1, 2, 3, 4], 30, 1000, (0, 10_000), seed=0, world_size=4, accumulation=3)
    batches = eval_micro_batches(sampler)
    assert sorted(s.target for mb in batches for s in mb) == [0, 1, 2, 3, 4]  # nothing dropped, whatever the world


def test_sample_length_adds_both_transcripts_audio_and_delay():
    target, reference = UtteranceInfo("a", 100, 12), UtteranceInfo("a", 60, 7)
    assert sample_positions(target, reference, prompt_overhead=40) == 40 + 12 + 7 + (100 + 9) + (60 + 9)


def test_one_step_problem_names_the_knob_that_helps():
    from higgs_lora.data.schedule import one_step_problem

    assert one_step_problem(32, 1, 32, 2048, 65536) is None
    message = one_step_problem(5, 1, 32, 2048, 65536)
    assert "train.global_batch_tokens=65,536" in message
    assert "lower train.global_batch_tokens to 10,240 or less" in message  # 5 micro-batches x 2048 x 1 rank
    assert "micro_batch_tokens" not in message
    assert "use fewer ranks" in one_step_problem(3, 4, 1, 2048, 0)
    assert "lower train.global_batch_tokens to 8,192" in one_step_problem(9, 4, 8, 1024, 32768)  # 2 per rank x 4


# ------------------------------------------------------------------------------------------------ replay


def replay_sampler(fraction, world_size=2, accumulation=2, replay_speakers=3, seed=5):
    main = corpus(num_speakers=5, per_speaker=40, seed=1)
    replay = [
        UtteranceInfo(f"replay:{u.speaker}", u.num_frames, u.num_text_tokens) for u in corpus(replay_speakers, 10, 2)
    ]
    utterances = main + replay
    sampler = EpochSampler(
        utterances,
        list(range(len(main))),
        prompt_overhead=30,
        micro_batch_tokens=1500,
        reference_frames=(20, 200),
        seed=seed,
        world_size=world_size,
        accumulation=accumulation,
        replay_targets=list(range(len(main), len(utterances))),
        replay_fraction=fraction,
    )
    return sampler, utterances, len(main)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("world_size,accumulation", [(1, 1), (2, 2), (4, 1)])
def test_replay_takes_its_share_of_every_step_and_references_of_its_own_speakers(fraction, world_size, accumulation):
    sampler, utterances, num_main = replay_sampler(fraction, world_size, accumulation)
    for epoch in (0, 1):
        plan = sampler.plan(epoch)
        assert plan.steps
        for step in plan.steps:
            assert len(step) == world_size * accumulation  # every rank the same number of micro-batches
            samples = [s for mb in step for s in mb]
            assert all(len(mb) * max(s.num_positions for s in mb) <= 1500 for mb in step)
            replayed = sum(s.target >= num_main for s in samples)
            assert abs(replayed - fraction * len(samples)) <= 1.5, (replayed, len(samples))
            for s in samples:  # a replay target's reference is another utterance of its own (replay) speaker
                assert s.reference != s.target
                assert utterances[s.reference].speaker == utterances[s.target].speaker
        main_targets = [s.target for step in plan.steps for mb in step for s in mb if s.target < num_main]
        assert len(main_targets) == len(set(main_targets))  # each main target at most once an epoch
        total = plan.num_samples + plan.num_dropped
        replay_total = round(200 * fraction / (1 - fraction))
        assert total + plan.num_without_reference == 200 + replay_total
    assert sampler.plan(0).steps != sampler.plan(1).steps


def test_replay_off_is_the_schedule_without_replay():
    with_zero, utterances, num_main = replay_sampler(0.0)
    plain = EpochSampler(utterances, list(range(num_main)), 30, 1500, (20, 200), seed=5, world_size=2, accumulation=2)
    assert with_zero.plan(0).steps == plain.plan(0).steps
