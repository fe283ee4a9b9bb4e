"""LAN discovery over mDNS / DNS-SD (zeroconf): announce this node, find other nodes' addresses.

Each node registers a `_plugshare._tcp.local.` service whose TXT record carries its node id
(the check-summed fingerprint) and name, and browses for the others. Discovery only finds
addresses: an entry's fingerprint is a claim that the pinned TLS link checks when it connects,
so a lying announcement costs a failed connection attempt, nothing more.

python-zeroconf runs its own threads; blocking calls go through `trio.to_thread`, and its
browser thread hands state changes to trio with `TrioToken.run_sync_soon`, which never blocks
that thread. Changes are coalesced per service name, then each added or updated service is
resolved (cache first, then the network) in a worker thread; a generation number per name
drops a resolution overtaken by a newer change (e.g. the service left meanwhile).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import ifaddr  # zeroconf's own dependency for listing interfaces
import trio
from zeroconf import (
    InterfaceChoice,
    InterfacesType,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import Error as ZeroconfError

from plugshare.errors import PlugshareError
from plugshare.token.identity import format_node_id, parse_node_id
from plugshare.token.errors import InvalidNodeIdError

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_plugshare._tcp.local."
TXT_VERSION = "1"
_MAX_LABEL_NAME = 40  # instance label = name + "-" + 7 node-id characters, within 63 bytes
_MAX_PEER_NAME = 100

HostPort = tuple[str, int]


class DiscoveryError(PlugshareError):
    """Discovery cannot start, or an announcement found on the LAN is unusable."""


@attrs.frozen
class DiscoveredPeer:
    """A node announced on the LAN, as its TXT record and address records describe it."""

    fingerprint: bytes
    name: str
    addresses: tuple[HostPort, ...]
    service: str  # the DNS-SD instance name it was announced under


def local_addresses() -> list[str]:
    """This host's IPv4 addresses other than loopback: what to announce when the peer
    listener is bound to 0.0.0.0."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and not ipaddress.ip_address(ip.ip).is_loopback:
                found.append(ip.ip)
    return sorted(set(found), key=found.index)


def peer_from_service(service: str, info: ServiceInfo) -> DiscoveredPeer:
    """The peer an announcement describes; `DiscoveryError` if its TXT record is unusable."""
    props = info.properties or {}
    raw_id = props.get(b"id")
    if not raw_id:
        raise DiscoveryError(f"service {service!r} has no 'id' in its TXT record")
    try:
        fingerprint = parse_node_id(raw_id.decode("utf-8"))
    except (UnicodeDecodeError, InvalidNodeIdError) as exc:
        raise DiscoveryError(f"service {service!r} announces a malformed node id: {exc}") from None
    raw_name = (props.get(b"name") or b"").decode("utf-8", "replace")
    # Shown to people: no control characters, bounded length.
    name = "".join(ch for ch in raw_name if ch.isprintable())[:_MAX_PEER_NAME]
    name = name or service.removesuffix("." + SERVICE_TYPE)
    port = info.port
    if port is None or not 1 <= port <= 65535:
        raise DiscoveryError(f"service {service!r} announces no usable port ({port!r})")
    addresses = tuple((host, port) for host in info.parsed_scoped_addresses())
    return DiscoveredPeer(fingerprint, name, addresses, service)


class Discovery:
    """Announces this node and keeps `found` current with the other nodes on the LAN.

    Use as `async with Discovery(...) as discovery:`; leaving the block sends goodbye packets
    so the other nodes drop this one at once.
    """

    def __init__(
        self,
        fingerprint: bytes,
        name: str,
        port: int,
        addresses: Sequence[str],
        *,
        interfaces: InterfacesType | None = None,
        resolve_timeout: float = 3.0,
    ):
        if len(fingerprint) != 32:
            raise DiscoveryError(f"a fingerprint is 32 bytes, got {len(fingerprint)}")
        if not 1 <= port <= 65535:
            raise DiscoveryError(f"the announced port must be 1-65535, got {port}")
        if not addresses:
            raise DiscoveryError("no address to announce (give the peer listener's addresses)")
        for address in addresses:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                raise DiscoveryError(
                    f"announced address {address!r} is not an IP address"
                ) from None
            if ip.is_unspecified:
                raise DiscoveryError(f"{address} cannot be announced; give the real addresses")
        self.fingerprint = fingerprint
        self.name = name
        self.port = port
        self.addresses = list(addresses)
        self.interfaces: InterfacesType = InterfaceChoice.All if interfaces is None else interfaces
        self.resolve_timeout = resolve_timeout
        # Services currently announced by other nodes (by DNS-SD instance name).
        self._services: dict[str, DiscoveredPeer] = {}
        #: Services ignored because their announcement is unusable, with the reason.
        self.rejected: dict[str, str] = {}
        self._pending: dict[str, ServiceStateChange] = {}
        self._generation: dict[str, int] = {}
        self._counter = 0
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._zeroconf: Zeroconf | None = None
        self._info: ServiceInfo | None = None
        self._nursery: trio.Nursery | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._running_cm: Any = None

    # --- what was found ---

    @property
    def peers(self) -> dict[bytes, DiscoveredPeer]:
        """One entry per fingerprint (merging its services' addresses, in name order)."""
        merged: dict[bytes, DiscoveredPeer] = {}
        for service in sorted(self._services):
            peer = self._services[service]
            if peer.fingerprint in merged:
                first = merged[peer.fingerprint]
                extra = tuple(a for a in peer.addresses if a not in first.addresses)
                merged[peer.fingerprint] = attrs.evolve(first, addresses=first.addresses + extra)
            else:
                merged[peer.fingerprint] = peer
        return merged

    @property
    def found(self) -> dict[bytes, list[HostPort]]:
        """fingerprint -> (host, port) addresses, for every node with at least one address."""
        return {fp: list(p.addresses) for fp, p in self.peers.items() if p.addresses}

    def addresses_of(self, fingerprint: bytes) -> list[HostPort]:
        """The addresses currently announced for `fingerprint` (empty if none)."""
        return self.found.get(fingerprint, [])

    @property
    def service_name(self) -> str | None:
        """This node's DNS-SD instance name once announced (zeroconf may rename on conflict)."""
        return self._info.name if self._info is not None else None

    async def wait_for(self, fingerprint: bytes) -> list[HostPort]:
        """Wait until an address for `fingerprint` is known, and return the addresses."""
        await self.wait_until(lambda: bool(self.addresses_of(fingerprint)))
        return self.addresses_of(fingerprint)

    async def wait_gone(self, fingerprint: bytes) -> None:
        """Wait until no address for `fingerprint` is known (its node left or went quiet)."""
        await self.wait_until(lambda: not self.addresses_of(fingerprint))

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds, checking it after every change of what is found."""
        while not condition():
            if self._nursery is None:
                raise DiscoveryError("discovery is not running")
            await self._changed.wait()

    # --- lifecycle ---

    async def __aenter__(self) -> Discovery:
        if self._running_cm is not None:
            raise DiscoveryError("this Discovery is already running")
        self._running_cm = self._running()
        try:
            return await self._running_cm.__aenter__()
        except BaseException:
            self._running_cm = None
            raise

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        cm, self._running_cm = self._running_cm, None
        return await cm.__aexit__(*exc_info)

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[Discovery]:
        self._trio_token = trio.lowlevel.current_trio_token()
        try:
            zc = await trio.to_thread.run_sync(partial(Zeroconf, interfaces=self.interfaces))
        except OSError as exc:
            raise DiscoveryError(f"cannot start mDNS discovery: {exc}") from exc
        self._zeroconf = zc
        browser: ServiceBrowser | None = None
        try:
            info = self._own_service_info()
            try:
                await trio.to_thread.run_sync(
                    partial(zc.register_service, info, allow_name_change=True)
                )
            except (ZeroconfError, OSError) as exc:
                raise DiscoveryError(f"cannot announce this node on the LAN: {exc}") from exc
            self._info = info
            logger.info(
                "announcing %s on the LAN as %r", format_node_id(self.fingerprint), info.name
            )
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._dispatch)
                browser = await trio.to_thread.run_sync(
                    partial(ServiceBrowser, zc, SERVICE_TYPE, handlers=[self._on_state_change])
                )
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._shutdown, zc, browser)
            self._zeroconf = None
            self._info = None
            self._services.clear()
            self._pending.clear()
            self._generation.clear()
            self._trio_token = None
            self._wake = trio.Event()
            self._notify()  # waiters re-check, and see "not running"

    def _own_service_info(self) -> ServiceInfo:
        node_id = format_node_id(self.fingerprint)
        # The label is only a unique handle (the name travels in TXT): keep it plain ASCII.
        plain = re.sub(r"[^A-Za-z0-9-]+", "-", self.name).strip("-")[:_MAX_LABEL_NAME] or "node"
        label = f"{plain}-{node_id[:7]}"
        return ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=self.port,
            properties={"txtvers": TXT_VERSION, "id": node_id, "name": self.name},
            parsed_addresses=self.addresses,
            server=f"plugshare-{self.fingerprint.hex()[:16]}.local.",
        )

    def _shutdown(self, zc: Zeroconf, browser: ServiceBrowser | None) -> None:
        """In a worker thread: stop browsing, say goodbye, close the sockets."""
        try:
            if browser is not None:
                browser.cancel()
            if self._info is not None:
                zc.unregister_service(self._info)  # goodbye packets: TTL 0
        except Exception:
            logger.exception("error while withdrawing the mDNS announcement")
        finally:
            zc.close()

    # --- zeroconf thread -> trio ---

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Called on zeroconf's browser thread (keyword names are zeroconf's)."""
        token = self._trio_token
        if token is None:
            return
        try:
            token.run_sync_soon(self._note, name, state_change)
        except trio.RunFinishedError:
            pass

    def _note(self, name: str, state_change: ServiceStateChange) -> None:
        """On the trio thread: remember the latest change per service, wake the dispatcher."""
        self._pending[name] = state_change
        self._wake.set()

    async def _dispatch(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            pending, self._pending = self._pending, {}
            for name, state_change in pending.items():
                self._counter += 1
                self._generation[name] = self._counter
                if state_change is ServiceStateChange.Removed:
                    self._forget(name)
                else:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._resolve, name, self._counter)

    async def _resolve(self, name: str, generation: int) -> None:
        info = await trio.to_thread.run_sync(self._lookup, name, abandon_on_cancel=True)
        if self._generation.get(name) != generation:
            return  # overtaken by a newer change of this service
        if info is None:
            logger.info("mDNS service %r did not answer; keeping what was known", name)
            return
        try:
            peer = peer_from_service(name, info)
        except DiscoveryError as exc:
            logger.warning("ignoring LAN announcement: %s", exc)
            self._services.pop(name, None)
            self.rejected[name] = str(exc)
            self._notify()
            return
        self.rejected.pop(name, None)
        if peer.fingerprint == self.fingerprint:
            return  # our own announcement
        self._services[name] = peer
        logger.info("found %s (%s) at %s", format_node_id(peer.fingerprint), peer.name,
                    peer.addresses)
        self._notify()

    def _lookup(self, name: str) -> ServiceInfo | None:
        """In a worker thread: the service's records, from the cache or asked on the LAN."""
        zc = self._zeroconf
        if zc is None:
            return None
        try:
            return zc.get_service_info(SERVICE_TYPE, name, timeout=int(self.resolve_timeout * 1000))
        except Exception as exc:  # zeroconf closing under us, malformed records...
            logger.info("cannot resolve mDNS service %r: %s", name, exc)
            return None

    def _forget(self, name: str) -> None:
        self._generation.pop(name, None)
        gone = self._services.pop(name, None)
        rejected = self.rejected.pop(name, None)
        if gone is not None:
            logger.info("%s (%s) left the LAN", format_node_id(gone.fingerprint), gone.name)
        if gone is not None or rejected is not None:
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
