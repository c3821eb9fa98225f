"""Atomic, epoch-boundary stage checkpoints that resume bit-identically on CPU.

A checkpoint is a directory ``<stage dir>/epoch-NNNNN`` holding ``tensors.safetensors`` (every tensor:
weights, optimizer moments, RNG states) and ``state.json`` (the structure around them), written into a
temporary directory, fsynced, marked ``COMPLETE`` and renamed into place. Only the newest complete
checkpoint is kept; anything without the marker is ignored and removed. No pickle is written or read.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from ..errors import CheckpointDirInUseError, CheckpointError
from ..files import temp_dir

MARKER = "COMPLETE"
RUN_NAME = "run.json"  # what the checkpoints in a directory belong to (CheckpointDir.claim)


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-ready structure of ``obj`` with every tensor (and numpy array) moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.copy())
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot checkpoint a value of type {type(obj).__name__}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StageCheckpoint:
    """Checkpoints of one training stage in ``directory``, every ``every`` epochs and at its end."""

    def __init__(self, directory: str | os.PathLike[str], every: int = 1, writer: bool = True) -> None:
        self.directory = Path(directory)
        self.every = every
        self.writer = writer

    def latest(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        if not self.directory.is_dir():
            return None
        done = sorted(p for p in self.directory.glob("epoch-*") if (p / MARKER).is_file())
        return done[-1] if done else None

    def due(self, epochs_done: int, total: int) -> bool:
        return epochs_done % self.every == 0 or epochs_done == total

    def save(self, epochs_done: int, state: dict[str, Any]) -> None:
        """Write ``state`` (nested dicts of tensors and JSON values) as the checkpoint after ``epochs_done`` epochs."""
        if not self.writer:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        structure = _flatten({**state, "epochs_done": epochs_done, "rng": rng_state()}, tensors)
        tmp = temp_dir(self.directory, ".tmp-")
        try:
            for name, data in (
                ("tensors.safetensors", safetensors.torch.save(tensors)),
                ("state.json", json.dumps(structure).encode()),
                (MARKER, b"ok\n"),
            ):
                with (tmp / name).open("wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            target = self.directory / f"epoch-{epochs_done:05d}"
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            _fsync_dir(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.directory.iterdir():
            if old != target and (old.name.startswith(".tmp-") or old.name.startswith("epoch-")):
                shutil.rmtree(old, ignore_errors=True)

    def load(self) -> dict[str, Any] | None:
        """The newest complete checkpoint's state (RNG states restored), or None."""
        path = self.latest()
        if path is None:
            return None
        try:
            tensors = safetensors.torch.load_file(str(path / "tensors.safetensors"))
            state = _unflatten(json.loads((path / "state.json").read_text()), tensors)
        except (OSError, ValueError, KeyError, safetensors.SafetensorError) as e:
            raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from e
        set_rng_state(state.pop("rng"))
        return state


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of ``model``'s state dict (names, dtypes, shapes and bytes): which weights a run started from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CheckpointDir:
    """Where a run's stage checkpoints go: ``CheckpointDir(root)("gates")`` is the gate stage's.

    With ``root=None`` it hands out no checkpoints. Only the writer (the main process) writes.
    """

    def __init__(self, root: str | os.PathLike[str] | None, every: int = 1, writer: bool = True) -> None:
        self.root = Path(root) if root is not None else None
        self.every = every
        self.writer = writer

    def __call__(self, stage: str) -> StageCheckpoint | None:
        return StageCheckpoint(self.root / stage, self.every, self.writer) if self.root is not None else None

    def claim(self, run: dict[str, Any]) -> None:
        """Bind the directory to one run, described by ``run`` (JSON values): the first call writes ``run.json``; a later
        call with another description raises :class:`CheckpointDirInUseError` (naming the keys that differ), so a
        rerun resumes only its own checkpoints. Nothing is written or checked without a root."""
        if self.root is None:
            return
        path = self.root / RUN_NAME
        run = json.loads(json.dumps(run))  # as it reads back: tuples become lists
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != run:
                keys = sorted(k for k in {*saved, *run} if saved.get(k) != run.get(k))
                raise CheckpointDirInUseError(
                    f"{self.root} holds the checkpoints of another run (its {', '.join(keys)} differ); "
                    "choose another checkpoint directory, or delete that one to start over"
                )
            return
        if self.writer:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(run, indent=2, sort_keys=True))
            os.replace(tmp, path)

    def sub(self, name: str) -> CheckpointDir:
        """The checkpoints of a part of the run (a seed, a strategy)."""
        return CheckpointDir(self.root / name if self.root is not None else None, self.every, self.writer)
