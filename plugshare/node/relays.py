"""A node's relays: it stays joined to each relay of `[peer] relays` (rejoining with back-off
after a failure or a relay restart) and hands every relayed session to the peer listener, to
be accepted exactly like a direct connection; and the routes through a peer's relays, for
dialing a peer no direct address reaches.

Relay entries travel among peers as address strings ``relay:ID@HOST:PORT`` (in the link hello,
address hints and the book), so an older node simply ignores them as addresses it cannot parse.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from plugshare.relay import RelayAddress, RelayError, join_relay, open_session, request_session
from plugshare.replication.backoff import Backoff
from plugshare.replication.transport import Incoming, PeerConnectError, Route

log = logging.getLogger("plugshare.relays")

PREFIX = "relay:"
REJOIN = Backoff(initial=0.5, maximum=30.0)
MAX_OPENING = 8  # relayed sessions being opened at once, per relay; more invitations are ignored


def relay_entry(address: RelayAddress) -> str:
    return PREFIX + str(address)


def parse_relay_entry(text: str) -> RelayAddress | None:
    """The relay a ``relay:ID@HOST:PORT`` entry names, or None for anything else."""
    if not isinstance(text, str) or not text.startswith(PREFIX):
        return None
    try:
        return RelayAddress.parse(text[len(PREFIX):])
    except ValueError:
        return None


def relay_route(address: RelayAddress, fingerprint: bytes) -> Route:
    """Dial `fingerprint` through the relay at `address`."""

    async def open_stream() -> trio.abc.Stream:
        try:
            return await request_session(address, fingerprint)
        except RelayError as error:
            raise PeerConnectError(str(error)) from error

    return Route(relay_entry(address), open_stream, via="relay")


class RelayMembership:
    """Keeps this node joined to its relays; relayed sessions go to `incoming`."""

    def __init__(self, relays: list[RelayAddress], *, node_id: bytes,
                 credentials: Callable[[], tuple[Ed25519PrivateKey, bytes]],
                 incoming: trio.MemorySendChannel[Incoming]) -> None:
        self.relays = relays
        self._node_id = node_id
        self._credentials = credentials
        self._incoming = incoming
        self.joined: dict[RelayAddress, bool] = {relay: False for relay in relays}
        self._nursery: trio.Nursery | None = None
        self._opening: dict[RelayAddress, int] = {}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for relay in self.relays:
                nursery.start_soon(self._stay_joined, relay)

    async def _stay_joined(self, relay: RelayAddress) -> None:
        attempt = 0
        rng = random.Random()
        while True:
            def joined() -> None:
                nonlocal attempt
                attempt = 0
                self.joined[relay] = True
                log.info("joined relay %s", relay)

            try:
                await join_relay(relay, node_id=self._node_id, credentials=self._credentials, joined=joined,
                                 on_invitation=lambda key: self._invited(relay, key))
            except RelayError as error:
                log.info("relay %s: %s", relay, error)
            finally:
                self.joined[relay] = False
            await trio.sleep(REJOIN.delay(attempt, rng))
            attempt += 1

    def _invited(self, relay: RelayAddress, session_key: bytes) -> None:
        assert self._nursery is not None
        if self._opening.get(relay, 0) >= MAX_OPENING:
            log.info("ignored an invitation from relay %s: %d sessions are being opened", relay, MAX_OPENING)
            return
        self._opening[relay] = self._opening.get(relay, 0) + 1
        self._nursery.start_soon(self._take, relay, session_key)

    async def _take(self, relay: RelayAddress, session_key: bytes) -> None:
        try:
            stream = await open_session(relay, session_key)
        except RelayError as error:
            log.info("relayed session through %s not opened: %s", relay, error)
            return
        finally:
            self._opening[relay] -= 1
        label = relay_entry(relay)
        try:
            self._incoming.send_nowait(Incoming(stream, label, label))
        except trio.WouldBlock:
            log.info("dropped a relayed session through %s: too many are being accepted", relay)
            await trio.aclose_forcefully(stream)
