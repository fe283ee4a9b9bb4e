"""The node: composition of config, token, store and servers, and its run loop."""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from plugshare import __version__
from plugshare.config import Address, Config
from plugshare.node import http_server
from plugshare.node.access import Identity, ShareView
from plugshare.node.admin import Admin
from plugshare.node.discovery import Discovery, DiscoveryError, local_addresses
from plugshare.node.documents import Documents
from plugshare.node.events import EventBus
from plugshare.node.home import Home
from plugshare.node.listen import bind_listener
from plugshare.node.on_read import FetchModes, OnRead
from plugshare.node.peers import PeerManager
from plugshare.node.session import PeerSession, SessionParts
from plugshare.node.sharing import Sharing
from plugshare.node.systemd import notify
from plugshare.store import Store, open_store
from plugshare.token import format_node_id
from plugshare.store.base import StoreError
from plugshare.token.client import TokenClient
from plugshare.token.paths import socket_path
from plugshare.token.supervisor import TokenProcess

log = logging.getLogger("plugshare.node")


GRACEFUL_TIMEOUT = 2.0  # seconds requests in flight get to finish at shutdown
# Seconds an idle keep-alive connection stays open. Clients drop theirs from their pools after
# their own delay (httpx 5 s, Node's agents about as long): a server that closes first races
# a request sent at that moment, which then meets a reset.
API_KEEP_ALIVE = 30.0


EXPIRY_CHECK_EVERY = 30.0  # seconds between two looks at share expiry (the token enforces)
STAGED_EXPIRY_EVERY = 3600.0  # seconds between two sweeps of staged chunks past their window


class Node:
    """Wires the parts: each gets what it uses, nothing reaches through another."""

    def __init__(self, home: Home, config: Config, store: Store, token: TokenClient,
                 identity: Identity, token_process: Any = None):
        self.home = home
        self.config = config
        self.store = store
        self.token = token
        self.token_process = token_process
        self.identity = identity
        call = token.call
        self.events = EventBus()
        self.shares = ShareView(call, identity.fingerprint)
        self.documents = Documents(store, call, self.events)
        self.admin = Admin(call, self.documents)
        self.discovery: Discovery | None = None
        parts_holder: dict[str, SessionParts] = {}
        self.peers = PeerManager(
            config=config, book_path=home.root / "peers.json", identity=identity,
            shares=self.shares, call=call, events=self.events,
            new_session=lambda conn, dialed: PeerSession(parts_holder["parts"], conn, dialed),
            discovery=lambda: self.discovery)
        self.sharing = Sharing(call=call, identity=identity, shares=self.shares, store=store,
                               documents=self.documents, events=self.events, peers=self.peers,
                               node_name=config.node.name)
        # Attachment data fetched on first read, for the shares this member keeps so.
        self.fetch_modes = FetchModes(store, on_change=lambda: self.on_read.wake_sweep())
        self.on_read = OnRead(store, self.fetch_modes, sessions=lambda: self.peers.sessions,
                              common=self.shares.common, share_name=self._share_name)
        self.sharing.fetch_mode = self.fetch_modes.mode
        parts_holder["parts"] = SessionParts(
            store=store, call=call, identity=identity, shares=self.shares, events=self.events,
            peers=self.peers, manifest_changed=self.sharing.manifest_changed,
            on_read=self.fetch_modes.on_read)
        self.api_url: str | None = None
        self.started_at = time.time()
        self._stopping = trio.Event()

    @classmethod
    @asynccontextmanager
    async def open(cls, home: Home) -> AsyncIterator[Node]:
        """The node of `home`, with its token in a process of its own (started here, or one
        already serving the home's socket, e.g. from `plugshare token run`)."""
        config = home.load_config()
        path = socket_path(home.root)
        async with _token_process(home, path) as process:
            async with TokenClient.open(path) as token:
                identity = await Identity.fetch(token.call)
                store = await open_store(config.store, home.root, config.node.name,
                                         node_id=identity.node_id)
                try:
                    node = cls(home, config, store, token, identity, process)
                    await node.shares.refresh()
                    await node.fetch_modes.load()
                    yield node
                finally:
                    await store.aclose()

    def _share_name(self, share_id: str) -> str:
        manifest = self.shares.get(share_id)
        return manifest.name if manifest is not None else share_id

    async def set_fetch_mode(self, name: str, mode: object) -> dict:
        """A share's fetch mode on this node (`eager` or `on-read`)."""
        manifest = self.shares.find(name)
        mode = await self.fetch_modes.set(manifest.share_id, mode)
        return {"share": manifest.name, "fetch": mode}

    async def pin(self, doc_id: object, pinned: bool) -> dict:
        """Pin a document for eager download in the shares this node fetches on read."""
        return {"id": doc_id, "pinned": await self.fetch_modes.pin(doc_id, pinned)}

    async def status(self) -> dict:
        return {
            "name": self.config.node.name,
            "node_id": self.identity.node_id,
            "token_pid": getattr(self.token_process, "pid", None),
            "token": await self._token_status(),
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "api": self.api_url,
            "peer_address": str(self.peers.listen_address) if self.peers.listen_address else None,
            "relays": [{"relay": str(relay), "joined": joined}
                       for relay, joined in self.peers.relays.joined.items()],
            "discovery": self.discovery is not None,
            "store": await self._store_status(),
            "peers": self.peers.status(),
            "shares": await self.sharing.list(),
            "pending_joins": self.sharing.pending_joins(),
            "events_dropped": self.events.dropped,
        }

    def nearby(self) -> list[dict]:
        """Nodes announcing themselves on the LAN that are not peers of this one: someone to
        invite, shown apart from peers (nothing is shared with them, nothing is trusted)."""
        if self.discovery is None:
            return []
        known = {row["id"] for row in self.peers.status()}
        rows = [{"id": format_node_id(fp), "name": peer.name,
                 "addresses": [str(Address(host, port)) for host, port in peer.addresses]}
                for fp, peer in self.discovery.peers.items()
                if fp != self.identity.fingerprint and peer.addresses]
        return sorted((r for r in rows if r["id"] not in known), key=lambda r: r["name"])

    async def _store_status(self) -> dict:
        """The store's info, or what is wrong with it: /status answers while it is down."""
        try:
            return await self.store.info()
        except StoreError as exc:
            return {"backend": getattr(self.store, "backend", None), "error": exc.reason}

    async def _token_status(self) -> dict:
        info = await self.token.call("info")
        return {"pid": info.get("pid"), "dumpable": info.get("dumpable"),
                "restarts": getattr(self.token_process, "restarts", 0)}

    def stop(self) -> None:
        """Ask `serve` to drain its requests and return."""
        self._stopping.set()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop()` (or cancellation); `task_status.started(api_url)` once
        listening. run.json tells the command line where the API is while the node runs."""
        from plugshare.node.api import ApiParts, create_app

        api_sock = bind_listener(self.config.api.listen, "local API")
        host, port = api_sock.getsockname()[:2]
        self.api_url = f"http://{Address(host, port)}"
        limits = http_server.Limits(keep_alive=API_KEEP_ALIVE, graceful=GRACEFUL_TIMEOUT)
        api_done = trio.Event()

        async def serve_api(task_status) -> None:
            try:
                parts = ApiParts(call=self.token.call, documents=self.documents,
                                 admin=self.admin, sharing=self.sharing, events=self.events,
                                 peers_status=self.peers.status, nearby=self.nearby,
                                 status=self.status,
                                 max_attachment=self.config.api.max_attachment_size,
                                 open_stored=self.on_read.open_attachment,
                                 set_fetch_mode=self.set_fetch_mode,
                                 pin=self.pin, pins=self.fetch_modes.pins,
                                 spool_dir=self.home.root)
                await http_server.serve(create_app(parts), api_sock, limits=limits,
                                        shutdown_trigger=self._stopping.wait,
                                        task_status=task_status)
            finally:
                api_done.set()

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.on_read.run)
                await nursery.start(self.peers.run)
                nursery.start_soon(self._follow_expiry)
                nursery.start_soon(sweep_staged_chunks, self.store,
                                   self.config.store.resume_window_hours)
                nursery.start_soon(self.sharing.retry_pending_joins)
                if self.config.peer.discovery:
                    await nursery.start(self._discover)
                await nursery.start(serve_api)
                self.home.write_runtime({"pid": os.getpid(), "api": self.api_url,
                                         "peer": str(self.peers.listen_address)})
                self.events.publish("node.started", api=self.api_url,
                                    peer_address=str(self.peers.listen_address))
                log.info("node %s (%s) serving the local API on %s",
                         self.config.node.name, self.identity.node_id, self.api_url)
                notify("READY=1", f"STATUS=serving the local API on {self.api_url}")
                task_status.started(self.api_url)
                await self._stopping.wait()
                notify("STOPPING=1")
                self.events.close()  # ends the /events streams, so the API can drain
                with trio.move_on_after(GRACEFUL_TIMEOUT + 1):
                    await api_done.wait()  # requests in flight finish first
                nursery.cancel_scope.cancel()
        finally:
            self.home.clear_runtime()

    async def _follow_expiry(self) -> None:
        """Shares and memberships expire in the token, also while nothing happens here:
        re-read the view now and then, and drop the links and pushes that no longer hold."""
        while True:
            await trio.sleep(EXPIRY_CHECK_EVERY)
            try:
                before = {m.share_id: (m.version, self.shares.status(m.share_id))
                          for m in self.shares.all()}
                await self.shares.refresh()
                after = {m.share_id: (m.version, self.shares.status(m.share_id))
                         for m in self.shares.all()}
                if before != after:
                    await self.peers.refresh()
            except Exception as exc:  # the token restarting: try again next time
                log.info("could not re-read the shares: %s", exc)

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
        discovery = Discovery(self.identity.fingerprint, self.config.node.name, listen.port,
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
    log.debug("home %s, configuration %s", home.root, home.config_file)
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
    log.info("node stopped")


@asynccontextmanager
async def _token_process(home: Home, path) -> AsyncIterator[Any]:
    """A token process for `home`: one started alone on its socket (`plugshare token run`),
    else a child this node starts, watches and restarts. A child left by a node that was
    killed stops by itself within a second: wait for it rather than share its state."""
    deadline = trio.current_time() + 5.0
    while os.path.exists(path) and trio.current_time() < deadline:
        info = await _probe(path)
        if info is None:
            break  # a stale socket: nothing serves it
        if info.get("standalone"):
            log.info("using the token process already serving %s", path)
            yield None
            return
        await trio.sleep(0.1)
    async with TokenProcess(["--home", str(home.root), "--die-with-parent"], path).run() as process:
        yield process


async def _probe(path) -> dict | None:
    try:
        async with TokenClient.open(path) as probe:
            return await probe.call("info")
    except Exception:
        return None


async def sweep_staged_chunks(store: Store, resume_window_hours: float) -> None:
    """Chunks an incoming file transfer staged stay for it to resume; a transfer cut for
    good (the node killed mid-transfer, then its share left or its read never made
    again) would hold them for ever. At start, then every STAGED_EXPIRY_EVERY seconds, those
    unused for the resume window go, and the store gives back the space of data no longer
    held."""
    while True:
        try:
            removed = await store.expire_staged(resume_window_hours * 3600)
            freed = await store.reclaim_space()
        except StoreError as exc:  # the store away: next time
            log.warning("could not expire staged chunks or reclaim space: %s", exc)
        else:
            if removed:
                log.info("removed %d staged chunks of file transfers cut more than %g "
                         "hours ago", removed, resume_window_hours)
            if freed:
                log.info("gave back %.1f MB of attachment data no longer held", freed / 1e6)
        await trio.sleep(STAGED_EXPIRY_EVERY)
