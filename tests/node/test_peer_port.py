"""Hostile load on a real node's peer port (issue #10, defects 7, 8 and 12): idle sockets, many
keys during an open invitation, running out of file descriptors, address hints about others.

The strangers here are real: Ed25519 keys proving themselves over the real TLS handshake to a
real node process."""

from __future__ import annotations

import json
import resource
import socket
import threading

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from plugshare.node.peers import MAX_JOINING
from plugshare.replication.link import LocalNode
from plugshare.replication.transport import PeerConnectError, PeerConnectionClosed, connect_peer
from plugshare.sharing.invitation import Invitation
from plugshare.token import tls
from plugshare.token.identity import parse_node_id
from tests.node.cluster import Cluster, ClusterNode, cluster, share_between, wait_until  # noqa: F401 (fixture)


def _raw(public_key) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class Stranger:
    """A node that is only a key: it links over the real handshake, proving its key."""

    def __init__(self, name: str, addresses: tuple[str, ...] = ("127.0.0.1:9",)):
        self.key = Ed25519PrivateKey.generate()
        self.local = LocalNode(public_key=_raw(self.key.public_key()), name=name,
                               addresses=addresses)
        self.fingerprint = self.local.node_id
        self.x25519 = _raw(X25519PrivateKey.generate().public_key())

    async def prove(self, server_id: bytes, nonce: bytes) -> bytes:
        return self.key.sign(tls.client_auth_payload(server_id, nonce, self.fingerprint))

    def connect(self, node: ClusterNode):
        return connect_peer("127.0.0.1", node.peer_port,
                            expected_fingerprint=parse_node_id(node.node_id),
                            ssl_context=tls.client_ssl_context(), local=self.local,
                            prove=self.prove)


def _book(node: ClusterNode) -> set[str]:
    try:
        return {p["fingerprint"] for p in json.loads((node.home / "peers.json").read_text())}
    except FileNotFoundError:
        return set()


def _alive(node: ClusterNode) -> bool:
    return node.running is not None and node.running.process.poll() is None


class IdleFlood:
    """`count` TCP sockets to a port that never say a word, from `sources` (loopback
    addresses), held until the end (those the node closes are closed here too)."""

    def __init__(self, port: int, count: int, sources: tuple[str, ...] = ("127.0.0.1",)):
        self.port, self.count, self.sources = port, count, sources
        self.opened = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int) -> socket.socket | None:
        sock = socket.socket()
        try:
            sock.bind((self.sources[i % len(self.sources)], 0))
            sock.connect(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            return None
        self.opened += 1
        return sock

    def _run(self) -> None:
        import select

        socks = [s for s in (self._open(i) for i in range(self.count)) if s is not None]
        self._ready.set()
        while not self._stop.is_set():
            readable, _, _ = select.select(socks, [], [], 0.05) if socks else ([], [], [])
            for sock in readable:  # closed by the node
                socks.remove(sock)
                sock.close()
        for sock in socks:
            sock.close()

    def __enter__(self) -> IdleFlood:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


# --- defect 7: idle sockets -------------------------------------------------------------------


def test_idle_sockets_from_one_address_do_not_stop_a_real_peer_from_linking(cluster: Cluster):
    alice = cluster.add("alice")
    bob = cluster.add("bob")
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    code = alice.cli_json("share", "invite", "notes")["code"]
    with IdleFlood(alice.peer_port, 80):  # from 127.0.0.1, where bob dials from too
        # Bob's accept dials alice once: it must get through the flood.
        bob.cli_json("share", "accept", "--no-progress", code)
        wait_until(lambda: bob.peer_connected(alice), what="bob linked to alice")
        alice.put("io.notes", {"title": "through the flood"}, "n1")
        wait_until(lambda: bob.get("n1") is not None, what="n1 reached bob")
    assert _alive(alice)


# --- defect 8: keys during an open invitation, and running out of descriptors ---------------------


async def _hold_links(strangers: list[Stranger], node: ClusterNode, held: list,
                      until: trio.Event) -> None:
    """Link every stranger to `node` and keep the links open until `until`; each link that
    came up (even if the node dropped it later) is counted in `held`."""

    handshaking = trio.CapacityLimiter(4)  # a few at a time, so each handshake completes

    async def one(stranger: Stranger) -> None:
        link = stranger.connect(node)
        try:
            async with handshaking:
                connection = await link.__aenter__()
        except (PeerConnectError, OSError):
            return
        held.append(stranger)
        try:
            with trio.move_on_after(120):
                async with trio.open_nursery() as nursery:
                    async def drain():
                        try:
                            async for _ in connection:
                                pass
                        except PeerConnectionClosed:
                            pass
                    nursery.start_soon(drain)
                    await until.wait()
                    nursery.cancel_scope.cancel()
        finally:
            try:
                await link.__aexit__(None, None, None)
            except (PeerConnectionClosed, OSError):
                pass

    async with trio.open_nursery() as nursery:
        for stranger in strangers:
            nursery.start_soon(one, stranger)


def _run_strangers(node: ClusterNode, count: int, while_held) -> int:
    """Link `count` strangers to `node` at once, run `while_held()` (in a thread) while they
    hold their links, then let go; how many links came up."""
    strangers = [Stranger(f"stranger-{i}") for i in range(count)]
    held: list[Stranger] = []

    async def main():
        until = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hold_links, strangers, node, held, until)
            await trio.to_thread.run_sync(while_held, held)
            until.set()

    trio.run(main)
    return len(held)


def test_keys_linking_during_an_open_invitation_are_not_remembered(cluster: Cluster):
    alice = cluster.add("alice")
    bob = cluster.add("bob")
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    code = alice.cli_json("share", "invite", "notes")["code"]
    before = _book(alice)

    def joining_links() -> int:
        return sum(1 for p in alice.api("GET", "/peers")["peers"]
                   if p["connected"] and p["name"].startswith("stranger-"))

    def check(held):
        wait_until(lambda: len(held) >= 20, what="strangers linked during the invitation")
        assert _alive(alice)
        # She holds only a bounded number of links from peers that have not joined.
        wait_until(lambda: joining_links() <= MAX_JOINING, what="joining links bounded")

    linked = _run_strangers(alice, 60, check)
    assert linked >= 20
    # None of them joined: none is written to alice's peers.json, and she still serves.
    assert _book(alice) == before
    assert _alive(alice)
    bob.cli_json("share", "accept", "--no-progress", code)
    wait_until(lambda: bob.node_id.replace("-", "") != "" and
               parse_node_id(bob.node_id).hex() in _book(alice), what="bob remembered by alice")
    assert _book(alice) - before == {parse_node_id(bob.node_id).hex()}


def test_a_node_out_of_file_descriptors_keeps_serving(cluster: Cluster):
    alice = cluster.add("alice")
    bob = cluster.add("bob")
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    code = alice.cli_json("share", "invite", "notes")["code"]
    # Just above what alice uses now: the flood below runs her out of descriptors.
    in_use = len(list((__import__("pathlib").Path(f"/proc/{alice.pid}/fd")).iterdir()))
    limit = in_use + 6
    resource.prlimit(alice.pid, resource.RLIMIT_NOFILE, (limit, limit))

    def flood(held):
        wait_until(lambda: "cannot accept peer connections" in alice.log()
                   or not _alive(alice), what="alice out of descriptors")

    _run_strangers(alice, 40, flood)
    assert _alive(alice), alice.log()[-3000:]
    # The flood is over: she serves her API and a real peer again, under the same limit.
    assert alice.status()["name"] == "alice"
    bob.cli_json("share", "accept", "--no-progress", code)
    wait_until(lambda: bob.peer_connected(alice), what="bob linked to alice")
    assert _alive(alice)


# --- defect 12: address hints -------------------------------------------------------------------


async def _join(stranger: Stranger, connection, code: str) -> None:
    invitation = Invitation.decode(code)
    await connection.send({"type": "share.join", "share": invitation.share_id,
                           "secret": invitation.secret, "name": stranger.local.name,
                           "public_key": stranger.local.public_key, "x25519": stranger.x25519})
    with trio.fail_after(30):
        async for message in connection:
            if message.get("type") == "share.joined":
                return
            assert message.get("type") != "share.join_refused", message


def test_a_member_cannot_make_a_node_dial_where_another_member_would_be(cluster: Cluster):
    alice = cluster.add("alice")
    bob = cluster.add("bob")
    share_between(alice, [bob], name="notes", doctype="io.notes")
    mallory = Stranger("mallory")
    code = alice.cli_json("share", "invite", "notes")["code"]
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(16)
    trap.settimeout(0.01)
    trap_address = f"127.0.0.1:{trap.getsockname()[1]}"
    reached: list[socket.socket] = []

    def trap_reached() -> bool:
        try:
            reached.append(trap.accept()[0])
        except OSError:
            pass
        return bool(reached)

    async def main():
        async with mallory.connect(alice) as connection:
            await _join(mallory, connection, code)
        await trio.to_thread.run_sync(lambda: wait_until(
            lambda: any(m["name"] == "mallory" for m in bob.share("notes")["members"]),
            what="bob knows mallory is a member"))
        await trio.to_thread.run_sync(alice.stop)  # bob now dials alice wherever he thinks she is
        async with mallory.connect(bob) as connection:
            # "alice is at the trap", and where mallory itself is (which bob may take).
            await connection.send({"type": "peer.addresses", "peers": [
                [parse_node_id(alice.node_id), [trap_address]],
                [mallory.fingerprint, ["127.0.0.1:10"]],
            ]})

            def taken():
                mine = [p for p in bob.api("GET", "/peers")["peers"] if p["name"] == "mallory"]
                return trap_reached() or (mine and "127.0.0.1:10" in mine[0]["addresses"])

            await trio.to_thread.run_sync(lambda: wait_until(taken, what="the hints handled"))

    try:
        trio.run(main)
        assert not trap_reached(), "bob dialed the address mallory gave for alice"
    finally:
        for sock in reached:
            sock.close()
        trap.close()


# --- defect 8: open invitations can be listed and cancelled -----------------------------------


def test_open_invitations_are_listed_and_a_cancelled_code_admits_no_one(cluster: Cluster):
    import httpx

    alice = cluster.add("alice")
    bob = cluster.add("bob")
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    alice.cli_json("share", "create", "tasks", "--doctype", "io.tasks")
    first = alice.cli_json("share", "invite", "notes", "--read-only")
    second = alice.cli_json("share", "invite", "notes")
    alice.cli_json("share", "invite", "tasks")
    listed = alice.cli_json("share", "invitations", "notes")["invitations"]
    assert [(r["share"], r["permission"]) for r in listed] == [("notes", "read"), ("notes", "write")]
    assert all(len(r["id"]) == 12 and r["expires_at"] for r in listed)
    assert {r["share"] for r in alice.cli_json("share", "invitations")["invitations"]} == {
        "notes", "tasks"}
    text = alice.cli_ok("share", "invitations")
    assert "notes" in text and "--cancel" in text

    # Cancelled by its code, then by its id: neither admits anyone any more.
    alice.cli_json("share", "invite", "notes", "--cancel", first["code"])
    left = alice.cli_json("share", "invitations", "notes")["invitations"]
    assert len(left) == 1 and left[0]["permission"] == "write"
    alice.cli_json("share", "invite", "notes", "--cancel", left[0]["id"])
    assert alice.cli_json("share", "invitations", "notes")["invitations"] == []
    refused = bob.cli("--json", "share", "accept", "--no-progress", second["code"])
    assert refused.returncode == 1 and "unknown invitation" in json.loads(refused.stdout)["reason"]
    again = alice.cli("--json", "share", "invite", "notes", "--cancel", left[0]["id"])
    assert again.returncode == 1 and json.loads(again.stdout)["error"] == "not_found"

    # Owner only: an app's credential may not list or cancel them.
    added = alice.cli_json("app", "add", "notes-app", "--doctype", "io.notes", "--perm", "read")
    app = httpx.Client(base_url=alice.running.api_url,
                       headers={"Authorization": f"Bearer {added['credential']}"})
    with app:
        assert app.get("/invitations").status_code == 403
        assert app.delete(f"/shares/tasks/invitations/{'0' * 12}").status_code == 403
