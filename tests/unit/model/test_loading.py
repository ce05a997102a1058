"""Loading from local directories: layouts, codebook_size check, codec resolution, LoRA placement."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from higgs_lora.config import LoraConfig, ModelConfig
from higgs_lora.errors import CheckpointError
from higgs_lora.model.loading import (
    inspect_checkpoint,
    load_base_model,
    load_processor,
    portable_codec_reference,
    resolve_codec_path,
)
from higgs_lora.model.lora import apply_lora


def model_cfg(tiny, **kw) -> ModelConfig:
    return ModelConfig(path=str(tiny.model_dir), codec_path=str(tiny.codec_dir), dtype="fp32", **kw)


def test_missing_and_unset_paths_say_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory.*Nothing is downloaded"):
        inspect_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(tmp_path)


def test_original_layout_is_recognised_and_refused_with_the_convert_command(tmp_path):
    original = tmp_path / "higgs-original"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"model_type": "higgs_audio"}))
    info = inspect_checkpoint(original)
    assert info.layout == "original"
    with pytest.raises(CheckpointError, match="python -m higgs_lora.convert --src"):
        load_base_model(ModelConfig(path=str(original)))


def test_codebook_size_1024_is_refused(tmp_path, tiny_checkpoint):
    broken = tmp_path / "model"
    shutil.copytree(tiny_checkpoint.model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["codebook_size"] = 1024
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="codebook_size=1024.*1026"):
        load_base_model(ModelConfig(path=str(broken), dtype="fp32"))


def test_codec_is_found_from_the_processor_config_or_beside_the_model(tiny_checkpoint, tmp_path):
    assert resolve_codec_path(ModelConfig(path=str(tiny_checkpoint.model_dir))) == tiny_checkpoint.codec_dir
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint.root, copy)
    processor_config = json.loads((copy / "model" / "processor_config.json").read_text())

    def name_codec(reference):
        processor_config["audio_tokenizer"] = {
            "audio_tokenizer_class": "HiggsAudioV2TokenizerModel",
            "audio_tokenizer_name_or_path": reference,
        }
        (copy / "model" / "processor_config.json").write_text(json.dumps(processor_config))

    # A local directory the processor config names is taken first ...
    shutil.copytree(tiny_checkpoint.codec_dir, tmp_path / "named-codec")
    name_codec(str(tmp_path / "named-codec"))
    assert resolve_codec_path(ModelConfig(path=str(copy / "model"))) == tmp_path / "named-codec"
    # ... a Hub id (as the released one names it) falls back to a sibling codec/ directory.
    name_codec("someorg/some-tokenizer")
    assert resolve_codec_path(ModelConfig(path=str(copy / "model"))) == copy / "codec"
    shutil.rmtree(copy / "codec")
    with pytest.raises(CheckpointError, match="model.codec_path"):
        resolve_codec_path(ModelConfig(path=str(copy / "model")))


def test_processor_from_local_parts_matches_autoprocessor(tiny_checkpoint):
    from transformers import AutoProcessor, HiggsAudioV2TokenizerModel

    ours = load_processor(model_cfg(tiny_checkpoint))
    codec = HiggsAudioV2TokenizerModel.from_pretrained(str(tiny_checkpoint.codec_dir))
    plain = AutoProcessor.from_pretrained(str(tiny_checkpoint.model_dir), audio_tokenizer=codec)
    conversation = [
        {"role": "system", "content": "Generate audio following instruction."},
        {"role": "user", "content": "اقرأ هذا"},
    ]
    assert ours.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    ) == plain.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ours.audio_token_id == plain.audio_token_id and ours.audio_delay_token_id == plain.audio_delay_token_id


def test_base_is_frozen_and_lora_hits_attention_and_both_mlps(tiny_checkpoint):
    cfg = model_cfg(tiny_checkpoint, gradient_checkpointing=False)
    model = apply_lora(load_base_model(cfg), LoraConfig(r=4, alpha=8, dropout=0.0), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for layer in range(2):
        for module in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "audio_mlp.gate_proj",
            "audio_mlp.up_proj",
            "audio_mlp.down_proj",
        ):
            assert any(f"layers.{layer}.{module}.lora_A" in n for n in trainable), (layer, module)
    assert not any("audio_lm_head" in n or "codebook" in n for n in trainable)


def test_unknown_lora_target_is_a_user_error_listing_the_names(tiny_checkpoint):
    from higgs_lora.model.lora import LoraTargetError, check_targets_early

    cfg = model_cfg(tiny_checkpoint)
    lora = LoraConfig(target_modules=["qproj", "v_proj"])
    with pytest.raises(LoraTargetError, match=r"entries 'qproj' match no module") as at_load:
        apply_lora(load_base_model(cfg), lora, cfg)
    assert at_load.value.exit_code == 2
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in str(at_load.value).split("named: ")[1].split(", ")
    # The same check on an empty meta-device copy built from config.json, before any weight is read.
    with pytest.raises(LoraTargetError) as early:
        check_targets_early(cfg, lora)
    assert str(early.value) == str(at_load.value)
    assert check_targets_early(cfg, LoraConfig()) is True


def test_text_head_loads_when_asked(tiny_checkpoint):
    assert load_base_model(model_cfg(tiny_checkpoint)).text_lm_head is None
    assert load_base_model(model_cfg(tiny_checkpoint, use_text_head=True)).text_lm_head is not None


def test_bf16_load_casts_weights(tiny_checkpoint):
    model = load_base_model(ModelConfig(path=str(tiny_checkpoint.model_dir), dtype="bf16"))
    assert model.model.layers[0].audio_mlp.gate_proj.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_nf4_quantises_the_layers_but_not_heads_or_embeddings(tiny_checkpoint):
    import bitsandbytes as bnb

    cfg = ModelConfig(
        path=str(tiny_checkpoint.model_dir),
        codec_path=str(tiny_checkpoint.codec_dir),
        dtype="fp32",
        quantization="nf4",
        gradient_checkpointing=False,
    )
    base = load_base_model(cfg)
    assert isinstance(base.model.layers[0].audio_mlp.gate_proj, bnb.nn.Linear4bit)
    assert isinstance(base.model.layers[1].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(base.audio_lm_head, bnb.nn.Linear4bit)
    assert isinstance(base.model.embed_tokens, torch.nn.Embedding)
    model = apply_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), cfg)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("reference", "kept"),
    [
        ("bosonai/higgs-audio-v2-tokenizer", True),  # the released Hub id resolves on any machine
        ("someorg/some.tokenizer-v2", True),
        ("/models/higgs-codec", False),  # a local path goes stale once the folder moves
        ("codec", False),  # relative: transformers reads it from the current directory, not the model's
        ("../codec", False),
        ("", False),
    ],
)
def test_only_hub_ids_are_kept_as_codec_references(reference, kept):
    settings = {
        "processor_class": "HiggsAudioV2Processor",
        "audio_stream_bos_id": 1024,
        "audio_tokenizer": {"audio_tokenizer_name_or_path": reference},
    }
    portable = portable_codec_reference(settings)
    assert portable["processor_class"] == "HiggsAudioV2Processor" and portable["audio_stream_bos_id"] == 1024
    if kept:
        assert portable["audio_tokenizer"] == {
            "audio_tokenizer_class": "HiggsAudioV2TokenizerModel",
            "audio_tokenizer_name_or_path": reference,
        }
    else:
        assert "audio_tokenizer" not in portable
    assert settings["audio_tokenizer"] == {"audio_tokenizer_name_or_path": reference}  # the input is not changed


def test_a_hub_id_that_is_also_a_local_folder_is_not_taken_for_one(tmp_path, monkeypatch):
    (tmp_path / "org" / "codec").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert "audio_tokenizer" not in portable_codec_reference(
        {"audio_tokenizer": {"audio_tokenizer_name_or_path": "org/codec"}}
    )
