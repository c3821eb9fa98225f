"""Filesystem helpers shared by everything that writes atomically (students, checkpoints)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
