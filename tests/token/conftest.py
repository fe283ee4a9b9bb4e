"""Fixtures for the token suite: a real SoftHSM2 device token and keystores of both kinds.

The SoftHSM2 token is made once per session by `.ci/softhsm.sh` in a temporary directory;
SOFTHSM2_CONF is set in this process before the PKCS#11 module is loaded. Each test gets
its own key label on that device token, and its objects are destroyed afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plugshare.token.inside import Keystore, Pkcs11Keystore, SoftKeystore, Token
from plugshare.token.pkcs11_keystore import DEFAULT_MODULE

from tests.support.softhsm import HSM_PIN, HSM_TOKEN_LABEL, PIN_ENV  # noqa: F401 (re-exported)

PASSPHRASE = "correct horse battery staple"
TEST_SCRYPT_N = 1 << 14  # the default (2^17) is exercised once in test_keystore.py

KeystoreFactory = Callable[[], Keystore]


def _pkcs11_factory(softhsm: Path) -> tuple[KeystoreFactory, Callable[[], None]]:
    key_label = f"test-{uuid.uuid4().hex[:12]}"

    def make() -> Keystore:
        return Pkcs11Keystore(DEFAULT_MODULE, HSM_TOKEN_LABEL, f"env:{PIN_ENV}", key_label)

    def cleanup() -> None:
        make().destroy()

    return make, cleanup


@pytest.fixture(params=["soft", "pkcs11"])
def keystore_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_keystore(
    keystore_kind: str, tmp_path: Path, softhsm: Path
) -> Iterator[KeystoreFactory]:
    """A factory of keystore objects that all name the same keystore, so a test can reopen
    it (each call is a fresh object, as after a restart)."""
    if keystore_kind == "soft":
        yield lambda: SoftKeystore(tmp_path / "keystore", PASSPHRASE, scrypt_n=TEST_SCRYPT_N)
        return
    make, cleanup = _pkcs11_factory(softhsm)
    try:
        yield make
    finally:
        cleanup()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def token_and_owner(
    make_keystore: KeystoreFactory, state_dir: Path
) -> Iterator[tuple[Token, str]]:
    token, owner_credential = Token.create(state_dir, make_keystore(), name="node-a")
    try:
        yield token, owner_credential
    finally:
        token.close()


@pytest.fixture
def token(token_and_owner: tuple[Token, str]) -> Token:
    return token_and_owner[0]


@pytest.fixture
def second_token(tmp_path: Path, keystore_kind: str, softhsm: Path) -> Iterator[Token]:
    """Another node's token (same keystore kind), for peer and share-key tests."""
    if keystore_kind == "soft":
        keystore: Keystore = SoftKeystore(tmp_path / "keystore-b", None)
        cleanup: Callable[[], None] = lambda: None  # noqa: E731
    else:
        make, cleanup = _pkcs11_factory(softhsm)
        keystore = make()
    token, _ = Token.create(tmp_path / "state-b", keystore, name="node-b")
    try:
        yield token
    finally:
        token.close()
        cleanup()
