"""Durable small-file writes: the only way token files reach the disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# fdatasync where the platform has it (Linux): the data and the metadata needed to read it
# back (the size), not the times; fsync elsewhere.
datasync = getattr(os, "fdatasync", os.fsync)


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


def open_in_place(path: Path, mode: int = 0o600) -> int:
    """A descriptor for rewriting `path` in place (`write_in_place`). Creating the file is
    made durable here, once (its directory entry); later writes need no directory fsync."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        os.fsync(fd)
        fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_in_place(fd: int, data: bytes, offset: int) -> None:
    """`data` at `offset`, durably (pwrite + fdatasync). A write that stays inside the file's
    size changes no metadata fdatasync must carry: one data write and a cache flush. A crash
    may leave the range torn (part old, part new): callers keep a second copy elsewhere."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    datasync(fd)


def read_file(path: Path, what: str, error: type[Exception]) -> bytes:
    """The bytes of `path`, or `error` saying which file of what is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} is missing") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
