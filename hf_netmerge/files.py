"""Filesystem helpers shared by everything that writes atomically (students, checkpoints)."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import OutputExistsError

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new directory in ``parent`` to fill and then rename into place. ``tempfile.mkdtemp`` makes it private
    (0700), which the rename would carry to the result; it gets the mode a plain ``mkdir`` gives under the umask."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    path.chmod(0o777 & ~_umask())
    return path


def write_file(path: Path, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` and fsync it."""
    with path.open("wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as contiguous CPU tensors (what safetensors writes)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)``); False where the platform or
    file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_directory(target: Path, fill: Callable[[Path], None]) -> Path:
    """Make ``target`` a directory holding what ``fill`` writes into an empty one, atomically: a complete temporary
    directory renamed into place, or exchanged with the existing one in a single rename where the system can
    (Linux), so a killed write leaves the old directory or the new one, never a mix."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*-*"):  # left by a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_dir(target.parent, f".{target.name}.tmp-")
    try:
        fill(tmp)
        if not target.exists():
            os.replace(tmp, target)
        elif exchange(tmp, target):
            shutil.rmtree(tmp)  # now the old directory
        else:  # two renames: a crash between them leaves the old in .NAME.old-*/NAME and the new in .NAME.tmp-*
            old = temp_dir(target.parent, f".{target.name}.old-")
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_output_dir(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse an existing, non-empty output directory unless ``overwrite``."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another directory or pass overwrite=True (--overwrite)")
    return path
