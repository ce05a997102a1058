"""The tiny-model kit writes the released layout, loads with plain transformers offline, and is deterministic."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from higgs_lora import tiny
from higgs_lora.data.audio import load_audio
from tests.conftest import DEMO_CORPUS


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_matches_the_released_checkpoint(tiny_checkpoint):
    model_files = {p.name for p in tiny_checkpoint.model_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
    } <= model_files
    codec_files = {p.name for p in tiny_checkpoint.codec_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= codec_files

    config = json.loads((tiny_checkpoint.model_dir / "config.json").read_text())
    assert config["model_type"] == "higgs_audio_v2"
    assert config["codebook_size"] == 1026 and config["num_codebooks"] == 8
    assert config["num_hidden_layers"] == 2
    generation = json.loads((tiny_checkpoint.model_dir / "generation_config.json").read_text())
    assert (generation["ras_win_len"], generation["ras_win_max_num_repeat"]) == (7, 2)
    processor = json.loads((tiny_checkpoint.model_dir / "processor_config.json").read_text())
    assert processor["processor_class"] == "HiggsAudioV2Processor"
    # No codec reference: a local path would go stale when the folder moves (the loader finds ../codec).
    assert "audio_tokenizer" not in processor
    assert str(tiny_checkpoint.root) not in (tiny_checkpoint.model_dir / "processor_config.json").read_text()


def test_loads_with_plain_transformers_offline(tiny_checkpoint):
    from transformers import (
        AutoProcessor,
        HiggsAudioV2ForConditionalGeneration,
        HiggsAudioV2Processor,
        HiggsAudioV2TokenizerModel,
    )

    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(tiny_checkpoint.model_dir), use_text_head=True)
    assert model.config.codebook_size == 1026
    assert model.audio_lm_head.out_features == 8 * 1026
    assert model.text_lm_head is not None and model.text_lm_head.out_features == model.config.vocab_size
    # The text head's saved weights are loaded, not re-initialised.
    from safetensors.torch import load_file

    saved = load_file(str(tiny_checkpoint.model_dir / "model.safetensors"))
    assert torch.equal(saved["text_lm_head.weight"], model.text_lm_head.weight.detach())
    assert sum("audio_mlp" in k for k in saved) == 2 * 3  # dual FFN: audio MLP in both layers

    codec = HiggsAudioV2TokenizerModel.from_pretrained(str(tiny_checkpoint.codec_dir))
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint.model_dir), audio_tokenizer=codec)
    assert isinstance(processor, HiggsAudioV2Processor) and processor.audio_tokenizer is codec
    assert processor.audio_tokenizer.config.num_quantizers == 8


def test_special_tokens_follow_the_llama3_layout(tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint.model_dir))
    base = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert len(tokenizer) == base + 256
    for offset, name in tiny.HIGGS_SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(name) == base + offset, name
    config = json.loads((tiny_checkpoint.model_dir / "config.json").read_text())
    assert config["audio_token_id"] == base + 16  # 128016 in the released vocabulary
    assert config["audio_delay_token_id"] == base + 14
    assert config["audio_bos_token_id"] == base + 13
    assert config["pad_token_id"] == base + 1


def test_tokenizer_round_trips_arabic_and_adds_one_bos(tiny_checkpoint, demo_rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint.model_dir))
    for text in [row["text"] for row in demo_rows] + ["نص جديد لم يره المُرمِّز من قبل ١٢٣", "Hello there."]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Trained on the transcripts: a demo sentence takes fewer tokens than it has characters (2 UTF-8 bytes each).
    text = demo_rows[0]["text"]
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < len(text)


def test_chat_template_renders_the_cloning_prompt(tiny_checkpoint):
    from transformers import AutoProcessor, HiggsAudioV2TokenizerModel

    codec = HiggsAudioV2TokenizerModel.from_pretrained(str(tiny_checkpoint.codec_dir))
    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint.model_dir), audio_tokenizer=codec)
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Generate audio following instruction."}]},
        {"role": "scene", "content": [{"type": "text", "text": "غرفة هادئة"}]},
        {"role": "user", "content": [{"type": "text", "text": "مرحبا"}]},
        {"role": "assistant", "content": [{"type": "audio", "audio": "ref"}]},
        {"role": "user", "content": [{"type": "text", "text": "كيف حالك"}]},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nGenerate audio following instruction."
        "\n\n<|scene_desc_start|>\nغرفة هادئة\n<|scene_desc_end|><|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nمرحبا<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|><|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nكيف حالك<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>"
    )
    with pytest.raises(Exception, match="system message"):
        processor.apply_chat_template(conversation[2:], tokenize=False)


def test_codec_encodes_one_second_into_8_by_25_and_decodes_to_24000(tiny_checkpoint):
    from transformers import HiggsAudioV2TokenizerModel

    codec = HiggsAudioV2TokenizerModel.from_pretrained(str(tiny_checkpoint.codec_dir)).eval()
    samples = load_audio(DEMO_CORPUS / "spk_f1" / "spk_f1_01.flac", 24000)[:24000]
    assert samples.shape == (24000,)
    with torch.no_grad():
        codes = codec.encode(torch.from_numpy(samples)[None, None]).audio_codes
        audio = codec.decode(codes).audio_values
    assert codes.shape == (1, 8, 25)
    assert codes.min() >= 0 and codes.max() < 1024
    assert codes.unique().numel() > 8  # not all equal (a codec with zero codebooks gives only 0)
    assert sum(codes[0, k].unique().numel() > 1 for k in range(8)) >= 4  # most codebooks vary over time
    assert len({tuple(codes[0, :, t].tolist()) for t in range(25)}) > 1  # frames differ over time
    assert audio.shape[-1] == 24000
    assert torch.isfinite(audio).all()


def test_codebooks_are_filled(tiny_checkpoint):
    from safetensors.torch import load_file

    weights = load_file(str(tiny_checkpoint.codec_dir / "model.safetensors"))
    books = [v for k, v in weights.items() if k.endswith("codebook.embed")]
    assert len(books) == 8
    for book in books:
        assert book.shape == (1024, 8)
        assert (book.abs().sum(dim=1) > 0).all()


def test_deterministic_for_a_seed(tmp_path, tiny_checkpoint):
    again = tiny.write_tiny(tmp_path / "again", seed=0)
    for sub in ("model/model.safetensors", "model/tokenizer.json", "codec/model.safetensors", "model/config.json"):
        assert sha256(again.root / sub) == sha256(tiny_checkpoint.root / sub), sub
    other = tiny.write_tiny(tmp_path / "other", seed=1)
    assert sha256(other.root / "model/model.safetensors") != sha256(tiny_checkpoint.root / "model/model.safetensors")
    assert sha256(other.root / "codec/model.safetensors") != sha256(tiny_checkpoint.root / "codec/model.safetensors")


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while building")

    monkeypatch.setattr(tiny, "build_model", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        tiny.write_tiny(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_ensure_tiny_reuses_an_existing_build(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(tiny, "write_tiny", lambda *a, **k: pytest.fail("rebuilt an existing tiny checkpoint"))
    assert tiny.ensure_tiny(tiny_checkpoint.root).model_dir == tiny_checkpoint.model_dir


def test_module_entry_point(tmp_path):
    assert tiny.main(["--out", str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert (tmp_path / "cli" / "model" / "config.json").is_file()
