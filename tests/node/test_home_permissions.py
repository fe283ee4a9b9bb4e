"""A node's home and everything in it is private to its user: the home directory is 0700
even when it already existed with another mode, and the files the node creates are 0600
(node.toml, the credential, the SQLite store with its -wal/-shm files), whatever the umask.

Seen on real nodes: a home made beforehand kept its 0755, and store.sqlite was 0644."""

import os
import stat
from pathlib import Path

import pytest

from plugshare.config import Config
from plugshare.node.home import Home
from plugshare.store.sqlite import SQLiteStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)  # the common default: files 0644, directories 0755
    try:
        yield
    finally:
        os.umask(old)


def test_an_existing_home_becomes_private(tmp_path, loose_umask):
    root = tmp_path / "home"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    home = Home(root)
    home.create(Config())
    assert mode(root) == 0o700
    found = [p for p in root.rglob("*")]
    assert home.config_file in found and home.owner_credential_file in found
    for path in found:
        expected = 0o700 if path.is_dir() else 0o600
        assert mode(path) == expected, f"{path.relative_to(root)} is {oct(mode(path))}"


def test_a_new_home_is_private(tmp_path, loose_umask):
    root = tmp_path / "new" / "home"
    Home(root).create(Config())
    assert mode(root) == 0o700


def assert_private(paths) -> None:
    """Files 0600, directories (the chunk packs') 0700, and what those hold likewise."""
    for path in paths:
        expected = 0o700 if path.is_dir() else 0o600
        assert mode(path) == expected, f"{path.name} is {oct(mode(path))}"
        if path.is_dir():
            assert_private(path.iterdir())


async def test_the_sqlite_store_files_are_private(tmp_path, loose_umask):
    path = tmp_path / "store.sqlite"
    store = await SQLiteStore.open(path)
    try:
        for i in range(20):
            await store.put({"_id": f"doc{i}", "text": "x" * 1000})
        await store.stage_chunks([b"chunk data from a peer"])  # a pack file
        files = sorted(tmp_path.glob("store.sqlite*"))
        assert path in files and path.with_name("store.sqlite-wal") in files
        packs = path.with_name("store.sqlite-chunks")
        assert packs in files and any(packs.iterdir())
        assert_private(files)
    finally:
        await store.aclose()


async def test_an_existing_loose_store_file_is_tightened(tmp_path, loose_umask):
    path = tmp_path / "store.sqlite"
    store = await SQLiteStore.open(path)
    await store.aclose()
    os.chmod(path, 0o644)  # as older nodes left it
    os.chmod(path.with_name("store.sqlite-chunks"), 0o755)
    store = await SQLiteStore.open(path)
    try:
        await store.put({"_id": "doc"})
        assert_private(tmp_path.glob("store.sqlite*"))
    finally:
        await store.aclose()
