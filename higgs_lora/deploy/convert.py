"""`higgs-lora convert` (also `python -m higgs_lora.convert`): original checkpoints into the transformers layout.

    python -m higgs_lora.convert --src /models/higgs-audio-v2-generation-3B-base --out /models/higgs-v2-hf \\
        --codec /models/higgs-v2-tokenizer-hf
    python -m higgs_lora.convert --src /models/higgs-audio-v2-tokenizer --out /models/higgs-v2-tokenizer-hf

Downloads from before the transformers port come in Boson's own layout: `model_type: higgs_audio`, tensors named
for Boson's code, and a codec stored as `model.pth` with weight-norm pairs. What `--src` holds (the generation model
or the audio tokenizer) is detected; a directory already in the transformers layout is refused as nothing to do.
The rewriting itself: deploy/original_model.py and deploy/original_codec.py (docs/deploy.md).

Exit codes: 0 converted, 2 a problem with the input or the output directory (the message says what to do).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from higgs_lora import startup
from higgs_lora.deploy.original_model import (
    DEFAULT_CODEC_REFERENCE,
    ORIGINAL_MODEL_TYPE,
    ConvertError,
    convert_model,
)
from higgs_lora.files import atomic_write_json, staged_directory
from higgs_lora.logs import get_logger

log = get_logger("convert")

CONVERT_MARKER = "higgs_lora_convert.json"


def detect_kind(src: Path) -> str:
    """'model' or 'codec' for an original-layout directory; ConvertError for anything else, saying what it is."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConvertError(f"{src} has no config.json: not a Higgs Audio checkpoint directory")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type in ("higgs_audio_v2", "higgs_audio_v2_tokenizer"):
        raise ConvertError(f"{src} is already in the transformers layout (model_type={model_type}); use it as it is")
    if model_type == ORIGINAL_MODEL_TYPE:
        return "model"
    if (src / "model.pth").is_file() and {"ratios", "n_q"} <= config.keys():
        return "codec"
    raise ConvertError(
        f"{src} is neither Boson's original generation model (model_type {ORIGINAL_MODEL_TYPE!r}) nor "
        "its original audio tokenizer (config.json with ratios/n_q and model.pth)"
    )


def convert(
    src: str | Path,
    out: str | Path,
    codec: str | None = None,
    force: bool = False,
    hubert_heads: int | None = None,
) -> Path:
    """Convert `src` (original model or codec) into `out`, atomically; returns `out`. `hubert_heads`: attention
    heads of the codec's HuBERT (default: hidden size / 64, HuBERT-base's 12); not stored in model.pth."""
    from higgs_lora.deploy.original_codec import convert_codec

    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if not src.is_dir():
        raise ConvertError(f"--src {src}: no such directory")
    kind = detect_kind(src)
    if out == src or src in out.parents or out in src.parents:
        raise ConvertError(f"--out {out} overlaps --src {src}; write the conversion to a separate directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(f"--out {out} exists and is not empty; choose another directory or pass --force")
    if codec is not None and kind == "codec":
        raise ConvertError("--codec names the codec a converted generation model refers to; --src is a codec")
    log.info(f"{src}: Boson's original {'generation model' if kind == 'model' else 'audio tokenizer'}")
    with staged_directory(out) as staging:
        if kind == "model":
            reference = str(Path(codec).expanduser().resolve()) if codec else DEFAULT_CODEC_REFERENCE
            summary = convert_model(src, staging, reference)
        else:
            summary = convert_codec(src, staging, hubert_heads)
        for path in src.iterdir():  # the weights' licence travels with them
            if path.is_file() and re.match(r"^(LICEN[CS]E|NOTICE)", path.name, re.IGNORECASE):
                shutil.copy2(path, staging / path.name)
        atomic_write_json(
            staging / CONVERT_MARKER, {"tool": "higgs_lora.deploy.convert", "source": str(src), **summary}
        )
    log.info(f"wrote {out}")
    return out


def _run(args: argparse.Namespace) -> int:
    if args.hubert_heads is not None and args.hubert_heads < 1:
        raise ConvertError(f"--hubert-heads {args.hubert_heads}: give a positive number of attention heads")
    convert(args.src, args.out, args.codec, args.force, args.hubert_heads)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="higgs-lora convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
    )
    parser.add_argument("--src", required=True, help="original-layout directory (generation model or codec)")
    parser.add_argument("--out", required=True, help="where the transformers-layout checkpoint goes")
    parser.add_argument(
        "--codec",
        help="for a generation model: the (converted) codec directory its processor "
        "config should name (default: the released Hub id; set model.codec_path)",
    )
    parser.add_argument(
        "--hubert-heads",
        type=int,
        default=None,
        help="for a codec: attention heads of its HuBERT semantic model (model.pth does not store them; "
        "default: hidden size / 64, i.e. 12 for HuBERT-base)",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    startup.add_common_arguments(parser)
    args = parser.parse_args(argv)
    return startup.run_command(args, lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main())
