"""Where a home's token lives: its state, its keystore and the socket its process serves."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

SOCKET_NAME = "token.sock"
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; keep a margin


def token_dir(home: Path) -> Path:
    return home / "token"


def keystore_dir(home: Path) -> Path:
    return home / "keystore"


def socket_path(home: Path) -> Path:
    """Where the token of `home` listens: in the home, or (for a home whose path is too long
    for a Unix socket) in a private per-user directory named after the home."""
    path = Path(home).resolve() / SOCKET_NAME
    if len(str(path).encode()) <= _MAX_SOCKET_PATH:
        return path
    private = Path(tempfile.gettempdir()) / f"plugshare-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    os.chmod(private, 0o700)
    digest = hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:24]
    return private / f"{digest}.sock"
