"""The relay's place in node.toml, invitation codes and the command line (no network)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import attrs
import pytest

from plugshare.config import ConfigError, example_config, load_config
from plugshare.node.watch import peer_rows
from plugshare.relay import RelayAddress
from plugshare.relay.quota import RelayLimits
from plugshare.sharing.invitation import Invitation, InvitationError
from plugshare.token import format_node_id

RELAY_ID = bytes(range(32))
RELAY = f"{format_node_id(RELAY_ID)}@relay.example:22067"


def test_relays_in_node_toml_are_parsed_and_the_example_documents_them(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(f'[peer]\nrelays = ["{RELAY}"]\nadvertise_direct = false\n')
    config = load_config(path)
    assert config.peer.relays == [RELAY] and config.peer.advertise_direct is False
    assert RelayAddress.parse(RELAY) == RelayAddress(RELAY_ID, "relay.example", 22067)
    assert "relays = []" in example_config() and "advertise_direct = true" in example_config()


@pytest.mark.parametrize("entry, says", [
    ("relay.example:22067", "not a relay address ID@HOST:PORT"),
    (f"{format_node_id(RELAY_ID)[:-1]}X@relay.example:22067", "relay id is not valid"),
    (f"{format_node_id(RELAY_ID)}@relay.example", "not a relay address"),
    (f"{format_node_id(RELAY_ID)}@relay.example:0", "not a relay address"),
])
def test_a_bad_relay_entry_is_a_config_error_naming_the_key_and_the_file(tmp_path, entry, says):
    path = tmp_path / "node.toml"
    path.write_text(f'[peer]\nrelays = ["{entry}"]\n')
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value) and "[peer]" in str(error.value) and "relays" in str(error.value)
    assert says in str(error.value)


def test_an_invitation_carries_the_owners_relays_and_old_codes_still_parse():
    owner = bytes(32 * [7])
    plain = Invitation.new(owner, [("192.0.2.1", 7415)], "s1", "write", 3600)
    assert Invitation.decode(plain.encode()).owner_relays == ()
    with_relay = Invitation.new(owner, [], "s1", "write", 3600, relays=[(RELAY_ID, "203.0.113.9", 22067)])
    decoded = Invitation.decode(with_relay.encode())
    assert decoded.owner_relays == ((RELAY_ID, "203.0.113.9", 22067),) and decoded.owner_addresses == ()
    # A code without relays is what older versions made and read: six fields, unchanged.
    assert len(plain.encode()) < len(with_relay.encode())
    with pytest.raises(InvitationError, match="relay id"):
        Invitation.new(owner, [], "s1", "write", 3600, relays=[(b"short", "203.0.113.9", 22067)])


def test_the_watch_peers_panel_says_when_a_link_runs_through_a_relay():
    status = {"peers": [{"name": "a", "id": format_node_id(RELAY_ID), "connected": True, "via": "relay"},
                        {"name": "b", "id": format_node_id(RELAY_ID), "connected": True, "via": "direct"}]}
    assert [row[3] for row in peer_rows(status, 0.0)] == ["● relay", "● yes"]


def test_plugshare_relay_creates_its_key_0600_and_prints_its_pinned_address(tmp_path):
    key = tmp_path / "keys" / "relay.key"
    process = subprocess.Popen([sys.executable, "-m", "plugshare", "relay", "--listen", "127.0.0.1:0",
                                "--key", str(key)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=os.environ.copy())
    try:
        first = process.stdout.readline().split()
    finally:
        process.kill()
        process.wait(timeout=30)
    assert first[0] == "relay"
    address = RelayAddress.parse(first[1])
    assert address.host == "127.0.0.1" and address.port > 0
    assert key.stat().st_mode & 0o777 == 0o600
    # The same key the next time: the same id, so nodes' pins hold across restarts.
    process = subprocess.Popen([sys.executable, "-m", "plugshare", "relay", "--listen", "127.0.0.1:0",
                                "--key", str(key)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=os.environ.copy())
    try:
        again = RelayAddress.parse(process.stdout.readline().split()[1])
    finally:
        process.kill()
        process.wait(timeout=30)
    assert again.relay_id == address.relay_id


def test_a_bad_relay_config_file_is_a_clear_error(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text("[limits]\nsession_rat = 5\n")
    done = subprocess.run([sys.executable, "-m", "plugshare", "relay", "--config", str(path),
                           "--key", str(tmp_path / "k")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and str(path) in done.stderr and "session_rat" in done.stderr


def test_a_manifest_carries_a_members_relays_under_the_owners_signature():
    from plugshare.sharing.manifest import (
        BadSignature, MalformedManifest, Manifest, ShareRule, sign, verify, with_member)
    from plugshare.token.identity import Identity, verify_signature

    owner, member = Identity.generate(), Identity.generate()
    base = Manifest.create(name="notes", owner_key=owner.public_key_bytes, owner_name="alice",
                           rule=ShareRule("io.notes", None))
    plain = sign(with_member(base, member.fingerprint, "bob", "write"), owner.sign)
    assert "relays" not in plain.to_dict()["members"][1]  # as before: old manifests unchanged
    relayed = sign(with_member(base, member.fingerprint, "bob", "write", relays=(RELAY,)), owner.sign)
    verify(relayed, verify_signature)
    again = Manifest.from_dict(relayed.to_dict())
    verify(again, verify_signature)
    assert again.member(member.fingerprint).relays == (RELAY,)
    # Whoever forwards it cannot point the member at another relay: the signature covers them.
    forged = relayed.to_dict()
    forged["members"][1]["relays"] = [f"{format_node_id(bytes(32))}@evil.example:22067"]
    with pytest.raises(BadSignature):
        verify(Manifest.from_dict(forged), verify_signature)
    with pytest.raises(MalformedManifest, match="relay"):
        with_member(base, member.fingerprint, "bob", "write", relays=("not a relay",))


def test_plugshare_relay_json_prints_one_json_document(tmp_path):
    import json

    process = subprocess.Popen([sys.executable, "-m", "plugshare", "relay", "--json", "--listen", "127.0.0.1:0",
                                "--key", str(tmp_path / "relay.key")], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=os.environ.copy())
    try:
        printed = json.loads(process.stdout.readline())
    finally:
        process.kill()
        process.wait(timeout=30)
    assert RelayAddress.parse(printed["relay"]).host == "127.0.0.1"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_plugshare_relay_stops_cleanly_with_a_line_on_sigterm_and_ctrl_c(tmp_path, sig):
    process = subprocess.Popen([sys.executable, "-m", "plugshare", "relay", "--listen", "127.0.0.1:0",
                                "--key", str(tmp_path / "relay.key")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert process.stdout.readline().startswith("relay ")
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert process.returncode == 0, stderr
    assert "relay stopped" in stderr and "Traceback" not in stderr


def test_plugshare_relay_help_says_what_it_does_how_to_configure_it_and_how_to_stop_it():
    done = subprocess.run([sys.executable, "-m", "plugshare", "relay", "--help"], capture_output=True,
                          text=True, timeout=60, env=os.environ.copy())
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for field in attrs.fields(RelayLimits):  # every limit of the [limits] table, by name
        assert field.name in text, field.name
    for needed in ("--listen", "--key", "--config", "[limits]", "[peer] relays", "SIGTERM", "ID@HOST:PORT",
                   "stateless"):
        assert needed in text, needed


def test_plugshare_config_example_shows_the_relays_key(tmp_path):
    done = subprocess.run([sys.executable, "-m", "plugshare", "config", "--example"], capture_output=True,
                          text=True, timeout=60, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    peer = done.stdout.split("[peer]", 1)[1].split("\n[", 1)[0]
    assert "\nrelays = []" in peer and "ID@HOST:PORT" in peer and "advertise_direct = true" in peer
