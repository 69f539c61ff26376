"""Atomic file writes: a reader (or a crash) sees the old file or the whole new one, never a torn one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(file: str | os.PathLike, data: bytes) -> Path:
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; a record is meant to be read
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return file


def atomic_write_text(file: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(file, text.encode("utf-8"))
