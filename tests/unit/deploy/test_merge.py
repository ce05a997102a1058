"""Merge parts without training: LoRA arithmetic against PEFT's own merge, refusals, shards, adapter discovery."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from higgs_lora.deploy.lora_weights import AdapterError, LoraDelta, check_targets, lora_deltas, merge_weight
from higgs_lora.deploy.merge import merge_into_shards
from higgs_lora.deploy.merge_plan import MERGE_MARKER, MergeError, licence_name, locate_adapter, plan_merge
from higgs_lora.deploy.shards import (
    INDEX_FILE,
    SINGLE_FILE,
    ShardWriter,
    TensorSpec,
    dtype_code,
    iter_tensors,
    parse_size,
    weight_files,
)
from higgs_lora.deploy.verify import logits_report


def random_peft_adapter(tiny, out, use_rslora=False):
    """A PEFT LoRA adapter on the tiny model with random (non-zero) A and B, saved to `out`; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model
    from transformers import HiggsAudioV2ForConditionalGeneration

    base = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(tiny.model_dir), use_text_head=True)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=use_rslora)
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(str(out))
    return model


@pytest.mark.parametrize("use_rslora", [False, True])
def test_streamed_merge_equals_peft_merge_and_unload(tiny_checkpoint, tmp_path, use_rslora):
    model = random_peft_adapter(tiny_checkpoint, tmp_path / "adapter", use_rslora)
    expected = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    from safetensors.torch import load_file

    deltas = lora_deltas(
        load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")),
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()),
    )
    assert sorted(deltas) == sorted(  # down_proj names both the text and the audio MLP's
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "audio_mlp.down_proj")
    )
    result = merge_into_shards(tiny_checkpoint.model_dir, deltas, tmp_path / "merged", "fp32", max_shard_bytes=10**6)
    merged = dict(iter_tensors(tmp_path / "merged"))
    assert set(merged) == set(expected) and result.num_merged == len(deltas)
    changed = 0
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=2e-6, msg=name)
        changed += not torch.equal(tensor, dict(iter_tensors(tiny_checkpoint.model_dir))[name])
    assert changed == len(deltas)


def test_merge_weight_adds_the_scaled_update_in_float32():
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    weight = torch.randn(3, 5)
    delta = LoraDelta(a=a, b=b, scale=0.5)
    torch.testing.assert_close(merge_weight(weight, delta, torch.float32), weight + 0.5 * b @ a)
    assert merge_weight(weight, delta, torch.bfloat16).dtype == torch.bfloat16
    transposed = LoraDelta(a=a, b=b, scale=0.5, fan_in_fan_out=True)
    assert transposed.shape == (5, 3)
    torch.testing.assert_close(merge_weight(weight.T, transposed, torch.float32), weight.T + 0.5 * (b @ a).T)


@pytest.mark.parametrize(
    "tensors,config,message",
    [
        ({"base_model.model.x.lora_A.weight": torch.ones(2, 3)}, {"lora_alpha": 4}, "lora_B is missing"),
        (
            {
                "base_model.model.x.lora_A.weight": torch.ones(2, 3),
                "base_model.model.x.lora_B.weight": torch.ones(4, 3),
            },
            {"lora_alpha": 4},
            "do not multiply",
        ),
        ({"base_model.model.x.lora_embedding_A": torch.ones(2, 3)}, {"lora_alpha": 4}, "not a LoRA A/B weight"),
        (
            {
                "base_model.model.x.lora_A.weight": torch.full((2, 3), float("nan")),
                "base_model.model.x.lora_B.weight": torch.ones(4, 2),
            },
            {"lora_alpha": 4},
            "NaN or inf.*earlier checkpoint",
        ),
        ({}, {"lora_alpha": 4, "use_dora": True}, "DoRA"),
        ({}, {"lora_alpha": 4, "modules_to_save": ["audio_lm_head"]}, "modules_to_save"),
        ({}, {"lora_alpha": 4}, "holds no LoRA weights"),
        ({}, {"peft_type": "IA3", "lora_alpha": 4}, "only LoRA"),
    ],
)
def test_unsupported_or_broken_adapters_are_refused_by_name(tensors, config, message):
    with pytest.raises(AdapterError, match=message):
        lora_deltas(tensors, config)


def test_every_adapter_problem_is_reported_at_once():
    tensors = {
        "base_model.model.x.lora_A.weight": torch.ones(2, 3),
        "base_model.model.y.lora_B.weight": torch.ones(2, 2),
        "stray": torch.ones(1),
    }
    with pytest.raises(AdapterError) as err:
        lora_deltas(tensors, {"lora_alpha": 4, "use_dora": True})
    text = str(err.value)
    assert all(s in text for s in ("DoRA", "stray", "x: lora_B is missing", "y: lora_A is missing"))


def test_targets_must_exist_in_the_base_with_the_right_shape():
    delta = LoraDelta(a=torch.ones(2, 5), b=torch.ones(3, 2), scale=1.0)
    assert check_targets({"w.weight": delta}, {"w.weight": (3, 5)}) == []
    assert "no such weight" in check_targets({"v.weight": delta}, {"w.weight": (3, 5)})[0]
    assert "different model" in check_targets({"w.weight": delta}, {"w.weight": (5, 3)})[0]


def test_non_finite_merged_weights_are_refused_by_name(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "base"
    tensors = dict(iter_tensors(tiny_checkpoint.model_dir))
    tensors["model.norm.weight"][0] = float("inf")
    base.mkdir()
    save_file(tensors, str(base / SINGLE_FILE))
    delta = LoraDelta(a=torch.ones(1, 64), b=torch.ones(64, 1), scale=1.0)
    with pytest.raises(MergeError, match=r"1 merged tensors hold NaN or inf \(model.norm.weight\)"):
        merge_into_shards(base, {"model.layers.0.self_attn.q_proj.weight": delta}, tmp_path / "out", "bf16")
    # a finite float32 weight that overflows the output dtype is caught the same way
    tensors["model.norm.weight"][0] = 1e5
    save_file(tensors, str(base / SINGLE_FILE))
    with pytest.raises(MergeError, match="model.norm.weight.*--dtype fp16"):
        merge_into_shards(base, {}, tmp_path / "out2", "fp16")


# -------------------------------------------------------------------------------------------------- shards


def specs_of(tensors):
    return [TensorSpec(name, dtype_code(t.dtype), tuple(t.shape)) for name, t in tensors.items()]


def test_shard_writer_places_tensors_by_plan_in_any_order_and_indexes_them(tmp_path):
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(7)}  # 1000 bytes each
    tensors["bf16"] = torch.randn(3, 5).to(torch.bfloat16)
    tensors["ints"] = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    tensors["empty"] = torch.zeros(0, 4)
    writer = ShardWriter(tmp_path / "many", specs_of(tensors), max_shard_bytes=2500)
    for name in reversed(list(tensors)):  # written out of order: offsets are planned
        writer.add(name, tensors[name])
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "many" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 7000 + 30 + 48 and set(index["weight_map"]) == set(tensors)
    assert weight_files(tmp_path / "many") == files
    # Read back by the reference implementation (and by our reader): the same names, dtypes and values.
    from safetensors.torch import load_file

    for reader in ({k: v for f in files for k, v in load_file(str(f)).items()}, dict(iter_tensors(tmp_path / "many"))):
        assert reader.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert reader[name].dtype == tensor.dtype and torch.equal(reader[name], tensor), name


def test_shard_writer_refuses_what_the_plan_does_not_say(tmp_path):
    single = ShardWriter(tmp_path / "one", [TensorSpec("w", "F32", (10,))], max_shard_bytes=10**6)
    with pytest.raises(ValueError, match="does not match the plan"):
        single.add("w", torch.zeros(10, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not in the plan"):
        single.add("v", torch.zeros(10))
    with pytest.raises(ValueError, match="never written: w"):
        single.close()
    single.add("w", torch.zeros(10))
    with pytest.raises(ValueError, match="written twice"):
        single.add("w", torch.zeros(10))
    assert [f.name for f in single.close()] == [SINGLE_FILE] and not (tmp_path / "one" / INDEX_FILE).exists()


@pytest.mark.parametrize("text,size", [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20), ("1024", 1024), ("1.5kb", 1500)])
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "two GB", "0", "-1GB", "5TB"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="size|more than 0"):
        parse_size(text)


# ------------------------------------------------------------------------------------------- adapter lookup


def fake_run(tmp_path, final=True):
    """A training output directory as checkpoint.py lays it out (adapter files are placeholders)."""
    run = tmp_path / "run"
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        (ckpt / "adapter").mkdir(parents=True)
        (ckpt / "deepspeed").mkdir()
        (ckpt / "trainer_state.json").write_text("{}")
        (ckpt / "adapter" / "adapter_config.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    if final:
        shutil.copytree(run / "checkpoints" / "step_00000004" / "adapter", run / "adapter")
    return run


def test_adapter_is_found_from_a_run_a_checkpoint_or_itself(tmp_path):
    run = fake_run(tmp_path)
    found = locate_adapter(run)
    assert found.path == run / "adapter" and found.run_dir == run and found.step is None
    assert "final adapter" in found.how
    step = run / "checkpoints" / "step_00000002"
    found = locate_adapter(step)
    assert found.path == step / "adapter" and found.run_dir == run and found.step == 2
    found = locate_adapter(step / "adapter")
    assert found.path == step / "adapter" and found.run_dir == run and found.step == 2
    shutil.rmtree(run / "adapter")
    found = locate_adapter(run)
    assert found.path == run / "checkpoints" / "step_00000004" / "adapter" and found.step == 4
    assert "newest checkpoint" in found.how


def test_nothing_to_merge_says_what_to_give(tmp_path):
    with pytest.raises(MergeError, match="no such directory"):
        locate_adapter(tmp_path / "absent")
    with pytest.raises(MergeError, match="found no adapter there.*checkpoints/latest"):
        locate_adapter(tmp_path)
    (tmp_path / MERGE_MARKER).write_text(json.dumps({"adapter": "/a", "base": "/b"}))
    with pytest.raises(MergeError, match="already a merged model.*adapter /a into base /b"):
        locate_adapter(tmp_path)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("arabic-lora", "Higgs-Audio-2-arabic-lora"),
        ("Higgs-Audio-2-demo-lora", "Higgs-Audio-2-demo-lora"),
        ("higgs_audio_2 ar voice", "Higgs-Audio-2-ar-voice"),
        ("my run/ä", "Higgs-Audio-2-my-run"),
        ("Higgs-Audio-2", "Higgs-Audio-2-fine-tune"),
    ],
)
def test_default_names_carry_the_licence_prefix_once(name, expected):
    assert licence_name(name) == expected


def test_out_must_not_clobber_inputs_or_a_non_empty_directory(tiny_checkpoint, tmp_path):
    model = random_peft_adapter(tiny_checkpoint, tmp_path / "adapter")
    del model
    from higgs_lora.config import ModelConfig, RunConfig, save_config

    cfg = RunConfig(
        name="ar", model=ModelConfig(path=str(tiny_checkpoint.model_dir), codec_path=str(tiny_checkpoint.codec_dir))
    )
    save_config(cfg, tmp_path / "adapter" / "higgs_lora.yaml")
    plan = plan_merge(str(tmp_path / "adapter"), device="cpu")
    assert plan.out == tmp_path / "Higgs-Audio-2-ar" and plan.base == tiny_checkpoint.model_dir
    assert plan.codec == tiny_checkpoint.codec_dir
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(MergeError, match="not empty.*--force"):
        plan_merge(str(tmp_path / "adapter"), out=str(busy))
    assert plan_merge(str(tmp_path / "adapter"), out=str(busy), force=True, device="cpu").out == busy
    with pytest.raises(MergeError, match="would overwrite the base model"):
        plan_merge(str(tmp_path / "adapter"), out=str(tiny_checkpoint.model_dir), force=True)
    with pytest.raises(MergeError, match="would overwrite the adapter"):
        plan_merge(str(tmp_path / "adapter"), out=str(tmp_path), force=True)


def test_an_adapter_from_elsewhere_needs_only_the_base(tmp_path, tiny_checkpoint):
    random_peft_adapter(tiny_checkpoint, tmp_path / "my-voice")  # plain PEFT: no higgs_lora.yaml
    with pytest.raises(MergeError, match="no higgs_lora.yaml.*--base"):
        plan_merge(str(tmp_path / "my-voice"))
    plan = plan_merge(str(tmp_path / "my-voice"), base=str(tiny_checkpoint.model_dir), device="cpu")
    assert plan.out == tmp_path / "Higgs-Audio-2-my-voice" and plan.codec == tiny_checkpoint.codec_dir
    assert (plan.cfg.lora.r, plan.cfg.lora.alpha) == (4, 12) and plan.cfg.model.quantization == "none"


# ------------------------------------------------------------------------------------------- verification


def test_logits_report_passes_rounding_and_fails_a_wrong_merge():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 10, 8, 16, generator=generator)
    adapter = base + 0.5 * torch.randn(base.shape, generator=generator)
    rounded = adapter.to(torch.bfloat16).float()
    good = logits_report(base, adapter, rounded)
    assert good["passed"] and good["merged_vs_adapter_mean"] <= good["allowed_mean"]
    assert good["adapter_effect"] == pytest.approx(float((adapter - base).abs().max()))
    unmerged = logits_report(base, adapter, base)  # the update was never applied
    assert not unmerged["passed"] and "exceeds" in unmerged["reason"]
    half = logits_report(base, adapter, base + 0.5 * (adapter - base))  # wrong scale
    assert not half["passed"]
    one_layer_short = adapter.clone()
    one_layer_short[..., :4, :] = base[..., :4, :]  # half the codebooks never saw their update
    assert not logits_report(base, adapter, one_layer_short)["passed"]
    untrained = logits_report(base, base, base.to(torch.bfloat16).float())  # B = 0: nothing to merge, rounding only
    assert untrained["passed"] and untrained["adapter_effect"] == 0
    # ... but not "passed": rounding is above an effect of 0, so the logits cannot show the merge.
    assert good["verdict"] == "passed" and not good["inconclusive"]
    assert untrained["verdict"] == "inconclusive" and "too little" in untrained["reason"]
    tiny_effect = base + 1e-4 * torch.randn(base.shape, generator=generator)
    assert logits_report(base, tiny_effect, base)["verdict"] == "inconclusive"  # an unmerged tiny adapter
    broken = logits_report(base, adapter, torch.full_like(base, float("nan")))
    assert not broken["passed"] and "NaN" in broken["reason"]
    quantised = logits_report(base, adapter, rounded, adapter_nf4=adapter + 0.1)
    assert quantised["merged_vs_nf4_adapter"] == pytest.approx(0.1, abs=0.02)


def test_staged_directory_publishes_whole_or_not_at_all(tmp_path):
    from higgs_lora.files import staged_directory

    target = tmp_path / "Higgs-Audio-2-x"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(target) as staging:
            (staging / "new").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["Higgs-Audio-2-x"] and (target / "old").is_file()
    with staged_directory(target) as staging:
        (staging / "new").write_text("whole")
    assert [p.name for p in target.iterdir()] == ["new"] and oct((target / "new").stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["Higgs-Audio-2-x"]
