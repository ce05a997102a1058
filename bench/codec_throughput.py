"""Codec throughput: hours of audio encoded per hour of compute (what `prepare` spends its time on), and the decode
of the same codes (what inference and the training evaluation clips spend on the codec).

    python bench/codec_throughput.py --size full --seconds 10 --batch 1 --repeats 5     # released-size codec
    python bench/codec_throughput.py --codec /path/to/higgs-audio-v2-tokenizer          # your real codec

`--size full` builds a codec with the released dimensions (HuBERT-base + DAC) and random weights: the compute is
the real codec's, no weights needed. Runs on CUDA when present (timed with synchronisation), else CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--codec", help="a local codec directory (overrides --size)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    parser.add_argument("--batch", type=int, default=1, help="clips per codec call (all the same length)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.codec:
        from higgs_lora.model.loading import load_codec

        codec, label = load_codec(args.codec, device=device), args.codec
    else:
        from higgs_lora.tiny import build_codec

        codec, label = build_codec(seed=0, full_size=args.size == "full").to(device), f"random {args.size}-size codec"
    params = sum(p.numel() for p in codec.parameters())
    audio = torch.randn(args.batch, 1, int(args.seconds * 24000), generator=torch.Generator().manual_seed(0)) * 0.1
    audio = audio.to(device)
    times, codes = timed(lambda: codec.encode(audio).audio_codes, args.repeats, device)
    decode_times, _ = timed(lambda: codec.decode(codes).audio_values, args.repeats, device)
    median = statistics.median(times)
    audio_seconds = args.batch * args.seconds
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"codec: {label} ({params / 1e6:.1f}M parameters) on {where}; torch {torch.__version__}")
    print(f"input: {args.batch} x {args.seconds:.1f} s -> codes {tuple(codes.shape)}")
    print(f"encode: median {median * 1000:.0f} ms over {len(times)} calls (min {min(times) * 1000:.0f} ms)")
    print(
        f"throughput: {audio_seconds / median:.1f} s of audio per second = {audio_seconds / median:.1f} h of audio "
        f"per hour of compute"
    )
    decode = statistics.median(decode_times)
    print(
        f"decode: median {decode * 1000:.0f} ms over {len(decode_times)} calls (min {min(decode_times) * 1000:.0f} "
        f"ms) = {audio_seconds / decode:.1f} s of audio per second"
    )
    return 0


def timed(call, repeats: int, device: str):
    """(seconds of each of `repeats` calls after one warm-up call, the last result)."""
    times, result = [], None
    with torch.no_grad():
        for step in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            result = call()
            if device == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - started)
    return times, result


if __name__ == "__main__":
    raise SystemExit(main())
