"""The node's one door to its token: authentication, decisions, sealing.

The node never decides an access itself and never holds a key: it asks `Access`, which asks
the token. This module only adapts the token's interface to HTTP-shaped questions.
"""

from __future__ import annotations

from typing import Any, Mapping

from plugshare.config import Config, TokenSection
from plugshare.errors import PlugshareError
from plugshare.token import (
    AccessDenied,
    AuthenticationError,
    Decision,
    IntegrityError,
    Keystore,
    Pkcs11Keystore,
    Principal,
    SoftKeystore,
    Token,
    TokenError,
)
from plugshare.token.envelope import is_sealed
from plugshare.token.keystore import read_secret_source

__all__ = ["Access", "AuthenticationFailed", "Forbidden", "Principal", "create_token",
           "open_access"]


class AuthenticationFailed(PlugshareError):
    """No credential, or one the token does not know."""


class Forbidden(PlugshareError):
    """The token refused the access."""

    status = 403
    error = "forbidden"


class Tampered(PlugshareError):
    """A sealed document failed authentication: the database holds altered ciphertext."""

    status = 502
    error = "integrity"


class TokenUnavailable(PlugshareError):
    """The token's state or keystore cannot be opened."""


def keystore_for(section: TokenSection, home, node_name: str) -> Keystore:
    if section.keystore == "pkcs11":
        pin = section.pin or "env:PLUGSHARE_PKCS11_PIN"
        return Pkcs11Keystore(section.module, section.token_label, pin,
                              key_label=section.key_label or f"plugshare-{node_name}")
    passphrase = None
    if section.passphrase:
        passphrase = read_secret_source(section.passphrase, "the token passphrase")
    return SoftKeystore(home.keystore_dir, passphrase)


def create_token(home, config: Config) -> tuple[str, str]:
    """A new token for a new home; returns its node id and the owner's credential."""
    try:
        keystore = keystore_for(config.token, home, config.node.name)
        token, credential = Token.create(home.token_dir, keystore, name=config.node.name)
    except TokenError as exc:
        raise TokenUnavailable(f"cannot create the token: {exc}") from None
    node_id = token.node_id
    token.close()
    return node_id, credential


def open_access(home, config: Config) -> Access:
    try:
        keystore = keystore_for(config.token, home, config.node.name)
        return Access(Token.open(home.token_dir, keystore))
    except TokenError as exc:
        raise TokenUnavailable(f"cannot open the token in {home.token_dir}: {exc}") from None


class Access:
    def __init__(self, token: Token):
        self.token = token

    @property
    def node_id(self) -> str:
        return self.token.node_id

    def close(self) -> None:
        self.token.flush()
        self.token.close()

    def flush(self) -> None:
        self.token.flush()

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an `Authorization: Bearer ...` header."""
        scheme, _, credential = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise AuthenticationFailed("send the credential as 'Authorization: Bearer <credential>'")
        try:
            return self.token.authenticate(credential.strip())
        except AuthenticationError as exc:
            raise AuthenticationFailed(str(exc)) from None

    @staticmethod
    def metadata(stored: Mapping[str, Any]) -> dict[str, Any]:
        """What the rules may look at (and the audit log names): the id and the fields in
        clear (all of them, unless the doc is sealed)."""
        return {k: v for k, v in stored.items() if k == "_id" or not k.startswith("_")}

    def decide(self, principal: Principal, action: str, doc: Mapping[str, Any]) -> Decision:
        return self.token.decide(principal, action, self.metadata(doc))

    def require_owner(self, principal: Principal, action: str) -> None:
        """Managing the token, shares or the events stream is the owner's; the token decides
        (and logs) it. `Forbidden` for anyone else."""
        decision = self.token.decide_admin(principal, action)
        if not decision.allowed:
            raise Forbidden(decision.reason)

    def may_access_doctype(self, principal: Principal, action: str, doctype: str) -> Decision:
        return self.token.may_access_doctype(principal, action, doctype)

    def read(self, principal: Principal, stored: Mapping[str, Any]) -> dict[str, Any]:
        """The document as `principal` may see it (decrypted by the token if sealed);
        `Forbidden` when the token says no."""
        if not is_sealed(stored):
            decision = self.decide(principal, "read", stored)
            if not decision.allowed:
                raise Forbidden(decision.reason)
            return dict(stored)
        try:
            return self.token.decrypt_doc(stored, principal)
        except AccessDenied as exc:
            raise Forbidden(str(exc)) from None
        except IntegrityError as exc:
            raise Tampered(f"document {stored.get('_id')!r}: {exc}") from None

    def sealing_scope(self, doc: Mapping[str, Any]) -> str | None:
        """How `doc` is to be stored: "share:<id>" (sealed under an encrypted share's key, so
        its members can open it), "doctype" (a sensitive doctype), or None (in clear)."""
        share_id = self.token.encrypted_share_for(self.metadata(doc))
        if share_id is not None:
            return f"share:{share_id}"
        return "doctype" if self.token.is_sensitive(doc["doctype"]) else None

    def seal(self, doc: Mapping[str, Any], generation: int, scope: str) -> dict[str, Any]:
        share_id = scope.removeprefix("share:") if scope.startswith("share:") else None
        return self.token.encrypt_doc(doc, generation=generation, share_id=share_id)
