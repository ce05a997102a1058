"""The inference core on the tiny model: greedy equals transformers' generate, batching, caches, streaming,
long text, adapters switched per request."""

import numpy as np
import pytest
import torch

from higgs_lora.data.audio import load_audio
from higgs_lora.data.collate import build_prompt
from higgs_lora.infer.cloner import CloneRequest, InferenceError, VoiceCloner
from higgs_lora.infer.decode import DecodeLoop
from higgs_lora.infer.sampling import SamplingParams
from higgs_lora.infer.streaming_codec import StreamingCodec, StreamSettings, decode_codes
from higgs_lora.tiny import REPO_ROOT

CORPUS = REPO_ROOT / "examples" / "demo_corpus"
REFERENCE = str(CORPUS / "spk_f1" / "spk_f1_01.flac")
REFERENCE_TEXT = "تَشْرَبُ الجَدَّةُ الشَّايَ فِي الحَدِيقَةِ"


@pytest.fixture(scope="module")
def cloner(tiny_checkpoint):
    return VoiceCloner.load(tiny_checkpoint.model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def prompts(cloner):
    result = []
    for name, target in [("spk_f1/spk_f1_01", "مرحبا بكم"), ("spk_m1/spk_m1_02", "كيف حالك اليوم يا صديقي")]:
        reference = cloner.reference(load_audio(CORPUS / f"{name}.flac"), 24000, "نص مرجعي")
        # scene '': the prompt these settings were picked for (the tiny model ends it by EOS); any scene has the
        # same layout (tests/unit/data/test_prompt.py), the random model's output is what differs
        result.append(build_prompt(cloner.processor, reference.text, reference.codes, target, ""))
    return result


def hf_generate(model, prompt, max_new_tokens):
    audio_mask = torch.ones(1, prompt.audio_input_ids.shape[0], dtype=torch.bool)
    out = model.generate(
        input_ids=prompt.input_ids[None],
        attention_mask=torch.ones_like(prompt.input_ids)[None],
        audio_input_ids=prompt.audio_input_ids[None],
        audio_input_ids_mask=audio_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return out[0, prompt.audio_input_ids.shape[0] :]


def run_columns(decoder, prompts, params):
    return torch.stack([c.codes for c in decoder.run(prompts, [params] * len(prompts), [None] * len(prompts))])


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_equals_transformers_generate_frame_for_frame(cloner, prompts, cache):
    params = SamplingParams(temperature=0, max_seconds=4)
    decoder = DecodeLoop(cloner.model, cache=cache)
    batched = run_columns(decoder, prompts, params)  # (L, B, K): both prompts in one left-padded batch
    for row, prompt in enumerate(prompts):
        expected = hf_generate(cloner.model, prompt, params.max_columns())
        alone = run_columns(decoder, [prompt], params)[:, 0]
        assert torch.equal(alone, expected), f"row {row}: {(alone != expected).sum()} ids differ"
        assert torch.equal(batched[: len(expected), row], expected)
    assert (expected[-1] == cloner.decoder.spec.eos_id).all()  # the greedy run ended by EOS, not by the limit


def test_streamed_chunks_join_to_the_whole_decode(cloner):
    codes = torch.randint(0, 1024, (8, 83), generator=torch.Generator().manual_seed(0))
    whole = decode_codes(cloner.codec, codes)
    decoder = StreamingCodec(cloner.codec, StreamSettings())
    chunks = []
    for t in range(1, 84):  # codes arrive one frame at a time
        chunks += decoder.push(codes[:, :t])
    chunks.append(decoder.finish(codes))
    assert len(chunks) >= 4 and len(chunks[0]) == 10 * 960
    joined = np.concatenate(chunks)
    assert len(joined) == len(whole) == 83 * 960
    assert np.abs(joined - whole).max() < 1e-3 * np.abs(whole).max()
    naive = np.concatenate([decode_codes(cloner.codec, codes[:, s : s + 25]) for s in range(0, 83, 25)])
    assert np.abs(naive - whole).max() > 10 * np.abs(joined - whole).max()  # without context the seams differ


@pytest.mark.slow
def test_streaming_and_whole_clone_give_the_same_audio_for_a_seed(cloner):
    params = SamplingParams(temperature=0.7, seed=11, max_seconds=3)
    request = cloner.request(REFERENCE, REFERENCE_TEXT, "الطقس اليوم معتدل. مع رياح خفيفة", params)
    whole = cloner.clone_batch([request])[0]
    chunks = list(cloner.events([request], stream=True))
    audio = [c.samples for c in chunks if c.result is None and len(c.samples)]
    streamed = chunks[-1].result
    assert len(audio) >= 2 and streamed.seed == whole.seed == 11
    joined = np.concatenate(audio)
    assert len(joined) == len(whole.waveform)
    assert np.abs(joined - whole.waveform).max() < 1e-3 * max(np.abs(whole.waveform).max(), 1e-6)
    assert streamed.first_audio_seconds is not None and streamed.first_audio_seconds <= streamed.seconds_taken
    again = cloner.clone_batch([request])[0]
    assert np.array_equal(again.waveform, whole.waveform)  # same seed, same audio


def test_long_text_is_spoken_piece_by_piece_in_one_voice(cloner):
    sentence = "جملة قصيرة للاختبار"
    text = "، ".join([sentence] * 14)  # 14 clauses, ~300 characters: two pieces of at most 200
    result = cloner.clone(REFERENCE, REFERENCE_TEXT, text, SamplingParams(temperature=0, max_seconds=1))
    assert len(result.pieces) == 2 and all(len(p) <= 200 for p in result.pieces)
    assert len(result.stops) == 2
    pause = int(0.15 * 24000)
    assert len(result.waveform) == result.frames * 960 + pause


@pytest.mark.slow
def test_batched_requests_match_single_requests(cloner):
    params = SamplingParams(temperature=0, max_seconds=2)
    requests = [cloner.request(REFERENCE, REFERENCE_TEXT, text, params) for text in ("مرحبا", "كيف الحال اليوم")]
    together = cloner.clone_batch(requests)
    for request, result in zip(requests, together):
        assert np.allclose(cloner.clone_batch([request])[0].waveform, result.waveform, atol=1e-5)


def test_bad_requests_are_refused_with_the_reason(cloner):
    with pytest.raises(InferenceError, match="file not found"):
        cloner.request("/nonexistent.wav", "نص", "هدف")
    request = CloneRequest(np.zeros(24000, dtype=np.float32), 24000, "نص", "هدف")
    with pytest.raises(InferenceError, match="reference audio: RMS"):
        cloner.prepare(request)
    with pytest.raises(InferenceError, match="target text is empty.*unknown adapter"):
        cloner.check(CloneRequest(np.ones(10, dtype=np.float32), 24000, "نص", " ", adapter="nope"))


@pytest.fixture(scope="module")
def two_adapters(tiny_checkpoint, tmp_path_factory):
    """Two random LoRA adapters on the tiny base, saved in PEFT format with a run config beside them."""
    from peft import LoraConfig, get_peft_model

    from higgs_lora.config import ModelConfig, RunConfig, save_config
    from higgs_lora.model.loading import load_base_model

    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for seed, name in [(1, "voice_a"), (2, "voice_b")]:
        base = load_base_model(ModelConfig(path=str(tiny_checkpoint.model_dir), dtype="fp32"))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        model.save_pretrained(root / name)
        cfg = RunConfig()
        cfg.model.path = str(tiny_checkpoint.model_dir)
        save_config(cfg, root / name / "higgs_lora.yaml")
        paths[name] = str(root / name)
    return paths


@pytest.mark.slow
def test_adapters_are_switched_per_request_without_reloading(tiny_checkpoint, two_adapters, cloner):
    both = VoiceCloner.load(tiny_checkpoint.model_dir, adapters=two_adapters, device="cpu", dtype="fp32")
    assert both.adapters == ["voice_a", "voice_b"]
    params = SamplingParams(temperature=0, max_seconds=2)
    requests = [
        both.request(REFERENCE, REFERENCE_TEXT, "مرحبا بكم", params, adapter=a)
        for a in ("voice_a", None, "voice_b", "voice_a")
    ]
    results = both.clone_batch(requests)
    only_a = VoiceCloner.load(two_adapters["voice_a"], device="cpu", dtype="fp32")  # adapter dir: base from config
    expected_a = only_a.clone(REFERENCE, REFERENCE_TEXT, "مرحبا بكم", params, adapter="voice_a")
    expected_base = cloner.clone(REFERENCE, REFERENCE_TEXT, "مرحبا بكم", params)
    assert np.array_equal(results[0].waveform, expected_a.waveform)
    assert np.array_equal(results[3].waveform, expected_a.waveform)
    assert np.array_equal(results[1].waveform, expected_base.waveform)
    assert not np.array_equal(results[2].waveform, results[0].waveform)
    assert not np.array_equal(results[0].waveform, results[1].waveform)


def test_the_queue_batches_concurrent_requests_and_refuses_beyond_its_limit(cloner):
    import asyncio
    import threading

    from higgs_lora.serve.batch_queue import BatchQueue, QueueFull

    params = SamplingParams(temperature=0, max_seconds=1)
    requests = [cloner.request(REFERENCE, REFERENCE_TEXT, text, params) for text in ("مرحبا", "أهلا", "شكرا")]

    class HeldQueue(BatchQueue):
        """The worker waits for `release` before it collects a batch: the requests below all arrive while it is
        busy, whatever the timing, and no collection window is needed to batch them (wait_seconds=0)."""

        release = threading.Event()

        def _collect(self):
            self.release.wait()
            return super()._collect()

    async def run():
        queue = HeldQueue(cloner, max_pending=3, wait_seconds=0)
        try:
            tickets = [queue.submit(r) for r in requests]
            with pytest.raises(QueueFull, match="limit 3"):
                queue.submit(requests[0])
        finally:
            queue.release.set()
        results = []
        for ticket in tickets:
            while not hasattr(item := await ticket.chunks.get(), "waveform"):
                assert isinstance(item, np.ndarray)
            results.append(item)
        queue.close()
        return queue, results

    queue, results = asyncio.run(run())
    assert queue.batches_run == 1 and queue.largest_batch == 3 and queue.pending == 0
    expected = cloner.clone_batch(requests)
    for got, want in zip(results, expected):
        assert np.allclose(got.waveform, want.waveform, atol=1e-4)
