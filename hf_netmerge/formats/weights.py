"""Reading weights files safely: safetensors validated header first, pickles refused unless allowed; strict loading.

The format of a file is decided by its first bytes, never by its name alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from ..errors import (
    CheckpointError,
    CheckpointMismatchError,
    CorruptHeaderError,
    EmptyFileError,
    FormatMismatchError,
    OverlappingTensorsError,
    OversizedHeaderError,
    PickleRefusedError,
    TruncatedFileError,
)

_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def sniff_format(path: Path) -> str:
    """``safetensors``, ``pickle`` (a ``torch.save`` zip or a raw pickle) or ``unknown``, from the file's structure.

    safetensors is decided first and by structure (an 8-byte header length that fits in the file, then a JSON
    object), because its first byte is the length's low byte and may be anything, 0x80 (a pickle's opcode) included.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    if not head:
        raise EmptyFileError(f"{path} is empty; re-download or re-save the checkpoint")
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def check_safetensors(path: Path) -> None:
    """Validate a safetensors file's header before reading any tensor: size, JSON, dtypes, shapes, offsets."""
    size = path.stat().st_size
    if size == 0:
        raise EmptyFileError(f"{path} is empty; re-download or re-save the checkpoint")
    if size < 8:
        raise TruncatedFileError(f"{path} is truncated ({size} bytes); re-download it")
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > _SAFETENSORS_HEADER_LIMIT:
            raise OversizedHeaderError(f"{path}: header claims {length} bytes (limit {_SAFETENSORS_HEADER_LIMIT}); the file is corrupt")
        if 8 + length > size:
            raise TruncatedFileError(f"{path}: header claims {length} bytes but the file has {size}; re-download it")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        entries = [(name, e) for name, e in header.items() if name != "__metadata__"]
        spans = []
        for name, entry in entries:
            start, end = (int(v) for v in entry["data_offsets"])
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
            if entry["dtype"] not in _DTYPE_BYTES or start > end or end - start != numel * _DTYPE_BYTES[entry["dtype"]]:
                raise CorruptHeaderError(f"{path}: tensor {name!r} has inconsistent dtype, shape and offsets; the file is corrupt")
            spans.append((start, end, name))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise CorruptHeaderError(f"{path}: the safetensors header is not valid ({type(e).__name__}); the file is corrupt") from e
    spans.sort()
    for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise OverlappingTensorsError(f"{path}: tensors {prev!r} and {name!r} overlap; the file is corrupt or crafted")
    if spans and spans[-1][1] > size - 8 - length:
        raise TruncatedFileError(f"{path}: tensor data ends past the end of the file; re-download it")


def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from ``path``, its format decided by its first bytes.

    safetensors is validated header first; a pickle is refused unless ``allow_pickle``, and then read
    with ``torch.load(weights_only=True)`` passed explicitly, with no fallback.
    """
    kind = sniff_format(path)
    if kind == "safetensors":
        if path.suffix in _PICKLE_SUFFIXES:
            raise FormatMismatchError(f"{path} is named like a pickle but holds safetensors; rename it to .safetensors")
        check_safetensors(path)
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except safetensors.SafetensorError as e:
            raise CorruptHeaderError(f"{path}: {e}") from e
    if kind == "pickle":
        if path.suffix == ".safetensors":
            raise FormatMismatchError(f"{path} is named .safetensors but is a pickle; refusing it (pickles can run code)")
        if not allow_pickle:
            raise PickleRefusedError(
                f"{path} is a pickle checkpoint, which can run code; convert it to safetensors or pass allow_pickle=True"
            )
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure of the restricted unpickler is a refusal
            raise PickleRefusedError(f"{path}: refused by torch.load(weights_only=True): {type(e).__name__}: {e}") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: the pickle does not hold a flat state dict of tensors")
        return state
    raise CorruptHeaderError(f"{path}: not a safetensors or PyTorch checkpoint")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], reference: str) -> None:
    """Strictly load ``state``; a checkpoint that does not fit its own architecture is a :class:`CheckpointMismatchError`."""
    from . import architecture_name

    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{reference}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]} for {architecture_name(model)}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointMismatchError(
                f"{reference}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"{architecture_name(model)} expects {tuple(expected[name].shape)}"
            )
        if tensor.dtype != expected[name].dtype:
            raise CheckpointMismatchError(f"{reference}: tensor {name!r} is {tensor.dtype}, expected {expected[name].dtype}")
    model.load_state_dict(state, strict=True)
