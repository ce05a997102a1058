"""Inference speed: ours vs plain transformers `generate`, in the same run, on the same prompts.

    python bench/infer_speed.py --size tiny                 # CPU, the tiny model (plumbing, not a GPU prediction)
    python bench/infer_speed.py --size full --device cuda   # released shapes with random weights (an H200 run)
    python bench/infer_speed.py --codec-seams               # streamed vs whole decode with the released codec shapes

Prints, for greedy decoding of a fixed number of frames (EOS ignored so every run decodes the same work):
- batch-1 real-time factor (seconds per second of audio) of our core and of `generate`,
- time to first audio chunk when streaming (prefill + first chunk's frames + lookahead + its decode),
- batched throughput (audio seconds per second) at `--batch` requests.
Random weights never emit EOS reliably, so the frame count is fixed with `max_seconds` and EOS masked out.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_throughput as tt  # noqa: E402  (bench helpers: a random model of a config)


def build_model(size: str, workdir: Path, device: str = "cpu", layers: int | None = None):
    """A random model of the given size saved and loaded through the real loader; returns the model dir.

    The full size is the released architecture (model in bf16, codec with the released dimensions: its decode is
    part of every figure) at `workdir/full/{model,codec}`, initialised on `device` (on a GPU: seconds; on a CPU the
    5.8B initialisations take minutes) and reused when present, so several runs build it once."""
    from higgs_lora.tiny import build_codec, build_feature_extractor, ensure_tiny

    tiny = ensure_tiny(workdir / "tiny")
    if size == "tiny":
        return tiny.model_dir
    from transformers import HiggsAudioV2Config

    from higgs_lora.plan import RELEASED_MODEL_CONFIG

    tiny_config = json.loads((tiny.model_dir / "config.json").read_text())
    config = HiggsAudioV2Config(
        **{**tiny_config, **{k: v for k, v in RELEASED_MODEL_CONFIG.items() if not k.endswith("_id")}}
    )
    config.vocab_size = tiny_config["vocab_size"]  # the tiny tokenizer's; its special ids are the released ones
    if layers:
        config.num_hidden_layers = layers
    out = workdir / (f"full-{layers}-layers" if layers else "full")
    if not (out / "model" / "config.json").is_file():
        model = tt.random_model(config, torch.bfloat16, device)
        model.save_pretrained(out / "model")
        del model
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
            (out / "model" / name).write_bytes((tiny.model_dir / name).read_bytes())
        codec = build_codec(0, full_size=True)
        codec.save_pretrained(out / "codec")  # found as ../codec beside the model (resolve_codec_path)
        build_feature_extractor().save_pretrained(out / "codec")
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out / "model"


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per request (fixed frame count)")
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="batch sizes of the throughput runs")
    parser.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="compiled decode step (auto: on a GPU)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, help="--size full with this many decoder layers (a CPU smoke run)")
    parser.add_argument("--codec-seams", action="store_true")
    parser.add_argument(
        "--baseline", action=argparse.BooleanOptionalAction, default=True, help="also time transformers `generate`"
    )
    parser.add_argument("--workdir", default=None, help="keep the random checkpoint here (reused when present)")
    args = parser.parse_args()
    if args.codec_seams:
        return codec_seams()
    from higgs_lora.data.collate import build_prompt
    from higgs_lora.infer.cloner import VoiceCloner
    from higgs_lora.infer.sampling import SamplingParams

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        # Before building anything: the full-size model takes minutes and ~20 GB of host memory to build.
        print(
            f"error: --device {args.device} but torch.cuda.is_available() is False; pass --device cpu", file=sys.stderr
        )
        return 2
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="infer_speed_"))
    try:
        return measure(args, workdir, build_prompt, VoiceCloner, SamplingParams)
    finally:
        if own_workdir:  # the full-size random checkpoint is ~12 GB
            shutil.rmtree(workdir, ignore_errors=True)


def measure(args, workdir: Path, build_prompt, VoiceCloner, SamplingParams) -> int:  # noqa: N803 (classes passed in)
    model_dir = build_model(args.size, workdir, args.device, args.layers)
    compile_step = {"auto": "auto", "on": True, "off": False}[args.compile]
    cloner = VoiceCloner.load(
        model_dir, device=args.device, cache="static" if compile_step is True else "auto", compile_step=compile_step
    )
    reference = Path(__file__).resolve().parents[1] / "examples/demo_corpus/spk_f1/spk_f1_01.flac"
    request = cloner.request(
        reference,
        "تشرب الجدة الشاي في الحديقة",
        "الطقس اليوم معتدل مع رياح خفيفة",
        SamplingParams(temperature=0, max_seconds=args.seconds),
    )
    ref = cloner.reference(request.reference_audio, request.reference_rate, request.reference_text)
    prompt = build_prompt(cloner.processor, ref.text, ref.codes, cloner.normalize(request.target_text))
    eos = cloner.decoder.spec.eos_id
    # Fixed work: EOS never allowed, so every run decodes max_columns frames.
    cloner.model.audio_lm_head.register_forward_hook(
        lambda m, i, out: (
            out.view(*out.shape[:-1], -1, cloner.decoder.spec.codebook_size)
            .index_fill_(-1, torch.tensor([eos], device=out.device), -1e4)
            .view(out.shape)
        )
    )
    params = request.params
    frames = params.max_columns() - 9
    audio_seconds = frames / 25

    def ours(batch):
        for _ in cloner.decoder.run([prompt] * batch, [params] * batch, [None] * batch):
            pass

    def hf(batch):
        n = prompt.audio_input_ids.shape[0]
        cloner.model.generate(
            input_ids=prompt.input_ids[None].repeat(batch, 1).to(args.device),
            attention_mask=torch.ones(batch, len(prompt.input_ids), dtype=torch.long, device=args.device),
            audio_input_ids=prompt.audio_input_ids[None].repeat(batch, 1, 1).to(args.device),
            audio_input_ids_mask=torch.ones(batch, n, dtype=torch.bool, device=args.device),
            max_new_tokens=params.max_columns(),
            do_sample=False,
        )

    def first_chunk():
        for chunk in cloner.events([request], stream=True):
            if len(chunk.samples):
                return

    header = {
        "size": args.size,
        "device": args.device,
        "decoder": cloner.describe(),
        "frames": frames,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    results: dict = {"ours": {}}

    def emit() -> None:  # after every figure: a run cut short by a time limit still leaves what it measured
        print(json.dumps({**header, "results": results}), flush=True)

    started = time.perf_counter()
    ours(1)  # warm-up (and compilation, when compiled)
    results["ours"]["warmup_s"] = time.perf_counter() - started
    pipelines = [("ours", ours)]
    if args.baseline:
        hf(1)
        pipelines.append(("transformers", hf))
    for name, fn in pipelines:
        single = min(timed(lambda fn=fn: fn(1), args.device) for _ in range(args.repeats))
        results.setdefault(name, {})["rtf_batch1"] = single / audio_seconds
        emit()
        if name == "ours":
            first_chunk()
            results["ours"]["first_audio_s"] = min(timed(first_chunk, args.device) for _ in range(args.repeats))
            emit()
        for size in args.batch:
            batched = min(timed(lambda fn=fn, size=size: fn(size), args.device) for _ in range(args.repeats))
            results[name][f"audio_s_per_s_batch{size}"] = size * audio_seconds / batched
            results[name][f"frames_per_s_batch{size}"] = size * frames / batched
            emit()
    print(json.dumps({**header, "results": results}, indent=1))
    return 0


def codec_seams() -> int:
    """Max |streamed - whole| of the released codec architecture (random weights) for several context sizes."""
    from higgs_lora.infer.streaming_codec import StreamingCodec, StreamSettings, decode_codes
    from higgs_lora.tiny import build_codec

    codec = build_codec(0, full_size=True)
    codes = torch.randint(0, 1024, (8, 150), generator=torch.Generator().manual_seed(0))
    whole = decode_codes(codec, codes)
    peak = float(np.abs(whole).max())
    for context in (0, 2, 4, 8):
        decoder = StreamingCodec(codec, StreamSettings(left_context=context, lookahead=context))
        chunks = []
        for t in range(1, codes.shape[1] + 1):
            chunks += decoder.push(codes[:, :t])
        chunks.append(decoder.finish(codes))
        diff = float(np.abs(np.concatenate(chunks) - whole).max())
        print(f"context {context} frames each side: max |streamed - whole| = {diff:.2e} ({diff / peak:.2%} of peak)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
