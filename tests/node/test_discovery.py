"""LAN discovery for real: zeroconf announcing and browsing on the loopback interface.

Other tests (or other nodes on this machine) may announce on loopback at the same time, so
every assertion is about the fingerprints and service names made here.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio
from zeroconf import ServiceInfo, Zeroconf

from plugshare.node.discovery import SERVICE_TYPE, Discovery, DiscoveryError
from plugshare.token.identity import Identity

LOOPBACK = ["127.0.0.1"]
LIMIT = 15  # seconds; registering takes about 2 s (mDNS probing), goodbyes about 1 s


def discovery(identity: Identity, name: str, port: int) -> Discovery:
    return Discovery(identity.fingerprint, name, port, ["127.0.0.1"], interfaces=LOOPBACK)


async def listener_port() -> tuple[int, trio.SocketListener]:
    """A real TCP listener on loopback whose port gets announced."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener.socket.getsockname()[1], listener


async def test_two_nodes_find_each_others_address_and_fingerprint_and_can_connect() -> None:
    alpha, beta = Identity.generate(), Identity.generate()
    with trio.fail_after(LIMIT):
        port_b, listener_b = await listener_port()
        async with listener_b, discovery(alpha, "alpha", 7415) as a, discovery(
            beta, "beta.laptop é", port_b
        ) as b:
            assert await a.wait_for(beta.fingerprint) == [("127.0.0.1", port_b)]
            assert await b.wait_for(alpha.fingerprint) == [("127.0.0.1", 7415)]
            assert a.peers[beta.fingerprint].name == "beta.laptop é"
            assert b.peers[alpha.fingerprint].name == "alpha"
            assert a.found[beta.fingerprint] == a.addresses_of(beta.fingerprint)
            assert alpha.fingerprint not in a.found  # a node does not list itself
            # The address found is one a peer can really connect to.
            stream = await trio.open_tcp_stream(*a.found[beta.fingerprint][0])
            accepted = await listener_b.accept()
            await stream.aclose()
            await accepted.aclose()


async def test_a_node_that_stops_is_removed_by_its_goodbye() -> None:
    alpha, beta = Identity.generate(), Identity.generate()
    with trio.fail_after(LIMIT):
        async with discovery(alpha, "alpha", 7415) as a:
            async with discovery(beta, "beta", 7416) as b:
                await a.wait_for(beta.fingerprint)
                beta_service = b.service_name
            assert b.service_name is None and b.found == {}
            await a.wait_gone(beta.fingerprint)
            assert all(p.service != beta_service for p in a.peers.values())


async def test_malformed_announcements_are_ignored_and_a_fixed_one_is_taken() -> None:
    alpha, gamma = Identity.generate(), Identity.generate()
    suffix = alpha.fingerprint.hex()[:8]
    bad_id = ServiceInfo(
        SERVICE_TYPE, f"bad-id-{suffix}.{SERVICE_TYPE}", port=7417, parsed_addresses=["127.0.0.1"],
        properties={"id": "AAAAAAA-BBBBBBB", "name": "bad"}, server=f"bad-{suffix}.local.",
    )
    no_id = ServiceInfo(
        SERVICE_TYPE, f"no-id-{suffix}.{SERVICE_TYPE}", port=7418, parsed_addresses=["127.0.0.1"],
        properties={"name": "anonymous"}, server=f"noid-{suffix}.local.",
    )
    zc = await trio.to_thread.run_sync(partial(Zeroconf, interfaces=LOOPBACK))
    try:
        with trio.fail_after(LIMIT):
            async with discovery(alpha, "alpha", 7415) as a:
                async with trio.open_nursery() as nursery:
                    for info in (bad_id, no_id):
                        nursery.start_soon(trio.to_thread.run_sync, zc.register_service, info)
                await a.wait_until(lambda: bad_id.name in a.rejected and no_id.name in a.rejected)
                assert "malformed node id" in a.rejected[bad_id.name]
                assert "no 'id'" in a.rejected[no_id.name]
                services = {p.service for p in a.peers.values()}
                assert bad_id.name not in services and no_id.name not in services

                # The announcement is corrected: now it names a node, and is taken (its name
                # shown without the control character it carries).
                fixed = ServiceInfo(
                    SERVICE_TYPE, bad_id.name, port=7417, parsed_addresses=["127.0.0.1"],
                    properties={"id": gamma.node_id, "name": "gam\x07ma"}, server=bad_id.server,
                )
                await trio.to_thread.run_sync(zc.update_service, fixed)
                assert await a.wait_for(gamma.fingerprint) == [("127.0.0.1", 7417)]
                assert bad_id.name not in a.rejected and a.peers[gamma.fingerprint].name == "gamma"
    finally:
        await trio.to_thread.run_sync(zc.close)


async def test_waiting_on_a_stopped_discovery_is_an_error_not_a_hang() -> None:
    d = discovery(Identity.generate(), "alpha", 7415)
    with pytest.raises(DiscoveryError, match="not running"):
        await d.wait_for(Identity.generate().fingerprint)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"port": 0}, "port must be 1-65535"),
        ({"addresses": []}, "no address to announce"),
        ({"addresses": ["0.0.0.0"]}, "cannot be announced"),
        ({"addresses": ["host.local"]}, "not an IP address"),
        ({"fingerprint": b"short"}, "32 bytes"),
    ],
)
def test_bad_settings_are_refused(kwargs, message) -> None:
    args = {"fingerprint": bytes(32), "name": "n", "port": 7415, "addresses": ["127.0.0.1"]}
    with pytest.raises(DiscoveryError, match=message):
        Discovery(**(args | kwargs))


async def test_a_discovery_restarts_after_stopping() -> None:
    alpha, beta = Identity.generate(), Identity.generate()
    a = discovery(alpha, "alpha", 7415)
    with trio.fail_after(2 * LIMIT):
        async with discovery(beta, "beta", 7416) as b:
            for _ in range(2):
                async with a:
                    await a.wait_for(beta.fingerprint)
                    await b.wait_for(alpha.fingerprint)
                await b.wait_gone(alpha.fingerprint)
