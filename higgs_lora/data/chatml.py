"""ChatML records: the typed parts of a message, the audio a part points at, paths relative to the file.

Shared by the corpus reader (data/sources.py) and the batch cloning CLI (infer/batch.py), which read the same
ChatML layouts (docs/data.md). Pure; imports nothing of the package.
"""

from __future__ import annotations

import os
from pathlib import Path


def resolve_path(base: Path, path: str) -> str:
    """`path` as an absolute path string: `~` expanded, a relative path taken relative to `base` (the folder of
    the file that names it)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    try:
        return str((base / candidate).resolve())
    except (RuntimeError, OSError, ValueError):
        # A symlink loop (RuntimeError before Python 3.13) or a name the file system cannot encode: keep the
        # absolute path unresolved; opening it fails later and that record alone is rejected with the reason.
        return os.path.abspath(base / candidate)


def message_parts(message: dict) -> list[dict]:
    """A message's content as a list of typed parts (strings and single dicts are accepted)."""
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, dict):
        return [content]
    if isinstance(content, list):
        return [c if isinstance(c, dict) else {"type": "text", "text": str(c)} for c in content]
    return []


def audio_of(part: dict) -> str | None:
    """The audio path or URL of an audio part; None for any other part."""
    if part.get("type") != "audio":
        return None
    value = part.get("audio_url") or part.get("audio") or part.get("url") or part.get("raw_audio")
    return value if isinstance(value, str) and value else None
