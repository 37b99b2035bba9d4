"""Durable local writes: what the registry, the archive and bundles rely on after a crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Persist a folder's entries (a rename is durable only once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, tmp_prefix: str | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole.

    The temporary file sits next to ``path``; ``tmp_prefix`` names it so that a reader or a
    clean-up can recognise leftovers of a crash (default: a hidden ``.NAME.*.tmp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp_prefix is None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f"{tmp_prefix}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
