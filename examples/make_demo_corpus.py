#!/usr/bin/env python3
"""Generate the small bundled Arabic demo corpus with espeak-ng.

The corpus is a tiny, licence-free stand-in for real recordings: five
synthetic "speakers" (distinct espeak-ng voice variants, pitches and speeds),
eight original Modern Standard Arabic sentences each.  It exists so the data
pipeline and the training loop can be exercised end to end without
downloading anything.

Usage::

    python examples/make_demo_corpus.py [--out examples/demo_corpus]

Output layout (relative to ``--out``)::

    <speaker>/<speaker>_<NN>.flac   16-bit PCM FLAC, mono, espeak's native rate
    manifest.jsonl                  one JSON object per utterance, sorted by path
    README.md                       provenance, voices, counts and licence

Audio is kept at espeak-ng's native 22,050 Hz on purpose: the training
pipeline resamples to 24 kHz itself and the demo should exercise that path.

The script is deterministic: the same espeak-ng build produces the same bytes.
It writes everything into a temporary directory next to ``--out`` and only
then swaps it into place, so an interrupted run never leaves a half-written
corpus behind.

Requirements: Python >= 3.10, numpy, soundfile, and the ``espeak-ng`` program.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile

ESPEAK_PROGRAM = "espeak-ng"

# Trimming / normalisation parameters.
TRIM_FRAME_SECONDS = 0.010
"""Analysis frame length for silence detection, in seconds."""
TRIM_THRESHOLD_DB = -40.0
"""A frame counts as speech when its RMS is within this many dB of the loudest frame."""
TRIM_PADDING_SECONDS = 0.050
"""Silence kept before the first and after the last speech frame, in seconds."""
PEAK_TARGET_DBFS = -3.0
"""Peak level after normalisation, in dB relative to full scale."""

# Every utterance must fall in this window after trimming (seconds).  The
# training code drops clips outside roughly this range, so a demo clip that
# drifts out of it would silently vanish from the demo run.
MIN_DURATION_SECONDS = 1.0
MAX_DURATION_SECONDS = 4.0

MANIFEST_NAME = "manifest.jsonl"
README_NAME = "README.md"


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an espeak-ng voice setting plus its sentences.

    Attributes:
        speaker_id: Directory and file-name prefix, e.g. ``spk_f1``.
        voice: espeak-ng ``-v`` value, language plus optional variant (``ar+f3``).
        pitch: espeak-ng ``-p`` pitch adjustment, 0..99 (50 is the default).
        speed: espeak-ng ``-s`` speaking rate in words per minute.
        amplitude: espeak-ng ``-a`` amplitude, 0..200 (100 is the default).
            Only matters for the raw render; clips are peak-normalised anyway.
        description: Human-readable note for the README.
        sentences: Transcripts, exactly as passed to espeak-ng.
    """

    speaker_id: str
    voice: str
    pitch: int
    speed: int
    amplitude: int
    description: str
    sentences: tuple[str, ...]


# Sentences were written for this corpus.  Roughly half of each speaker's
# lines carry full or partial tashkeel so the text normaliser sees both kinds;
# a few use Arabic punctuation (، ؟) and a few contain digits.
SPEAKERS: tuple[Speaker, ...] = (
    Speaker(
        speaker_id="spk_f1",
        voice="ar+f3",
        pitch=62,
        speed=165,
        amplitude=100,
        description="female-style variant f3, mid-high pitch, moderate pace",
        sentences=(
            "تَشْرَبُ الجَدَّةُ الشَّايَ فِي الحَدِيقَةِ",
            "الطقس اليوم معتدل مع رياح خفيفة",
            "هَلْ قَرَأْتَ الكِتَابَ الجَدِيدَ؟",
            "افتتحت البلدية مكتبة عامة",
            "يَبْدَأُ الدَّرْسُ فِي السَّاعَةِ الثَّامِنَةِ",
            "اشتريت خبزا وحليبا من المتجر",
            "تَتَوَقَّعُ الأَرْصَادُ أَمْطَارًا غَزِيرَةً",
            "سافر أخي إلى القاهرة، ثم عاد",
        ),
    ),
    Speaker(
        speaker_id="spk_f2",
        voice="ar+f2",
        pitch=78,
        speed=150,
        amplitude=100,
        description="female-style variant f2, high pitch, slow pace",
        sentences=(
            "النَّهْرُ يَجْرِي بِهُدُوءٍ بَيْنَ الأَشْجَارِ",
            "ترتفع الحرارة في الصيف",
            "كَتَبَتِ الطَّالِبَةُ رِسَالَةً طَوِيلَةً",
            "وصل القطار في موعده",
            "أين وضعت مفاتيح السيارة؟",
            "يَقْرَأُ أَبِي الصُّحُفَ صَبَاحًا",
            "في الفصل ٢٥ طالبا",
            "تُزْهِرُ الوُرُودُ فِي الرَّبِيعِ",
        ),
    ),
    Speaker(
        speaker_id="spk_m1",
        voice="ar+m3",
        pitch=42,
        speed=175,
        amplitude=100,
        description="male-style variant m3, mid-low pitch, brisk pace",
        sentences=(
            "يَعْمَلُ المُهَنْدِسُ عَلَى تَصْمِيمِ جِسْرٍ جَدِيدٍ",
            "انخفضت أسعار الخضار هذا الأسبوع",
            "تعلّمَ الأطفالُ الحروفَ بسرعة",
            "الجو غائم جزئيا في الشمال",
            "مَتَى يَبْدَأُ الِامْتِحَانُ النِّهَائِيُّ؟",
            "يقرأ الطلاب في المكتبة بصمت",
            "أُقِيمَ مَعْرِضُ الكِتَابِ فِي الرَّبِيعِ",
            "نلتقي في المقهى، بعد العمل",
        ),
    ),
    Speaker(
        speaker_id="spk_m2",
        voice="ar+m7",
        pitch=28,
        speed=155,
        amplitude=100,
        description="male-style variant m7, low pitch, measured pace",
        sentences=(
            "تَغْرُبُ الشَّمْسُ خَلْفَ الجِبَالِ",
            "بدأت الجامعة تسجيل الطلاب الجدد",
            "أعلنت الوزارةُ عن مشروعٍ جديد",
            "تهب رياح قوية على السواحل",
            "نَظَّفَ الأَوْلَادُ غُرْفَتَهُمْ قَبْلَ النَّوْمِ",
            "كم ثمن هذا القميص الأزرق؟",
            "يُسَاعِدُ الطَّبِيبُ المَرْضَى كُلَّ يَوْمٍ",
            "يبدأ العام الدراسي في الخريف",
        ),
    ),
    Speaker(
        speaker_id="spk_m3",
        voice="ar+klatt",
        pitch=50,
        speed=185,
        amplitude=100,
        description="Klatt-synthesiser variant, neutral pitch, fast pace",
        sentences=(
            "يَسْقِي الفَلَّاحُ الحَقْلَ صَبَاحًا",
            "تأخرت الطائرة بسبب الضباب الكثيف",
            "الرياضياتُ مادةٌ ممتعةٌ ومفيدة",
            "افتتح المتحف قاعة جديدة للزوار",
            "يَلْعَبُ الأَطْفَالُ الكُرَةَ فِي السَّاحَةِ",
            "ننصح السائقين بالحذر على الطرق",
            "سَأُسَافِرُ إِلَى دِمَشْقَ فِي نِهَايَةِ الشَّهْرِ",
            "تخرجت أختي عام 2026",
        ),
    ),
)


@dataclass(frozen=True)
class Utterance:
    """One rendered clip, ready to be written to the manifest.

    Attributes:
        audio: Path relative to the corpus root, with forward slashes.
        text: Transcript exactly as given to espeak-ng.
        speaker: Speaker id.
        duration: Clip length after trimming, in seconds.
    """

    audio: str
    text: str
    speaker: str
    duration: float


def require_espeak() -> str:
    """Return the path of the espeak-ng executable or exit with an install hint."""
    program = shutil.which(ESPEAK_PROGRAM)
    if program is None:
        sys.exit(
            f"error: '{ESPEAK_PROGRAM}' was not found on PATH; it is needed to "
            "synthesise the demo corpus. Install it with: apt-get install espeak-ng"
        )
    return program


def synthesise(program: str, speaker: Speaker, text: str, wav_path: Path) -> None:
    """Render ``text`` with the speaker's voice settings into a WAV file.

    espeak-ng writes 22,050 Hz mono 16-bit PCM.  The text goes through stdin
    (declared UTF-8 with ``-b 1``) so that the command line's locale cannot
    mangle the Arabic script.
    """
    command = [
        program,
        "-v",
        speaker.voice,
        "-p",
        str(speaker.pitch),
        "-s",
        str(speaker.speed),
        "-a",
        str(speaker.amplitude),
        "-b",
        "1",
        "-w",
        str(wav_path),
        "--stdin",
    ]
    result = subprocess.run(command, input=text.encode("utf-8"), capture_output=True, check=False)
    if result.returncode != 0 or not wav_path.is_file():
        raise RuntimeError(
            f"espeak-ng failed for {speaker.speaker_id} ({text!r}), exit code "
            f"{result.returncode}: {result.stderr.decode('utf-8', 'replace').strip()}"
        )


def trim_silence(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Cut leading/trailing silence, keeping ``TRIM_PADDING_SECONDS`` either side.

    Args:
        samples: Mono float signal in [-1, 1], shape ``(num_samples,)``.
        sample_rate: Sampling rate in Hz.

    Returns:
        The trimmed signal (a slice of ``samples``).  The threshold is relative
        to the loudest frame so it does not depend on espeak's output level.
    """
    frame_length = max(1, int(round(TRIM_FRAME_SECONDS * sample_rate)))
    num_frames = int(np.ceil(len(samples) / frame_length))
    padded = np.zeros(num_frames * frame_length, dtype=np.float64)
    padded[: len(samples)] = samples
    frame_rms = np.sqrt(np.mean(padded.reshape(num_frames, frame_length) ** 2, axis=1))
    loudest = float(frame_rms.max())
    if loudest <= 0.0:
        raise ValueError("espeak-ng produced pure silence")
    threshold = loudest * 10.0 ** (TRIM_THRESHOLD_DB / 20.0)
    voiced = np.flatnonzero(frame_rms >= threshold)
    padding = int(round(TRIM_PADDING_SECONDS * sample_rate))
    start = max(0, int(voiced[0]) * frame_length - padding)
    end = min(len(samples), (int(voiced[-1]) + 1) * frame_length + padding)
    return samples[start:end]


def peak_normalise(samples: np.ndarray) -> np.ndarray:
    """Scale ``samples`` so that the absolute peak sits at ``PEAK_TARGET_DBFS``."""
    peak = float(np.max(np.abs(samples)))
    if peak <= 0.0:
        raise ValueError("cannot normalise a silent signal")
    return samples * (10.0 ** (PEAK_TARGET_DBFS / 20.0) / peak)


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Quantise a float signal in [-1, 1] to int16 by rounding (not truncation)."""
    return np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)


def render_speaker(program: str, speaker: Speaker, corpus_dir: Path, scratch_dir: Path) -> list[Utterance]:
    """Synthesise, trim, normalise and write every sentence of one speaker as FLAC."""
    speaker_dir = corpus_dir / speaker.speaker_id
    speaker_dir.mkdir(parents=True)
    utterances = []
    for index, text in enumerate(speaker.sentences, start=1):
        stem = f"{speaker.speaker_id}_{index:02d}"
        wav_path = scratch_dir / f"{stem}.wav"
        synthesise(program, speaker, text, wav_path)
        raw, sample_rate = soundfile.read(wav_path, dtype="float64", always_2d=False)
        if raw.ndim != 1:
            raise RuntimeError(f"expected mono output from espeak-ng, got shape {raw.shape}")
        pcm = to_pcm16(peak_normalise(trim_silence(raw, sample_rate)))
        flac_path = speaker_dir / f"{stem}.flac"
        soundfile.write(flac_path, pcm, sample_rate, format="FLAC", subtype="PCM_16")
        utterances.append(
            Utterance(
                audio=flac_path.relative_to(corpus_dir).as_posix(),
                text=text,
                speaker=speaker.speaker_id,
                duration=round(len(pcm) / sample_rate, 3),
            )
        )
    return utterances


def check_durations(utterances: list[Utterance]) -> None:
    """Fail loudly if any clip is outside the allowed duration window (seconds)."""
    bad = [
        f"  {u.audio}: {u.duration:.3f} s  {u.text}"
        for u in utterances
        if not MIN_DURATION_SECONDS <= u.duration <= MAX_DURATION_SECONDS
    ]
    if bad:
        raise RuntimeError(
            f"{len(bad)} clip(s) outside {MIN_DURATION_SECONDS}-{MAX_DURATION_SECONDS} s; "
            "shorten or lengthen these sentences:\n" + "\n".join(bad)
        )


def write_manifest(utterances: list[Utterance], path: Path) -> None:
    """Write one JSON object per line, sorted by audio path, UTF-8, Arabic unescaped."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for u in sorted(utterances, key=lambda item: item.audio):
            record = {
                "audio": u.audio,
                "text": u.text,
                "speaker": u.speaker,
                "language": "ar",
                "duration": u.duration,
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def espeak_version(program: str) -> str:
    """Return espeak-ng's version number (e.g. ``1.51``), or ``unknown``."""
    result = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
    # Extract only the number: the full line ends with "Data at: <install
    # path>", which would leak this machine's layout into the committed README.
    match = re.search(r"text-to-speech:\s*(\S+)", result.stdout)
    return match.group(1) if match else "unknown"


def write_readme(utterances: list[Utterance], path: Path, version: str) -> None:
    """Describe provenance, voices, counts, durations (seconds) and licence."""
    total_seconds = sum(u.duration for u in utterances)
    rows = []
    for speaker in SPEAKERS:
        durations = [u.duration for u in utterances if u.speaker == speaker.speaker_id]
        rows.append(
            f"| `{speaker.speaker_id}` | `{speaker.voice}` | {speaker.pitch} | "
            f"{speaker.speed} | {speaker.amplitude} | {len(durations)} | "
            f"{min(durations):.2f}-{max(durations):.2f} s | {speaker.description} |"
        )
    sample_rate = soundfile.info(str(path.parent / utterances[0].audio)).samplerate
    text = f"""# Arabic demo corpus (synthetic)

A tiny Modern Standard Arabic speech corpus bundled with the repository so the
data pipeline and training loop can be tried end to end without downloading
anything. It is synthetic speech and far too small and robotic to train a
useful model; it only exercises the code paths.

- Speakers: {len(SPEAKERS)}
- Utterances: {len(utterances)} ({len(utterances) // len(SPEAKERS)} per speaker, every sentence distinct)
- Total duration: {total_seconds:.1f} s
- Clip durations: {min(u.duration for u in utterances):.2f}-{max(u.duration for u in utterances):.2f} s
  (the generator enforces {MIN_DURATION_SECONDS:.1f}-{MAX_DURATION_SECONDS:.1f} s)
- Audio: FLAC, 16-bit PCM, mono, {sample_rate} Hz. This is espeak-ng's native
  rate, kept on purpose: the pipeline resamples to 24 kHz itself and the demo
  should exercise that.
- Processing: leading/trailing silence trimmed with an energy threshold
  ({-TRIM_THRESHOLD_DB:.0f} dB below the loudest {TRIM_FRAME_SECONDS * 1000:.0f} ms frame,
  {TRIM_PADDING_SECONDS * 1000:.0f} ms padding kept), then peak-normalised to {PEAK_TARGET_DBFS:.0f} dBFS.

## Layout

```
<speaker>/<speaker>_<NN>.flac
{MANIFEST_NAME}
```

`{MANIFEST_NAME}` has one JSON object per line, sorted by `audio`:

```json
{{"audio": "spk_f1/spk_f1_01.flac", "text": "...", "speaker": "spk_f1", "language": "ar", "duration": 2.345}}
```

`audio` is relative to this directory, `text` is the transcript exactly as
given to espeak-ng, `duration` is in seconds (3 decimals). About half of the
transcripts carry full or partial diacritics (tashkeel) and half carry none;
a few contain Arabic punctuation (، ؟) and digits, for the text normaliser.

## How it was made

Generated by `examples/make_demo_corpus.py` with espeak-ng {version}:

```
apt-get install espeak-ng
python examples/make_demo_corpus.py --out examples/demo_corpus
```

The script is deterministic for a given espeak-ng build. Other espeak-ng
versions may render slightly different audio.

## Speakers

| speaker | espeak-ng voice (`-v`) | pitch (`-p`) | speed (`-s`, wpm) | amplitude (`-a`) | clips | duration range | notes |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Licence

The sentences were written by the project authors for this corpus and the
audio was generated by us with espeak-ng from those sentences. The corpus
(text and audio) is free to use, modify and redistribute for any purpose,
without restriction or attribution.
"""
    path.write_text(text, encoding="utf-8", newline="\n")


def build_corpus(program: str, corpus_dir: Path, scratch_dir: Path) -> list[Utterance]:
    """Write the complete corpus (audio, manifest, README) into ``corpus_dir``."""
    utterances: list[Utterance] = []
    for speaker in SPEAKERS:
        utterances.extend(render_speaker(program, speaker, corpus_dir, scratch_dir))
    check_durations(utterances)
    write_manifest(utterances, corpus_dir / MANIFEST_NAME)
    write_readme(utterances, corpus_dir / README_NAME, espeak_version(program))
    return utterances


def replace_directory(new_dir: Path, target: Path) -> None:
    """Move ``new_dir`` to ``target``, replacing any existing corpus there.

    A directory cannot be renamed over a non-empty one, so the old corpus is
    first renamed aside, then the new one renamed in, then the old one deleted.
    Both renames stay on one filesystem (the temp dirs live next to
    ``target``), so at every instant ``target`` is either the complete old
    corpus, absent, or the complete new corpus.
    """
    if not target.exists():
        new_dir.rename(target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()  # mkdtemp reserved a unique name; rename needs it absent
    target.rename(backup)
    try:
        new_dir.rename(target)
    except OSError:
        backup.rename(target)  # put the old corpus back before reporting
        raise
    shutil.rmtree(backup)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse command-line options."""
    default_out = Path(__file__).resolve().parent / "demo_corpus"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=default_out,
        help="corpus directory to create or replace (default: demo_corpus next to this script)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: build the corpus in a temp dir, then swap it into place."""
    args = parse_args(argv)
    program = require_espeak()
    target = args.out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        corpus_dir = staging / "corpus"
        scratch_dir = staging / "scratch"
        corpus_dir.mkdir()
        scratch_dir.mkdir()
        utterances = build_corpus(program, corpus_dir, scratch_dir)
        replace_directory(corpus_dir, target)
    finally:
        # Runs on success too: only scratch WAVs remain then.  On failure this
        # discards the partial corpus, leaving any previous one untouched.
        shutil.rmtree(staging, ignore_errors=True)

    durations = [u.duration for u in utterances]
    print(
        f"wrote {len(utterances)} clips from {len(SPEAKERS)} speakers to {target} "
        f"({sum(durations):.1f} s total, {min(durations):.2f}-{max(durations):.2f} s per clip)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
