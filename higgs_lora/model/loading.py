"""Loading the base model, its processor and codec from local directories.

One code path for real and tiny checkpoints: `from_pretrained(local_dir)` on the transformers layout. Boson's
original layout (downloads from before the transformers port), of the model or of the codec, is recognised and
refused with the command that converts it (`python -m higgs_lora.convert`, docs/deploy.md). Nothing here
downloads: every path must be a local directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from higgs_lora.config import ModelConfig
from higgs_lora.errors import CheckpointError

if TYPE_CHECKING:
    import torch

CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
"""The released model's chat template (tokenizer_config.json carries it; tiny models and conversions write it)."""

REQUIRED_CODEBOOK_SIZE = 1026
"""1024 codes + stream BOS (1024) + stream EOS (1025): what the released weights were trained with."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a model directory holds."""

    path: Path
    layout: str
    """'transformers' (loadable) or 'original' (Boson's pre-port layout: convert it first)."""
    config: dict


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Identify the layout of a local Higgs Audio v2 checkpoint directory, or raise CheckpointError."""
    path = Path(path).expanduser()
    if not str(path):
        raise CheckpointError("model.path is not set: point it at a local Higgs Audio v2 checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(
            f"model.path={path} is not a directory. Nothing is downloaded here: download the checkpoint yourself "
            "and give its local directory (or build a tiny one with `python -m higgs_lora.tiny`)."
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not a model checkpoint directory")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type == "higgs_audio_v2":
        return CheckpointInfo(path=path, layout="transformers", config=config)
    if model_type == "higgs_audio" or "audio_decoder_proj" in _weight_names(path):
        return CheckpointInfo(path=path, layout="original", config=config)
    raise CheckpointError(f"{config_file} has model_type={model_type!r}; expected 'higgs_audio_v2'")


def _weight_names(path: Path) -> str:
    """The safetensors index as text (cheap check for original-layout key names); empty when absent."""
    index = path / "model.safetensors.index.json"
    return index.read_text(encoding="utf-8") if index.is_file() else ""


def check_loadable(info: CheckpointInfo) -> None:
    """Raise CheckpointError unless `info` is a transformers-layout checkpoint with codebook_size 1026."""
    if info.layout == "original":
        raise CheckpointError(
            f"{info.path} is in Boson's original checkpoint layout. Convert it once to the transformers layout:\n"
            f"  python -m higgs_lora.convert --src {info.path} --out {info.path}-hf\n"
            "then set model.path to the converted directory (see docs/deploy.md)."
        )
    codebook_size = info.config.get("codebook_size")
    if codebook_size != REQUIRED_CODEBOOK_SIZE:
        raise CheckpointError(
            f"{info.path}/config.json has codebook_size={codebook_size}; the released weights need "
            f"{REQUIRED_CODEBOOK_SIZE} (1024 codes + stream BOS + stream EOS). With 1024 the BOS/EOS ids collide "
            'with the next codebook. Set "codebook_size": 1026 in that config.json.'
        )


def check_model_dir(path: str | Path) -> CheckpointInfo:
    """What every entry point that takes a model directory calls first: the directory's layout, or CheckpointError
    (exit 2) saying what to do, the convert command for Boson's original layout included. Reads config.json only."""
    info = inspect_checkpoint(path)
    check_loadable(info)
    return info


def load_base_model(cfg: ModelConfig, device: str | torch.device | None = None):
    """Load the frozen base HiggsAudioV2ForConditionalGeneration as `cfg` says (bf16/fp16/fp32 or NF4 4-bit)."""
    from transformers import HiggsAudioV2ForConditionalGeneration

    info = check_model_dir(cfg.path)
    dtype = torch_dtype(cfg.dtype)
    kwargs: dict = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    if cfg.use_text_head:
        kwargs["use_text_head"] = True
    if cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # Storage dtype equal to the compute dtype lets ZeRO-3 partition the packed 4-bit weights.
            bnb_4bit_quant_storage=dtype,
            # Heads and embeddings stay in full precision: they are small and quality-critical.
            llm_int8_skip_modules=["audio_lm_head", "text_lm_head", "embed_tokens", "embed_audio_tokens"],
        )
    if device is not None:
        kwargs["device_map"] = {"": str(device)}
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(str(info.path), **kwargs)
    model.requires_grad_(False)
    if cfg.quantization == "nf4":
        # bitsandbytes' CPU inference fast path (eval mode, no grad, AVX512-BF16 CPUs) repacks 4-bit weights in
        # place and flags them as repacked. Under ZeRO-3 the repacked copy is a transient gather, the flag stays,
        # and saving or the next forward breaks. Training never takes that path; evaluation must not either.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def portable_codec_reference(settings: dict) -> dict:
    """A processor config (`processor_config.json` as a dict) whose codec reference resolves on any machine.

    transformers loads the codec that `audio_tokenizer.audio_tokenizer_name_or_path` names before anything else,
    as a directory relative to the *current* directory or else as a Hub id; it has no notion of a path relative to
    the model folder. So the only references that survive moving a folder to another machine are Hub ids (the
    released `bosonai/higgs-audio-v2-tokenizer`: plain `AutoProcessor.from_pretrained(folder)` resolves it wherever
    the Hub or its cache is, exactly as for the released model). Those are kept. A local path (a tiny model's
    codec, a codec the user converted) is dropped rather than written: it would be stale, and a stale path makes
    transformers fail even when the codec is passed explicitly, while without the entry
    `AutoProcessor.from_pretrained(folder, audio_tokenizer=HiggsAudioV2TokenizerModel.from_pretrained(codec_dir))`
    works from anywhere. Our own loader never needs the entry (`resolve_codec_path`). docs/deploy.md says so.
    """
    settings = dict(settings)
    reference = settings.get("audio_tokenizer") or {}
    named = str(reference.get("audio_tokenizer_name_or_path") or "")
    if _HUB_ID.match(named) and not Path(named).expanduser().exists():
        settings["audio_tokenizer"] = {"audio_tokenizer_class": "HiggsAudioV2TokenizerModel", **reference}
    else:
        settings.pop("audio_tokenizer", None)
    return settings


def resolve_codec_path(cfg: ModelConfig) -> Path:
    """The codec directory: `cfg.codec_path`, else the processor config's reference if local, else the model's own
    `audio_tokenizer/` (merged models), else `../codec` beside the model."""
    if cfg.codec_path:
        path = Path(cfg.codec_path).expanduser()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"model.codec_path={path} is not a codec directory (no config.json)")
        return path
    candidates = []
    processor_config = Path(cfg.path) / "processor_config.json"
    if processor_config.is_file():
        reference = json.loads(processor_config.read_text(encoding="utf-8")).get("audio_tokenizer", {})
        named = reference.get("audio_tokenizer_name_or_path")
        if named:
            candidates.append(Path(named).expanduser())
            candidates.append(Path(cfg.path) / named)
    candidates.append(Path(cfg.path) / "audio_tokenizer")  # a merged model carries its codec (higgs_lora.deploy.merge)
    candidates.append(Path(cfg.path).parent / "codec")
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise CheckpointError(
        f"no local codec found for {cfg.path} (tried {tried}). Download the Higgs Audio v2 tokenizer and set "
        "model.codec_path to its directory."
    )


def check_codec(path: str | Path) -> None:
    """Raise CheckpointError when `path` holds Boson's original audio tokenizer (`model.pth`), with the fix."""
    path = Path(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if config.get("model_type") != "higgs_audio_v2_tokenizer" and (path / "model.pth").is_file():
        raise CheckpointError(
            f"{path} is Boson's original audio tokenizer layout (model.pth). Convert it once to the transformers "
            f"layout:\n  python -m higgs_lora.convert --src {path} --out {path}-hf\n"
            "then set model.codec_path to the converted directory (see docs/deploy.md)."
        )


def load_codec(path: str | Path, device: str | torch.device | None = None):
    """The audio codec (HiggsAudioV2TokenizerModel) from a local directory, in eval mode, float32."""
    from transformers import HiggsAudioV2TokenizerModel

    check_codec(path)

    codec = HiggsAudioV2TokenizerModel.from_pretrained(str(path))
    if device is not None:
        codec = codec.to(device)
    return codec.eval()


def load_processor(cfg: ModelConfig, codec=None):
    """The HiggsAudioV2Processor of a checkpoint, built from local files only.

    Assembled from its parts rather than through `AutoProcessor.from_pretrained`, because the released processor
    config names its codec by Hub id, which cannot be fetched here; the codec comes from `resolve_codec_path`.
    """
    from transformers import AutoTokenizer, DacFeatureExtractor, HiggsAudioV2Processor

    model_dir = Path(cfg.path)
    if codec is None:
        codec = load_codec(resolve_codec_path(cfg))
    settings = {}
    processor_config = model_dir / "processor_config.json"
    if processor_config.is_file():
        settings = json.loads(processor_config.read_text(encoding="utf-8"))
    feature_settings = settings.get("feature_extractor") or {
        "feature_size": 1,
        "hop_length": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "sampling_rate": 24000,
        "return_attention_mask": True,
    }
    feature_settings = {k: v for k, v in feature_settings.items() if k != "feature_extractor_type"}
    template_file = model_dir / "chat_template.jinja"
    chat_template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    if chat_template is None:
        raise CheckpointError(f"{model_dir} has no chat_template.jinja: the processor cannot render prompts")
    keys = (
        "audio_token",
        "audio_bos_token",
        "audio_eos_token",
        "audio_delay_token",
        "audio_stream_bos_id",
        "audio_stream_eos_id",
    )
    return HiggsAudioV2Processor(
        feature_extractor=DacFeatureExtractor(**feature_settings),
        tokenizer=AutoTokenizer.from_pretrained(str(model_dir)),
        audio_tokenizer=codec,
        chat_template=chat_template,
        **{k: settings[k] for k in keys if k in settings},
    )
