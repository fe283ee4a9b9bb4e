"""The token process: opens the token of one home and serves its door on a Unix socket.

`plugshare run` starts it as a child (`python -m plugshare.token --home DIR`) and talks to it
through `plugshare.token.client`; `plugshare token run` starts it alone. It is the only process
that opens `<home>/token/` and the keystore, and it makes itself non-dumpable before it does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import trio

from plugshare.config import Config, TokenSection, load_config
from plugshare.errors import PlugshareError

from .errors import TokenError
from .keystore import Keystore, read_secret_source
from .paths import keystore_dir, socket_path, token_dir
from .pkcs11_keystore import Pkcs11Keystore
from .soft_keystore import SoftKeystore
from .token import Token

log = logging.getLogger("plugshare.token")



class TokenUnavailableError(PlugshareError):
    """The token's state or keystore cannot be opened."""


def keystore_for(section: TokenSection, home: Path, node_name: str) -> Keystore:
    if section.keystore == "pkcs11":
        pin = section.pin or "env:PLUGSHARE_PKCS11_PIN"
        return Pkcs11Keystore(section.module, section.token_label, pin,
                              key_label=section.key_label or f"plugshare-{node_name}")
    passphrase = None
    if section.passphrase:
        passphrase = read_secret_source(section.passphrase, "the token passphrase")
    return SoftKeystore(keystore_dir(home), passphrase)


def create_token(home: Path, config: Config) -> tuple[str, str]:
    """A new token for a new home; returns its node id and the owner's credential."""
    try:
        keystore = keystore_for(config.token, home, config.node.name)
        token, credential = Token.create(token_dir(home), keystore, name=config.node.name)
    except TokenError as exc:
        raise TokenUnavailableError(f"cannot create the token: {exc}") from None
    node_id = token.node_id
    token.close()
    return node_id, credential


def create_home_token(home: Path) -> str:
    """Create the token of a new home from its node.toml and write the owner's credential
    (mode 0600) where the command line reads it. Returns the node id."""
    config = load_config(home / "node.toml.new")
    node_id, credential = create_token(home, config)
    path = home / "owner.credential"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(credential + "\n")
        file.flush()
        os.fsync(file.fileno())
    return node_id


def open_token(home: Path, config: Config) -> Token:
    try:
        keystore = keystore_for(config.token, home, config.node.name)
        return Token.open(token_dir(home), keystore)
    except TokenError as exc:
        raise TokenUnavailableError(
            f"cannot open the token in {token_dir(home)}: {exc}") from None


async def serve_home(home: Path, *, ready=None, parent: int | None = None) -> None:
    """Open the token of `home` and serve it until SIGTERM/SIGINT (or, given `parent`, until
    that process ends)."""
    from .door import Door
    from .server import harden_process, serve

    harden_process()  # before any key is in memory
    config = load_config(home / "node.toml")
    door = Door(open_token(home, config), standalone=parent is None)
    path = socket_path(home)
    # A node's child stops when the node tells it (SIGTERM). A terminal's Ctrl-C reaches the
    # whole foreground process group: left to it, the child would exit on its own and the
    # node would restart it while stopping.
    stop_on = (signal.SIGTERM,) if parent is not None else (signal.SIGINT, signal.SIGTERM)
    if parent is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(*stop_on) as signals:
                await nursery.start(serve, path, door)
                if parent is not None:
                    nursery.start_soon(_watch_parent, parent, nursery.cancel_scope)
                if ready is not None:
                    ready(path)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
    finally:
        door.close()
        path.unlink(missing_ok=True)


async def _watch_parent(parent: int, cancel: trio.CancelScope) -> None:
    """A node killed outright (SIGKILL) must not leave its token serving: end when this
    process is re-parented. (PR_SET_PDEATHSIG would fire when the parent's *thread* that
    spawned us ends, and trio spawns from worker threads.)"""
    while os.getppid() == parent:
        await trio.sleep(0.5)
    log.info("the node that started this token process is gone; stopping")
    cancel.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plugshare-token",
                                     description="Serve a node's secure token on a Unix socket.")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--die-with-parent", action="store_true",
                        help="stop when the process that started this one ends (the node)")
    parser.add_argument("--create", action="store_true",
                        help="create the token of a new home (writes owner.credential), then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.create:
        try:
            node_id = create_home_token(args.home)
        except PlugshareError as exc:
            print(f"plugshare token: {exc}", file=sys.stderr, flush=True)
            return 1
        print(f"created {node_id}", flush=True)
        return 0

    def ready(path: Path) -> None:
        print(f"ready {path}", flush=True)


    try:
        parent = os.getppid() if args.die_with_parent else None
        trio.run(lambda: serve_home(args.home, ready=ready, parent=parent))
    except PlugshareError as exc:
        print(f"plugshare token: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
