"""The node's home directory: what lives where, and creating it (`plugshare init`).

    <home>/node.toml          configuration (`plugshare config --example` prints every key)
    <home>/owner.credential   the owner's bearer credential for the local API (mode 0600)
    <home>/token/             the token's sealed state (only ciphertext)
    <home>/keystore/          the soft keystore's sealed master key (keystore = "soft")
    <home>/store.sqlite       the embedded store (when backend = "sqlite")
    <home>/run.json           written by a running node: its pid and API address

The home is private to its user: the directory is 0700 (also when it existed before `init`)
and the files the node creates in it are 0600.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import attrs
import platformdirs

from plugshare.config import Config, dump_config, load_config
from plugshare.errors import PlugshareError


class HomeError(PlugshareError):
    """The home is missing, already initialised, or unreadable."""


def default_home() -> Path:
    env = os.environ.get("PLUGSHARE_HOME")
    return Path(env) if env else platformdirs.user_data_path("plugshare")


def write_private(path: Path, data: bytes) -> None:
    """Write a file only the owner can read, atomically (temp file + fsync + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_private(root: Path) -> None:
    """Make `root` and everything under it accessible to its owner only, by taking the group
    and other permission bits away (a 0755 directory becomes 0700, a 0644 file 0600; the
    owner's bits are kept, so a 0400 file stays 0400). Symlinks are left alone."""
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, mode & ~0o077)


@attrs.frozen
class Home:
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "node.toml"

    @property
    def owner_credential_file(self) -> Path:
        return self.root / "owner.credential"

    @property
    def token_dir(self) -> Path:
        return self.root / "token"

    @property
    def keystore_dir(self) -> Path:
        return self.root / "keystore"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    def exists(self) -> bool:
        return self.config_file.exists()

    def load_config(self) -> Config:
        return load_config(self.config_file)

    def owner_credential(self) -> str:
        try:
            return self.owner_credential_file.read_text().strip()
        except FileNotFoundError:
            raise HomeError(
                f"{self.owner_credential_file} is missing; is {self.root} a plugshare home?"
            ) from None

    def runtime(self) -> dict | None:
        """What the running node wrote in run.json, or None when no node has written it."""
        try:
            return json.loads(self.run_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_runtime(self, info: dict) -> None:
        write_private(self.run_file, json.dumps(info).encode())

    def clear_runtime(self) -> None:
        self.run_file.unlink(missing_ok=True)

    def create(self, config: Config) -> str:
        """Create the home: node.toml, the token (identity, sealed state) and the owner's
        credential file. Refuses a home that already exists. Returns the node id."""
        if self.exists() or self.token_dir.exists() or self.keystore_dir.exists():
            raise HomeError(
                f"{self.root} already holds a plugshare node; use another --home or remove it"
            )
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)  # mkdir's mode is not applied to a directory that existed
        staged = self.root / "node.toml.new"
        try:
            write_private(staged, dump_config(config).encode())
            node_id = _create_token(self.root)
            make_private(self.root)  # whatever the token and keystore made, under any umask
            staged.replace(self.config_file)  # last: a node.toml marks a whole home
        except BaseException:
            for leftover in (self.owner_credential_file, self.config_file, staged):
                leftover.unlink(missing_ok=True)
            shutil.rmtree(self.token_dir, ignore_errors=True)
            shutil.rmtree(self.keystore_dir, ignore_errors=True)
            raise
        return node_id


def _create_token(root: Path) -> str:
    """The token creates itself, in a process of its own: no key passes through this one.
    It writes the owner's credential file; returns the node id."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "plugshare.token", "--home", str(root),
                           "--create"], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1].removeprefix("plugshare token: ") if lines else "it failed"
        raise HomeError(f"cannot create the token: {reason}")
    return done.stdout.split()[-1]
