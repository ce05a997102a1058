"""Training through the real launchers on CPU: 2 ranks over gloo, ZeRO-2/3, LoRA and QLoRA, on the demo cache."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from higgs_lora.config import ModelConfig
from higgs_lora.constants import RUN_CONFIG
from higgs_lora.run_folder import ADAPTER, DEEPSPEED_TAG, latest_checkpoint, read_adapter_config
from tests.e2e.launch import adapter_tensors, metrics, train

pytestmark = pytest.mark.slow  # every test trains through a real launcher

FAST = ["train.lr=5e-3", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=4", "train.eval_samples=0"]


def probe_batch(model_dir, codec_dir, cache_dir):
    """A collated zero-shot batch from the cache (first two utterances of one speaker)."""
    from higgs_lora.data.cache import load_cache
    from higgs_lora.data.collate import MODEL_INPUTS, build_example, collate
    from higgs_lora.model.loading import load_processor

    processor = load_processor(ModelConfig(path=str(model_dir), codec_path=str(codec_dir)))
    rows = list(load_cache(cache_dir).select(range(2)))
    example = build_example(
        processor,
        rows[0]["text_normalized"],
        torch.tensor(rows[0]["codes"]),
        rows[1]["text_normalized"],
        torch.tensor(rows[1]["codes"]),
    )
    batch = collate([example], processor.tokenizer.pad_token_id, processor.audio_stream_eos_id)
    return {k: batch[k] for k in MODEL_INPUTS}


def assert_probe_logged(out, evals, count, dnsmos):
    """Every evaluation scored `count` generated clips, logged them to metrics.jsonl and TensorBoard, and wrote an
    inference folder `python -m higgs_lora.evaluate` reads."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from higgs_lora.eval.predictions import read_predictions

    for m in evals:
        # Each clip is scored, or flagged near-silent (clip or reference) and left unscored: the tiny random model
        # mostly makes near-silence, and silence against silence must never look like a perfect clone.
        assert m["num_scored"] + m["num_failed"] == count, m
        if m["num_scored"]:
            assert -1 <= m["similarity"] <= 1
        else:
            assert m["num_silent"] >= 1 and "similarity" not in m, m
        assert ("dnsmos_ovrl" in m) == (dnsmos and m["num_scored"] > 0) and 0 <= m["eos_fraction"] <= 1
        folder = read_predictions(out / "eval_samples" / f"step_{m['step']:08d}")
        assert not folder.problems and len(folder.predictions) == count
        assert all(p.wav.stat().st_size > 44 and p.reference_audio.is_file() for p in folder.predictions)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"audio": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("eval/num_scored")] == [0, 4, 8]
    scored = [m for m in evals if "similarity" in m]
    if scored:
        similarity = events.Scalars("eval/similarity")
        assert [e.value for e in similarity] == pytest.approx([m["similarity"] for m in scored])
    assert {f"eval_samples/{i:02d}" for i in range(count)} <= set(events.Tags()["audio"])


def overrides_value(overrides, key):
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "="))


@pytest.mark.parametrize(
    "ds,quantization",
    [
        ("zero2.json", "none"),
        ("zero2.json", "nf4"),
        ("zero3.json", "none"),
        ("zero3.json", "nf4"),
    ],
)
def test_two_ranks_train_and_write_a_working_adapter(demo_cache, tmp_path, ds, quantization):
    from peft import PeftModel
    from transformers import HiggsAudioV2ForConditionalGeneration

    out = tmp_path / "run"
    # Three held-out clips at every evaluation (steps 0, 4, 8), split over the two ranks (2 + 1), through DeepSpeed:
    # under ZeRO-3 every forward pass gathers parameters. (Here both ranks run to the length limit; a rank finishing
    # early or holding no pair is tested in tests/unit/eval/test_probe.py.) DNSMOS in one case only (its cost).
    dnsmos = ds == "zero2.json" and quantization == "none"
    probe = ["train.eval_samples=3", "train.eval_sample_seconds=1", f"train.eval_dnsmos={str(dnsmos).lower()}"]
    train(
        out,
        [*demo_cache, *FAST, *probe, "train.max_steps=8", "train.save_every=4", f"model.quantization={quantization}"],
        ds=ds,
    )

    logged = metrics(out)
    assert [m["step"] for m in logged] == list(range(1, 9))
    losses = [m["loss"] for m in logged]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses  # the loss falls on the demo corpus
    for m in logged:  # the logged loss is the sum of the per-codebook losses (same positions each)
        assert m["loss"] == pytest.approx(sum(m["per_codebook_loss"]), rel=1e-6)
        assert m["positions_per_s"] > 0 and m["audio_seconds_per_s"] > 0
    evals = metrics(out, "eval")
    assert [m["step"] for m in evals] == [0, 4, 8], "held-out speaker loss was not computed at every evaluation"
    assert_probe_logged(out, evals, count=3, dnsmos=dnsmos)
    # the run report, written at the end: training + held-out loss curves, one row per evaluation
    report = (out / "report.html").read_text(encoding="utf-8")
    loss_figure = report.split('data-plot="loss"')[1].split("</figure>")[0]
    assert loss_figure.count('class="line"') == 2
    assert [int(s) for s in re.findall(r'<tr data-step="(\d+)"', report)] == [0, 4, 8]

    adapter = out / ADAPTER
    tensors = adapter_tensors(adapter)
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    # B starts at zero: non-zero means it trained. The one exception is the last layer's text MLP: with the audio
    # loss alone, the last layer's text positions feed nothing that is scored, so its gradient is exactly zero.
    last_text_mlp = ".layers.1.mlp."
    trained = {name: bool(t.abs().sum() > 0) for name, t in tensors.items() if "lora_B" in name}
    assert trained and all(ok for name, ok in trained.items() if last_text_mlp not in name), trained
    assert not any(ok for name, ok in trained.items() if last_text_mlp in name)
    saved = read_adapter_config(adapter)
    assert saved.model.quantization == quantization and saved.train.max_steps == 8

    # Plain PEFT on plain transformers (fp32, unquantised) loads it, and it changes the model's output.
    model_dir = overrides_value(demo_cache, "model.path")
    batch = probe_batch(
        model_dir, overrides_value(demo_cache, "model.codec_path"), overrides_value(demo_cache, "data.cache_dir")
    )
    base = HiggsAudioV2ForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        before = base(**batch).logits.clone()
        adapted = PeftModel.from_pretrained(base, str(adapter)).eval()
        after = adapted(**batch).logits
    assert (after - before).abs().max() > 1e-3

    if ds == "zero3.json" and quantization == "none":
        # DeepSpeed's own consolidation of the sharded checkpoint gives the exported adapter's tensors.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        last = latest_checkpoint(out)
        consolidated = get_fp32_state_dict_from_zero_checkpoint(str(last), tag=DEEPSPEED_TAG)
        exported = adapter_tensors(last / ADAPTER)
        lora = {k: v for k, v in consolidated.items() if "lora_" in k}
        assert len(lora) == len(exported)
        for key, value in lora.items():
            peft_key = key.replace(".default.", ".")
            assert torch.equal(value.float(), exported[peft_key].float()), key


def test_checkpoints_are_complete_kept_last_k_and_carry_the_config(demo_cache, tmp_path):
    out = tmp_path / "run"
    train(
        out,
        [*demo_cache, *FAST, "train.max_steps=6", "train.save_every=2", "train.keep_last=2"],
        launcher="python",
        num_ranks=1,
    )
    root = out / "checkpoints"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["step_00000004", "step_00000006"]  # step 2 pruned, no partial directories left
    assert (root / "latest").read_text().strip() == "step_00000006"
    step = root / "step_00000006"
    assert (step / "trainer_state.json").is_file() and (step / DEEPSPEED_TAG).is_dir()
    assert (step / ADAPTER / RUN_CONFIG).is_file() and (step / ADAPTER / "NOTICE").is_file()
    # How it was trained: the plan and the DeepSpeed config DeepSpeed ran with ("auto" resolved).
    plan = json.loads((step / "plan.json").read_text())
    ds_config = json.loads((step / "ds_config.json").read_text())
    assert ds_config == json.loads((out / "ds_config.json").read_text()) and "auto" not in json.dumps(ds_config)
    assert ds_config["gradient_accumulation_steps"] == plan["accumulation"]
    assert (plan["world_size"], plan["zero_stage"]) == (1, 2)
    # The frozen base is not in the DeepSpeed state: only the adapter's tensors are.
    state = torch.load(step / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["module"] and all("lora_" in k for k in state["module"])
    saved = read_adapter_config(step / ADAPTER)
    assert saved.model.path.startswith("/") and saved.output_dir == str(out)


def test_text_loss_under_zero3_trains_the_text_path_too(demo_cache, tmp_path):
    out = tmp_path / "run"
    train(
        out,
        [
            *demo_cache,
            *FAST,
            "train.max_steps=6",
            "train.save_every=6",
            "model.use_text_head=true",
            "train.text_loss_weight=0.5",
        ],
        ds="zero3.json",
    )
    logged = metrics(out)
    assert all("text_loss" in m for m in logged)
    assert logged[-1]["text_loss"] < logged[0]["text_loss"]
    tensors = adapter_tensors(out / ADAPTER)
    # Unlike the audio-only loss, the text loss reaches the last layer's text MLP.
    last_text_mlp = [t for name, t in tensors.items() if ".layers.1.mlp." in name and "lora_B" in name]
    assert last_text_mlp and all(t.abs().sum() > 0 for t in last_text_mlp)


def test_a_pinned_budget_that_cannot_fit_stops_every_rank_before_loading(demo_cache, tmp_path):
    import subprocess

    from tests.conftest import REPO_ROOT
    from tests.e2e.launch import free_port, launcher_command, train_env

    out = tmp_path / "run"
    overrides = [f"output_dir={out}", *demo_cache, "plan.gpu_memory_gib=1", "train.micro_batch_tokens=65536"]
    result = subprocess.run(
        launcher_command("torchrun", 2, "zero2.json", overrides, free_port()),
        cwd=REPO_ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    # Both ranks report the planner's error (rank 1 gets it from rank 0), and nothing was loaded or written.
    assert result.stderr.count("does not fit 2 x 1 GiB") == 2, result.stderr[-3000:]
    assert "train.micro_batch_tokens=" in result.stderr
    assert "[train] data:" not in result.stdout and not (out / "config.yaml").exists()


def test_replay_asr_and_the_best_adapter_through_two_ranks(replay_cache, tiny_whisper, tmp_path):
    """data.replay at 25 %, train.eval_asr (tiny Whisper), keep_last=1: the evaluations log Arabic and replay
    scores side by side (loss, similarity, CER), best/ holds the rule's choice and pruning kept its checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from higgs_lora.run_folder import list_checkpoints
    from higgs_lora.train.best import RULE, is_better, scores_of

    overrides, _ = replay_cache
    out = tmp_path / "run"
    probe = ["train.eval_samples=2", "train.eval_sample_seconds=1", "train.eval_dnsmos=false"]
    result = train(
        out,
        [
            *overrides,
            *FAST,
            *probe,
            f"train.eval_asr={tiny_whisper}",
            "train.max_steps=6",
            "train.eval_every=2",
            "train.save_every=2",
            "train.keep_last=1",
        ],
    )
    evals = metrics(out, "eval")
    assert [m["step"] for m in evals] == [0, 2, 4, 6]
    for m in evals:
        for key in ("loss", "cer", "wer", "cer_ground_truth"):
            assert math.isfinite(m[key]) and math.isfinite(m[f"replay_{key}"]), (key, m)
        for key in ("similarity", "replay_similarity"):  # absent when every clip was flagged near-silent
            assert key not in m or math.isfinite(m[key]), (key, m)
        assert m["cer"] >= 0 and m["replay_positions"] > 0
    assert (out / "eval_samples_replay" / "step_00000006" / "manifest.jsonl").is_file()
    assert "main (ar) / replay (en): loss" in result.stdout and "CER " in result.stdout

    record = json.loads((out / "best" / "best.json").read_text(encoding="utf-8"))
    expected = None
    for m in evals[1:]:  # the rule over the logged evaluations (step 0 is never a candidate)
        if expected is None or is_better(scores_of(m), scores_of(expected)):
            expected = m
    assert record["step"] == expected["step"] and record["rule"] == RULE
    assert record["scores"]["cer"] == pytest.approx(expected["cer"])
    assert (out / "best" / "adapter_model.safetensors").is_file()
    kept = [p.name for p in list_checkpoints(out)]
    assert kept == sorted({f"step_{record['step']:08d}", "step_00000006"})
    assert f"best so far: step {record['step']}" in result.stdout

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("eval/replay_loss")] == [0, 2, 4, 6]
    assert [e.value for e in events.Scalars("eval/cer")] == pytest.approx([m["cer"] for m in evals])
