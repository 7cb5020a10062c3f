"""A nested training state (``SaRAAdamW.state_dict()``, a generator state, a loss scaler's state)
as one safetensors file, never pickled.

Tensors are stored as safetensors tensors named ``t0``, ``t1``, ...; everything else (numbers,
strings, booleans, None, lists, dicts with int or str keys) goes into the ``structure`` metadata
entry as JSON in which a tensor is ``{"tensor": "t7"}`` and a dict is ``{"dict": [[key, value],
...]}`` (so int keys stay ints). Loading rebuilds the same nested value, bit-exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..engine.errors import SaRAError
from ..engine.files import atomic_output, read_safetensors_header

STRUCTURE_KEY = "structure"


def save_state_file(path: Path, state: Any, metadata: dict[str, str]) -> None:
    """Write ``state`` (nested dicts/lists of tensors and plain values) and ``metadata`` (strings)
    to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}  # a tensor held twice (e.g. a code book every state shares) is stored once

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in names:
                names[id(value)] = f"t{len(tensors)}"
                tensors[names[id(value)]] = value.detach().cpu().contiguous()
            return {"tensor": names[id(value)]}
        if isinstance(value, dict):
            return {"dict": [[key, encode(item)] for key, item in value.items()]}
        if isinstance(value, (list, tuple)):
            return [encode(item) for item in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise SaRAError(f"cannot store a {type(value).__name__} in a training state file")

    structure = json.dumps(encode(state))
    with atomic_output(path) as temp:
        save_file(tensors, str(temp), metadata={**metadata, STRUCTURE_KEY: structure})


def read_state_file(path: Path) -> tuple[Any, dict[str, str]]:
    """``(state, metadata)`` as ``save_state_file`` wrote them. Raises ``SaRAError`` if the file is
    missing, truncated, not safetensors, or its structure does not match its tensors."""
    header = read_safetensors_header(path)
    try:
        with safe_open(str(path), "pt") as file:
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        structure = json.loads(header.metadata[STRUCTURE_KEY])

        def decode(value: Any) -> Any:
            if isinstance(value, dict):
                if "tensor" in value:
                    return tensors[value["tensor"]]
                return {key: decode(item) for key, item in value["dict"]}
            if isinstance(value, list):
                return [decode(item) for item in value]
            return value

        state = decode(structure)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RecursionError) as error:
        raise SaRAError(f"the saved state {path} is damaged ({type(error).__name__}: {error})") from None
    metadata = {key: value for key, value in header.metadata.items() if key != STRUCTURE_KEY}
    return state, metadata
