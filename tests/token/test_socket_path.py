"""Where a home's token socket goes: a path the kernel can bind, whatever the home or TMPDIR."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from plugshare.token.errors import TokenError
from plugshare.token.paths import socket_path

SUN_PATH = 108  # bytes of sockaddr_un.sun_path on Linux, the final NUL included


@pytest.fixture
def long_tmpdir(tmp_path, monkeypatch):
    """TMPDIR set to a long directory (as under pytest, or a test runner's own temp dir)."""
    long = tmp_path / ("t" * 80)
    long.mkdir()
    monkeypatch.setenv("TMPDIR", str(long))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its first answer
    return long


def bind(path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    os.unlink(path)


def test_a_short_home_keeps_its_socket_inside(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    path = socket_path(home)
    if len(str(home.resolve())) < 60:
        assert path == home.resolve() / "token.sock"
    bind(path)


def test_a_long_home_under_a_long_tmpdir_still_gets_a_socket_that_binds(tmp_path, long_tmpdir):
    home = long_tmpdir / ("h" * 60)
    home.mkdir()
    path = socket_path(home)
    assert len(str(path).encode()) < SUN_PATH
    bind(path)
    private = path.parent
    assert private.stat().st_uid == os.getuid()
    assert private.stat().st_mode & 0o777 == 0o700


def test_two_long_homes_get_two_sockets_and_one_home_always_the_same(tmp_path, long_tmpdir):
    homes = [long_tmpdir / (c * 60) for c in "ab"]
    for home in homes:
        home.mkdir()
    assert socket_path(homes[0]) != socket_path(homes[1])
    assert socket_path(homes[0]) == socket_path(homes[0])


def test_a_private_dir_held_by_a_symlink_is_refused(tmp_path, monkeypatch, request):
    """Someone else may create the shared fallback dir first: a symlink there must not
    redirect the token's socket."""
    short = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))  # short enough to be chosen
    request.addfinalizer(lambda: shutil.rmtree(short))
    monkeypatch.setenv("TMPDIR", str(short))
    monkeypatch.setattr(tempfile, "tempdir", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (short / f"plugshare-{os.getuid()}").symlink_to(elsewhere)
    home = tmp_path / ("h" * 120)
    home.mkdir()
    with pytest.raises(TokenError, match="plugshare-"):
        socket_path(home)
