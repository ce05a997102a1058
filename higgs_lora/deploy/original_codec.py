"""Boson's original audio tokenizer (`config.json` + `model.pth`) into a `HiggsAudioV2TokenizerModel` directory.

The original codec is xcodec-style: a DAC acoustic encoder/decoder stored as `nn.Sequential` indices with weight norm
(`weight_g`/`weight_v` pairs), a HuBERT semantic model, convolutional semantic encoder/decoder whose convolutions are
wrapped one level deeper, a residual VQ (`quantizer.vq.layers.N._codebook`) and three linear maps
(`fc_prior`, `fc_post1`, `fc_post2`). The transformers port names the same modules (acoustic_encoder.block.N.res_unitM,
quantizer.quantizers.N.codebook, fc/fc1/fc2, ...) and keeps weight norm only where its modules still apply it
(HuBERT's positional convolution): elsewhere the pair is folded into the plain weight, w = g * v / |v|.

Sizes come from the checkpoint itself where the original config does not hold them (Boson's code hard-codes the DAC
widths, and its HuBERT teacher's config lives in another repository): DAC widths from the first convolutions, the
HuBERT widths, depth and convolution kernels from its tensors. Only the number of HuBERT attention heads cannot be
read off any shape: HuBERT's 64-wide heads (12 for the released HuBERT-base) unless given.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from higgs_lora.deploy.shards import ShardWriter, TensorSpec, dtype_code
from higgs_lora.errors import UserError
from higgs_lora.logs import get_logger

log = get_logger("convert")

SUPPORTED_TEACHERS = ("hubert_base", "hubert_base_general")
HUBERT_HEAD_DIM = 64
_RES_UNIT_LAYERS = ("snake1", "conv1", "snake2", "conv2")
_HUBERT_CONV = re.compile(r"^semantic_model\.feature_extractor\.conv_layers\.(\d+)\.conv\.weight$")
_IGNORED = re.compile(r"^semantic_model\.masked_spec_embed$")
"""HuBERT's training-time mask embedding: unused for inference, absent from the port's model."""


class CodecConvertError(UserError, ValueError):
    """The original codec cannot be converted; the message lists every problem."""


def _res_unit(prefix: str, unit: int, rest: str) -> str | None:
    """`block.K.rest` inside an original DAC residual unit -> `res_unit{unit}.{snake1|conv1|snake2|conv2}.rest`."""
    match = re.match(r"^block\.(\d)\.(.+)$", rest)
    if not match or int(match[1]) >= len(_RES_UNIT_LAYERS):
        return None
    return f"{prefix}.res_unit{unit}.{_RES_UNIT_LAYERS[int(match[1])]}.{match[2]}"


def _acoustic_name(name: str, num_blocks: int) -> str | None:
    """DAC encoder (`encoder.block.I`) and decoder (`decoder_2.model.I`) names; None when `name` is neither.

    Sequential layout of the original DAC with B blocks: 0 = input conv, 1..B = blocks, B+1 = snake, B+2 = output
    conv. An encoder block holds 3 residual units then snake + strided conv; a decoder block holds snake +
    transposed conv then 3 residual units.
    """
    match = re.match(r"^(encoder\.block|decoder_2\.model)\.(\d+)\.(.+)$", name)
    if not match:
        return None
    encoder = match[1] == "encoder.block"
    side, index, rest = ("acoustic_encoder" if encoder else "acoustic_decoder"), int(match[2]), match[3]
    if index == 0:
        return f"{side}.conv1.{rest}"
    if index == num_blocks + 1:
        return f"{side}.snake1.{rest}"
    if index == num_blocks + 2:
        return f"{side}.conv2.{rest}"
    if not 1 <= index <= num_blocks:
        return None
    block = f"{side}.block.{index - 1}"
    inner = re.match(r"^block\.(\d+)\.(.+)$", rest)
    if not inner:
        return None
    position, tail = int(inner[1]), inner[2]
    if encoder:
        if position <= 2:
            return _res_unit(block, position + 1, tail)
        return {3: f"{block}.snake1.{tail}", 4: f"{block}.conv1.{tail}"}.get(position)
    if position >= 2:
        return _res_unit(block, position - 1, tail) if position <= 4 else None
    return {0: f"{block}.snake1.{tail}", 1: f"{block}.conv_t1.{tail}"}[position]


def transformers_codec_name(name: str, num_blocks: int) -> str | None:
    """The port's name for an original codec tensor name (weight-norm suffixes left as they are); None if unknown."""
    acoustic = _acoustic_name(name, num_blocks)
    if acoustic is not None:
        return acoustic
    if name.startswith(("encoder.", "decoder_2.")):
        return None
    quantizer = re.match(r"^quantizer\.vq\.layers\.(\d+)\.(_codebook|project_in|project_out)\.(.+)$", name)
    if quantizer:
        part = "codebook" if quantizer[2] == "_codebook" else quantizer[2]
        return f"quantizer.quantizers.{quantizer[1]}.{part}.{quantizer[3]}"
    for old, new in (("fc_prior.", "fc."), ("fc_post1.", "fc1."), ("fc_post2.", "fc2.")):
        if name.startswith(old):
            return new + name[len(old) :]
    if name.startswith(("encoder_semantic.", "decoder_semantic.")):
        # The original wraps each semantic convolution in a module holding it as `.conv`.
        return re.sub(r"\.(conv|conv1|conv2)\.conv\.", r".\1.", name)
    if name.startswith("semantic_model."):
        return name
    return None


def fold_weight_norm(weight_g, weight_v):
    """The plain weight of a weight-normalised layer: g * v / |v|, the norm taken over every dim where g has size 1."""
    import torch

    dims = tuple(d for d in range(weight_v.dim()) if weight_g.shape[d] == 1)
    return weight_g * weight_v / torch.linalg.vector_norm(weight_v, dim=dims, keepdim=True)


def codec_config_from_original(
    original: dict, shapes: dict[str, tuple[int, ...]], semantic_attention_heads: int | None = None
) -> dict:
    """`HiggsAudioV2TokenizerConfig` arguments from the original config.json and the checkpoint's tensor shapes."""
    problems = []
    teacher = original.get("semantic_techer", "hubert_base_general")  # sic: the original key's spelling
    if teacher not in SUPPORTED_TEACHERS:
        problems.append(f"semantic_techer={teacher!r}: the port's codec uses a HuBERT semantic model only")
    for key, value in (
        ("merge_mode", "concat"),
        ("downsample_mode", "step_down"),
        ("semantic_mode", "classic"),
        ("vq_scale", 1),
        ("causal", False),
    ):
        if original.get(key, value) != value:
            problems.append(f"{key}={original[key]!r}: the port implements {value!r} only")
    if not isinstance(original.get("bins", 1024), int):
        problems.append("bins is a list (finite scalar quantisation): the port implements the residual VQ only")
    ratios, sample_rate = list(original.get("ratios", [8, 5, 4, 2])), original.get("sample_rate", 16000)
    needed = {
        "encoder.block.0.weight_v",
        "decoder_2.model.0.weight_v",
        "quantizer.vq.layers.0.project_in.weight",
        "semantic_model.feature_projection.projection.weight",
    }
    problems += [f"{name} is not in model.pth" for name in sorted(needed - shapes.keys())]
    if problems:
        raise CodecConvertError("cannot convert this codec:\n" + "\n".join(f"  - {p}" for p in problems))

    hubert_hidden = shapes["semantic_model.feature_projection.projection.weight"][0]
    conv_names = sorted(
        (name for name in shapes if _HUBERT_CONV.match(name)), key=lambda name: int(_HUBERT_CONV.match(name)[1])
    )
    conv_shapes = [shapes[name] for name in conv_names]
    pos_conv = next(
        shape
        for name, shape in shapes.items()
        if name.startswith("semantic_model.encoder.pos_conv_embed.conv.")
        and name.endswith(("weight_v", "original1", ".weight"))
    )
    layers = {int(m[1]) for name in shapes if (m := re.match(r"semantic_model\.encoder\.layers\.(\d+)\.", name))}
    semantic = {
        "hidden_size": hubert_hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": semantic_attention_heads or max(1, hubert_hidden // HUBERT_HEAD_DIM),
        "intermediate_size": shapes["semantic_model.encoder.layers.0.feed_forward.intermediate_dense.weight"][0],
        "conv_dim": [shape[0] for shape in conv_shapes],
        "conv_kernel": [shape[2] for shape in conv_shapes],
        "conv_bias": "semantic_model.feature_extractor.conv_layers.0.conv.bias" in shapes,
        "num_conv_pos_embeddings": pos_conv[2],
        "num_conv_pos_embedding_groups": hubert_hidden // pos_conv[1],
        "mask_time_prob": 0.0,
    }
    codebook_dim, quantizer_dim = shapes["quantizer.vq.layers.0.project_in.weight"]
    acoustic = {
        "encoder_hidden_size": shapes["encoder.block.0.weight_v"][0],
        "downsampling_ratios": ratios,
        "decoder_hidden_size": shapes["decoder_2.model.0.weight_v"][0],
        "upsampling_ratios": ratios,
        "hidden_size": original.get("D", quantizer_dim - hubert_hidden),
        "sampling_rate": sample_rate,
    }
    frame_rate = math.ceil(sample_rate / math.prod(ratios))
    bins = original.get("bins", 1024)
    stored = len({m[1] for name in shapes if (m := re.match(r"quantizer\.vq\.layers\.(\d+)\.", name))})
    if original.get("n_q", stored) != stored:
        raise CodecConvertError(f"config.json says n_q={original['n_q']}, but model.pth holds {stored} quantizers")
    bandwidths = bandwidths_for(original.get("target_bandwidths", [0.5, 1, 1.5, 2]), stored, frame_rate, bins)
    return {
        "target_bandwidths": bandwidths,
        "sample_rate": sample_rate,
        "codebook_size": bins,
        "codebook_dim": codebook_dim,
        "acoustic_model_config": acoustic,
        "semantic_model_config": semantic,
        "semantic_sample_rate": original.get("semantic_sample_rate") or 16000,
        "downsample_factor": 320,
    }


def bandwidths_for(bandwidths: list[float], num_quantizers: int, frame_rate: int, bins: int) -> list[float]:
    """The target bandwidths (kbps) the port's codec can use with the `num_quantizers` the checkpoint holds.

    The port derives its quantizer count from the last bandwidth; the released config lists up to 4 kbps (16
    quantizers at 25 frames/s) while model.pth holds 8, and Boson's quantizer uses the 8 it holds. So bandwidths
    that need more quantizers are dropped, and the bandwidth of all of them is appended when none is left at it.
    """
    bits = math.ceil(math.log2(bins))
    needed = lambda kbps: int(1000 * kbps // (frame_rate * bits))  # noqa: E731
    kept = [float(b) for b in sorted(bandwidths) if needed(b) <= num_quantizers]
    if not kept or needed(kept[-1]) < num_quantizers:
        kept.append(num_quantizers * frame_rate * bits / 1000)
    return kept


def expected_codec_shapes(config_args: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the port's codec model for `config_args`, built on the meta device."""
    import torch
    from transformers import HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel

    with torch.device("meta"):
        model = HiggsAudioV2TokenizerModel(HiggsAudioV2TokenizerConfig(**config_args))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def convert_state_dict(original: dict, num_blocks: int, expected: dict[str, tuple[int, ...]]) -> dict:
    """The port's state dict from the original one; raises CodecConvertError with every name or shape problem."""
    converted, problems = {}, []
    pairs: dict[str, dict[str, object]] = {}
    for name, tensor in original.items():
        if _IGNORED.match(name):
            continue
        norm = re.match(r"^(.+)\.weight_([gv])$", name)
        target = transformers_codec_name(norm[1] + ".weight" if norm else name, num_blocks)
        if target is None:
            problems.append(f"{name}: not a tensor of the original codec")
        elif norm:
            pairs.setdefault(target, {})[norm[2]] = tensor
        else:
            converted[target] = tensor
    for target, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            problems.append(f"{target}: weight_g or weight_v is missing")
            continue
        module = target.removesuffix(".weight")
        if f"{module}.parametrizations.weight.original0" in expected:
            # The port keeps weight norm here (HuBERT's positional convolution): g and v stay as they are.
            converted[f"{module}.parametrizations.weight.original0"] = pair["g"]
            converted[f"{module}.parametrizations.weight.original1"] = pair["v"]
        else:
            converted[target] = fold_weight_norm(pair["g"].float(), pair["v"].float()).to(pair["v"].dtype)
    problems += [f"{name}: missing from model.pth" for name in sorted(expected.keys() - converted.keys())]
    problems += [
        f"{name}: shape {tuple(converted[name].shape)}, the port expects {expected[name]}"
        for name in sorted(converted.keys() & expected.keys())
        if tuple(converted[name].shape) != expected[name]
    ]
    problems += [f"{name}: the port has no such tensor" for name in sorted(converted.keys() - expected.keys())]
    if problems:
        raise CodecConvertError(
            "the original codec does not map onto HiggsAudioV2TokenizerModel:\n"
            + "\n".join(f"  - {p}" for p in problems[:40])
        )
    return converted


def convert_codec(src: Path, staging: Path, semantic_attention_heads: int | None = None) -> dict:
    """Write the port's layout of the original codec in `src` into `staging`; returns a summary."""
    import torch
    from transformers import DacFeatureExtractor, HiggsAudioV2TokenizerConfig

    original_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    state = torch.load(src / "model.pth", map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    config_args = codec_config_from_original(original_config, shapes, semantic_attention_heads)
    num_blocks = len(config_args["acoustic_model_config"]["downsampling_ratios"])
    converted = convert_state_dict(state, num_blocks, expected_codec_shapes(config_args))
    names = sorted(converted)
    writer = ShardWriter(
        staging, [TensorSpec(name, dtype_code(converted[name].dtype), tuple(converted[name].shape)) for name in names]
    )
    for name in names:
        writer.add(name, converted[name])
    writer.close()
    HiggsAudioV2TokenizerConfig(**config_args).save_pretrained(str(staging))
    hop_length = math.prod(config_args["acoustic_model_config"]["downsampling_ratios"])
    feature_extractor = DacFeatureExtractor(
        feature_size=1,
        hop_length=hop_length,
        padding_side="right",
        padding_value=0.0,
        return_attention_mask=True,
        sampling_rate=config_args["sample_rate"],
    )
    feature_extractor.save_pretrained(str(staging))
    folded = sum(1 for name in state if name.endswith(".weight_g"))
    log.info(
        f"codec: {len(converted)} tensors, {folded} weight-norm pairs, "
        f"{config_args['semantic_model_config']['num_hidden_layers']}-layer HuBERT, "
        f"{len(set(n.split('.')[2] for n in converted if n.startswith('quantizer.quantizers.')))} quantizers"
    )
    return {"kind": "codec", "tensors": len(converted), "weight_norm_pairs": folded}
