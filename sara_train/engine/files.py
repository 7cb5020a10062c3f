"""Safe file handling: safetensors header validation (never unpickle), atomic writes, and checks
that an output path may be written before any work starts."""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import SaRAError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype names sara_train can read as torch tensors."""
ITEM_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "C64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
"""Bytes per element of every safetensors dtype with whole-byte elements (used to check offsets)."""
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
            raise error(
                f"{path} is not a valid safetensors file (header length {header_len} "
                f"does not fit a {size}-byte file; truncated or another format)"
            )
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise error(f"{path} is not a valid safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise error(f"{path} is not a valid safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{path} is not a valid safetensors file (__metadata__ must be an object of strings)")
    data_start = 8 + header_len
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        tensors[name] = _tensor_entry(path, name, info, size - data_start, error)
    tensors = dict(sorted(tensors.items(), key=lambda item: item[1].begin))
    return SafetensorsHeader(path, tensors, metadata, data_start)


def _tensor_entry(path: Path, name: str, info: object, data_size: int, error: type[SaRAError]) -> TensorEntry:
    """One header entry, checked: its byte range lies in the file and, for dtypes of whole-byte
    elements, holds exactly ``prod(shape)`` of them."""
    try:
        begin, end = info["data_offsets"]
        shape = info["shape"]
        if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise TypeError
        entry = TensorEntry(str(info["dtype"]), tuple(shape), int(begin), int(end))
    except (KeyError, TypeError, ValueError):
        raise error(f"{path}: malformed header entry for tensor {name!r}") from None
    if entry.end > data_size:
        raise error(
            f"{path} is truncated: tensor {name!r} needs bytes up to {entry.end} of the data section "
            f"but the file holds {data_size}"
        )
    item_bytes = ITEM_BYTES.get(entry.dtype)
    if (
        entry.begin < 0
        or entry.end < entry.begin
        or (item_bytes is not None and entry.end - entry.begin != math.prod(entry.shape) * item_bytes)
    ):
        raise error(
            f"{path}: tensor {name!r} ({entry.dtype}, shape {list(entry.shape)}) does not fit its byte "
            f"range [{entry.begin}, {entry.end}); the header is corrupt"
        )
    return entry


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    Creating the folder or the temporary file, the body and the rename all fail the same way: an
    ``OSError`` (out of disk, no permission, a file where a folder should be) or ``SafetensorError``
    becomes ``SaRAError("could not write <path>: <reason>; ...")``. On any failure (any exception,
    Ctrl-C included) the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    temp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        temp = Path(temp_name)
        os.chmod(temp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
        yield temp
        os.chmod(temp, 0o666 & ~current_umask())  # again: writers such as safetensors recreate the file
        with temp.open("rb+") as file:
            os.fsync(file.fileno())
        os.replace(temp, path)
    except (OSError, SafetensorError) as error:  # safetensors reports its I/O errors as SafetensorError
        if temp is not None:
            temp.unlink(missing_ok=True)
        reason = getattr(error, "strerror", None) or error
        raise SaRAError(f"could not write {path}: {reason}; the previous file, if any, is unchanged") from error
    except BaseException:
        if temp is not None:
            temp.unlink(missing_ok=True)
        raise


def encode_safetensors_header(
    entries: Mapping[str, tuple[str, Sequence[int], int, int]], metadata: Mapping[str, str]
) -> bytes:
    """The first bytes of a safetensors file: the header length (u64 little-endian) and the JSON
    header padded with spaces to a multiple of 8. ``entries``: ``{name: (dtype name, shape, begin,
    end)}`` in file order, byte offsets into the data section."""
    header: dict[str, object] = {
        name: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        for name, (dtype, shape, begin, end) in entries.items()
    }
    header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors_streaming(
    path: str | os.PathLike,
    layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    tensor_of: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str],
) -> Path:
    """Write a safetensors file atomically, one tensor at a time: ``layout`` gives every tensor's
    ``(dtype, shape)`` in file order, ``tensor_of(name)`` makes it when its turn comes (so peak
    memory is one tensor, not the file). ``SaRAError`` for a dtype safetensors cannot name, a made
    tensor whose dtype or shape differs from its layout entry, or a file that cannot be written
    (nothing is left behind)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    entries = {}
    offset = 0
    for name, (dtype, shape) in layout.items():
        if dtype not in names:
            raise SaRAError(f"{name}: safetensors has no name for dtype {dtype}")
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        entries[name] = (names[dtype], shape, offset, offset + size)
        offset += size
    with atomic_output(path) as temp, open(temp, "wb") as out:
        out.write(encode_safetensors_header(entries, metadata))
        for name, (dtype, shape) in layout.items():
            tensor = tensor_of(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise SaRAError(
                    f"{name}: made a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, "
                    f"expected {dtype} {tuple(shape)}"
                )
            out.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return Path(path)


def check_writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` if needed and prove it takes new files (a probe file is written and
    removed), so a run fails before its work rather than at its first save. Raises ``SaRAError``
    naming ``what`` (e.g. ``"--output-dir"``) and the reason."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or error
        raise SaRAError(f"{what} {folder} cannot be written to: {reason}") from None
    return folder


def check_output_file(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike], overwrite: bool, what: str = "output"
) -> Path:
    """Refuse an output path that would destroy something: one that is (or links to) any of
    ``inputs``, an existing file unless ``overwrite``, or anything that is not a regular file
    (a folder, FIFO or device node), whatever ``overwrite`` says. Raises ``SaRAError``."""
    out = Path(out)
    for source in inputs:
        if _same_file(out, Path(source)):
            raise SaRAError(
                f"{what} {out} is the input file {source}; writing it would destroy the input: choose a new file name"
            )
    if out.exists() or out.is_symlink():
        if not stat.S_ISREG(out.stat().st_mode if out.exists() else os.lstat(out).st_mode):
            raise SaRAError(f"{what} {out} exists and is not a regular file; choose a new file name")
        if not overwrite:
            raise SaRAError(f"{what} {out} already exists; choose a new file name or allow overwriting it")
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
