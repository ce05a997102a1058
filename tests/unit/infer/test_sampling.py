"""Delay-pattern constraints, per-codebook filtering and repetition-aware sampling (pure tensor code)."""

import pytest
import torch

from higgs_lora.infer.decode import columns_to_codes
from higgs_lora.infer.sampling import DelayConstraints, SamplingParams, choose_codes, filter_logits, make_generator
from higgs_lora.text.arabic import split_sentences

BOS, EOS, K, V = 1024, 1025, 8, 1026


def test_bos_is_forced_for_codebook_k_during_the_first_k_plus_one_steps():
    constraints = DelayConstraints(1, K, BOS, EOS, torch.device("cpu"))
    for step in range(K + 1):
        bos, eos = constraints.forced()
        assert bos[0].tolist() == [k >= step for k in range(K)]
        assert not eos.any()
        constraints.advance(torch.zeros(1, K, dtype=torch.long))


def test_first_eos_starts_a_countdown_that_closes_codebooks_in_order():
    constraints = DelayConstraints(2, K, BOS, EOS, torch.device("cpu"))
    for _ in range(K + 1):
        constraints.advance(torch.zeros(2, K, dtype=torch.long))
    codes = torch.zeros(2, K, dtype=torch.long)
    codes[0, 3] = EOS  # stream 0: codebook 3 emits EOS first; stream 1 goes on
    constraints.advance(codes)
    for j in range(1, K + 1):
        _, eos = constraints.forced()
        assert eos[0].tolist() == [k < j for k in range(K)]
        assert not eos[1].any()
        finished = constraints.advance(torch.where(eos, EOS, 0))
        assert bool(finished[0]) == (j == K)


def test_constrained_logits_leave_only_the_forced_id():
    constraints = DelayConstraints(1, K, BOS, EOS, torch.device("cpu"))
    logits = torch.randn(1, K, V)
    chosen = constraints.apply(logits).argmax(-1)
    assert chosen.tolist() == [[BOS] * K]  # step 0: every codebook starts with BOS


def test_top_k_and_top_p_act_per_codebook():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = filter_logits(logits, 1.0, 2, 1.0) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = filter_logits(logits, 1.0, 0, 0.7) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]  # 0.5 + 0.3 reaches 0.7
    kept = filter_logits(logits, 1.0, 0, 0.4) > torch.finfo(torch.float32).min
    assert kept.sum(-1).tolist() == [1, 1]  # the most likely code always stays


def test_sampling_is_reproducible_per_seed_and_greedy_is_argmax():
    constraints = DelayConstraints(1, K, BOS, EOS, torch.device("cpu"))
    constraints.step = K + 1  # past the BOS phase
    logits = torch.randn(1, K, V, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, top_k=0, top_p=1.0)]

    def draw(seed):
        return choose_codes(logits, constraints, params, [make_generator(seed, torch.device("cpu"))], None)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    greedy = choose_codes(logits, constraints, [SamplingParams(temperature=0)], [None], None)
    assert torch.equal(greedy, logits.argmax(-1))


def test_repetition_aware_sampling_redraws_a_code_repeated_in_the_window():
    constraints = DelayConstraints(1, K, BOS, EOS, torch.device("cpu"))
    constraints.step = K + 1
    logits = torch.full((1, K, V), -30.0)
    logits[..., 7] = 30.0  # code 7 is all but certain at low temperature
    logits[..., 9] = 29.0  # ... code 9 close behind in the untempered distribution
    history = torch.full((1, 7, K), 7)
    params = [SamplingParams(temperature=0.1, top_k=1, ras_window=7, ras_max_repeats=2)]
    generators = [make_generator(0, torch.device("cpu"))]
    redrawn = choose_codes(logits, constraints, params, generators, history)
    assert (redrawn != 7).any()  # code 7 occurs 7 times in the window: it is re-drawn from the plain softmax
    plain = choose_codes(
        logits, constraints, [SamplingParams(temperature=0.1, top_k=1, ras_window=0)], generators, history
    )
    assert (plain == 7).all()


def test_sampling_params_problems_name_the_setting():
    assert SamplingParams().problems() == []
    problems = SamplingParams(temperature=-1, top_p=0, max_seconds=0).problems()
    assert len(problems) == 3 and "temperature" in problems[0]
    assert SamplingParams(max_seconds=2).max_columns() == 59  # 50 frames + the 9 columns of the delay pattern


def test_columns_to_codes_reverts_the_delay_pattern_and_repairs_stray_ids():
    from higgs_lora.data.collate import build_delay_pattern

    codes = torch.randint(0, 1024, (K, 12), generator=torch.Generator().manual_seed(0))
    columns = build_delay_pattern(codes, BOS, EOS).T  # (L, K) as generated
    reverted, repaired = columns_to_codes(columns, BOS, EOS)
    assert torch.equal(reverted, codes) and repaired == 0
    columns[5, 2] = EOS  # a stray EOS inside codebook 2's codes (frame 2)
    reverted, repaired = columns_to_codes(columns, BOS, EOS)
    assert repaired == 1 and reverted[2, 2] == codes[2, 1]
    partial, _ = columns_to_codes(build_delay_pattern(codes, BOS, EOS).T[:15], BOS, EOS)  # cut at a length limit
    assert torch.equal(partial, codes[:, :7])  # 15 columns hold 7 complete frames


@pytest.mark.parametrize(
    "text, max_chars, expected",
    [
        ("مرحبا بكم. كيف حالكم؟", 200, ["مرحبا بكم. كيف حالكم؟"]),
        ("مرحبا بكم. كيف حالكم؟", 12, ["مرحبا بكم.", "كيف حالكم؟"]),
        ("أولا، ثانيا؛ ثالثا! رابعا", 14, ["أولا، ثانيا؛", "ثالثا! رابعا"]),
        ("سطر أول\nسطر ثان", 200, ["سطر أول سطر ثان"]),
        ("سطر أول\nسطر ثان", 8, ["سطر أول", "سطر ثان"]),
        ("كلمة " * 10, 20, ["كلمة كلمة كلمة كلمة", "كلمة كلمة كلمة كلمة", "كلمة كلمة"]),
        ("   ", 200, []),
    ],
)
def test_split_sentences(text, max_chars, expected):
    assert split_sentences(text, max_chars) == expected
