"""Keystores: one contract, run on both the soft and the PKCS#11 (SoftHSM2) keystore, plus
what is particular to each."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import AttributeSensitive

from plugshare.token.inside import (
    IntegrityError,
    KeystoreError,
    Pkcs11Keystore,
    SoftKeystore,
    Token,
    TokenStateError,
    WrongSecretError,
)
from plugshare.token.pkcs11_keystore import DEFAULT_MODULE
from plugshare.token.soft_keystore import ANCHOR_SLOTS

from .conftest import HSM_PIN, HSM_TOKEN_LABEL, PASSPHRASE, PIN_ENV, KeystoreFactory


@pytest.fixture
def keystore(make_keystore: KeystoreFactory):
    ks = make_keystore()
    assert ks.create() == 1
    yield ks
    ks.close()


def test_wrap_unwrap_round_trip_bound_to_context(keystore) -> None:
    key = os.urandom(32)
    wrapped = keystore.wrap(1, key, b"ctx-a")
    assert key not in wrapped
    assert keystore.unwrap(1, wrapped, b"ctx-a") == key
    with pytest.raises(IntegrityError):
        keystore.unwrap(1, wrapped, b"ctx-b")
    flipped = bytearray(wrapped)
    flipped[len(flipped) // 2] ^= 0x01
    with pytest.raises(IntegrityError):
        keystore.unwrap(1, bytes(flipped), b"ctx-a")
    with pytest.raises(IntegrityError):
        keystore.unwrap(1, wrapped[:20], b"ctx-a")


def test_keys_survive_reopen_and_anchor_persists(keystore, make_keystore) -> None:
    key = os.urandom(32)
    wrapped = keystore.wrap(1, key, b"ctx")
    assert keystore.read_anchor() == 0
    keystore.advance_anchor(7)
    keystore.advance_anchor(8)
    keystore.close()
    again = make_keystore()
    again.open()
    try:
        assert again.unwrap(1, wrapped, b"ctx") == key
        assert again.read_anchor() == 8
    finally:
        again.close()


def test_master_rotation_and_destruction(keystore) -> None:
    key = os.urandom(32)
    old = keystore.wrap(1, key, b"ctx")
    assert keystore.new_master_key() == 2
    assert keystore.master_key_ids() == [1, 2]
    new = keystore.wrap(2, key, b"ctx")
    with pytest.raises(IntegrityError):
        keystore.unwrap(2, old, b"ctx")  # each master only opens its own wraps
    keystore.destroy_master_key(1)
    assert keystore.master_key_ids() == [2]
    assert keystore.unwrap(2, new, b"ctx") == key
    with pytest.raises(KeystoreError, match="master key 1"):
        keystore.unwrap(1, old, b"ctx")


def test_create_refuses_an_existing_keystore(keystore, make_keystore) -> None:
    with pytest.raises(KeystoreError, match="already"):
        make_keystore().create()


def test_open_of_a_missing_keystore_is_a_clear_error(make_keystore) -> None:
    with pytest.raises(KeystoreError):
        make_keystore().open()


# --- soft keystore ------------------------------------------------------------------------


def test_soft_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    SoftKeystore(tmp_path, PASSPHRASE, scrypt_n=1 << 14).create()
    with pytest.raises(WrongSecretError, match="wrong passphrase"):
        SoftKeystore(tmp_path, "tr0ub4dor").open()
    with pytest.raises(KeystoreError, match="protected by a passphrase"):
        SoftKeystore(tmp_path, None).open()
    ks = SoftKeystore(tmp_path, PASSPHRASE)
    ks.open()
    assert ks.master_key_ids() == [1]


def test_soft_default_scrypt_parameters_are_stored_and_used(tmp_path: Path) -> None:
    ks = SoftKeystore(tmp_path, PASSPHRASE)
    ks.create()
    params = json.loads((tmp_path / "keystore.json").read_text())["scrypt"]
    assert (params["n"], params["r"], params["p"]) == (1 << 17, 8, 1)
    assert PASSPHRASE.encode() not in (tmp_path / "keystore.json").read_bytes()


def test_soft_unattended_mode_uses_a_private_key_file(tmp_path: Path) -> None:
    ks = SoftKeystore(tmp_path, None)
    ks.create()
    wrapped = ks.wrap(1, b"k" * 32, b"c")
    for name in ("keystore.key", "keystore.json", "keystore.anchor"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    again = SoftKeystore(tmp_path, None)
    again.open()
    assert again.unwrap(1, wrapped, b"c") == b"k" * 32
    (tmp_path / "keystore.key").write_bytes(os.urandom(32))
    with pytest.raises(KeystoreError, match="altered or replaced"):
        SoftKeystore(tmp_path, None).open()
    assert SoftKeystore(tmp_path, None).describe().endswith("(unattended key file)")


def test_soft_passphrase_from_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PLUGSHARE_PASSPHRASE", "from env")
    assert not SoftKeystore.from_environment(tmp_path).unattended
    monkeypatch.delenv("PLUGSHARE_PASSPHRASE")
    assert SoftKeystore.from_environment(tmp_path).unattended


def test_soft_damaged_files_are_reported(tmp_path: Path) -> None:
    ks = SoftKeystore(tmp_path, None)
    ks.create()
    ks.advance_anchor(1)  # both slots hold a value now (0 and 1)
    anchor = tmp_path / "keystore.anchor"
    data = bytearray(anchor.read_bytes())
    for offset in ANCHOR_SLOTS:  # the tag of each slot: always a change
        data[offset + 35] ^= 1
    anchor.write_bytes(bytes(data))
    with pytest.raises(TokenStateError, match="anchor .* fails authentication"):
        ks.read_anchor()
    anchor.unlink()
    with pytest.raises(TokenStateError, match="anchor .* is missing"):
        ks.read_anchor()
    (tmp_path / "keystore.json").write_text("{not json")
    with pytest.raises(KeystoreError, match="damaged"):
        SoftKeystore(tmp_path, None).open()


# --- PKCS#11 keystore ---------------------------------------------------------------------


def _hsm(softhsm, key_label: str, pin_source: str = f"env:{PIN_ENV}") -> Pkcs11Keystore:
    return Pkcs11Keystore(DEFAULT_MODULE, HSM_TOKEN_LABEL, pin_source, key_label)


def test_pkcs11_master_key_is_sensitive_and_not_extractable(softhsm) -> None:
    ks = _hsm(softhsm, f"attrs-{time.time_ns()}")
    ks.create()
    try:
        key = ks._masters[1]
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        with pytest.raises(AttributeSensitive):
            key[Attribute.VALUE]
    finally:
        ks.destroy()


def test_pkcs11_wrong_pin_no_token_and_pin_file(softhsm, tmp_path: Path, monkeypatch) -> None:
    label = f"pin-{time.time_ns()}"
    ks = _hsm(softhsm, label)
    ks.create()
    ks.close()
    try:
        # with no session open in this process, the device itself checks the PIN
        monkeypatch.setenv("PLUGSHARE_WRONG_PIN", "9999")
        with pytest.raises(WrongSecretError, match="wrong PIN"):
            _hsm(softhsm, label, "env:PLUGSHARE_WRONG_PIN").open()
        pin_file = tmp_path / "pin"
        pin_file.write_text(HSM_PIN + "\n")
        good = _hsm(softhsm, label, f"file:{pin_file}")
        good.open()
        # with a session open, a second open with another PIN is refused the same way
        with pytest.raises(WrongSecretError, match="wrong PIN"):
            _hsm(softhsm, label, "env:PLUGSHARE_WRONG_PIN").open()
        good.close()
        with pytest.raises(KeystoreError, match="no PKCS#11 token labelled 'nope'"):
            Pkcs11Keystore(DEFAULT_MODULE, "nope", f"env:{PIN_ENV}", label).open()
        with pytest.raises(KeystoreError, match="not set"):
            _hsm(softhsm, label, "env:PLUGSHARE_UNSET_VARIABLE").open()
        with pytest.raises(KeystoreError, match="'env:VARIABLE' or 'file:PATH'"):
            _hsm(softhsm, label, "1234").open()
    finally:
        _hsm(softhsm, label).destroy()


def test_pkcs11_anchor_survives_a_crash_between_create_and_destroy(softhsm) -> None:
    label = f"anchor-{time.time_ns()}"
    ks = _hsm(softhsm, label)
    ks.create()
    try:
        ks.advance_anchor(5)
        # simulate the crash window: the new anchor object exists next to the old one
        ks._session.create_object({
            Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True, Attribute.PRIVATE: True,
            Attribute.LABEL: f"{label}:anchor", Attribute.VALUE: (6).to_bytes(8, "big"),
        })
        assert ks.read_anchor() == 6
        ks.advance_anchor(7)
        assert [v for v, _ in ks._anchors()] == [7]
    finally:
        ks.destroy()


def test_pkcs11_token_state_is_bound_to_the_device_keys(softhsm, tmp_path: Path) -> None:
    """A state created with one device key label cannot be opened with another's keys."""
    a, b = _hsm(softhsm, f"bind-a-{time.time_ns()}"), _hsm(softhsm, f"bind-b-{time.time_ns()}")
    token, _ = Token.create(tmp_path / "a", a, name="a")
    token.close()
    b.create()
    b.close()
    try:
        with pytest.raises(TokenStateError, match="another keystore"):
            Token.open(tmp_path / "a", _hsm(softhsm, b.key_label))
    finally:
        _hsm(softhsm, a.key_label).destroy()
        _hsm(softhsm, b.key_label).destroy()
