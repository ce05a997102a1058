"""Safetensors checkpoints read and written one tensor at a time.

Merging an adapter and converting an original checkpoint both rewrite every tensor of a 5.8B-parameter model. Doing
it through `from_pretrained` + `save_pretrained` holds the whole model in memory (twice, for a PEFT merge: base and
merged copy during `save_pretrained`'s state-dict gathering). Here a checkpoint is read tensor by tensor from its
shards (`safe_open`, memory-mapped) and written into new shards as they fill, so host memory holds at most one
output shard plus the tensor being rewritten, whatever the size of the model.

The output layout is what `save_pretrained` writes and `from_pretrained` reads: `model.safetensors` when everything
fits in one shard, else `model-00001-of-0000N.safetensors` ... plus `model.safetensors.index.json` mapping every
tensor name to its file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from higgs_lora.files import atomic_write_json

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 10**9
"""2 GB: small enough that the output buffer is a fraction of the 11.5 GB model, large enough for few files."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1024' -> 1024 bytes. Raises ValueError otherwise."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 2GB, 500MB or 800MiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes")
    return size


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order; FileNotFoundError when there are none."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (model_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names files that are not there: {', '.join(missing)}")
        return [model_dir / name for name in names]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(f"{model_dir} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a checkpoint with its shape, read from the file headers only (no tensor data)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(name, tensor) for every tensor of a checkpoint, one at a time, on CPU, in file order."""
    from safetensors import safe_open

    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def tensor_bytes(tensor: "torch.Tensor") -> int:
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` (a larger tensor gets a shard alone).

    `add` buffers tensors until the next one would overflow the shard, then writes the shard; `close` writes the
    last one, gives the shards their final `-of-N` names and writes the index. Only one shard is ever in memory.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, "torch.Tensor"] = {}
        self._buffer_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        if name in self._buffer or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name} written twice")
        size = tensor_bytes(tensor)
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self._written) + 1:05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._written.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is buffered, name the shards, write the index (when more than one shard); returns the files."""
        if self._buffer or not self._written:
            self._flush()
        if len(self._written) == 1:
            final = self.out_dir / SINGLE_FILE
            self._written[0][0].rename(final)
            return [final]
        count = len(self._written)
        weight_map: dict[str, str] = {}
        files = []
        for number, (path, names) in enumerate(self._written, start=1):
            final = self.out_dir / f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        atomic_write_json(self.out_dir / INDEX_FILE,
                          {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
        return files


def sha256_file(path: str | Path, chunk_bytes: int = 16 * 2**20) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
