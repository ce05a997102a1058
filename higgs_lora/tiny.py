"""Tiny random Higgs Audio v2 checkpoints, written in the released transformers layout.

`python -m higgs_lora.tiny --out build/tiny` writes two directories, as the released model ships in two
repositories (the generation model, and the audio tokenizer it refers to):

    build/tiny/model/   config.json, generation_config.json, model.safetensors (text head included),
                        tokenizer.json, tokenizer_config.json, chat_template.jinja, processor_config.json
    build/tiny/codec/   config.json, model.safetensors, preprocessor_config.json

Both load with plain transformers from the local directory (`HiggsAudioV2ForConditionalGeneration`,
`HiggsAudioV2TokenizerModel`, and `AutoProcessor` given that codec), offline, so the project's loading code is
exercised exactly as with real weights. What differs from the real model is only size: 2 layers, hidden 64, a
byte-level BPE text vocabulary of about a thousand tokens trained on the demo transcripts and some English, followed by
the 256 Llama-3 special tokens in their usual order (so `<|AUDIO_OUT|>` sits at vocab_base + 16, as 128016 = 128000 + 16
in the real one). Token ids therefore differ from the real ones: code must read them from the tokenizer/config, never
hard-code them.

The codec keeps the real signal path and numbers that matter: 24 kHz, hop 960 samples -> 25 frames/s, 8 residual
codebooks of 1024 codes, a HuBERT semantic branch at 16 kHz and a DAC acoustic branch; its codebooks are filled
with random non-zero vectors (a freshly built codec has all-zero codebooks and maps everything to code 0).

The released processor config names its codec by Hub id; the tiny codec has none, and transformers resolves a
local path from the current directory, so the tiny processor config names no codec at all (a path would go stale
when the folder moves). Our loader finds `../codec` beside the model (or `model.codec_path`); plain transformers
is given it: `AutoProcessor.from_pretrained(model_dir, audio_tokenizer=codec)`. The two directories can move
together anywhere. Everything is deterministic for a seed. Weights are saved in float32: the tiny model is for CPU
tests.

`--whisper` also writes `build/tiny/whisper/`, a random multilingual Whisper (transformers layout, byte-level
tokenizer) for `train.eval_asr` and `evaluate --asr` in tests and the demo; it transcribes garbage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from higgs_lora import startup
from higgs_lora.files import replace_directory
from higgs_lora.model.loading import CHAT_TEMPLATE_PATH, portable_codec_reference

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRANSCRIPTS = REPO_ROOT / "examples" / "demo_corpus" / "manifest.jsonl"

# Llama 3 reserves 256 special tokens after the text vocabulary; Higgs Audio v2 renames some of them.
# Offsets from the first special id (128000 in the real vocabulary).
HIGGS_SPECIAL_TOKENS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    2: "<|reserved_special_token_0|>",
    3: "<|reserved_special_token_1|>",
    4: "<|finetune_right_pad_id|>",
    5: "<|reserved_special_token_2|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
    11: "<|audio_bos|>",
    12: "<|audio_eos|>",
    13: "<|audio_out_bos|>",
    14: "<|reserved_special_token_6|>",  # the audio delay token; keeps its reserved name in the released vocab
    15: "<|AUDIO|>",
    16: "<|AUDIO_OUT|>",
    18: "<|scene_desc_start|>",
    19: "<|scene_desc_end|>",
}
NUM_SPECIAL_TOKENS = 256

# English lines written for the tokenizer (the model also reads English system prompts and scene descriptions).
ENGLISH_LINES = (
    "Generate audio following instruction.",
    "Audio is recorded from a quiet room.",
    "The speaker reads the news in a calm and steady voice.",
    "A short sentence is easier to say than a long one.",
    "Please clone this voice and read the following text.",
    "The weather today is sunny with a light breeze from the north.",
    "Numbers such as 12, 250 and 2026 appear in many transcripts.",
    "She opened the window and listened to the rain.",
    "Training stops when the loss no longer falls.",
    "Every codebook ends with its own end of stream token.",
)


@dataclass(frozen=True)
class TinyPaths:
    """Where a tiny checkpoint was written."""

    root: Path
    model_dir: Path
    codec_dir: Path


def special_token_names() -> list[str]:
    """The 256 special token names, in id order (offset 0 = `<|begin_of_text|>`)."""
    # Llama 3 numbers the unnamed slots from offset 11 on as <|reserved_special_token_{offset - 8}|>.
    return [
        HIGGS_SPECIAL_TOKENS.get(offset, f"<|reserved_special_token_{offset - 8}|>")
        for offset in range(NUM_SPECIAL_TOKENS)
    ]


def read_transcripts(manifest: Path | None) -> list[str]:
    """Transcripts from a JSONL manifest (`text` field), or none when there is no manifest."""
    if manifest is None or not Path(manifest).is_file():
        return []
    lines = Path(manifest).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def build_text_tokenizer(texts: list[str], bpe_vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `texts`, plus the Higgs special tokens and Llama-3 conventions.

    Byte-level: any text encodes, Arabic included, with no unknown token. BOS is added by the post-processor
    as in Llama 3; EOS and pad are `<|end_of_text|>` as in the released tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator(list(texts) + list(ENGLISH_LINES), trainer)
    specials = special_token_names()
    backend.add_special_tokens(specials)
    bos_id = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, seed: int, hidden_size: int = 64, num_layers: int = 2):
    """A random HiggsAudioV2ForConditionalGeneration sized for tests, with the text head."""
    import torch
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = HiggsAudioV2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=131072,  # as Llama 3.2; rotary tables are computed on the fly
        rope_parameters={  # Llama 3.2's, as in the released checkpoint
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        num_codebooks=8,
        codebook_size=1026,  # 1024 codes + stream BOS 1024 + stream EOS 1025 (the class default 1024 is wrong)
        audio_stream_bos_id=1024,
        audio_stream_eos_id=1025,
        audio_token_id=ids("<|AUDIO_OUT|>"),
        audio_bos_token_id=ids("<|audio_out_bos|>"),
        audio_delay_token_id=ids("<|reserved_special_token_6|>"),
        pad_token_id=ids("<|end_of_text|>"),
        bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=ids("<|eot_id|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True)
    gen = model.generation_config
    gen.bos_token_id = config.bos_token_id
    gen.eos_token_id = config.eos_token_id
    gen.pad_token_id = config.pad_token_id
    gen.ras_win_len = 7  # repetition-aware sampling window, as Boson's engine
    gen.ras_win_max_num_repeat = 2
    gen.use_text_head = True
    return model.eval()


def build_codec(seed: int, full_size: bool = False):
    """A random HiggsAudioV2TokenizerModel: 24 kHz, 25 frames/s, 8 codebooks of 1024, non-zero codebooks.

    `full_size=True` gives the released codec's dimensions (HuBERT-base semantic branch, DAC with 64/1024 channels,
    codebook dim 64) with random weights: same compute as the real codec, for benchmarks.
    """
    import torch
    from transformers import DacConfig, HiggsAudioV2TokenizerConfig, HiggsAudioV2TokenizerModel, HubertConfig

    ratios = [8, 5, 4, 2, 3]  # product 960: one frame per 960 samples at 24 kHz = 25 frames/s
    if full_size:
        acoustic = DacConfig(
            encoder_hidden_size=64,
            downsampling_ratios=ratios,
            decoder_hidden_size=1024,
            upsampling_ratios=ratios,
            hidden_size=256,
            sampling_rate=24000,
        )
        semantic = HubertConfig(mask_time_prob=0.0)  # HuBERT-base: 768 hidden, 12 layers
        codebook_dim = 64
    else:
        acoustic, semantic, codebook_dim = _tiny_codec_parts(ratios)
    config = HiggsAudioV2TokenizerConfig(
        target_bandwidths=[0.5, 1, 1.5, 2],  # ends at 2 kbps -> 8 quantizers at 25 frames/s
        sample_rate=24000,
        codebook_size=1024,
        codebook_dim=codebook_dim,
        acoustic_model_config=acoustic.to_dict(),
        semantic_model_config=semantic.to_dict(),
        semantic_sample_rate=16000,
        downsample_factor=320,
    )
    torch.manual_seed(seed)
    codec = HiggsAudioV2TokenizerModel(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in codec.quantizer.quantizers:
            book = layer.codebook
            book.embed.copy_(torch.randn(book.embed.shape, generator=generator))
            book.embed_avg.copy_(book.embed)
            book.cluster_size.fill_(1.0)
    return codec.eval()


def _tiny_codec_parts(ratios: list[int]):
    """DAC and HuBERT configs of the tiny codec, and its codebook dimension."""
    from transformers import DacConfig, HubertConfig

    acoustic = DacConfig(
        encoder_hidden_size=4,
        downsampling_ratios=ratios,
        decoder_hidden_size=32,  # halves at each of the 5 upsampling stages: must stay >= 32
        upsampling_ratios=ratios,
        hidden_size=16,
        n_codebooks=1,
        codebook_size=16,
        codebook_dim=4,
        sampling_rate=24000,
    )
    semantic = HubertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(16,) * 7,  # the default strides (5,2,2,2,2,2,2) give 50 frames/s at 16 kHz, halved to 25
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,
    )
    return acoustic, semantic, 8


def build_feature_extractor():
    """The codec's feature extractor: raw 24 kHz mono samples in, as in the released processor."""
    from transformers import DacFeatureExtractor

    return DacFeatureExtractor(
        feature_size=1,
        hop_length=1,
        padding_side="right",
        padding_value=0.0,
        sampling_rate=24000,
        return_attention_mask=True,
    )


def write_tiny(out: str | Path, seed: int = 0, transcripts: Path | None = DEFAULT_TRANSCRIPTS) -> TinyPaths:
    """Build the tiny model, codec, tokenizer and processor and write them under `out` (atomically).

    `out/model` and `out/codec` appear together, complete, or not at all.
    """
    from transformers import HiggsAudioV2Processor

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the checkpoint is an ordinary readable directory
    try:
        tokenizer = build_text_tokenizer(read_transcripts(transcripts))
        codec = build_codec(seed)
        feature_extractor = build_feature_extractor()
        model = build_model(tokenizer, seed)

        codec_dir = staging / "codec"
        codec.save_pretrained(codec_dir)
        feature_extractor.save_pretrained(codec_dir)

        processor = HiggsAudioV2Processor(
            feature_extractor=feature_extractor,
            tokenizer=tokenizer,
            audio_tokenizer=codec,
            chat_template=CHAT_TEMPLATE_PATH.read_text(encoding="utf-8"),
        )
        model_dir = staging / "model"
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        # transformers wrote the codec's (staging) path; a local path cannot survive a move: drop it (see
        # portable_codec_reference). Our loader finds ../codec; plain transformers is given the codec.
        processor_file = model_dir / "processor_config.json"
        settings = json.loads(processor_file.read_text(encoding="utf-8"))
        processor_file.write_text(json.dumps(portable_codec_reference(settings), indent=2) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(
            "Tiny random Higgs Audio v2 checkpoint written by `python -m higgs_lora.tiny` "
            f"(seed {seed}) for tests and the demo. Not a speech model.\n",
            encoding="utf-8",
        )
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TinyPaths(root=out, model_dir=out / "model", codec_dir=out / "codec")


WHISPER_SPECIALS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|ar|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
WHISPER_SIZES = {
    "tiny": {"d_model": 32, "layers": 1, "heads": 2, "ffn": 64},
    "small": {"d_model": 768, "layers": 12, "heads": 12, "ffn": 3072},
}
"""Layer sizes of the random Whispers: "tiny" for tests, "small" as openai/whisper-small's (for cost benchmarks)."""


def write_tiny_whisper(out: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """A random multilingual Whisper in the transformers layout (config, weights, generation config, processor),
    written to `out` and returned; it knows `<|ar|>` and `<|en|>` and transcribes garbage, deterministically.

    The tokenizer is byte-level with 256 byte tokens and no merges (any text encodes), plus Whisper's special
    tokens; "small" has whisper-small's layer sizes but this small vocabulary, so its output layer is cheaper.
    """
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    out = Path(out).resolve()
    dims = WHISPER_SIZES[size]
    with tempfile.TemporaryDirectory(prefix="tiny-whisper-vocab-") as vocab_dir:
        vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
        (Path(vocab_dir) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(vocab_dir) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        eot = WHISPER_SPECIALS[0]
        tokenizer = WhisperTokenizer(
            str(Path(vocab_dir) / "vocab.json"),
            str(Path(vocab_dir) / "merges.txt"),
            unk_token=eot,
            bos_token=eot,
            eos_token=eot,
            pad_token=eot,
        )
    tokenizer.add_special_tokens({"additional_special_tokens": list(WHISPER_SPECIALS[1:])})
    ids = dict(zip(WHISPER_SPECIALS, tokenizer.convert_tokens_to_ids(list(WHISPER_SPECIALS))))
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        d_model=dims["d_model"],
        encoder_layers=dims["layers"],
        decoder_layers=dims["layers"],
        encoder_attention_heads=dims["heads"],
        decoder_attention_heads=dims["heads"],
        encoder_ffn_dim=dims["ffn"],
        decoder_ffn_dim=dims["ffn"],
        num_mel_bins=80,
        max_target_positions=448 if size == "small" else 64,
        pad_token_id=ids[eot],
        bos_token_id=ids[eot],
        eos_token_id=ids[eot],
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids[eot],
        pad_token_id=ids[eot],
        bos_token_id=ids[eot],
        is_multilingual=True,
        lang_to_id={"<|ar|>": ids["<|ar|>"], "<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        max_length=config.max_target_positions,
    )
    model.save_pretrained(out)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(
        out
    )
    return out


def ensure_tiny(out: str | Path, seed: int = 0) -> TinyPaths:
    """Return the tiny checkpoint under `out`, building it first if it is missing."""
    out = Path(out).resolve()
    if (out / "model" / "config.json").is_file() and (out / "codec" / "config.json").is_file():
        return TinyPaths(root=out, model_dir=out / "model", codec_dir=out / "codec")
    return write_tiny(out, seed=seed)


def _run(args: argparse.Namespace) -> int:
    paths = write_tiny(args.out, seed=args.seed, transcripts=Path(args.transcripts) if args.transcripts else None)
    print(f"tiny model: {paths.model_dir}\ntiny codec: {paths.codec_dir}")  # the command's output: where it is
    if args.whisper:
        print(f"tiny whisper: {write_tiny_whisper(paths.root / 'whisper', seed=args.seed)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="higgs-lora tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/tiny", help="output directory (gets model/ and codec/)")
    parser.add_argument("--seed", type=int, default=0, help="seed for all random weights")
    parser.add_argument(
        "--transcripts",
        default=str(DEFAULT_TRANSCRIPTS) if DEFAULT_TRANSCRIPTS.is_file() else None,
        help="JSONL manifest whose `text` fields train the BPE tokenizer (default: the demo corpus)",
    )
    parser.add_argument(
        "--whisper", action="store_true", help="also write a tiny random Whisper to <out>/whisper (for train.eval_asr)"
    )
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return startup.run_command(args, lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
