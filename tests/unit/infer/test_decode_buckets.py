"""The compiled decode compiles once per (batch, cache) bucket: requests of other lengths and batch sizes inside a
bucket reuse its graph, and the bucketed / compiled decode gives the eager decode's columns token for token.

The compile backend here is dynamo's with the `eager` backend behind a counter (`CompileCounterWithBackend`): what
recompiles is decided by dynamo's guards, which are the same whatever backend runs the captured graph, and inductor
would spend minutes of C++ compilation on 2 busy cores for every graph."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from higgs_lora.data.audio import load_audio
from higgs_lora.data.collate import build_prompt
from higgs_lora.infer.cloner import VoiceCloner
from higgs_lora.infer.decode import DecodeLoop, batch_bucket, batch_buckets, cache_bucket, cache_buckets
from higgs_lora.infer.sampling import SamplingParams
from higgs_lora.tiny import REPO_ROOT

CORPUS = REPO_ROOT / "examples" / "demo_corpus"


def test_buckets_are_powers_of_two_from_256_and_capped_batches():
    assert [cache_bucket(n) for n in (1, 200, 256, 257, 511, 512, 513, 3000)] == [
        256,
        256,
        256,
        512,
        512,
        512,
        1024,
        4096,
    ]
    assert [batch_bucket(n, 8) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert [batch_bucket(n, 6) for n in (3, 5, 6)] == [4, 6, 6]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert cache_buckets(1000) == [256, 512, 1024]


@pytest.fixture(scope="module")
def cloner(tiny_checkpoint):
    return VoiceCloner.load(tiny_checkpoint.model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def prompts(cloner):
    """Three prompts of different lengths."""
    result = []
    for name, target in [
        ("spk_f1/spk_f1_01", "مرحبا"),
        ("spk_m1/spk_m1_02", "كيف حالك اليوم يا صديقي"),
        ("spk_f1/spk_f1_02", "السلام عليكم ورحمة الله"),
    ]:
        reference = cloner.reference(load_audio(CORPUS / f"{name}.flac"), 24000, "نص مرجعي")
        result.append(build_prompt(cloner.processor, reference.text, reference.codes, target))
    assert len({len(p.input_ids) for p in result}) == 3
    return result


def columns(decoder, prompts, params):
    return torch.stack([c.codes for c in decoder.run(prompts, params, [None] * len(prompts))])


@pytest.mark.slow
def test_compiled_bucketed_decode_compiles_once_per_bucket_and_equals_eager(cloner, prompts):
    greedy = [SamplingParams(temperature=0, max_seconds=s) for s in (0.6, 0.9, 0.7)]
    requests = [([prompts[0]], greedy[:1]), ([prompts[1]], greedy[1:2]), ([prompts[2]], greedy[2:])]
    requests += [(prompts, greedy), (prompts[:2], greedy[:2][::-1])]  # batch 3 and 2 share no bucket: 4 and 2
    longest = max(len(p.input_ids) for p in prompts) + max(p.max_columns() for p in greedy)
    assert cache_bucket(longest) == 256  # every request lies in one cache bucket

    eager = DecodeLoop(cloner.model, cache="dynamic")
    counter = CompileCounterWithBackend("eager")
    compiled = DecodeLoop(cloner.model, cache="static", compile_step=True, max_batch=4, compile_backend=counter)
    assert compiled.bucket

    frames_after = []
    for batch, params in requests:
        expected = columns(eager, batch, params)
        got = columns(compiled, batch, params)
        assert got.shape == expected.shape and torch.equal(got, expected)
        frames_after.append(counter.frame_count)
    # The first request compiles the (1, 256) bucket, the other batch-1 requests reuse it; batch 3 (bucket 4) and
    # batch 2 each compile their own bucket once.
    assert frames_after[0] > 0
    assert frames_after[1] == frames_after[2] == frames_after[0]
    assert frames_after[3] > frames_after[2] and frames_after[4] > frames_after[3]
    per_bucket = frames_after[0]
    print(f"dynamo frames compiled per bucket: {per_bucket}; after all requests: {frames_after}")
    assert frames_after[4] == 3 * per_bucket
    # A repeat of every request compiles nothing more.
    for batch, params in requests:
        columns(compiled, batch, params)
    assert counter.frame_count == 3 * per_bucket


def test_warm_up_compiles_every_bucket_before_the_first_request(cloner, prompts):
    counter = CompileCounterWithBackend("eager")
    server = VoiceCloner(cloner.model, cloner.processor, cloner.codec, cloner.run_config, [], max_batch=2)
    assert server.warm_up(512) == []  # an eager decode has nothing to warm
    server.decoder = DecodeLoop(cloner.model, cache="static", compile_step=True, max_batch=2, compile_backend=counter)
    assert server.warm_up(512) == [(1, 256), (1, 512), (2, 256), (2, 512)]
    frames = counter.frame_count
    assert frames > 0
    greedy = [SamplingParams(temperature=0, max_seconds=s) for s in (0.6, 0.7)]
    columns(server.decoder, [prompts[1]], greedy[:1])
    columns(server.decoder, prompts[1:], greedy)
    assert counter.frame_count == frames  # served without compiling


def test_bucketed_sampling_matches_unbucketed_for_a_seed(cloner, prompts):
    """Dummy rows draw nothing: sampled requests give the same codes in a padded batch as alone."""
    params = [SamplingParams(temperature=0.8, top_k=50, seed=s, max_seconds=0.6) for s in (3, 4, 5)]

    def sampled(decoder):
        gens = [torch.Generator().manual_seed(p.seed) for p in params]
        return torch.stack([c.codes for c in decoder.run(prompts, params, gens)])

    plain = DecodeLoop(cloner.model, cache="static")
    bucketed = DecodeLoop(cloner.model, cache="static", bucket=True, max_batch=8)
    assert torch.equal(sampled(plain), sampled(bucketed))
