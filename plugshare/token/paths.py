"""Where a home's token lives: its state, its keystore and the socket its process serves."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from plugshare.token.errors import TokenError

SOCKET_NAME = "token.sock"
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; keep a margin


def token_dir(home: Path) -> Path:
    return home / "token"


def keystore_dir(home: Path) -> Path:
    return home / "keystore"


def socket_path(home: Path) -> Path:
    """Where the token of `home` listens: in the home, or (for a home whose path is too long
    for a Unix socket) in a private per-user directory named after the home — under TMPDIR,
    or under /tmp when TMPDIR is itself too long."""
    path = Path(home).resolve() / SOCKET_NAME
    if _fits(path):
        return path
    digest = hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:24]
    for base in (tempfile.gettempdir(), "/tmp"):
        private = Path(base) / f"plugshare-{os.getuid()}"
        if _fits(private / f"{digest}.sock"):
            _make_private(private)
            return private / f"{digest}.sock"
    raise TokenError(f"no directory short enough for the token socket of {home}: "
                     f"set TMPDIR to a short path")


def _fits(path: Path) -> bool:
    return len(str(path).encode()) <= _MAX_SOCKET_PATH


def _make_private(private: Path) -> None:
    """A directory only this user can enter. It sits in a shared temp dir, where someone else
    may have made it first (or put a symlink there): then refuse rather than listen in it."""
    try:
        private.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(private)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise TokenError(f"{private} is not a directory of this user: remove it, or set "
                         f"TMPDIR to a directory of your own")
    os.chmod(private, 0o700)
