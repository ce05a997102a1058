"""Merging adapters from real tiny training runs (LoRA and QLoRA) through `python -m higgs_lora.merge`.

One short training run per adapter type (module-scoped), then the real entry point; the merged directory is loaded
with plain transformers (offline) and its logits compared with the adapter's on the base.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from higgs_lora.config import ModelConfig
from higgs_lora.deploy.merge import MERGE_MARKER
from higgs_lora.deploy.merge import main as merge_main
from higgs_lora.deploy.shards import INDEX_FILE, sha256_file
from higgs_lora.model.loading import resolve_codec_path
from tests.conftest import REPO_ROOT
from tests.e2e.launch import train, train_env
from tests.e2e.test_train import overrides_value, probe_batch

pytestmark = pytest.mark.slow  # every test uses an adapter from a real training run

STEPS = [
    "train.lr=5e-3",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=0",
    "train.max_steps=3",
    "train.save_every=3",
]


@pytest.fixture(scope="module")
def lora_run(demo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge-lora") / "run"
    train(out, [*demo_cache, *STEPS, "name=arabic-test"], launcher="python", num_ranks=1)
    return out


@pytest.fixture(scope="module")
def qlora_run(demo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge-qlora") / "run"
    train(out, [*demo_cache, *STEPS, "name=arabic-test", "model.quantization=nf4"], launcher="python", num_ranks=1)
    return out


def run_merge_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "higgs_lora.deploy.merge", *args],
        cwd=REPO_ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def adapter_and_base_logits(demo_cache, adapter_dir, dtype=torch.float32):
    """Logits of the adapter on the (unquantised) tiny base, via plain PEFT, on a cached training sample."""
    from peft import PeftModel
    from transformers import HiggsAudioV2ForConditionalGeneration

    model_dir = overrides_value(demo_cache, "model.path")
    batch = probe_batch(
        model_dir, overrides_value(demo_cache, "model.codec_path"), overrides_value(demo_cache, "data.cache_dir")
    )
    base = HiggsAudioV2ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        return batch, adapted(**batch).logits.float()


def plain_logits(merged_dir, batch, dtype=torch.float32):
    from transformers import HiggsAudioV2ForConditionalGeneration

    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(merged_dir), dtype=dtype).eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def test_lora_adapter_merges_into_a_plain_transformers_checkpoint(lora_run, demo_cache, tmp_path, monkeypatch):
    from transformers import AutoProcessor

    result = run_merge_cli("--adapter", str(lora_run), "--shard-size", "1MB")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = lora_run / "Higgs-Audio-2-arabic-test"  # default name: the licence prefix + the run name
    assert f"[merge] adapter: run directory {lora_run}: its final adapter" in result.stdout
    assert f"[merge] merged model: {merged}" in result.stdout
    assert "max |merged - adapter on base| = " in result.stdout and "[verify] passed" in result.stdout

    # The released layout: sharded weights with an index, config with codebook_size 1026 in bf16, generation
    # config, tokenizer, chat template, processor config, and the codec copied alongside.
    shards = sorted(merged.glob("model-*-of-*.safetensors"))
    index = json.loads((merged / INDEX_FILE).read_text())
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    config = json.loads((merged / "config.json").read_text())
    assert config["codebook_size"] == 1026 and config["dtype"] == "bfloat16"
    assert config["model_type"] == "higgs_audio_v2"
    for name in (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "audio_tokenizer/config.json",
        "audio_tokenizer/model.safetensors",
        "README.md",
    ):
        assert (merged / name).is_file(), name
    # The tiny base names no codec (a local path would go stale): the merged processor config names none either,
    # and no path of this machine is in it.
    processor_text = (merged / "processor_config.json").read_text()
    assert "audio_tokenizer" not in json.loads(processor_text) and str(tmp_path.parents[1]) not in processor_text
    notice = (merged / "NOTICE").read_text()
    assert "Higgs Audio 2" in notice and "Meta Llama 3" in notice and "Copyright (c) Meta Platforms" in notice
    record = json.loads((merged / MERGE_MARKER).read_text())
    assert record["adapter"] == str(lora_run / "adapter") and record["dtype"] == "bf16"
    # The prompt settings travel with the merged model (inference reads its higgs_lora.yaml) and are on record.
    from higgs_lora.config import load_config

    trained = load_config(lora_run / "adapter" / "higgs_lora.yaml").data.prompt_settings()
    assert load_config(merged / "higgs_lora.yaml").data.prompt_settings() == record["prompt"] == trained
    assert record["adapter_sha256"]["adapter_model.safetensors"] == sha256_file(
        lora_run / "adapter" / "adapter_model.safetensors"
    )
    assert record["merged_weights"] == 20  # 2 layers x (q, k, v, o + gate, up, down of both MLPs)
    assert record["weights_sha256"] == {s.name: sha256_file(s) for s in shards}
    report = record["verification"]
    assert report["passed"] and report["merged_vs_adapter"] < 0.1 * report["adapter_effect"]
    assert report["merged_vs_adapter_mean"] < 0.05 * report["adapter_effect_mean"]
    assert not list(lora_run.glob(".*partial"))

    # Plain transformers, offline (conftest), no project code: the model and the processor with its codec.
    batch, adapter_logits = adapter_and_base_logits(demo_cache, lora_run / "adapter", torch.bfloat16)
    merged_logits = plain_logits(merged, batch, torch.bfloat16)
    _, fp32_reference = adapter_and_base_logits(demo_cache, lora_run / "adapter")
    merge_error = float((merged_logits - adapter_logits).abs().max())
    base_logits = plain_logits(overrides_value(demo_cache, "model.path"), batch)
    adapter_effect = float((fp32_reference - base_logits).abs().max())
    assert merge_error < 0.05 * adapter_effect, (merge_error, adapter_effect)
    # Copied elsewhere and loaded from another directory: plain transformers with the folder's own codec copy, and
    # our loader, which takes that copy by itself (even with another codec beside the folder).
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(merged, moved)
    shutil.copytree(merged / "audio_tokenizer", moved.parent / "codec")
    monkeypatch.chdir(tmp_path / "elsewhere")
    from transformers import HiggsAudioV2TokenizerModel

    codec = HiggsAudioV2TokenizerModel.from_pretrained(str(moved / "audio_tokenizer"))
    processor = AutoProcessor.from_pretrained(str(moved), audio_tokenizer=codec)
    assert processor.audio_tokenizer is codec and processor.audio_token_id == config["audio_token_id"]
    assert resolve_codec_path(ModelConfig(path=str(moved))) == moved / "audio_tokenizer"
    # A processor config an older version wrote (the codec's absolute path, now stale) does not mislead our loader.
    stale = json.loads((moved / "processor_config.json").read_text())
    stale["audio_tokenizer"] = {"audio_tokenizer_name_or_path": str(tmp_path / "gone")}
    (moved / "processor_config.json").write_text(json.dumps(stale))
    assert resolve_codec_path(ModelConfig(path=str(moved))) == moved / "audio_tokenizer"


PLAIN_LOAD = """
import sys
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained(sys.argv[1])
codec = processor.audio_tokenizer
print(type(codec).__name__, repr(sum(float(p.double().sum()) for p in codec.parameters())))
"""


def hub_cache_with(codec_dir, repo_id, cache):
    """`cache` laid out as huggingface_hub's cache holding `codec_dir` as a snapshot of `repo_id`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(codec_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def test_a_moved_merged_folder_loads_with_plain_autoprocessor(lora_run, demo_cache, tmp_path):
    """A base whose processor config names its codec by Hub id (as the released one does): the merged folder keeps
    the id, so after a move to another machine plain `AutoProcessor.from_pretrained(folder)` finds the codec where
    the released model's would be (the Hub or its cache; here an offline cache)."""
    from transformers import HiggsAudioV2TokenizerModel

    repo_id = "higgs-lora-tests/tiny-codec"
    codec_dir = overrides_value(demo_cache, "model.codec_path")
    base = tmp_path / "hub-base"
    shutil.copytree(overrides_value(demo_cache, "model.path"), base)
    settings = json.loads((base / "processor_config.json").read_text())
    settings["audio_tokenizer"] = {
        "audio_tokenizer_class": "HiggsAudioV2TokenizerModel",
        "audio_tokenizer_name_or_path": repo_id,
    }
    (base / "processor_config.json").write_text(json.dumps(settings))
    out = tmp_path / "machine-a" / "Higgs-Audio-2-hub"
    args = ["--adapter", str(lora_run), "--base", str(base), "--codec", codec_dir, "--out", str(out), "--no-verify"]
    assert merge_main([*args, "--dtype", "fp32"]) == 0
    reference = json.loads((out / "processor_config.json").read_text())["audio_tokenizer"]
    assert reference == {"audio_tokenizer_class": "HiggsAudioV2TokenizerModel", "audio_tokenizer_name_or_path": repo_id}

    moved = tmp_path / "machine-b" / "models" / "Higgs-Audio-2-hub"
    moved.parent.mkdir(parents=True)
    shutil.move(out, moved)
    shutil.rmtree(base)  # nothing of machine A is left to find
    cache = hub_cache_with(moved / "audio_tokenizer", repo_id, tmp_path / "machine-b" / "hf-cache")
    env = {**train_env(), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(moved)],
        cwd=tmp_path / "machine-b",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name, checksum = result.stdout.split()[-2:]
    codec = HiggsAudioV2TokenizerModel.from_pretrained(codec_dir)
    assert name == "HiggsAudioV2TokenizerModel"
    assert float(checksum) == sum(float(p.double().sum()) for p in codec.parameters())
    assert resolve_codec_path(ModelConfig(path=str(moved))) == moved / "audio_tokenizer"  # ours needs no cache


def test_fp32_merge_reproduces_the_adapter_exactly(lora_run, demo_cache, tmp_path):
    out = tmp_path / "Higgs-Audio-2-fp32"
    step = lora_run / "checkpoints" / "step_00000003"
    assert merge_main(["--adapter", str(step), "--out", str(out), "--dtype", "fp32", "--no-verify"]) == 0
    assert json.loads((out / MERGE_MARKER).read_text())["adapter_step"] == 3
    batch, adapter_logits = adapter_and_base_logits(demo_cache, step / "adapter")
    assert float((plain_logits(out, batch) - adapter_logits).abs().max()) < 1e-4


def test_merged_directories_and_busy_outputs_are_refused(lora_run, tmp_path, capsys):
    merged = lora_run / "Higgs-Audio-2-arabic-test"
    if not merged.is_dir():  # made by the first test; make it here when run alone
        assert merge_main(["--adapter", str(lora_run), "--no-verify"]) == 0
    capsys.readouterr()
    assert merge_main(["--adapter", str(merged)]) == 2
    assert "already a merged model" in capsys.readouterr().err
    assert merge_main(["--adapter", str(lora_run), "--base", str(merged), "--out", str(tmp_path / "x")]) == 2
    assert "already contains this adapter" in capsys.readouterr().err
    before = sha256_file(merged / MERGE_MARKER)
    assert merge_main(["--adapter", str(lora_run), "--no-verify"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and sha256_file(merged / MERGE_MARKER) == before
    assert merge_main(["--adapter", str(lora_run), "--shard-size", "lots"]) == 2
    assert "--shard-size" in capsys.readouterr().err


def test_qlora_adapter_merges_into_the_full_precision_base(qlora_run, demo_cache):
    result = run_merge_cli("--adapter", str(qlora_run))
    assert result.returncode == 0, result.stderr[-3000:]
    merged = qlora_run / "Higgs-Audio-2-arabic-test"
    assert "QLoRA: max |merged - adapter on the NF4 base" in result.stdout
    report = json.loads((merged / MERGE_MARKER).read_text())["verification"]
    assert report["passed"] and json.loads((merged / MERGE_MARKER).read_text())["trained_quantization"] == "nf4"
    # Merged into bf16, the model matches the adapter on the bf16 base; the NF4 base it was trained against differs
    # by the base's quantisation error, which is far larger than the merge's rounding.
    assert report["merged_vs_adapter"] < 0.1 * report["adapter_effect"]
    assert report["merged_vs_nf4_adapter"] > 3 * report["merged_vs_adapter"]
    batch, adapter_logits = adapter_and_base_logits(demo_cache, qlora_run / "adapter", torch.bfloat16)
    merge_error = float((plain_logits(merged, batch, torch.bfloat16) - adapter_logits).abs().max())
    assert merge_error < 0.1 * report["adapter_effect"]


def test_a_wrong_merge_fails_the_check_and_publishes_nothing(lora_run, tmp_path, monkeypatch, capsys):
    import dataclasses

    import higgs_lora.deploy.merge as merge

    real = merge.merge_weight
    monkeypatch.setattr(
        merge,
        "merge_weight",  # a scale bug: half of every update
        lambda weight, delta, *a: real(weight, dataclasses.replace(delta, scale=delta.scale / 2), *a),
    )
    out = tmp_path / "Higgs-Audio-2-wrong"
    assert merge_main(["--adapter", str(lora_run), "--out", str(out)]) == 1
    assert "verification failed, nothing was written" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
