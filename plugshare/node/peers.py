"""Peer links of a node: the listener, the dialers, one live session per peer, and where
peers were last seen.

Peers are known by key fingerprint only; an address is a hint (from an invitation, a
peer's hello, discovery or node.toml) and never decides who a peer is: the pinned TLS link
does. The token says who may connect (`link.may_connect`) and signs this node's proofs; the share
view says whom to keep a link to (the active members of shares in common).

Members learn where the other members of their shares are from the share's owner
(`peer.addresses` hints, see `session`), so they can link directly while the owner is away. A
hint is taken only from the peer it describes or from the owner of a share that peer is an
active member of: no member can make this node dial a host of its choosing for someone else.
Dialing is bounded: a few hinted addresses per peer, a few dials at once, and a hint restarts a
waiting dialer at most once per `HINT_REDIAL_INTERVAL`.

A link from a peer that shares nothing with this node yet (it may be joining: the token lets
anyone link while an invitation is open) is held as *joining*: at most `MAX_JOINING` such links
(`MAX_JOINING_PER_SOURCE` from one address, the oldest dropped to admit a newcomer), each for
`JOINING_TIMEOUT` at most, and nothing about it is written to `peers.json` until it has joined.

Both nodes of a pair dial each other. If two links come up at once, both ends keep the one
dialed by the lower fingerprint, so they agree without talking. A dialer does not dial while
a link to its peer is up.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from plugshare.config import Address, Config
from plugshare.node.access import Identity, ShareView
from plugshare.node.home import write_private
from plugshare.node.relays import RelayMembership, parse_relay_entry, relay_entry, relay_route
from plugshare.relay import RelayAddress
from plugshare.replication.admission import Admission
from plugshare.replication.backoff import Backoff
from plugshare.replication.link import LocalNode
from plugshare.replication.transport import (
    Incoming,
    NoRouteAnswered,
    PeerConnectError,
    PeerConnection,
    PeerRefused,
    Route,
    TransportConfig,
    connect_first,
    connect_peer,
    keep_connected,
    serve_peers,
)
from plugshare.token import format_node_id, tls

if TYPE_CHECKING:
    from plugshare.node.discovery import Discovery
    from plugshare.node.events import EventBus
    from plugshare.node.session import PeerSession

log = logging.getLogger("plugshare.peers")

REDIAL = Backoff(initial=0.5, maximum=30.0)
MAX_CONCURRENT_DIALS = 8  # connection attempts in flight at once, over all peers
HINT_REDIAL_INTERVAL = 10.0  # seconds: a hint restarts a waiting dialer at most this often
MAX_JOINING = 16  # links held from peers that share nothing with us yet
MAX_JOINING_PER_SOURCE = 4  # ...from one source address
JOINING_TIMEOUT = 30.0  # seconds such a link has to join a share
UPGRADE = Backoff(initial=2.0, maximum=60.0)  # a relayed link re-tries direct addresses this often
MAX_RELAYED_WAITING = 16  # relayed sessions handed to the listener, not yet taken


def parse_host_port(text: str) -> tuple[str, int] | None:
    if "@" in text:  # a relay entry (relay:ID@HOST:PORT), not a direct address
        return None
    try:
        address = Address.parse(text)
    except ValueError:
        return None
    return (address.host, address.port) if address.port else None


@attrs.define
class PeerInfo:
    """What this node knows of a peer: hints and live state (nothing here is trusted)."""

    fingerprint: bytes
    name: str = ""
    addresses: list[str] = attrs.Factory(list)  # "host:port", most recently useful first
    last_seen: float | None = None

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint.hex(), "name": self.name,
                "addresses": self.addresses, "last_seen": self.last_seen}

    @classmethod
    def from_json(cls, data: dict) -> PeerInfo:
        return cls(bytes.fromhex(data["fingerprint"]), str(data.get("name", "")),
                   [str(a) for a in data.get("addresses", [])][:16], data.get("last_seen"))


class AddressBook:
    """Where peers were seen, kept in `<home>/peers.json` across restarts."""

    MAX_ADDRESSES = 8
    MAX_HINTED = 4  # addresses another node may add for a peer

    def __init__(self, path: Path):
        self.path = path
        self.peers: dict[bytes, PeerInfo] = {}
        self._save_failing = False
        try:
            for item in json.loads(path.read_text()):
                info = PeerInfo.from_json(item)
                self.peers[info.fingerprint] = info
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s (%s); peers will be found again", path, exc)

    def get(self, fingerprint: bytes) -> PeerInfo:
        return self.peers.setdefault(fingerprint, PeerInfo(fingerprint))

    def learn(self, fingerprint: bytes, *, name: str | None = None,
              addresses: list[str] = (), seen: bool = False) -> None:
        info = self.get(fingerprint)
        if name:
            info.name = name
        for address in reversed([a for a in addresses if _usable(a)]):
            if address in info.addresses:
                info.addresses.remove(address)
            info.addresses.insert(0, address)
        del info.addresses[self.MAX_ADDRESSES:]
        if seen:
            info.last_seen = time.time()
        self.save()

    def add_hints(self, fingerprint: bytes, addresses: list[str]) -> bool:
        """Addresses another node gave for `fingerprint`, kept after the ones seen first-hand;
        True if any was new."""
        info = self.get(fingerprint)
        new = [a for a in dict.fromkeys(addresses) if _usable(a) and a not in info.addresses]
        room = min(self.MAX_ADDRESSES - len(info.addresses), self.MAX_HINTED)
        if not new or room <= 0:
            return False
        info.addresses.extend(new[:room])
        self.save()
        return True

    def save(self) -> None:
        """Write the book; a failure (out of file descriptors, disk full) is logged once and
        the book stays in memory, to be written at the next change."""
        data = [info.to_json() for info in self.peers.values()]
        try:
            write_private(self.path, json.dumps(data, indent=1).encode())
        except OSError as exc:
            if not self._save_failing:
                log.warning("cannot write %s (%s); peers are kept in memory for now", self.path, exc)
            self._save_failing = True
            return
        self._save_failing = False


def _usable(address: str) -> bool:
    """A direct HOST:PORT, or a relay entry."""
    return bool(parse_host_port(address) or parse_relay_entry(address))


@attrs.define(eq=False)
class _Joining:
    """A link held while its peer may be joining a share."""

    ticket: int
    session: PeerSession
    hello_addresses: list[str] = attrs.Factory(list)
    joined: trio.Event = attrs.Factory(trio.Event)


class PeerManager:
    """Links to peers. Gets what it uses: the config, where to keep its address book, this
    node's public identity, the share view it plans links by, the token (for link decisions
    and proofs), the event bus, how to make a session, and where discovery is."""

    def __init__(self, *, config: Config, book_path: Path, identity: Identity,
                 shares: ShareView, call, events: EventBus,
                 new_session: Callable[[PeerConnection, bool], PeerSession],
                 discovery: Callable[[], Discovery | None] = lambda: None):
        self.node_config = config
        self.identity = identity
        self.shares = shares
        self._call = call
        self.events = events
        self.book = AddressBook(book_path)
        self.sessions: dict[bytes, PeerSession] = {}
        self._new_session = new_session
        self._discovery = discovery
        self._dialers: dict[bytes, trio.CancelScope] = {}
        self._dial_limiter = trio.CapacityLimiter(MAX_CONCURRENT_DIALS)
        self._hint_restarts: dict[bytes, float] = {}  # peer -> when a hint last restarted its dialer
        self._joining = Admission(per_source=MAX_JOINING_PER_SOURCE, total=MAX_JOINING)
        self._joining_sessions: dict[int, _Joining] = {}  # by admission ticket
        self._nursery: trio.Nursery | None = None
        self.local: LocalNode | None = None
        self.listen_address: Address | None = None
        self.config = TransportConfig()
        self._client_context = tls.client_ssl_context()
        self._relayed_send, self._relayed_receive = trio.open_memory_channel[Incoming](MAX_RELAYED_WAITING)
        self._tls_credentials: tuple[Ed25519PrivateKey, bytes] | None = None
        self.relays = RelayMembership(
            [RelayAddress.parse(r) for r in config.peer.relays], node_id=identity.fingerprint,
            credentials=lambda: self._tls_credentials, incoming=self._relayed_send)

    async def _prove(self, server_id: bytes, nonce: bytes) -> bytes:
        """This node's proof on a link it dials: signed inside the token."""
        answer = await self._call("link.prove", server_id=server_id, nonce=nonce)
        return bytes(answer["signature"])

    async def _server_context(self):
        """A TLS context for an ephemeral key the token certifies for this run: the
        identity key never enters this process."""
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        answer = await self._call("link.certify", tls_public_key=public)
        delegation = bytes(answer["delegation"])
        # The same certified key proves this node's id to its relays (see plugshare.relay).
        certificate = tls.delegated_certificate(key, delegation, common_name=self.node_config.node.name)
        self._tls_credentials = (key, certificate.public_bytes(Encoding.DER))
        return tls.server_ssl_context(key, delegation, common_name=self.node_config.node.name)

    # -- what other nodes are told about this one ---------------------------------------

    def advertised_addresses(self) -> list[str]:
        """Addresses a peer may use to reach this node (listener bound to 0.0.0.0: this
        host's IPv4 addresses, loopback last); none with `[peer] advertise_direct = false`."""
        assert self.listen_address is not None
        if not self.node_config.peer.advertise_direct:
            return []
        host, port = self.listen_address.host, self.listen_address.port
        if host not in ("0.0.0.0", "::"):
            return [str(Address(host, port))]
        from plugshare.node.discovery import local_addresses

        return [str(Address(h, port)) for h in local_addresses()] + [f"127.0.0.1:{port}"]

    # -- running ------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        from plugshare.node.listen import bind_listener

        sock = bind_listener(self.node_config.peer.listen, "peer listener")
        host, port = sock.getsockname()[:2]
        self.listen_address = Address(self.node_config.peer.listen.host, port)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self.local = LocalNode(
            public_key=self.identity.public_key,
            name=self.node_config.node.name,
            addresses=self.advertised_addresses() + [relay_entry(r) for r in self.relays.relays],
        )
        server_context = await self._server_context()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(lambda task_status: serve_peers(
                self._accepted, host=None, port=0, ssl_context=server_context,
                local=self.local, accept_peer=self._may_connect, config=self.config,
                listeners=[listener], incoming=self._relayed_receive, task_status=task_status))
            log.info("listening for peers on %s", self.listen_address)
            nursery.start_soon(self.relays.run)
            await self.refresh()
            task_status.started(self.listen_address)

    async def _may_connect(self, fingerprint: bytes) -> bool:
        allowed = await self._call("link.may_connect", peer=fingerprint)
        if not allowed:
            log.info("refused a link from unknown node %s", format_node_id(fingerprint))
        return allowed

    async def refresh(self) -> None:
        """Keep a dialer for every peer the token says we share with; stop the others'."""
        if self._nursery is None:
            return
        me = self.identity.fingerprint
        wanted = {m.fingerprint for share in self.shares.all()
                  for m in share.active_members()} - {me}
        wanted = {fp for fp in wanted if self.shares.common(fp)}
        for fp in set(self._dialers) - wanted:
            self._dialers.pop(fp).cancel()
        for fp in wanted - set(self._dialers):
            self._start_dialer(fp)
        for fp, session in list(self.sessions.items()):
            if fp not in wanted and not session.joining:
                session.close("no share in common any more")
            else:
                await session.refresh()
        for joining in list(self._joining_sessions.values()):
            if not joining.session.joining:  # it joined: now it is a peer worth remembering
                self._joined(joining)

    def _start_dialer(self, fingerprint: bytes) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._dialers[fingerprint] = scope
        self._nursery.start_soon(self._dial_forever, fingerprint, scope)

    def may_hint(self, source: bytes, fingerprint: bytes) -> bool:
        """May `source` tell this node where `fingerprint` is? Only the peer itself, or the
        owner of a share (that this node is in) where it is an active member."""
        if source == fingerprint:
            return True
        for manifest in self.shares.common(source):
            member = manifest.member(fingerprint)
            if manifest.owner == source and member is not None and member.status == "active":
                return True
        return False

    def learn_hints(self, fingerprint: bytes, addresses: list[str], *, source: bytes) -> bool:
        """Where `source` says `fingerprint` is; ignored unless `may_hint`. A dialer of that
        peer with no link up starts over at once (rather than after a back-off grown while it
        had no address), at most once per HINT_REDIAL_INTERVAL. True if the hint was taken."""
        if fingerprint == self.identity.fingerprint or not self.may_hint(source, fingerprint):
            log.debug("ignored address hints for %s from %s", format_node_id(fingerprint),
                      format_node_id(source))
            return False
        if not self.book.add_hints(fingerprint, addresses):
            return True
        if fingerprint in self._dialers and fingerprint not in self.sessions:
            now = trio.current_time()
            if now - self._hint_restarts.get(fingerprint, -HINT_REDIAL_INTERVAL) >= HINT_REDIAL_INTERVAL:
                self._hint_restarts[fingerprint] = now
                self._dialers.pop(fingerprint).cancel()
                self._start_dialer(fingerprint)
        return True

    def known_addresses(self, fingerprint: bytes) -> list[tuple[str, int]]:
        """Where `fingerprint` may be now (LAN discovery, the address book, node.toml); none
        while a link to it is up."""
        return self._direct_addresses(fingerprint) if fingerprint not in self.sessions else []

    def relay_routes(self, fingerprint: bytes, extra: list[str] = ()) -> list[Route]:
        """Ways to `fingerprint` through its relays (known from it, its share's owner or an
        invitation), tried after every direct address."""
        entries = list(extra) + list(self.book.get(fingerprint).addresses)
        for manifest in self.shares.common(fingerprint):  # signed by the share's owner
            member = manifest.member(fingerprint)
            entries += [relay_entry(RelayAddress.parse(r)) for r in (member.relays if member else ())]
        relays = dict.fromkeys(r for r in map(parse_relay_entry, entries) if r is not None)
        return [relay_route(relay, fingerprint) for relay in relays]

    def _addresses_for(self, fingerprint: bytes) -> list[tuple[str, int] | Route]:
        if fingerprint in self.sessions:
            return []  # a link is up: nothing to dial
        return [*self._direct_addresses(fingerprint), *self.relay_routes(fingerprint)]

    def _direct_addresses(self, fingerprint: bytes) -> list[tuple[str, int]]:
        hints = list(self.book.get(fingerprint).addresses)
        discovery = self._discovery()
        if discovery is not None:
            hints = [str(Address(h, p)) for h, p in discovery.addresses_of(fingerprint)] + hints
        hints += [str(a) for a in self.node_config.peer.static]
        seen: list[tuple[str, int]] = []
        for hint in hints:
            parsed = parse_host_port(hint)
            if parsed and parsed not in seen:
                seen.append(parsed)
        return seen

    async def _dial_forever(self, fingerprint: bytes, scope: trio.CancelScope) -> None:
        with scope:
            await keep_connected(
                lambda conn: self._run_session(conn, dialed=True),
                addresses=lambda: self._addresses_for(fingerprint),
                expected_fingerprint=fingerprint, ssl_context=self._client_context,
                local=self.local, config=self.config, backoff=REDIAL, prove=self._prove,
                dial_limiter=self._dial_limiter,
            )

    async def open_session(self, fingerprint: bytes,
                           addresses: list[tuple[str, int] | Route]) -> PeerSession:
        """Dial a peer we may not know yet (accepting an invitation) and return its session
        once the link is up; the session then lives on in the background like any other.
        `PeerConnectError` if no address answers."""
        assert self._nursery is not None, "the peer manager is not running"
        ready = trio.Event()
        result: dict[str, object] = {}

        def up(session: PeerSession) -> None:
            result["session"] = session
            ready.set()

        async def dial() -> None:
            try:
                async with connect_first(addresses, expected_fingerprint=fingerprint,
                                         ssl_context=self._client_context, local=self.local,
                                         config=self.config, prove=self._prove,
                                         dial_limiter=self._dial_limiter) as conn:
                    await self._run_session(conn, dialed=True, on_session=up)
            except NoRouteAnswered as exc:
                refused = [str(e) for e in exc.errors if isinstance(e, PeerRefused)]  # it answered: no
                result["error"] = (PeerRefused("; ".join(refused)) if refused else
                                   PeerConnectError(str(exc) if exc.errors else "the invitation names no address"))
            finally:
                ready.set()

        self._nursery.start_soon(dial)
        await ready.wait()
        if "session" in result:
            return result["session"]  # type: ignore[return-value]
        raise result["error"]  # type: ignore[misc]

    async def _accepted(self, conn: PeerConnection) -> None:
        await self._run_session(conn, dialed=False)

    async def _run_session(self, conn: PeerConnection, *, dialed: bool,
                           on_session: Callable[[PeerSession], None] | None = None) -> None:
        fp = conn.peer_fingerprint
        existing = self.sessions.get(fp)
        if existing is not None:
            # Two links at once: a direct one replaces a relayed one; otherwise keep the one
            # dialed by the lower fingerprint (both ends agree without talking).
            me = self.identity.fingerprint
            dialer_of_new = me if dialed else fp
            if existing.connection.via == "relay" and conn.via == "direct":
                log.info("link to %s upgraded from the relay to direct", format_node_id(fp))
                existing.close("replaced by a direct link")
            elif existing.connection.via == "direct" and conn.via == "relay":
                log.debug("dropping a relayed link to %s: a direct one is up", format_node_id(fp))
                return
            elif dialer_of_new != min(me, fp):
                log.debug("dropping a duplicate link to %s", format_node_id(fp))
                return
            else:
                existing.close("replaced by a simultaneous link")
        hello = conn.peer_hello
        remote = [conn.remote_address] if dialed else []
        session = self._new_session(conn, dialed)
        joining = self._admit_joining(session, conn) if session.joining else None
        if joining is None:
            self.book.learn(fp, name=hello.name, addresses=remote + list(hello.addresses), seen=True)
        else:  # remembered only once it has joined
            joining.hello_addresses = remote + list(hello.addresses)
        self.sessions[fp] = session
        self.events.publish("peer.connected", peer=hello.name,
                                 address=conn.remote_address, rtt_ms=None)
        reason = "closed"
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(session.run)
                if joining is not None:
                    nursery.start_soon(self._expire_joining, joining)
                if conn.via == "relay":
                    nursery.start_soon(self._upgrade, fp)
                if on_session is not None:
                    on_session(session)
                await session.wait_closed()
                nursery.cancel_scope.cancel()
            reason = session.close_reason or conn.close_reason or "closed"
        finally:
            if self.sessions.get(fp) is session:
                del self.sessions[fp]
            if joining is not None:
                self._joining.release(joining.ticket)
                self._joining_sessions.pop(joining.ticket, None)
            if fp in self.book.peers:
                self.book.learn(fp, seen=True)
            self.events.publish("peer.disconnected", peer=hello.name, reason=reason)

    async def _upgrade(self, fingerprint: bytes) -> None:
        """While the link to `fingerprint` runs through a relay, try its direct addresses now
        and then; a direct link that comes up replaces the relayed one (`_run_session`)."""
        assert self._nursery is not None
        attempt = 0
        rng = random.Random()
        while True:
            await trio.sleep(UPGRADE.delay(attempt, rng))
            attempt += 1
            for host, port in self._direct_addresses(fingerprint):
                outcome = trio.Event()
                up: list[bool] = []
                self._nursery.start_soon(self._dial_direct, fingerprint, host, port, outcome, up)
                await outcome.wait()
                if up:
                    return

    async def _dial_direct(self, fingerprint: bytes, host: str, port: int, outcome: trio.Event,
                           up: list[bool]) -> None:
        """One direct dial; the session it starts lives in the manager's nursery, beyond the
        relayed session that asked for it."""
        try:
            async with connect_peer(host, port, expected_fingerprint=fingerprint,
                                    ssl_context=self._client_context, local=self.local,
                                    config=self.config, prove=self._prove,
                                    dial_limiter=self._dial_limiter) as conn:
                up.append(True)
                outcome.set()
                await self._run_session(conn, dialed=True)
        except PeerConnectError as exc:
            log.debug("no direct link to %s at %s:%s yet: %s", format_node_id(fingerprint), host, port, exc)
        finally:
            outcome.set()

    # -- joining links ----------------------------------------------------------------------

    def _admit_joining(self, session: PeerSession, conn: PeerConnection) -> _Joining:
        """Hold a link from a peer that shares nothing with us yet, dropping the oldest such
        links (of its address first) beyond the limits."""
        source = parse_host_port(conn.remote_address)
        admitted = self._joining.admit(source[0] if source else conn.remote_address)
        for ticket in admitted.evicted:
            evicted = self._joining_sessions.pop(ticket)
            log.info("dropping the joining link of %s: too many joining links",
                     format_node_id(evicted.session.fingerprint))
            evicted.session.close("too many links are joining this node; try again later")
        joining = _Joining(admitted.ticket, session)
        self._joining_sessions[admitted.ticket] = joining
        return joining

    def _joined(self, joining: _Joining) -> None:
        self._joining.release(joining.ticket)
        self._joining_sessions.pop(joining.ticket, None)
        joining.joined.set()
        session = joining.session
        self.book.learn(session.fingerprint, name=session.name,
                        addresses=joining.hello_addresses, seen=True)

    async def _expire_joining(self, joining: _Joining) -> None:
        with trio.move_on_after(JOINING_TIMEOUT):
            await joining.joined.wait()
            return
        if joining.session.joining:
            log.info("dropping the link of %s: it did not join within %ss",
                     format_node_id(joining.session.fingerprint), JOINING_TIMEOUT)
            joining.session.close(f"no share joined within {JOINING_TIMEOUT:.0f}s")

    # -- status -------------------------------------------------------------------------

    def status(self) -> list[dict]:
        """Every peer we share with or have seen, for /status and `plugshare peers`."""
        fps = set(self.book.peers) | set(self.sessions)
        fps |= {m.fingerprint for s in self.shares.all() for m in s.members}
        fps.discard(self.identity.fingerprint)
        rows = []
        for fp in fps:
            info = self.book.peers.get(fp) or PeerInfo(fp)
            session = self.sessions.get(fp)
            rtt = session.connection.rtt if session else None
            rows.append({
                "via": session.connection.via if session else None,
                "id": format_node_id(fp),
                "name": info.name or self.shares.member_name(fp) or "",
                "addresses": info.addresses,
                "connected": session is not None,
                "rtt_ms": round(rtt * 1000, 2) if rtt is not None else None,
                "last_seen": time.time() if session else info.last_seen,
                "shares": [s.name for s in self.shares.common(fp)],
            })
        return sorted(rows, key=lambda r: (not r["connected"], r["name"]))


