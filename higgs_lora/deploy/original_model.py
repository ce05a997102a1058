"""Boson's original generation model (`model_type: higgs_audio`) into the transformers layout, tensor by tensor.

Tensor names (docs/deploy.md, "Tensor names"):
  `audio_codebook_embeddings.*` -> `model.embed_audio_tokens.embed_audio_tokens.*`; `embed_tokens.*`, `layers.*`,
  `norm.*` -> under `model.`; `audio_decoder_proj.{audio,text}_lm_head.weight` -> `{audio,text}_lm_head.weight`;
  rotary buffers and `audio_codebook_weights` dropped; embeddings or heads stored as a frozen + trainable pair
  (Boson's partially frozen modules) concatenated back into one tensor. The config becomes a `HiggsAudioV2Config`
  with `codebook_size` 1026 (1024 codes + stream BOS + EOS). Tensors are streamed (higgs_lora.deploy.shards): host
  memory holds one tensor at a time, not the model. Options the transformers port does not implement (a Whisper audio
  tower, audio FFNs in only some layers, an embedding projector, ...) are refused by name.

The installed transformers (5.24) has no converter we can call: the upstream repository's
`convert_higgs_audio_v2_to_hf.py` and `convert_higgs_audio_v2_tokenizer_to_hf.py` are not in the wheel (no
`convert_*` module under `transformers/models/higgs_audio_v2*`), and they fetch their input from the Hub and build
fixed full-size configs. This module converts from local files only. The command is deploy/convert.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from higgs_lora.deploy.shards import ShardWriter, TensorSpec, iter_tensors, tensor_specs
from higgs_lora.errors import UserError
from higgs_lora.files import atomic_write_json
from higgs_lora.logs import get_logger
from higgs_lora.model.loading import CHAT_TEMPLATE_PATH

log = get_logger("convert")

ORIGINAL_MODEL_TYPE = "higgs_audio"
DELAY_TOKEN = "<|reserved_special_token_6|>"
"""The audio delay token keeps its reserved Llama-3 name in the released vocabulary (id 128014)."""
END_OF_TURN_TOKEN = "<|eot_id|>"
DEFAULT_CODEC_REFERENCE = "bosonai/higgs-audio-v2-tokenizer"
"""What the released processor config names when no local codec is given (our loader then looks beside the model)."""

_RENAMES = (
    (re.compile(r"^audio_codebook_embeddings\."), "model.embed_audio_tokens.embed_audio_tokens."),
    (re.compile(r"^(embed_tokens|layers|norm)\."), r"model.\1."),
    (re.compile(r"^audio_decoder_proj\.(audio_lm_head|text_lm_head)\."), r"\1."),
)
_DROPPED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|rotary_emb\.original_inv_freq|audio_codebook_weights)$")
_SPLIT = re.compile(
    r"^(?P<module>embed_tokens|audio_decoder_proj\.(?:audio|text)_lm_head)\."
    r"(?:embedding|linear)_(?P<part>frozen|trainable)\.weight$"
)


class ConvertError(UserError, ValueError):
    """The source cannot be converted as it is; the message lists every problem and what to do."""


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ConvertError(f"{what}:\n" + "\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------------------------------ tensor names


def transformers_name(original: str) -> str | None:
    """The transformers-layout name of an original tensor name; None for buffers the port does not keep."""
    if _DROPPED.search(original):
        return None
    for pattern, replacement in _RENAMES:
        if pattern.match(original):
            return pattern.sub(replacement, original, count=1)
    return original


def plan_tensors(original_shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict, list[str]]:
    """How each original tensor becomes a transformers one.

    Returns (renamed: original -> new name, joined: new name -> [frozen part, trainable part], dropped names).
    """
    renamed, joined, dropped = {}, {}, []
    parts: dict[str, dict[str, str]] = {}
    for name in original_shapes:
        split = _SPLIT.match(name)
        if split:
            parts.setdefault(transformers_name(f"{split['module']}.weight"), {})[split["part"]] = name
            continue
        new = transformers_name(name)
        if new is None:
            dropped.append(name)
        else:
            renamed[name] = new
    for new, pair in parts.items():
        joined[new] = [pair.get("frozen"), pair.get("trainable")]
    return renamed, joined, dropped


def planned_shapes(original_shapes: dict, renamed: dict, joined: dict) -> tuple[dict, list[str]]:
    """The shapes the converted tensors will have, and problems (a split part missing or not joinable)."""
    shapes, problems = {}, []
    for old, new in renamed.items():
        shapes[new] = tuple(original_shapes[old])
    for new, (frozen, trainable) in joined.items():
        if frozen is None or trainable is None:
            problems.append(f"{new}: only one part of the frozen/trainable pair is in the checkpoint")
            continue
        a, b = original_shapes[frozen], original_shapes[trainable]
        if tuple(a[1:]) != tuple(b[1:]):
            problems.append(f"{new}: parts {tuple(a)} and {tuple(b)} cannot be joined")
            continue
        shapes[new] = (a[0] + b[0], *a[1:])
    return shapes, problems


def compare_shapes(planned: dict, expected: dict, optional: tuple[str, ...] = ()) -> list[str]:
    """Every difference between the tensors a conversion will write and those the target model holds."""
    problems = [
        f"{name}: not in the checkpoint" for name in sorted(expected.keys() - planned.keys()) if name not in optional
    ]
    problems += [
        f"{name}: the transformers model has no such tensor (an option the port does not implement?)"
        for name in sorted(planned.keys() - expected.keys())
    ]
    problems += [
        f"{name}: shape {planned[name]} but the model expects {expected[name]}"
        for name in sorted(planned.keys() & expected.keys())
        if tuple(planned[name]) != tuple(expected[name])
    ]
    return problems


# ------------------------------------------------------------------------------------------------- config


def model_config_from_original(original: dict, token_ids: dict[str, int | None]) -> dict:
    """`HiggsAudioV2Config` arguments from an original `config.json` (`model_type: higgs_audio`).

    `token_ids` gives the ids of the delay token and `<|eot_id|>` from the checkpoint's tokenizer (the original
    config does not record them). Raises ConvertError listing every option the transformers port lacks.
    """
    text = original.get("text_config") or {}
    problems = []
    num_layers = text.get("num_hidden_layers")
    if not text or num_layers is None:
        raise ConvertError("the original config.json has no text_config (the Llama backbone's settings)")
    if original.get("audio_adapter_type") not in ("dual_ffn", "dual_ffn_fast_forward"):
        problems.append(
            f"audio_adapter_type={original.get('audio_adapter_type')!r}: the port has a dual FFN "
            "(audio_mlp) in every layer"
        )
    elif sorted(original.get("audio_dual_ffn_layers") or []) != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(original.get("audio_dual_ffn_layers") or []))
        problems.append(f"layers {missing} have no audio FFN; the port has one in every layer")
    for key, expected in (
        ("audio_ffn_hidden_size", text.get("hidden_size")),
        ("audio_ffn_intermediate_size", text.get("intermediate_size")),
    ):
        if key in original and original[key] != expected:
            problems.append(f"{key}={original[key]} differs from the text FFN's {expected}; the port uses one size")
    for key in (
        "use_audio_out_embed_projector",
        "use_audio_out_self_attention",
        "use_rq_transformer",
        "audio_embed_avg",
    ):
        if original.get(key):
            problems.append(f"{key}=true is not implemented by the transformers port")
    if original.get("audio_decoder_proj_num_layers", 0):
        problems.append("audio_decoder_proj_num_layers > 0 (extra decoder layers) is not implemented by the port")
    if original.get("use_delay_pattern") is False:
        problems.append("use_delay_pattern=false: the port always uses the delay pattern")
    codes = original.get("audio_codebook_size", 1024)
    bos, eos = original.get("audio_stream_bos_id", codes), original.get("audio_stream_eos_id", codes + 1)
    if (bos, eos) != (codes, codes + 1):
        problems.append(
            f"audio_stream_bos_id={bos}, audio_stream_eos_id={eos}: expected {codes} and {codes + 1} "
            "(the two ids after the codes)"
        )
    for name, value in token_ids.items():
        if value is None:
            problems.append(f"the tokenizer has no {name} token")
    _raise_if(problems, "cannot convert this checkpoint")

    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {"rope_type": "default"})
    if "type" in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_theta", text.get("rope_theta", 500000.0))
    return {
        "vocab_size": text["vocab_size"],
        "hidden_size": text["hidden_size"],
        "intermediate_size": text["intermediate_size"],
        "num_hidden_layers": num_layers,
        "num_attention_heads": text["num_attention_heads"],
        "num_key_value_heads": text.get("num_key_value_heads", text["num_attention_heads"]),
        "head_dim": text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        "hidden_act": text.get("hidden_act", "silu"),
        "max_position_embeddings": text.get("max_position_embeddings", 131072),
        "rms_norm_eps": text.get("rms_norm_eps", 1e-5),
        "attention_bias": text.get("attention_bias", False),
        "mlp_bias": text.get("mlp_bias", False),
        "rope_parameters": rope,
        "tie_word_embeddings": False,
        "num_codebooks": original.get("audio_num_codebooks", 8),
        "codebook_size": codes + 2,  # 1024 codes + stream BOS + stream EOS = 1026
        "audio_stream_bos_id": bos,
        "audio_stream_eos_id": eos,
        "audio_token_id": original.get("audio_out_token_idx", 128016),
        "audio_bos_token_id": original.get("audio_out_bos_token_id", 128013),
        "audio_delay_token_id": token_ids[DELAY_TOKEN],
        "pad_token_id": original.get("pad_token_id", 128001),
        "bos_token_id": text.get("bos_token_id", 128000),
        "eos_token_id": token_ids[END_OF_TURN_TOKEN],
    }


def expected_model_shapes(config_args: dict) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) of a HiggsAudioV2ForConditionalGeneration with its text head, built on `meta`."""
    import torch
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    with torch.device("meta"):
        model = HiggsAudioV2ForConditionalGeneration(HiggsAudioV2Config(**config_args), use_text_head=True)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ convert


def convert_model(src: Path, staging: Path, codec_reference: str = DEFAULT_CODEC_REFERENCE) -> dict:
    """Write the transformers layout of the original generation model `src` into `staging`; returns a summary."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, HiggsAudioV2Config

    original = json.loads((src / "config.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (DELAY_TOKEN, END_OF_TURN_TOKEN)}
    token_ids = {
        token: (i if isinstance(i, int) and i != tokenizer.unk_token_id else None) for token, i in token_ids.items()
    }
    config_args = model_config_from_original(original, token_ids)

    original_specs = tensor_specs(src)
    original_shapes = {name: shape for name, (_, shape) in original_specs.items()}
    renamed, joined, dropped = plan_tensors(original_shapes)
    planned, problems = planned_shapes(original_shapes, renamed, joined)
    problems += compare_shapes(planned, expected_model_shapes(config_args), optional=("text_lm_head.weight",))
    codes = {new: original_specs[old][0] for old, new in renamed.items()}
    for new, pair in joined.items():
        part_codes = {original_specs[part][0] for part in pair if part is not None}
        if len(part_codes) > 1:
            problems.append(f"{new}: its frozen and trainable parts have different dtypes {sorted(part_codes)}")
        codes[new] = min(part_codes) if part_codes else "BF16"
    _raise_if(problems, f"{src} does not map onto the transformers model")

    writer = ShardWriter(staging, [TensorSpec(name, codes[name], shape) for name, shape in planned.items()])
    part_of = {part: new for new, pair in joined.items() for part in pair}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    stored_dtype = None
    for name, tensor in iter_tensors(src):
        if tensor.is_floating_point() and stored_dtype is None:
            stored_dtype = tensor.dtype
        if name in part_of:
            new = part_of[name]
            pending.setdefault(new, {})[name] = tensor
            if len(pending[new]) == 2:
                frozen, trainable = joined[new]
                writer.add(new, torch.cat([pending[new][frozen], pending[new][trainable]]))
                del pending[new]
        elif name in renamed:
            writer.add(renamed[name], tensor)
        del tensor  # before the next one is read (higgs_lora.deploy.shards.iter_tensors)
    files = writer.close()

    config = HiggsAudioV2Config(**config_args)
    config.architectures = ["HiggsAudioV2ForConditionalGeneration"]
    config.dtype = str(stored_dtype or torch.bfloat16).removeprefix("torch.")
    config.save_pretrained(str(staging))
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        ras_win_len=7,
        ras_win_max_num_repeat=2,  # Boson's repetition-aware sampling defaults
        use_text_head="text_lm_head.weight" in planned,
    ).save_pretrained(str(staging))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    tokenizer.save_pretrained(str(staging))
    shutil.copy2(CHAT_TEMPLATE_PATH, staging / "chat_template.jinja")
    atomic_write_json(
        staging / "processor_config.json",
        processor_config(codec_reference, config.audio_stream_bos_id, config.audio_stream_eos_id),
    )
    log.info(
        f"{len(renamed) + len(joined)} tensors in {len(files)} file(s); joined {sorted(joined) or 'none'}; "
        f"dropped {len(dropped)} buffers"
    )
    return {"kind": "model", "tensors": len(renamed) + len(joined), "joined": sorted(joined), "dropped": dropped}


def processor_config(codec_reference: str, stream_bos_id: int, stream_eos_id: int) -> dict:
    """The HiggsAudioV2Processor settings of the released checkpoint, naming its codec by `codec_reference`."""
    return {
        "processor_class": "HiggsAudioV2Processor",
        "audio_token": "<|AUDIO_OUT|>",
        "audio_bos_token": "<|audio_out_bos|>",
        "audio_eos_token": "<|audio_eos|>",
        "audio_delay_token": DELAY_TOKEN,
        "audio_stream_bos_id": stream_bos_id,
        "audio_stream_eos_id": stream_eos_id,
        "audio_tokenizer": {
            "audio_tokenizer_class": "HiggsAudioV2TokenizerModel",
            "audio_tokenizer_name_or_path": codec_reference,
        },
        "feature_extractor": {
            "feature_extractor_type": "DacFeatureExtractor",
            "feature_size": 1,
            "hop_length": 1,
            "padding_side": "right",
            "padding_value": 0.0,
            "return_attention_mask": True,
            "sampling_rate": 24000,
        },
    }
