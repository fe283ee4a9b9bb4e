"""A `plugshare relay` process and node homes set up behind it, for tests that run real
processes (on loopback here; inside network namespaces in tests/net)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import tomli_w

from tests.node.cluster import free_port


class RelayProcess:
    """`plugshare relay` in a subprocess; its address is the `ID@HOST:PORT` it prints. Its
    stderr goes to relay.log next to its key. `stop` kills it; `start` again comes back on the
    same port with the same key (so the same address)."""

    def __init__(self, key, port: int | None = None, *, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()):
        self.key = key
        self.host = host
        self.port = port or free_port()
        self.prefix = prefix  # e.g. ("ip", "netns", "exec", "public"): where the relay runs
        self.process: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> RelayProcess:
        log = open(self.key.parent / "relay.log", "a")
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "plugshare", "relay", "--listen", f"{self.host}:{self.port}",
             "--key", str(self.key)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=os.environ.copy())
        log.close()
        line = self.process.stdout.readline()
        assert line.startswith("relay "), f"the relay printed {line!r}"
        self.address = line.split()[1]
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None


def behind_nat(node, relay_address: str, *, advertise_direct: bool = False) -> None:
    """Give `node` the relay, and (behind NAT) have it tell peers no direct address."""
    path = node.home / "node.toml"
    config = tomllib.loads(path.read_text())
    config.setdefault("peer", {}).update(relays=[relay_address], advertise_direct=advertise_direct)
    path.write_text(tomli_w.dumps(config))
