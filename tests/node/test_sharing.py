"""Shares between real nodes (subprocesses, pinned TLS on loopback) through the command line:
create -> invite -> accept -> revoke, each step visible in `share show` on every node, and the
bad inputs of the peer link and of invitations."""

from __future__ import annotations

import json
import time

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from plugshare.replication.frames import encode
from plugshare.replication.link import LocalNode
from plugshare.replication.transport import (
    FingerprintMismatch,
    PeerRefused,
    connect_peer,
)
from plugshare.token import parse_node_id
from plugshare.token.tls import client_auth_payload, client_ssl_context
from tests.node.conftest import init_node, start_node


def cli_json(node, *args):
    done = node.cli("--json", *args)
    assert done.returncode == 0, (args, done.stderr)
    return json.loads(done.stdout)


def wait_until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def doc_ids(node, doctype="io.notes"):
    return {d["_id"] for d in cli_json(node, "doc", "list", "--doctype", doctype)["docs"]}


def members(node, share="notes"):
    return {m["name"]: (m["permission"], m["status"])
            for m in cli_json(node, "share", "show", share)["members"]}


@pytest.fixture
def trio_nodes(tmp_path):
    """Three running nodes on the embedded store: alice (owner), bob, carol."""
    nodes = []
    for name in ("alice", "bob", "carol"):
        home = tmp_path / name
        init_node(home, "--name", name)
        nodes.append(start_node(home))
    yield nodes
    for node in nodes:
        node.stop()


def invite(owner, *flags):
    return cli_json(owner, "share", "invite", "notes", *flags)["code"]


def test_create_invite_accept_revoke_seen_on_every_node(trio_nodes):
    alice, bob, carol = trio_nodes
    created = cli_json(alice, "share", "create", "notes", "--doctype", "io.notes")
    assert created["role"] == "owner" and created["version"] == 1
    alice.cli("doc", "put", "io.notes", '{"t": "before"}', "--id", "n0")

    bob_share = cli_json(bob, "share", "accept", "--no-progress", invite(alice))
    assert bob_share["role"] == "member" and bob_share["permission"] == "write"
    carol_share = cli_json(carol, "share", "accept", "--no-progress", "--as", "caro",
                           invite(alice, "--read-only", "--ttl", "10m"))
    assert carol_share["permission"] == "read"

    expected = {"alice": ("write", "active"), "bob": ("write", "active"),
                "caro": ("read", "active")}
    for node in trio_nodes:
        wait_until(lambda: members(node) == expected, what=f"{node.home.name} sees 3 members")
        wait_until(lambda: "n0" in doc_ids(node), what=f"{node.home.name} has n0")

    # the owner revokes bob: every node shows it, bob no longer receives new changes
    revoked = cli_json(alice, "share", "revoke", "notes", "bob")
    assert revoked["version"] == 4
    for node in trio_nodes:
        wait_until(lambda: members(node)["bob"] == ("write", "revoked"),
                   what=f"{node.home.name} sees bob revoked")
    assert cli_json(bob, "share", "show", "notes")["status"] == "revoked"
    alice.cli("doc", "put", "io.notes", '{"t": "after"}', "--id", "n1")
    wait_until(lambda: "n1" in doc_ids(carol), what="carol gets n1")
    assert "n1" not in doc_ids(bob)
    assert "n0" in doc_ids(bob)  # its local copy stays
    # and bob's own new edits reach nobody
    bob.cli("doc", "put", "io.notes", '{"t": "from revoked bob"}', "--id", "b1")
    alice.cli("doc", "put", "io.notes", '{"t": "marker"}', "--id", "n2")
    wait_until(lambda: "n2" in doc_ids(carol), what="carol gets n2")
    assert "b1" not in doc_ids(alice) and "b1" not in doc_ids(carol)

    by_name = {p["name"]: p for p in cli_json(alice, "peers")["peers"]}
    assert by_name["carol"]["connected"] is True  # named as its node calls itself
    wait_until(lambda: not {p["name"]: p for p in cli_json(alice, "peers")["peers"]}
               ["bob"]["connected"], what="alice drops its link to revoked bob")


def test_member_leaves_and_the_owner_publishes_it(trio_nodes):
    alice, bob, _ = trio_nodes
    cli_json(alice, "share", "create", "notes", "--doctype", "io.notes")
    cli_json(bob, "share", "accept", "--no-progress", invite(alice))
    wait_until(lambda: "bob" in members(alice), what="alice sees bob")
    left = cli_json(bob, "share", "leave", "notes")
    assert left["status"] == "left" and left["owner_notified"] is True
    wait_until(lambda: "bob" not in members(alice), what="alice drops bob")
    alice.cli("doc", "put", "io.notes", '{"t": "after leave"}', "--id", "late")
    time.sleep(1.0)  # give a wrongly-kept link the chance to deliver (it must not)
    assert "late" not in doc_ids(bob)


def test_invitation_codes_are_single_use_short_lived_and_checked(trio_nodes):
    alice, bob, carol = trio_nodes
    cli_json(alice, "share", "create", "notes", "--doctype", "io.notes")
    code = invite(alice)
    assert len(code) < 200 and "\n" not in code
    cli_json(bob, "share", "accept", "--no-progress", code)

    reused = carol.cli("share", "accept", "--no-progress", code)
    assert reused.returncode == 1 and reused.stderr.count("\n") == 1
    assert "refused" in reused.stderr

    altered = code[:-5] + ("A" if code[-5] != "A" else "B") + code[-4:]
    bad = carol.cli("share", "accept", "--no-progress", altered)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr

    short = invite(alice, "--ttl", "1s")
    time.sleep(1.5)
    expired = carol.cli("share", "accept", "--no-progress", short)
    assert expired.returncode == 1 and "expired" in expired.stderr

    drawn = alice.cli("share", "invite", "notes", "--qr")
    assert drawn.returncode == 0 and drawn.stdout.startswith("plugshare1:")
    assert drawn.stdout.count("\n") == 1 and "█" in drawn.stderr  # stdout stays pipeable
    bad_ttl = alice.cli("share", "invite", "notes", "--ttl", "soon")
    assert bad_ttl.returncode == 1 and "soon" in bad_ttl.stderr
    unknown = alice.cli("share", "invite", "nope")
    assert unknown.returncode == 1 and "nope" in unknown.stderr
    assert carol.cli("--json", "share", "list").stdout.count('"id"') == 0
    # none of this disturbed the members
    alice.cli("doc", "put", "io.notes", '{"t": "still fine"}', "--id", "ok")
    wait_until(lambda: "ok" in doc_ids(bob), what="bob still syncs")


def _fresh_node(name="stranger"):
    """A node nobody invited: its own key, and the link proof a real node's token would make."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    local = LocalNode(public_key=public, name=name)

    async def prove(server_id: bytes, nonce: bytes) -> bytes:
        return key.sign(client_auth_payload(server_id, nonce, local.node_id))

    return key, prove, local


def _peer_address(node):
    host, _, port = json.loads((node.home / "run.json").read_text())["peer"].rpartition(":")
    return host, int(port)


def test_unknown_peers_and_wrong_pins_are_refused_and_the_node_keeps_serving(trio_nodes):
    alice, bob, _ = trio_nodes
    cli_json(alice, "share", "create", "notes", "--doctype", "io.notes")
    cli_json(bob, "share", "accept", "--no-progress", invite(alice))
    host, port = _peer_address(alice)
    alice_fp = parse_node_id(cli_json(alice, "status")["node_id"])
    bob_fp = parse_node_id(cli_json(bob, "status")["node_id"])

    async def attempts():
        _, prove, stranger = _fresh_node()
        # an unknown node: the link is refused after it proves its key
        with pytest.raises(PeerRefused):
            async with connect_peer(host, port, expected_fingerprint=alice_fp,
                                    ssl_context=client_ssl_context(), local=stranger,
                                    prove=prove) as conn:
                await conn.receive()
        # a certificate that does not match the pinned fingerprint: we refuse it
        with pytest.raises(FingerprintMismatch):
            async with connect_peer(host, port, expected_fingerprint=bob_fp,
                                    ssl_context=client_ssl_context(), local=stranger,
                                    prove=prove):
                pass
        # garbage, an oversized frame, a peer that stops mid-frame: dropped, one at a time
        for payload in (b"\x00" * 64, b"\x01\xff\xff\xff\xff", encode({"type": "x"})[:7]):
            stream = await trio.open_tcp_stream(host, port)
            tls = trio.SSLStream(stream, client_ssl_context(), server_side=False)
            try:
                await tls.do_handshake()
                await tls.send_all(payload)
                with trio.move_on_after(15):
                    while await tls.receive_some(4096):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(tls)

    trio.run(attempts)
    # the node still serves its apps and its members
    alice.cli("doc", "put", "io.notes", '{"t": "after attacks"}', "--id", "aa")
    wait_until(lambda: "aa" in doc_ids(bob), what="bob still syncs")
    assert cli_json(alice, "status")["name"] == "alice"


def test_a_forged_or_replayed_manifest_is_refused(trio_nodes):
    alice, bob, carol = trio_nodes
    cli_json(alice, "share", "create", "notes", "--doctype", "io.notes")
    cli_json(bob, "share", "accept", "--no-progress", invite(alice))
    wait_until(lambda: "bob" in members(alice), what="alice sees bob")
    share_id = cli_json(alice, "share", "show", "notes")["id"]
    host, port = _peer_address(alice)
    alice_fp = parse_node_id(cli_json(alice, "status")["node_id"])

    # a stranger builds a manifest naming itself owner and pushes it, over a link made with an
    # invitation (the only way in for a non-member)
    code = invite(alice)
    from plugshare.sharing.invitation import Invitation
    from plugshare.sharing.manifest import Manifest, ShareRule, sign

    invitation = Invitation.decode(code)
    key, prove, stranger = _fresh_node("mallory")
    forged = sign(
        Manifest.create(name="notes", owner_key=stranger.public_key, owner_name="mallory",
                        rule=ShareRule("io.notes"), share_id=share_id), key.sign)

    async def push_forgery():
        async with connect_peer(host, port, expected_fingerprint=alice_fp,
                                ssl_context=client_ssl_context(), local=stranger,
                                prove=prove) as conn:
            await conn.send({"type": "share.manifest", "manifest": forged.to_dict()})
            await conn.send({"type": "share.manifest", "manifest": {"garbage": True}})
            await trio.sleep(0.5)
    assert invitation.share_id == share_id
    trio.run(push_forgery)

    show = cli_json(alice, "share", "show", "notes")
    assert show["owner"] == cli_json(alice, "status")["node_id"] and show["version"] == 2
    audit = cli_json(alice, "audit", "--tail", "200")["entries"]
    assert any(not e["allowed"] and "manifest" in e["action"] for e in audit), audit[-5:]
    # the real members are undisturbed
    alice.cli("doc", "put", "io.notes", '{"t": "x"}', "--id", "after-forgery")
    wait_until(lambda: "after-forgery" in doc_ids(bob), what="bob still syncs")


def test_discovery_finds_members_after_their_addresses_change(tmp_path):
    """Both nodes restart on new ports: the addresses they knew are stale, and only the LAN
    announcements (zeroconf on loopback) tell them where the other is now."""
    from tests.node.conftest import plugshare

    nodes = []
    for name in ("dora", "eve"):
        home = tmp_path / name
        done = plugshare(home, "init", "--name", name, "--api-listen", "127.0.0.1:0",
                         "--peer-listen", "127.0.0.1:0")
        assert done.returncode == 0, done.stderr
        nodes.append(start_node(home))
    dora, eve = nodes
    try:
        assert cli_json(dora, "status")["discovery"] is True
        cli_json(dora, "share", "create", "notes", "--doctype", "io.notes")
        cli_json(eve, "share", "accept", "--no-progress", invite(dora))
        old_ports = {_peer_address(n)[1] for n in nodes}
        for node in nodes:
            node.stop()
        dora, eve = nodes = [start_node(n.home) for n in nodes]
        assert not {_peer_address(n)[1] for n in nodes} & old_ports
        dora.cli("doc", "put", "io.notes", '{"t": "found you"}', "--id", "d1")
        wait_until(lambda: "d1" in doc_ids(eve), timeout=45, what="eve finds dora again")
    finally:
        for node in nodes:
            node.stop()
