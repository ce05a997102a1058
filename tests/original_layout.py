"""Tiny checkpoints in Boson's original layout, written from the tiny transformers-layout ones, for conversion tests.

The original names are spelled out here from the structure of Boson's code, as lists in module order, not by
inverting the rules of higgs_lora.deploy.original_model and original_codec: the model's from the table of original
and transformers tensor names in docs/deploy.md ("Tensor names"), the codec's from the original xcodec/DAC modules
(`nn.Sequential` indices, weight-norm pairs, wrapped semantic convolutions). The tests then compare what the
converted checkpoints compute with what the source checkpoints compute, so a wrong rule on either side shows up as
different logits or codes, not as a tautology.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYER_TENSORS = (  # one decoder layer of Boson's dual-FFN model, as its state dict names them
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "audio_mlp.gate_proj.weight",
    "audio_mlp.up_proj.weight",
    "audio_mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "audio_input_layernorm.weight",
    "audio_post_attention_layernorm.weight",
)
TOP_LEVEL = {  # original name -> transformers name (docs/deploy.md, "Tensor names")
    "audio_codebook_embeddings.weight": "model.embed_audio_tokens.embed_audio_tokens.weight",
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "audio_decoder_proj.audio_lm_head.weight": "audio_lm_head.weight",
    "audio_decoder_proj.text_lm_head.weight": "text_lm_head.weight",
}


def original_model_tensors(tiny_model_dir: Path, split_embedding_at: int | None = None) -> dict[str, torch.Tensor]:
    """The tiny model's tensors under their original names, plus the buffers the original saves and the port drops.

    `split_embedding_at` stores the text embedding as Boson's partially frozen pair (rows before / from that row).
    """
    from safetensors.torch import load_file

    source = load_file(str(tiny_model_dir / "model.safetensors"))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    tensors = {original: source[new] for original, new in TOP_LEVEL.items()}
    for layer in range(config["num_hidden_layers"]):
        for name in LAYER_TENSORS:
            tensors[f"layers.{layer}.{name}"] = source[f"model.layers.{layer}.{name}"]
        tensors[f"layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(config["head_dim"] // 2)
    assert len(tensors) - config["num_hidden_layers"] == len(source), "the original naming missed a tensor"
    tensors["audio_codebook_weights"] = torch.ones(config["num_codebooks"])
    tensors["rotary_emb.inv_freq"] = torch.ones(config["head_dim"] // 2)
    if split_embedding_at is not None:
        embedding = tensors.pop("embed_tokens.weight")
        tensors["embed_tokens.embedding_frozen.weight"] = embedding[:split_embedding_at].clone()
        tensors["embed_tokens.embedding_trainable.weight"] = embedding[split_embedding_at:].clone()
    return tensors


def original_model_config(tiny_model_dir: Path) -> dict:
    """Boson's HiggsAudioConfig for the tiny model: a Llama text_config plus the audio settings."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    rope = dict(config["rope_parameters"])
    rope_theta = rope.pop("rope_theta")
    text_config = {
        key: config[key]
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "bos_token_id",
        )
    }
    text_config.update(
        model_type="llama", rope_scaling=rope, rope_theta=rope_theta, eos_token_id=[1, 2], tie_word_embeddings=False
    )
    return {
        "model_type": "higgs_audio",
        "architectures": ["HiggsAudioModel"],
        "text_config": text_config,
        "audio_adapter_type": "dual_ffn_fast_forward",
        "audio_dual_ffn_layers": list(range(config["num_hidden_layers"])),
        "audio_ffn_hidden_size": config["hidden_size"],
        "audio_ffn_intermediate_size": config["intermediate_size"],
        "audio_num_codebooks": 8,
        "audio_codebook_size": 1024,
        "audio_stream_bos_id": 1024,
        "audio_stream_eos_id": 1025,
        "audio_out_token_idx": config["audio_token_id"],
        "audio_out_bos_token_id": config["audio_bos_token_id"],
        "audio_eos_token_id": config["audio_bos_token_id"] - 1,
        "pad_token_id": config["pad_token_id"],
        "use_delay_pattern": True,
        "skip_audio_tower": True,
        "encode_whisper_embed": False,
        "audio_decoder_proj_num_layers": 0,
        "use_audio_out_embed_projector": False,
        "use_audio_out_self_attention": False,
        "torch_dtype": "float32",
    }


def write_original_model(tiny_model_dir: Path, out: Path, split_embedding_at: int | None = None) -> Path:
    """The tiny model in the original layout: two safetensors shards + index, original config, tokenizer, LICENSE."""
    out.mkdir(parents=True)
    tensors = original_model_tensors(tiny_model_dir, split_embedding_at)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({name: tensors[name].contiguous() for name in part}, str(out / file), metadata={"format": "pt"})
    weight_map = {name: file for file, part in halves.items() for name in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(original_model_config(tiny_model_dir), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_model_dir / name, out / name)
    (out / "LICENSE").write_text("Boson Higgs Audio 2 Community License (test stand-in)\n")
    return out


# ------------------------------------------------------------------------------------------------------ codec

ENCODER = ("conv1", "BLOCKS", "snake1", "conv2")  # DAC Encoder's nn.Sequential, blocks in the middle
ENCODER_BLOCK = ("res_unit1", "res_unit2", "res_unit3", "snake1", "conv1")
DECODER = ("conv1", "BLOCKS", "snake1", "conv2")
DECODER_BLOCK = ("snake1", "conv_t1", "res_unit1", "res_unit2", "res_unit3")
RESIDUAL_UNIT = ("snake1", "conv1", "snake2", "conv2")
WRAPPED_SEMANTIC_CONVS = ("conv", "conv1", "conv2")  # semantic convolutions hold their nn.Conv1d as `.conv`


def _sequential_index(layout: tuple[str, ...], part: str, num_blocks: int) -> int:
    """Index of `part` (or of block k given as 'block.k') in a DAC Sequential whose blocks sit at 'BLOCKS'."""
    start = layout.index("BLOCKS")
    if part.startswith("block."):
        return start + int(part.split(".")[1])
    position = layout.index(part)
    return position if position < start else position + num_blocks - 1


def original_codec_name(name: str, num_blocks: int) -> str:
    """The original name of one of the tiny codec's tensors (weight-norm suffixes are added by the caller)."""
    parts = name.split(".")
    if parts[0] in ("acoustic_encoder", "acoustic_decoder"):
        encoder = parts[0] == "acoustic_encoder"
        prefix, layout, block_layout = (
            ("encoder.block", ENCODER, ENCODER_BLOCK) if encoder else ("decoder_2.model", DECODER, DECODER_BLOCK)
        )
        if parts[1] == "block":
            index = _sequential_index(layout, f"block.{parts[2]}", num_blocks)
            inner = block_layout.index(parts[3])
            if parts[3].startswith("res_unit"):
                return f"{prefix}.{index}.block.{inner}.block.{RESIDUAL_UNIT.index(parts[4])}.{'.'.join(parts[5:])}"
            return f"{prefix}.{index}.block.{inner}.{'.'.join(parts[4:])}"
        return f"{prefix}.{_sequential_index(layout, parts[1], num_blocks)}.{'.'.join(parts[2:])}"
    if parts[0] == "quantizer":
        kind = "_codebook" if parts[3] == "codebook" else parts[3]
        return f"quantizer.vq.layers.{parts[2]}.{kind}.{'.'.join(parts[4:])}"
    if parts[0] in ("fc", "fc1", "fc2"):
        return {"fc": "fc_prior", "fc1": "fc_post1", "fc2": "fc_post2"}[parts[0]] + "." + ".".join(parts[1:])
    if parts[0] in ("encoder_semantic", "decoder_semantic") and parts[-2] in WRAPPED_SEMANTIC_CONVS:
        return ".".join(parts[:-1] + ["conv", parts[-1]])
    return name


def write_original_codec(tiny_codec_dir: Path, out: Path) -> Path:
    """The tiny codec as Boson's original `config.json` + `model.pth` (weight-norm pairs, original names)."""
    from safetensors.torch import load_file

    source = load_file(str(tiny_codec_dir / "model.safetensors"))
    config = json.loads((tiny_codec_dir / "config.json").read_text())
    ratios = config["acoustic_model_config"]["downsampling_ratios"]
    generator = torch.Generator().manual_seed(7)
    state = {}
    for name, tensor in source.items():
        if ".parametrizations.weight.original" in name:  # HuBERT's positional conv: already a g/v pair
            module = name.split(".parametrizations.")[0]
            state[f"{module}.weight_{'g' if name.endswith('original0') else 'v'}"] = tensor
            continue
        original = original_codec_name(name, len(ratios))
        if name.startswith(("acoustic_encoder.", "acoustic_decoder.")) and name.endswith(".weight"):
            # DAC's convolutions are weight-normalised over dim 0: store g = |w| per output row and a v that is w
            # rescaled per row, so only a correct fold g * v / |v| gives w back.
            norm = torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.dim())), keepdim=True)
            scale = 0.5 + torch.rand(norm.shape, generator=generator)
            state[original.removesuffix(".weight") + ".weight_g"] = norm
            state[original.removesuffix(".weight") + ".weight_v"] = tensor * scale
        else:
            state[original] = tensor
    out.mkdir(parents=True)
    torch.save(state, out / "model.pth")
    (out / "config.json").write_text(
        json.dumps(
            {
                "n_filters": 32,
                "D": config["acoustic_model_config"]["hidden_size"],
                "target_bandwidths": config["target_bandwidths"],
                "ratios": ratios,
                "sample_rate": config["sample_rate"],
                "bins": config["codebook_size"],
                "n_q": 8,
                "codebook_dim": config["codebook_dim"],
                "semantic_techer": "hubert_base_general",
                "semantic_sample_rate": config["semantic_sample_rate"],
                "last_layer_semantic": True,
                "merge_mode": "concat",
                "downsample_mode": "step_down",
                "semantic_mode": "classic",
                "vq_scale": 1,
            },
            indent=2,
        )
    )
    return out
