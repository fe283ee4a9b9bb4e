"""The node: composition of config, token, store and servers, and its run loop."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from plugshare import __version__
from plugshare.config import Address, Config
from plugshare.errors import PlugshareError
from plugshare.node.access import Access, open_access
from plugshare.node.admin import Admin
from plugshare.node.discovery import Discovery, DiscoveryError, local_addresses
from plugshare.node.events import EventBus
from plugshare.node.peers import PeerManager
from plugshare.node.session import PeerSession
from plugshare.node.sharing import Sharing
from plugshare.node.documents import Documents
from plugshare.node.home import Home
from plugshare.store import Store, open_store

log = logging.getLogger("plugshare.node")

GRACEFUL_TIMEOUT = 2.0  # seconds requests in flight get to finish at shutdown


class ListenError(PlugshareError):
    """A listening address cannot be bound (port in use, no permission, bad host)."""


def bind_listener(address: Address, what: str) -> socket.socket:
    """Bind and listen on `address` now, so a port in use is one clear error at start-up."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":  # a restarted node rebinds its port despite old links in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address.host, address.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        hint = {
            errno.EADDRINUSE: "is another node running? pick another port in node.toml",
            errno.EACCES: "ports below 1024 need privileges; pick another port",
        }.get(exc.errno, "check the address in node.toml")
        raise ListenError(f"cannot listen on {address} for the {what}: {exc.strerror} ({hint})")
    sock.setblocking(False)
    return sock


class Node:
    def __init__(self, home: Home, config: Config, store: Store, access: Access):
        self.home = home
        self.config = config
        self.store = store
        self.access = access
        self.events = EventBus()
        self.documents = Documents(store, access, self.events)
        self.admin = Admin(self.documents)
        self.sharing = Sharing(self)
        self.peers = PeerManager(self, lambda conn, dialed: PeerSession(self, conn, dialed))
        self.discovery: Discovery | None = None
        self.api_url: str | None = None
        self.started_at = time.time()
        self._stopping = trio.Event()

    @classmethod
    @asynccontextmanager
    async def open(cls, home: Home) -> AsyncIterator[Node]:
        config = home.load_config()
        access = open_access(home, config)
        try:
            store = await open_store(config.store, home.root, config.node.name)
        except BaseException:
            access.close()
            raise
        try:
            yield cls(home, config, store, access)
        finally:
            await store.aclose()
            access.close()

    async def status(self) -> dict:
        return {
            "name": self.config.node.name,
            "node_id": self.access.node_id,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "api": self.api_url,
            "peer_address": str(self.peers.listen_address) if self.peers.listen_address else None,
            "discovery": self.discovery is not None,
            "store": await self.store.info(),
            "peers": self.peers.status(),
            "shares": await self.sharing.list(),
            "events_dropped": self.events.dropped,
        }

    def stop(self) -> None:
        """Ask `serve` to drain its requests and return."""
        self._stopping.set()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()` (or cancellation); `task_status.started(api_url)` once
        listening. run.json tells the command line where the API is while the node runs."""
        from plugshare.node.api import create_app

        api_sock = bind_listener(self.config.api.listen, "local API")
        host, port = api_sock.getsockname()[:2]
        self.api_url = f"http://{Address(host, port)}"
        hconfig = HypercornConfig()
        hconfig.bind = [f"fd://{api_sock.detach()}"]  # hypercorn owns (and closes) the fd now
        hconfig.accesslog = None
        hconfig.errorlog = logging.getLogger("plugshare.api")  # one logging setup, not two
        hconfig.graceful_timeout = GRACEFUL_TIMEOUT
        api_done = trio.Event()

        async def serve_api(task_status) -> None:
            try:
                await hypercorn_serve(create_app(self), hconfig,
                                      shutdown_trigger=self._stopping.wait,
                                      task_status=task_status)
            finally:
                api_done.set()

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.peers.run)
                if self.config.peer.discovery:
                    await nursery.start(self._discover)
                await nursery.start(serve_api)
                self.home.write_runtime({"pid": os.getpid(), "api": self.api_url,
                                         "peer": str(self.peers.listen_address)})
                self.events.publish("node.started", api=self.api_url,
                                    peer_address=str(self.peers.listen_address))
                log.info("node %s (%s) serving the local API on %s",
                         self.config.node.name, self.access.node_id, self.api_url)
                task_status.started(self.api_url)
                await self._stopping.wait()
                self.events.close()  # ends the /events streams, so the API can drain
                with trio.move_on_after(GRACEFUL_TIMEOUT + 1):
                    await api_done.wait()  # requests in flight finish first
                nursery.cancel_scope.cancel()
        finally:
            self.home.clear_runtime()


    async def _discover(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Announce this node and find members' current addresses on the LAN."""
        listen = self.peers.listen_address
        loopback = listen.host in ("127.0.0.1", "localhost")
        addresses = ["127.0.0.1"] if loopback else (
            [listen.host] if listen.host not in ("0.0.0.0", "::") else local_addresses())
        if not addresses:
            log.info("discovery off: no LAN address to announce")
            task_status.started()
            return
        discovery = Discovery(self.access.token.fingerprint, self.config.node.name, listen.port,
                              addresses, interfaces=["127.0.0.1"] if loopback else None)
        started = False
        try:
            async with discovery as found:
                self.discovery = found
                task_status.started()
                started = True
                try:
                    await trio.sleep_forever()
                finally:
                    self.discovery = None
        except (OSError, DiscoveryError) as exc:
            # No multicast here (a container, a locked-down network): peers are still reached
            # through invitations, hellos and static addresses.
            log.warning("LAN discovery is off: %s", exc)
            if not started:
                task_status.started()


async def run_node(home: Home, *, on_ready=None) -> None:
    """`plugshare run`: serve until SIGINT/SIGTERM, then stop cleanly."""
    async with Node.open(home) as node:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                api_url = await nursery.start(node.serve)
                if on_ready is not None:
                    on_ready(node, api_url)
                async for signum in signals:
                    log.info("received %s, stopping", signal.Signals(signum).name)
                    node.stop()
                    break
