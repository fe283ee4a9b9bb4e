"""The node's side of the token's door: the client, what the node may know, HTTP errors.

The node never decides an access and never holds a key: every request goes to the token
process as one command (see `plugshare.token.door`). This module keeps the little the node
routes by — its public identity and the shares' signed manifests, refreshed after every change —
and names the errors the API maps to HTTP.
"""

from __future__ import annotations

import base64
import binascii

import attrs

from plugshare.errors import PlugshareError
from plugshare.sharing.manifest import Manifest

__all__ = ["AuthenticationFailed", "Forbidden", "Identity", "ShareView", "Tampered"]


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


def bearer(authorization: str | None) -> str:
    """The credential of an `Authorization: Bearer ...` header, or of HTTP Basic with the
    credential as the password (CouchDB clients send Basic; the user name is free text, an
    app's name or anything: only the credential is checked, by the token)."""
    scheme, _, value = (authorization or "").partition(" ")
    value = value.strip()
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthenticationFailed("the Basic credentials are not base64 of "
                                       "'name:credential'") from None
        _, colon, credential = decoded.partition(":")
        if colon and credential:
            return credential
        raise AuthenticationFailed("send the credential as the password of Basic "
                                   "authentication ('name:credential')")
    if scheme.lower() != "bearer" or not value:
        raise AuthenticationFailed("send the credential as 'Authorization: Bearer <credential>'"
                                   " (or as the password of HTTP Basic)")
    return value


@attrs.frozen
class Identity:
    """This node's public identity, as its token states it."""

    node_id: str
    name: str
    fingerprint: bytes
    public_key: bytes
    x25519: bytes

    @classmethod
    async def fetch(cls, call) -> Identity:
        info = await call("info")
        return cls(info["node_id"], info["name"], bytes(info["fingerprint"]),
                   bytes(info["public_key"]), bytes(info["x25519"]))


class ShareView:
    """The shares' manifests (signed, public to their members) and this node's standing in
    each, as last read from the token: what the node plans links and pushes by. Every
    document still passes the token, so a stale view can only delay, never leak."""

    def __init__(self, call, self_fingerprint: bytes):
        self._call = call
        self._self = self_fingerprint
        self._manifests: dict[str, Manifest] = {}
        self._status: dict[str, str] = {}

    async def refresh(self) -> None:
        manifests, status = {}, {}
        for row in await self._call("share.list"):
            manifest = Manifest.from_dict(row["manifest"])
            manifests[manifest.share_id] = manifest
            status[manifest.share_id] = row["status"]
        self._manifests, self._status = manifests, status

    def all(self) -> list[Manifest]:
        return list(self._manifests.values())

    def get(self, share_id: str) -> Manifest | None:
        return self._manifests.get(share_id)

    def find(self, name_or_id: str) -> Manifest:
        from plugshare.store import NotFound

        manifest = self._manifests.get(name_or_id)
        if manifest is not None:
            return manifest
        named = [m for m in self._manifests.values() if m.name == name_or_id]
        if len(named) == 1:
            return named[0]
        if named:
            raise Forbidden(f"several shares are named {name_or_id!r}; name it by id")
        raise NotFound(f"no share {name_or_id!r}")

    def status(self, share_id: str) -> str:
        return self._status.get(share_id, "removed")

    def here(self, share_id: str) -> bool:
        return self._status.get(share_id) in ("owner", "active")

    def common(self, fingerprint: bytes) -> list[Manifest]:
        """Shares where both this node and the peer are active: what to sync with it."""
        if fingerprint == self._self:
            return []
        return [m for m in self._manifests.values()
                if self.here(m.share_id) and m.is_active_member(fingerprint)]

    def former_member(self, fingerprint: bytes) -> bool:
        """Revoked from (or gone from) a share held here, and in none in common: a link
        with it only tells it so."""
        if self.common(fingerprint):
            return False
        return any(self.here(m.share_id) and (member := m.member(fingerprint)) is not None
                   and member.status != "active" for m in self._manifests.values())

    def member_name(self, fingerprint: bytes) -> str | None:
        for manifest in self._manifests.values():
            member = manifest.member(fingerprint)
            if member is not None:
                return member.name
        return None

