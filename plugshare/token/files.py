"""Durable small-file writes: the only way token files reach the disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: Path, data: bytes, mode: int = 0o600) -> str:
    """Write `data` durably to a new temporary file beside `path` (fsynced, not yet visible
    under `path`); `install` puts it in place, `discard` drops it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        discard(tmp)
        raise
    return tmp


def install(tmp: str, path: Path) -> None:
    """Rename a `write_temp` file over `path` and fsync the directory: from then on `path`
    durably holds the new content."""
    try:
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    fsync_dir(path.parent)


def discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` all at once: write a temporary file in the same directory,
    fsync it, rename it over `path`, fsync the directory. A crash leaves the old content or
    the new one, never a mix."""
    install(write_temp(path, data, mode), path)


def read_file(path: Path, what: str, error: type[Exception]) -> bytes:
    """The bytes of `path`, or `error` saying which file of what is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} is missing") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
