"""What `train.eval_asr` costs rank 0 per evaluation clip on the CPU: a random Whisper (tiny, or whisper-small's
layer sizes) transcribing N clips of S seconds through higgs_lora.eval.asr. Prints seconds per clip.

    python bench/asr_cost.py --size small --clips 4 --seconds 4

Random weights decode to the token limit more often than a trained model stops early, so this is an upper bound on
the decoder's share; the encoder's cost (a 30 s window per clip) is the same as a real model's of these sizes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    import torch

    from higgs_lora.eval.asr import load_asr
    from higgs_lora.tiny import write_tiny_whisper

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_whisper(Path(tmp) / "whisper", size=args.size)
        transcriber = load_asr(model_dir)
        rng = np.random.default_rng(0)
        clips = [0.1 * rng.standard_normal(int(args.seconds * 24000)).astype(np.float32) for _ in range(args.clips)]
        transcriber.transcribe(clips[0], 24000)  # warm-up
        started = time.perf_counter()
        lengths = [len(transcriber.transcribe(clip, 24000)) for clip in clips]
        per_clip = (time.perf_counter() - started) / len(clips)
    print(
        f"whisper-{args.size} random: {per_clip:.3f} s per {args.seconds:g} s clip on CPU "
        f"({torch.get_num_threads()} threads, {len(clips)} clips, mean transcript {np.mean(lengths):.0f} chars)"
    )


if __name__ == "__main__":
    main()
