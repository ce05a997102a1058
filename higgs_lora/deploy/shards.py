"""Safetensors checkpoints read and written one tensor at a time, so memory holds one tensor, not a model.

Merging an adapter and converting an original checkpoint both rewrite every tensor of a 5.8B-parameter model.
`from_pretrained` + `save_pretrained` would hold the whole model (and for a PEFT merge, copies of it). Here:

- Reading (`iter_tensors`) parses the safetensors header (8-byte length, JSON: dtype, shape, byte range per tensor)
  and reads each tensor's bytes with plain file reads. `safe_open` would memory-map the file instead: every page
  touched then counts in the process's resident memory until the file is closed, i.e. a whole input shard (5 GB in
  the released checkpoint) on top of everything else.
- Writing (`ShardWriter`) is planned: the names, dtypes and shapes of all output tensors are known before the first
  one is computed (from the input headers), so every shard's header and every tensor's byte offset are fixed up
  front. Each tensor is written at its offset as soon as it exists, in any order, and dropped. Shard size is then a
  file-size choice, not a memory one.

The output is what `save_pretrained` writes and `from_pretrained` reads: `model.safetensors` when one shard is enough,
else `model-00001-of-0000N.safetensors` ... plus `model.safetensors.index.json` mapping every tensor to its file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from higgs_lora.files import atomic_write_json

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9
"""5 GB files, as the released checkpoint and `save_pretrained` use; memory does not depend on it."""

_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1024' -> 1024 bytes. Raises ValueError otherwise."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 800MiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes")
    return size


def torch_dtype_of(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code ('BF16' -> torch.bfloat16)."""
    import torch

    if code not in _DTYPES:
        raise ValueError(f"safetensors dtype {code} is not supported here")
    return getattr(torch, _DTYPES[code])


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (torch.bfloat16 -> 'BF16')."""
    name = str(dtype).removeprefix("torch.")
    for code, torch_name in _DTYPES.items():
        if torch_name == name:
            return code
    raise ValueError(f"{dtype} cannot be stored here")


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


def read_header(path: str | Path) -> tuple[int, dict]:
    """(byte offset where tensor data starts, {name: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def tensor_specs(model_dir: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype code, shape)} of every tensor of a checkpoint, from the file headers only."""
    specs = {}
    for path in weight_files(model_dir):
        for name, entry in read_header(path)[1].items():
            specs[name] = (entry["dtype"], tuple(entry["shape"]))
    return specs


def tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor of a checkpoint, from the file headers only."""
    return {name: shape for name, (_, shape) in tensor_specs(model_dir).items()}


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a checkpoint, one at a time, on CPU, in file order; see module doc.

    Drop each tensor (`del`) before asking for the next, so that only one is ever in memory.
    """
    import torch

    for path in weight_files(model_dir):
        data_start, header = read_header(path)
        with open(path, "rb") as handle:
            for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                start, end = entry["data_offsets"]
                buffer = bytearray(end - start)
                handle.seek(data_start + start)
                if handle.readinto(buffer) != len(buffer):
                    raise OSError(f"{path} is truncated: {name} needs bytes {start}..{end} of its data")
                dtype = torch_dtype_of(entry["dtype"])
                if not buffer:
                    yield name, torch.empty(entry["shape"], dtype=dtype)
                    continue
                yield name, torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
                # Let the tensor go before reading the next one (the caller drops its reference too): two of the
                # largest tensors (the 0.8 GB embeddings) would otherwise coexist.
                del buffer


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        import torch

        return math.prod(self.shape) * torch.empty((), dtype=torch_dtype_of(self.dtype)).element_size()


class ShardWriter:
    """Writes the tensors of `specs` into safetensors shards of about `max_shard_bytes` (see module doc).

    Shards are filled in `specs` order (a tensor larger than a shard gets one alone); headers are written when the
    writer is made. `add` writes one tensor at its planned offset and refuses one that does not match its spec;
    `close` checks every tensor was written and writes the index. Files get their final names at once: write into
    a staging directory and publish it as a whole.
    """

    def __init__(self, out_dir: str | Path, specs: list[TensorSpec], max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.specs = {spec.name: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise ValueError("a tensor name appears twice in the plan")
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if groups[-1] and size + spec.num_bytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.num_bytes
        count = len(groups)
        names = (
            [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self.files = [self.out_dir / name for name in names]
        self._where: dict[str, tuple[Path, int]] = {}
        for path, group in zip(self.files, groups):
            header, offset = {}, 0
            for spec in group:
                header[spec.name] = {
                    "dtype": spec.dtype,
                    "shape": list(spec.shape),
                    "data_offsets": [offset, offset + spec.num_bytes],
                }
                offset += spec.num_bytes
            encoded = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
            encoded += b" " * (-(8 + len(encoded)) % 8)  # tensor data starts 8-byte aligned, as safetensors writes
            data_start = 8 + len(encoded)
            with open(path, "wb") as handle:
                handle.write(struct.pack("<Q", len(encoded)) + encoded)
                handle.truncate(data_start + offset)
            for spec in group:
                self._where[spec.name] = (path, data_start + header[spec.name]["data_offsets"][0])
        self._written: set[str] = set()
        self.total_bytes = sum(spec.num_bytes for spec in specs)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise ValueError(f"{name} is not in the plan of tensors to write")
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        if (dtype_code(tensor.dtype), tuple(tensor.shape)) != (spec.dtype, spec.shape):
            raise ValueError(
                f"{name}: {dtype_code(tensor.dtype)} {tuple(tensor.shape)} does not match the plan "
                f"({spec.dtype} {spec.shape})"
            )
        import torch

        path, offset = self._where[name]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        with open(path, "r+b") as handle:
            handle.seek(offset)
            handle.write(memoryview(data))
        self._written.add(name)

    def close(self) -> list[Path]:
        """Check every planned tensor was written, write the index (several shards); returns the files."""
        missing = sorted(self.specs.keys() - self._written)
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written: {', '.join(missing[:5])}")
        if len(self.files) > 1:
            weight_map = {name: path.name for name, (path, _) in sorted(self._where.items())}
            atomic_write_json(
                self.out_dir / INDEX_FILE, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            )
        return list(self.files)


def sha256_file(path: str | Path, chunk_bytes: int = 16 * 2**20) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
