"""Converting Boson's original layout: tiny original checkpoints convert and compute what their sources compute."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from higgs_lora.config import ModelConfig
from higgs_lora.deploy.convert import CONVERT_MARKER, convert
from higgs_lora.deploy.convert import main as convert_main
from higgs_lora.deploy.original_codec import (
    CodecConvertError,
    codec_config_from_original,
    convert_codec,
    fold_weight_norm,
    transformers_codec_name,
)
from higgs_lora.deploy.original_model import ConvertError, model_config_from_original, transformers_name
from higgs_lora.errors import CheckpointError
from higgs_lora.model.loading import inspect_checkpoint, load_base_model, load_codec
from tests.conftest import REPO_ROOT
from tests.original_layout import original_model_config, write_original_codec, write_original_model


@pytest.fixture(scope="module")
def original_model(tiny_checkpoint, tmp_path_factory):
    return write_original_model(tiny_checkpoint.model_dir, tmp_path_factory.mktemp("original") / "higgs-audio-v2")


def sample_logits(model_dir, tiny, **load):
    """Audio logits of a model directory on a fixed zero-shot sample (the merge check's sample)."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    from higgs_lora.deploy.verify import fixed_sample
    from higgs_lora.model.loading import load_processor

    batch = fixed_sample(load_processor(ModelConfig(path=str(tiny.model_dir), codec_path=str(tiny.codec_dir))))
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(model_dir), **load).eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
def test_converted_model_gives_the_logits_of_the_transformers_model(original_model, tiny_checkpoint, tmp_path):
    assert inspect_checkpoint(original_model).layout == "original"
    with pytest.raises(CheckpointError, match=f"python -m higgs_lora.convert --src {original_model} --out"):
        load_base_model(ModelConfig(path=str(original_model)))
    out = tmp_path / "higgs-audio-v2-hf"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "higgs_lora.deploy.convert",
            "--src",
            str(original_model),
            "--out",
            str(out),
            "--codec",
            str(tiny_checkpoint.codec_dir),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Boson's original generation model" in result.stdout

    info = inspect_checkpoint(out)
    assert info.layout == "transformers" and info.config["codebook_size"] == 1026
    source_config = json.loads((tiny_checkpoint.model_dir / "config.json").read_text())
    for key in (
        "audio_token_id",
        "audio_bos_token_id",
        "audio_delay_token_id",
        "pad_token_id",
        "eos_token_id",
        "num_codebooks",
        "rope_parameters",
        "head_dim",
        "vocab_size",
    ):
        assert info.config[key] == source_config[key], key
    assert (out / "LICENSE").is_file() and (out / "chat_template.jinja").is_file()
    record = json.loads((out / CONVERT_MARKER).read_text())
    assert sorted(record["dropped"]) == [
        "audio_codebook_weights",
        "layers.0.self_attn.rotary_emb.inv_freq",
        "layers.1.self_attn.rotary_emb.inv_freq",
        "rotary_emb.inv_freq",
    ]
    # The same weights under the new names: the same logits, exactly (plain transformers on both sides).
    torch.testing.assert_close(
        sample_logits(out, tiny_checkpoint, use_text_head=True),
        sample_logits(tiny_checkpoint.model_dir, tiny_checkpoint, use_text_head=True),
        rtol=0,
        atol=0,
    )
    model = load_base_model(ModelConfig(path=str(out), dtype="fp32", use_text_head=True))
    source = load_base_model(ModelConfig(path=str(tiny_checkpoint.model_dir), dtype="fp32", use_text_head=True))
    source_state = source.state_dict()
    assert model.state_dict().keys() == source_state.keys()
    assert all(torch.equal(tensor, source_state[name]) for name, tensor in model.state_dict().items())
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["ras_win_len"] == 7 and generation["eos_token_id"] == source_config["eos_token_id"]

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(out))  # names the local codec given with --codec; offline
    assert processor.audio_token_id == source_config["audio_token_id"]
    assert processor.tokenizer.pad_token_id == source_config["pad_token_id"]


def test_partially_frozen_embeddings_are_joined(tiny_checkpoint, tmp_path):
    original = write_original_model(tiny_checkpoint.model_dir, tmp_path / "split", split_embedding_at=1000)
    out = convert(original, tmp_path / "out")
    from safetensors.torch import load_file

    joined = {k: v for f in out.glob("model*.safetensors") for k, v in load_file(str(f)).items()}
    source = load_file(str(tiny_checkpoint.model_dir / "model.safetensors"))
    assert torch.equal(joined["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    assert json.loads((out / CONVERT_MARKER).read_text())["joined"] == ["model.embed_tokens.weight"]


def test_converted_codec_encodes_and_decodes_like_the_source(tiny_checkpoint, tmp_path):
    original = write_original_codec(tiny_checkpoint.codec_dir, tmp_path / "higgs-audio-v2-tokenizer")
    with pytest.raises(CheckpointError, match=f"(?s)original audio tokenizer.*--src {original} --out {original}-hf"):
        load_codec(original)  # what prepare, training and merge load codecs with
    out = tmp_path / "codec-hf"
    out.mkdir()
    # The tiny HuBERT has 2 heads of 8; the original checkpoint does not record heads (see convert_codec).
    convert_codec(original, out, semantic_attention_heads=2)
    from transformers import HiggsAudioV2TokenizerModel

    converted, info = HiggsAudioV2TokenizerModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    source = load_codec(tiny_checkpoint.codec_dir)
    # Every tensor lands under the name it has in the source (weight-norm folds agree to float rounding). The tiny
    # codec's output barely depends on some of them (fc1 is not used at all), so values are checked one by one.
    expected = source.state_dict()
    for name, tensor in converted.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    audio = torch.randn(1, 1, 24000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        codes = source.encode(audio).audio_codes
        assert codes.shape[1] == 8 and torch.equal(converted.eval().encode(audio).audio_codes, codes)
        torch.testing.assert_close(
            converted.decode(codes).audio_values, source.decode(codes).audio_values, rtol=1e-5, atol=1e-8
        )


def test_the_cli_converts_a_codec_with_the_released_bandwidth_list(tiny_checkpoint, tmp_path, capsys):
    original = write_original_codec(tiny_checkpoint.codec_dir, tmp_path / "released-style")
    config = json.loads((original / "config.json").read_text())
    config["target_bandwidths"] = [0.5, 1, 1.5, 2, 4]  # as released: up to 4 kbps, while model.pth holds 8
    (original / "config.json").write_text(json.dumps(config))
    out = tmp_path / "released-style-hf"
    assert convert_main(["--src", str(original), "--out", str(out), "--hubert-heads", "0"]) == 2
    assert "--hubert-heads 0" in capsys.readouterr().err
    assert convert_main(["--src", str(original), "--out", str(out), "--hubert-heads", "2"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["target_bandwidths"] == [0.5, 1.0, 1.5, 2.0]
    assert written["semantic_model_config"]["num_attention_heads"] == 2
    from transformers import HiggsAudioV2TokenizerModel

    converted, info = HiggsAudioV2TokenizerModel.from_pretrained(str(out), output_loading_info=True)
    assert converted.config.num_quantizers == 8 and not info["missing_keys"] and not info["unexpected_keys"]


def test_the_cli_detects_what_it_is_given(original_model, tiny_checkpoint, tmp_path, capsys):
    assert convert_main(["--src", str(tiny_checkpoint.model_dir), "--out", str(tmp_path / "x")]) == 2
    assert "already in the transformers layout" in capsys.readouterr().err
    assert convert_main(["--src", str(tiny_checkpoint.codec_dir), "--out", str(tmp_path / "x")]) == 2
    assert "already in the transformers layout" in capsys.readouterr().err
    assert convert_main(["--src", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("x")
    assert convert_main(["--src", str(original_model), "--out", str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err and (busy / "keep").is_file()
    assert convert_main(["--src", str(original_model), "--out", str(original_model / "sub")]) == 2
    assert "overlaps" in capsys.readouterr().err


def test_options_the_port_lacks_are_refused_all_at_once(tiny_checkpoint):
    config = original_model_config(tiny_checkpoint.model_dir)
    config.update(audio_dual_ffn_layers=[1], use_audio_out_embed_projector=True, audio_embed_avg=True)
    with pytest.raises(ConvertError) as err:
        model_config_from_original(config, {"<|reserved_special_token_6|>": 1, "<|eot_id|>": 2})
    text = str(err.value)
    assert "layers [0] have no audio FFN" in text and "use_audio_out_embed_projector" in text
    assert "audio_embed_avg" in text


def test_original_config_maps_to_the_released_numbers():
    text = {
        "vocab_size": 128256,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "bos_token_id": 128000,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    args = model_config_from_original(
        {
            "model_type": "higgs_audio",
            "text_config": text,
            "audio_adapter_type": "dual_ffn_fast_forward",
            "audio_dual_ffn_layers": list(range(28)),
            "audio_num_codebooks": 8,
            "audio_codebook_size": 1024,
            "audio_out_token_idx": 128016,
            "audio_out_bos_token_id": 128013,
            "pad_token_id": 128001,
        },
        {"<|reserved_special_token_6|>": 128014, "<|eot_id|>": 128009},
    )
    assert args["codebook_size"] == 1026 and args["audio_delay_token_id"] == 128014
    assert args["rope_parameters"] == {**text["rope_scaling"], "rope_theta": 500000.0}
    assert (args["audio_token_id"], args["audio_bos_token_id"], args["eos_token_id"]) == (128016, 128013, 128009)


@pytest.mark.parametrize(
    "original,expected",
    [
        ("audio_codebook_embeddings.weight", "model.embed_audio_tokens.embed_audio_tokens.weight"),
        ("layers.27.audio_mlp.up_proj.weight", "model.layers.27.audio_mlp.up_proj.weight"),
        ("embed_tokens.weight", "model.embed_tokens.weight"),
        ("norm.weight", "model.norm.weight"),
        ("audio_decoder_proj.audio_lm_head.weight", "audio_lm_head.weight"),
        ("audio_decoder_proj.text_lm_head.weight", "text_lm_head.weight"),
        ("audio_codebook_weights", None),
        ("layers.3.self_attn.rotary_emb.inv_freq", None),
    ],
)
def test_model_tensor_names(original, expected):
    assert transformers_name(original) == expected


@pytest.mark.parametrize(
    "original,expected",
    [  # the released DAC has 5 blocks: Sequential indices 0..7
        ("encoder.block.0.weight", "acoustic_encoder.conv1.weight"),
        ("encoder.block.2.block.1.block.3.bias", "acoustic_encoder.block.1.res_unit2.conv2.bias"),
        ("encoder.block.5.block.4.weight", "acoustic_encoder.block.4.conv1.weight"),
        ("encoder.block.6.alpha", "acoustic_encoder.snake1.alpha"),
        ("encoder.block.7.weight", "acoustic_encoder.conv2.weight"),
        ("decoder_2.model.1.block.1.weight", "acoustic_decoder.block.0.conv_t1.weight"),
        ("decoder_2.model.3.block.4.block.0.alpha", "acoustic_decoder.block.2.res_unit3.snake1.alpha"),
        ("decoder_2.model.7.bias", "acoustic_decoder.conv2.bias"),
        ("quantizer.vq.layers.7._codebook.embed", "quantizer.quantizers.7.codebook.embed"),
        ("fc_post2.weight", "fc2.weight"),
        (
            "encoder_semantic.conv_blocks.0.res_units.1.conv1.conv.weight",
            "encoder_semantic.conv_blocks.0.res_units.1.conv1.weight",
        ),
        (
            "semantic_model.encoder.layers.0.attention.q_proj.weight",
            "semantic_model.encoder.layers.0.attention.q_proj.weight",
        ),
        ("encoder.block.9.weight", None),
        ("something.else", None),
    ],
)
def test_codec_tensor_names(original, expected):
    assert transformers_codec_name(original, num_blocks=5) == expected


def test_weight_norm_fold_recovers_the_weight_for_any_norm_dim():
    weight = torch.randn(6, 4, 5)
    for dim in range(3):
        others = tuple(d for d in range(3) if d != dim)
        g = weight.norm(dim=others, keepdim=True)
        torch.testing.assert_close(fold_weight_norm(g, weight * 3.0), weight)


def test_released_codec_config_gets_hubert_base_and_eight_quantizers():
    shapes = {
        "encoder.block.0.weight_v": (64, 1, 7),
        "decoder_2.model.0.weight_v": (1024, 256, 7),
        "quantizer.vq.layers.0.project_in.weight": (64, 1024),
        "semantic_model.feature_projection.projection.weight": (768, 512),
        "semantic_model.encoder.layers.0.feed_forward.intermediate_dense.weight": (3072, 768),
        "semantic_model.encoder.pos_conv_embed.conv.weight_v": (768, 48, 128),
    }
    shapes.update({f"semantic_model.encoder.layers.{i}.attention.q_proj.weight": (768, 768) for i in range(12)})
    shapes.update(
        {
            f"semantic_model.feature_extractor.conv_layers.{i}.conv.weight": (512, 512, k)
            for i, k in enumerate((10, 3, 3, 3, 3, 2, 2))
        }
    )
    shapes.update({f"quantizer.vq.layers.{i}._codebook.embed": (1024, 64) for i in range(8)})
    original = {
        "D": 256,
        "target_bandwidths": [0.5, 1, 1.5, 2],
        "ratios": [8, 5, 4, 2, 3],
        "sample_rate": 24000,
        "bins": 1024,
        "n_q": 8,
        "codebook_dim": 64,
        "semantic_techer": "hubert_base_general",
    }
    args = codec_config_from_original(original, shapes)
    semantic = args["semantic_model_config"]
    assert (semantic["hidden_size"], semantic["num_hidden_layers"], semantic["num_attention_heads"]) == (768, 12, 12)
    assert semantic["num_conv_pos_embeddings"] == 128 and semantic["num_conv_pos_embedding_groups"] == 16
    assert args["acoustic_model_config"]["encoder_hidden_size"] == 64
    assert args["acoustic_model_config"]["decoder_hidden_size"] == 1024
    from transformers import HiggsAudioV2TokenizerConfig

    config = HiggsAudioV2TokenizerConfig(**args)
    assert (config.num_quantizers, config.frame_rate, config.hop_length) == (8, 25, 960)
    # The released config lists bandwidths up to 4 kbps (16 quantizers) while model.pth holds 8: the count comes
    # from the checkpoint, and only the bandwidths 8 quantizers support are kept.
    released = codec_config_from_original({**original, "target_bandwidths": [0.5, 1, 1.5, 2, 4]}, shapes)
    assert released["target_bandwidths"] == [0.5, 1.0, 1.5, 2.0]
    assert HiggsAudioV2TokenizerConfig(**released).num_quantizers == 8
    short = codec_config_from_original({**original, "target_bandwidths": [0.5, 1]}, shapes)
    assert short["target_bandwidths"] == [0.5, 1.0, 2.0]  # all 8 stored quantizers stay in use
    assert HiggsAudioV2TokenizerConfig(**short).num_quantizers == 8
    with pytest.raises(CodecConvertError, match="n_q=12, but model.pth holds 8"):
        codec_config_from_original({**original, "n_q": 12}, shapes)
    with pytest.raises(CodecConvertError, match="HuBERT semantic model only"):
        codec_config_from_original({**original, "semantic_techer": "wavlm_base_plus"}, shapes)
