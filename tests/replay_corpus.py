"""A small English corpus spoken by espeak-ng (as examples/demo_corpus was made), for the replay tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

VOICES = {"en_m1": ("en+m1", 45, 150), "en_f2": ("en+f2", 60, 165), "en_m3": ("en+m3", 35, 140)}
"""speaker -> (espeak-ng voice, pitch, words per minute)."""
SENTENCES = (
    "The river runs past the old mill.",
    "She bought 3 apples at the market.",
    "Please close the door when you leave.",
    "A cold wind blew across the hills tonight.",
)


def espeak() -> str:
    """The espeak-ng program, or a skip (a failure in CI, which installs it: .ci/run)."""
    program = shutil.which("espeak-ng")
    if program:
        return program
    if os.environ.get("HIGGS_LORA_CI"):
        pytest.fail("espeak-ng is not installed, but CI must make the replay corpus: .ci/run installs it")
    pytest.skip("needs espeak-ng to speak the English replay corpus (apt-get install espeak-ng); CI installs it")


def make_english_corpus(out: Path) -> Path:
    """3 speakers x 4 sentences of English as WAV files at espeak-ng's rate, and their manifest.jsonl (no
    `language` field: the corpus's language comes from data.replay_language)."""
    program = espeak()
    lines = []
    for speaker, (voice, pitch, speed) in VOICES.items():
        (out / speaker).mkdir(parents=True, exist_ok=True)
        for number, sentence in enumerate(SENTENCES, start=1):
            wav = out / speaker / f"{speaker}_{number:02d}.wav"
            subprocess.run(
                [program, "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(wav), sentence],
                check=True,
                capture_output=True,
            )
            lines.append({"audio": f"{speaker}/{wav.name}", "text": sentence, "speaker": speaker})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return manifest
