"""Corpus readers: every supported input format becomes a list of uniform `Utterance` records.

Formats (see docs/data.md for a minimal example of each):

- `chatml`: the seed design's ChatML JSON (a list of samples whose user message holds reference transcript,
  reference audio and target text, optionally followed by an assistant audio: the target recording), or Boson-style
  ChatML JSONL (one conversation per line with system/user/assistant turns and audio contents). Reference/target
  pairs found there are kept as fixed pairs.
- `manifest`: JSONL, one `{"audio": path, "text": ..., "speaker": ...}` per line, paths relative to the manifest.
- `ljspeech`: `metadata.csv` (`id|text|normalized_text`) + `wavs/`; one speaker.
- `commonvoice`: `validated.tsv` (client_id, path, sentence, ...) + `clips/`; speaker = client_id.
- `hf`: a local Hugging Face dataset directory: `save_to_disk` output, or an audiofolder (audio files +
  `metadata.csv`/`metadata.jsonl` with a `file_name` column).

Readers never open audio; a malformed record is reported as a `SourceProblem` and the rest is read. Text files are
decoded line by line, so a line that is not UTF-8 is one problem (`bad_encoding`) and not the end of the read; a
transcript, speaker or path that is not proper Unicode (a lone surrogate from a JSON `\\ud800`) is one problem
(`bad_text`); a path that cannot be resolved (a symlink loop) is kept as given and rejected later when opened. A
corpus with no record at all is a `CorpusFormatError` (nothing to prepare is a user error, not "0 kept").
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from higgs_lora.data.audio import HF_AUDIO_PREFIX
from higgs_lora.data.chatml import audio_of, message_parts, resolve_path
from higgs_lora.errors import UserError

FORMATS = ("manifest", "chatml", "ljspeech", "commonvoice", "hf")
TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text")
SPEAKER_COLUMNS = ("speaker", "speaker_id", "client_id", "spk_id")


@dataclass
class Utterance:
    """One recording and its transcript, as the sources describe it (nothing is checked yet)."""

    audio: str
    """Audio file path (absolute), or `hf-dataset://<dir>#<row>` for audio stored inside a dataset directory."""
    text: str
    speaker: str
    language: str
    source_id: str
    """Stable id within the corpus (manifest line, LJSpeech id, ChatML sample + role, ...)."""


@dataclass
class SourceProblem:
    """A record that could not be read into an Utterance."""

    source_id: str
    reason: str
    detail: str


@dataclass
class Corpus:
    """What a reader produced: utterances in a stable order, fixed (reference, target) pairs, and problems."""

    utterances: list[Utterance] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    """(reference source_id, target source_id) pairs given explicitly by the data (ChatML)."""
    problems: list[SourceProblem] = field(default_factory=list)


class CorpusFormatError(UserError, ValueError):
    """The corpus path cannot be read in the requested (or any detectable) format."""


def detect_format(path: Path) -> str:
    """Guess the corpus format from the path; raises CorpusFormatError listing what was looked for."""
    if path.is_file():
        if path.suffix == ".jsonl":
            text = path.read_text(encoding="utf-8", errors="replace")
            first = next((line for line in text.splitlines() if line.strip()), "")
            return "chatml" if '"messages"' in first else "manifest"
        if path.suffix == ".json":
            return "chatml"
        if path.name == "metadata.csv":
            return "ljspeech"
        if path.suffix == ".tsv":
            return "commonvoice"
    if path.is_dir():
        if (path / "metadata.csv").is_file() and (path / "wavs").is_dir():
            return "ljspeech"
        if (path / "validated.tsv").is_file():
            return "commonvoice"
        if (
            (path / "dataset_info.json").is_file()
            or (path / "dataset_dict.json").is_file()
            or (path / "metadata.csv").is_file()
            or (path / "metadata.jsonl").is_file()
        ):
            return "hf"
    raise CorpusFormatError(
        f"cannot tell the format of {path}: expected a .jsonl manifest, ChatML .json/.jsonl, an LJSpeech directory "
        "(metadata.csv + wavs/), a Common Voice directory (validated.tsv + clips/) or a Hugging Face dataset "
        "directory; set data.format explicitly"
    )


def read_corpus(path: str | Path, fmt: str = "auto", language: str = "ar") -> Corpus:
    """Read a corpus in format `fmt` ('auto' detects it) into utterances, fixed pairs and problems."""
    try:
        path = Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as err:  # a symlink loop (RuntimeError before Python 3.13), a bad component
        raise CorpusFormatError(f"data.corpus={path} cannot be resolved ({err})") from None
    if not path.exists():
        raise CorpusFormatError(f"data.corpus={path} does not exist")
    if fmt == "auto":
        fmt = detect_format(path)
    readers = {
        "manifest": _read_manifest,
        "chatml": _read_chatml,
        "ljspeech": _read_ljspeech,
        "commonvoice": _read_commonvoice,
        "hf": _read_hf_dir,
    }
    if fmt not in readers:
        raise CorpusFormatError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")
    corpus = Corpus()
    readers[fmt](path, language, corpus)
    _drop_bad_text(corpus)
    if not corpus.utterances and not corpus.problems:
        raise CorpusFormatError(
            f"data.corpus={path} holds no records (format {fmt}): nothing to prepare; point data.corpus at a "
            "non-empty corpus (docs/data.md shows each format)"
        )
    return corpus


def unicode_problem(value: str) -> str | None:
    """Why `value` cannot be written as UTF-8 (a lone surrogate), or None when it is proper Unicode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"character {ascii(value[err.start])} at position {err.start} is not valid Unicode ({err.reason})"
    return None


def _drop_bad_text(corpus: Corpus) -> None:
    """Move utterances whose text, speaker, language or path is not proper Unicode into the problems."""
    kept = []
    for utterance in corpus.utterances:
        problem = next(
            (
                f"{name}: {why}"
                for name in ("text", "speaker", "language", "audio", "source_id")
                if (why := unicode_problem(getattr(utterance, name)))
            ),
            None,
        )
        if problem is None:
            kept.append(utterance)
        else:
            corpus.problems.append(SourceProblem(printable(utterance.source_id), "bad_text", problem))
    corpus.utterances = kept


def printable(value: str) -> str:
    """`value` with anything that is not valid Unicode escaped (`\\ud800`), safe to write as UTF-8."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_resolve(path: Path) -> str:
    """`path` made absolute and resolved; when resolving fails (a symlink loop) it is made absolute only, and the
    failure is left to the audio reader, which rejects the file with its reason."""
    try:
        return str(path.resolve())
    except (RuntimeError, OSError, ValueError):
        return os.path.abspath(path)


# ------------------------------------------------------------------------------------------------ readers


def text_lines(path: Path, corpus: Corpus) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a text file; a line that is not UTF-8 becomes a `bad_encoding` problem.

    A UTF-8 byte-order mark on the first line is dropped. Line ends are `\\n`, `\\r\\n` or `\\r`."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            corpus.problems.append(
                SourceProblem(
                    f"{path.name}:{number}",
                    "bad_encoding",
                    f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8; re-save the file as UTF-8",
                )
            )


def _jsonl_records(path: Path, corpus: Corpus):
    for number, line in text_lines(path, corpus):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            corpus.problems.append(SourceProblem(f"{path.name}:{number}", "malformed_record", f"not JSON: {err}"))
            continue
        if not isinstance(record, dict):
            corpus.problems.append(SourceProblem(f"{path.name}:{number}", "malformed_record", "not a JSON object"))
            continue
        yield number, record


def _read_manifest(path: Path, language: str, corpus: Corpus) -> None:
    base = path.parent
    for number, record in _jsonl_records(path, corpus):
        source_id = f"{path.name}:{number}"
        audio = record.get("audio") or record.get("audio_filepath") or record.get("path")
        if not isinstance(audio, str) or not audio:
            corpus.problems.append(SourceProblem(source_id, "malformed_record", "no 'audio' path"))
            continue
        text = _first(record, TEXT_COLUMNS)
        speaker = _first(record, SPEAKER_COLUMNS) or "unknown"
        corpus.utterances.append(
            Utterance(
                audio=resolve_path(base, audio),
                text=str(text or ""),
                speaker=str(speaker),
                language=str(record.get("language") or language),
                source_id=source_id,
            )
        )


def _first(record: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if record.get(key) not in (None, ""):
            return record[key]
    return None


def _read_chatml(path: Path, language: str, corpus: Corpus) -> None:
    base = path.parent
    if path.suffix == ".jsonl":
        samples = [(f"{path.name}:{number}", record) for number, record in _jsonl_records(path, corpus)]
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise CorpusFormatError(
                f"{path} is not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start}); re-save it as UTF-8"
            ) from None
        except json.JSONDecodeError as err:
            raise CorpusFormatError(f"{path} is not valid JSON: {err}") from None
        if isinstance(data, dict):
            data = data.get("samples") or data.get("data") or [data]
        samples = [(f"{path.name}:{index}", record) for index, record in enumerate(data)]
    for sample_id, sample in samples:
        if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list):
            corpus.problems.append(SourceProblem(sample_id, "malformed_record", "no 'messages' list"))
            continue
        speaker = str(sample.get("speaker") or (sample.get("misc") or {}).get("speaker") or sample_id)
        sample_language = str(sample.get("language") or language)
        # Walk the turns collecting (text, audio) pairs: a text followed by audio, in the same user content (seed
        # format) or across a user turn and the next assistant turn (Boson style).
        segments: list[tuple[str, str]] = []
        pending_text: str | None = None
        for message in sample["messages"]:
            if not isinstance(message, dict) or message.get("role") == "system":
                continue
            for part in message_parts(message):
                audio = audio_of(part)
                if audio is not None:
                    if pending_text is not None:
                        segments.append((pending_text, resolve_path(base, audio)))
                        pending_text = None
                elif part.get("type") == "text":
                    pending_text = str(part.get("text", ""))
        if not segments:
            corpus.problems.append(SourceProblem(sample_id, "malformed_record", "no transcript followed by audio"))
            continue
        ids = []
        for index, (text, audio) in enumerate(segments):
            if len(segments) > 1 and index in (0, len(segments) - 1):
                role = "reference" if index == 0 else "target"
            else:
                role = f"segment{index}"
            source_id = f"{sample_id}:{role}"
            ids.append(source_id)
            corpus.utterances.append(
                Utterance(audio=audio, text=text, speaker=speaker, language=sample_language, source_id=source_id)
            )
        if len(ids) >= 2:
            corpus.pairs.append((ids[0], ids[-1]))


def _read_ljspeech(path: Path, language: str, corpus: Corpus) -> None:
    root = path if path.is_dir() else path.parent
    metadata = root / "metadata.csv"
    speaker = root.name or "ljspeech"
    for number, line in text_lines(metadata, corpus):
        for row in csv.reader([line], delimiter="|", quoting=csv.QUOTE_NONE):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                corpus.problems.append(SourceProblem(f"metadata.csv:{number}", "malformed_record", "expected id|text"))
                continue
            # The raw text column is used: our normaliser spells numbers in Arabic; LJSpeech's normalized_text
            # column is English-specific. It is the fallback when the raw column is empty.
            text = row[1] if row[1].strip() else (row[2] if len(row) > 2 else "")
            corpus.utterances.append(
                Utterance(
                    audio=safe_resolve(root / "wavs" / f"{row[0].strip()}.wav"),
                    text=text,
                    speaker=speaker,
                    language=language,
                    source_id=row[0].strip(),
                )
            )


def _read_commonvoice(path: Path, language: str, corpus: Corpus) -> None:
    root = path if path.is_dir() else path.parent
    table = path if path.is_file() else root / "validated.tsv"
    lines = list(text_lines(table, corpus))
    if not lines or lines[0][0] != 1:
        raise CorpusFormatError(f"{table}: the header line is missing or not UTF-8")
    header = next(csv.reader([lines[0][1]], delimiter="\t", quoting=csv.QUOTE_NONE), [])
    missing = {"client_id", "path", "sentence"} - set(header)
    if missing:
        raise CorpusFormatError(f"{table} lacks the Common Voice columns {sorted(missing)}")
    for number, line in lines[1:]:
        if not line.strip():
            continue
        row = dict(zip(header, next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))))
        if not row.get("path") or row.get("client_id") is None:
            corpus.problems.append(SourceProblem(f"{table.name}:{number}", "malformed_record", "no path/client_id"))
            continue
        corpus.utterances.append(
            Utterance(
                audio=safe_resolve(root / "clips" / row["path"]),
                text=row.get("sentence") or "",
                speaker=row["client_id"],
                language=row.get("locale") or language,
                source_id=row["path"],
            )
        )


def _read_hf_dir(path: Path, language: str, corpus: Corpus) -> None:
    for name in ("metadata.jsonl", "metadata.csv"):
        if (path / name).is_file():
            _read_audiofolder(path, path / name, language, corpus)
            return
    from datasets import Audio, load_from_disk

    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys"):  # a DatasetDict: use 'train' if present, else the first split
        split = "train" if "train" in dataset else next(iter(dataset.keys()))
        dataset = dataset[split]
        location = f"{path}/{split}"
    else:
        location = str(path)
    audio_column = next((c for c, f in dataset.features.items() if isinstance(f, Audio)), None)
    if audio_column is None:
        raise CorpusFormatError(f"{path}: no column of type Audio among {list(dataset.features)}")
    text_column = next((c for c in TEXT_COLUMNS if c in dataset.features), None)
    if text_column is None:
        raise CorpusFormatError(f"{path}: no transcript column (looked for {', '.join(TEXT_COLUMNS)})")
    speaker_column = next((c for c in SPEAKER_COLUMNS if c in dataset.features), None)
    columns = [text_column] + ([speaker_column] if speaker_column else [])
    for row_index, row in enumerate(dataset.select_columns(columns)):
        corpus.utterances.append(
            Utterance(
                audio=f"{HF_AUDIO_PREFIX}{location}#{row_index}",
                text=str(row[text_column] or ""),
                speaker=str(row[speaker_column]) if speaker_column else path.name,
                language=language,
                source_id=f"{Path(location).name}:{row_index}",
            )
        )


def _read_audiofolder(root: Path, metadata: Path, language: str, corpus: Corpus) -> None:
    if metadata.suffix == ".jsonl":
        records = [record for _, record in _jsonl_records(metadata, corpus)]
    else:
        records = list(csv.DictReader(line for _, line in text_lines(metadata, corpus)))
    for index, record in enumerate(records):
        file_name = record.get("file_name")
        if not file_name:
            corpus.problems.append(SourceProblem(f"{metadata.name}:{index + 1}", "malformed_record", "no file_name"))
            continue
        corpus.utterances.append(
            Utterance(
                audio=resolve_path(root, file_name),
                text=str(_first(record, TEXT_COLUMNS) or ""),
                speaker=str(_first(record, SPEAKER_COLUMNS) or root.name),
                language=language,
                source_id=file_name,
            )
        )
