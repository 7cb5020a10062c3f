"""Safe file handling: safetensors header validation (never unpickle) and atomic writes."""
from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import SaRAError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: dtype name (e.g. ``"F16"``), shape, byte range in data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """Parsed header: ``tensors`` in file order, ``metadata`` (str -> str), ``data_start`` offset."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def _describe_non_safetensors(head: bytes) -> str | None:
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a Python pickle (e.g. a .ckpt/.pt/.bin file)"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (the torch.save format, which holds a pickle)"
    return None


def read_safetensors_header(path: str | os.PathLike, error: type[SaRAError] = SaRAError) -> SafetensorsHeader:
    """Validate and parse the header of a safetensors file without reading tensor data.

    Raises ``error`` naming the file if it is missing, a pickle/zip (never unpickled), has a
    malformed header, or is truncated (a tensor's bytes run past the end of the file).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        kind = _describe_non_safetensors(head)
        if kind:
            raise error(f"{path} is {kind}, not a safetensors file; sara_train never unpickles files")
        if len(head) < 8:
            raise error(f"{path} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise error(f"{path} is not a valid safetensors file (header length {header_len} "
                        f"does not fit a {size}-byte file; truncated or another format)")
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise error(f"{path} is not a valid safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise error(f"{path} is not a valid safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            entry = TensorEntry(str(info["dtype"]), tuple(int(d) for d in info["shape"]), int(begin), int(end))
        except (KeyError, TypeError, ValueError):
            raise error(f"{path}: malformed header entry for tensor {name!r}") from None
        if data_start + entry.end > size:
            raise error(f"{path} is truncated: tensor {name!r} needs bytes up to "
                        f"{data_start + entry.end} but the file has {size}")
        tensors[name] = entry
    tensors = dict(sorted(tensors.items(), key=lambda item: item[1].begin))
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, data_start)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    If the body raises (including out-of-disk ``OSError``), the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temp = Path(temp_name)
    os.chmod(temp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield temp
        os.chmod(temp, 0o666 & ~current_umask())  # again: writers such as safetensors recreate the file
        with temp.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    except (OSError, SafetensorError) as error:  # out of disk, file too large, permissions (safetensors
        temp.unlink(missing_ok=True)              # reports its I/O errors as SafetensorError)
        reason = getattr(error, "strerror", None) or error
        raise SaRAError(f"could not write {path}: {reason}; the previous file, if any, is unchanged") from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
