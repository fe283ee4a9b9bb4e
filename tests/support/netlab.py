"""Simulated networks for tests: Linux network namespaces joined by veth pairs.

`netlab()` builds, and always tears down (also when the test fails or is interrupted), this
topology, every part of it a namespace of its own:

    home A LAN 10.1.0.0/24          public 100.64.0.0/24            home B LAN 10.2.0.0/24
    a1 10.1.0.11 ┐                  ┌──────────────────┐                ┌ b1 10.2.0.11
    a2 10.1.0.12 ┼─ router A ── wan ┤ bridge, 100.64.0.1├ wan ── router B ┼ b2 10.2.0.12
                 ┘  10.1.0.1  100.64.0.11  (the relay)  100.64.0.12  10.2.0.1 ┘

- a host (`a1`, `b1`...) is a namespace with one veth on its home's LAN bridge, which lives in
  the router's namespace; its default route is the router;
- a router masquerades what leaves by its WAN side (nftables NAT, no port forwarded) and is
  stateful: a connection opened from the public side is dropped, both to the router and
  through it (counted: `inbound_drops`), only answers to what the LAN opened come back in;
- public is one bridge the routers' WAN sides are plugged into. It routes each home's LAN
  to that home's router, the worst an ISP could do, so that only the router's firewall (not
  a missing route) keeps outsiders out, and forwards between the routers.

Addresses are test ranges only (10.x, 100.64.x) and every interface, route and rule lives in a
namespace made here: nothing touches the host's own interfaces or routes. Names are unique per
run (`psnl-<pid>-<random>-<part>`) so parallel sessions never collide; namespaces left by a run
whose process is gone (a crashed run) are removed when the next lab is built.

Helpers: `run_in` / `open_in` (trio processes in a namespace, with `ip netns exec`),
`start_node` (tests/node/conftest.py's, in a namespace), `entered_netns` (this thread's
sockets in a namespace), and `Host`, a place a `tests.node.cluster.Cluster` can put a node.

The tests using it call `require_netlab()`: they skip, saying why, only when not root or when
`ip netns` / `nft` is unavailable, and with `CI=true` (as `.ci/run` sets) they fail instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.node.conftest import RunningNode
from tests.node.conftest import start_node as start_node_with

PREFIX = "psnl"  # plugshare netlab: every namespace it makes starts with this
NETNS_DIR = Path("/run/netns")
PUBLIC_ADDRESS = "100.64.0.1"  # the public bridge's own address, where the relay listens
_NAME = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-\w+$")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


# -- can this machine do it ------------------------------------------------------------------

def netlab_unavailable() -> str | None:
    """Why namespaces cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (the tests run as root in .ci/run)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian package {package}; .ci/run installs it)"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` fails here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def require_netlab() -> None:
    """Skip the calling test when namespaces cannot be built here, saying why; under CI
    (`CI=true`, as .ci/run sets) fail instead: there these tests must run."""
    reason = netlab_unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the network-namespace tests cannot run: {reason}")
    pytest.skip(reason)


# -- namespaces from this process ---------------------------------------------------------------

def in_netns(ns: str) -> list[str]:
    """The command prefix that runs a program in namespace `ns`."""
    return ["ip", "netns", "exec", ns]


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered_netns(ns: str) -> Iterator[None]:
    """Run the block with this thread in namespace `ns` (only this thread: setns(2) on a
    network namespace is per thread). Sockets made inside stay in `ns` after the block."""
    with open("/proc/thread-self/ns/net") as own, open(NETNS_DIR / ns) as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(own.fileno())


class NetnsTransport(httpx.BaseTransport):
    """httpx transport whose connections are made in namespace `ns`: the test process talks
    to a node's API on that namespace's own loopback."""

    def __init__(self, ns: str):
        self.ns = ns
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with entered_netns(self.ns):
            return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


async def run_in(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """`trio.run_process(argv)` in namespace `ns` (same keyword arguments)."""
    return await trio.run_process([*in_netns(ns), *argv], **kwargs)


async def open_in(ns: str, argv: Sequence[str], **kwargs: Any) -> trio.Process:
    """A background trio process in namespace `ns`; the lab kills whatever still runs in
    its namespaces when it is torn down."""
    return await trio.lowlevel.open_process([*in_netns(ns), *argv], **kwargs)


def start_node(ns: str, home: Path, timeout: float = 60) -> RunningNode:
    """`plugshare run` for `home` in namespace `ns` (tests/node/conftest.py's start_node)."""
    return start_node_with(home, timeout, command_prefix=in_netns(ns))


def free_port_in(ns: str, host: str) -> int:
    """A TCP port nothing listens on at `host` in namespace `ns` right now."""
    with entered_netns(ns), socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# -- the topology -------------------------------------------------------------------------

@attrs.frozen
class Host:
    """A machine on a home LAN (or the public host): its namespace and address. It is also a
    place a `Cluster` can run a node (`cluster.add(name, place=host)`)."""

    label: str
    ns: str
    address: str

    @property
    def peer_host(self) -> str:
        return self.address

    @property
    def command_prefix(self) -> list[str]:
        return in_netns(self.ns)

    def http_transport(self) -> httpx.BaseTransport:
        return NetnsTransport(self.ns)

    def free_port(self) -> int:
        return free_port_in(self.ns, self.address)


@attrs.frozen
class Home:
    label: str  # "a", "b"
    router_ns: str
    wan_address: str
    lan_gateway: str
    lan_subnet: str
    hosts: tuple[Host, ...]


@attrs.define
class Netlab:
    tag: str  # psnl-<pid>-<random>: the prefix of every namespace of this lab
    public: Host
    homes: dict[str, Home]

    @property
    def namespaces(self) -> list[str]:
        names = [self.public.ns]
        for home in self.homes.values():
            names += [home.router_ns, *(h.ns for h in home.hosts)]
        return names

    def host(self, label: str) -> Host:
        """`a1`, `b2`, `public`..."""
        if label == "public":
            return self.public
        for home in self.homes.values():
            for host in home.hosts:
                if host.label == label:
                    return host
        raise KeyError(label)

    def inbound_drops(self, home: str) -> int:
        """How many packets home `home`'s router dropped that came from the public side
        unasked (new connections to or through it)."""
        done = _run(["ip", "netns", "exec", self.homes[home].router_ns, "nft", "-j", "list",
                     "counter", "inet", "netlab", "inbound_dropped"])
        for item in json.loads(done.stdout)["nftables"]:
            if "counter" in item:
                return item["counter"]["packets"]
        raise AssertionError(f"no counter in {done.stdout!r}")


def _run(argv: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, input=input)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _ip(ns: str, *args: str) -> None:
    _run(["ip", "-n", ns, *args])


def _sysctl(ns: str, setting: str) -> None:
    _run(["ip", "netns", "exec", ns, "sysctl", "-qw", setting])


# The router's rules: masquerade out by the WAN side; from the WAN side only what answers a
# connection the LAN opened comes in (to the router itself or through it); the rest is
# dropped and counted. No port is forwarded.
_ROUTER_RULES = """
table ip netlab_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }
}
table inet netlab {
    counter inbound_dropped { }
    chain forward {
        type filter hook forward priority filter; policy accept;
        ct state established,related accept
        iifname "wan" counter name "inbound_dropped" drop
    }
    chain input {
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        iifname "wan" counter name "inbound_dropped" drop
    }
}
"""


def _add_namespace(ns: str, made: list[str]) -> None:
    _run(["ip", "netns", "add", ns])
    made.append(ns)
    _ip(ns, "link", "set", "lo", "up")


def _plug(ns: str, inner: str, bridge_ns: str, port: str, bridge: str) -> None:
    """A veth pair: `inner` in `ns`, `port` in `bridge_ns` enslaved to `bridge` there.
    Made inside `ns` and moved straight to `bridge_ns`: never in the host's namespace."""
    _ip(ns, "link", "add", inner, "type", "veth", "peer", "name", port, "netns", bridge_ns)
    _ip(bridge_ns, "link", "set", port, "master", bridge, "up")
    _ip(ns, "link", "set", inner, "up")


def _bridge(ns: str, name: str, address: str) -> None:
    _ip(ns, "link", "add", name, "type", "bridge")
    _ip(ns, "addr", "add", address, "dev", name)
    _ip(ns, "link", "set", name, "up")


def _build(tag: str, hosts_per_home: Sequence[int], made: list[str]) -> Netlab:
    public = Host("public", f"{tag}-pub", PUBLIC_ADDRESS)
    _add_namespace(public.ns, made)
    _bridge(public.ns, "inet", f"{PUBLIC_ADDRESS}/24")
    _sysctl(public.ns, "net.ipv4.ip_forward=1")
    homes = {}
    for index, count in enumerate(hosts_per_home, start=1):
        label = "ab"[index - 1] if index <= 2 else f"h{index}"
        router = f"{tag}-r{label}"
        wan = f"100.64.0.{10 + index}"
        gateway, subnet = f"10.{index}.0.1", f"10.{index}.0.0/24"
        _add_namespace(router, made)
        _plug(router, "wan", public.ns, f"r{label}", "inet")
        _ip(router, "addr", "add", f"{wan}/24", "dev", "wan")
        _ip(router, "route", "add", "default", "via", PUBLIC_ADDRESS)
        _bridge(router, "lan", f"{gateway}/24")
        _sysctl(router, "net.ipv4.ip_forward=1")
        _run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=_ROUTER_RULES)
        _ip(public.ns, "route", "add", subnet, "via", wan)
        hosts = []
        for number in range(1, count + 1):
            host = Host(f"{label}{number}", f"{tag}-{label}{number}", f"10.{index}.0.{10 + number}")
            _add_namespace(host.ns, made)
            _plug(host.ns, "eth0", router, f"h{number}", "lan")
            _ip(host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip(host.ns, "route", "add", "default", "via", gateway)
            hosts.append(host)
        homes[label] = Home(label, router, wan, gateway, subnet, tuple(hosts))
    return Netlab(tag, public, homes)


# -- teardown -----------------------------------------------------------------------------------

def _kill_processes_in(ns: str) -> None:
    """SIGKILL what still runs in namespace `ns` (only namespaces a lab made: what runs there
    was started by a test), and wait until it is gone."""
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    pids = [int(p) for p in done.stdout.split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()
                and not _is_zombie(p)]
        time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def _delete_namespaces(names: Sequence[str]) -> None:
    """Kill what runs in them, then delete them (their veths and bridges go with them)."""
    for ns in names:
        _kill_processes_in(ns)
    for ns in reversed(names):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def lab_namespaces(tag: str = PREFIX) -> list[str]:
    """Names of the namespaces that exist now whose name starts with `tag`."""
    done = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in done.stdout.splitlines()
            if line.split() and line.split()[0].startswith(tag)]


def remove_stale_namespaces() -> list[str]:
    """Delete the lab namespaces whose run is gone (its pid, in the name, no longer
    exists): what a crashed or killed run left. Those of live runs are left alone."""
    stale = [ns for ns in lab_namespaces()
             if (m := _NAME.match(ns)) and not Path(f"/proc/{m.group(1)}").exists()]
    _delete_namespaces(stale)
    return stale


@contextlib.contextmanager
def netlab(hosts_per_home: Sequence[int] = (2, 1)) -> Iterator[Netlab]:
    """Build the topology (home A with hosts_per_home[0] hosts, home B with [1]) and tear it
    down when the block ends, however it ends."""
    require_netlab()
    remove_stale_namespaces()
    tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
    made: list[str] = []
    try:
        yield _build(tag, hosts_per_home, made)
    finally:
        _delete_namespaces(made)
