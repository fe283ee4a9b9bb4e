"""Invitation codes: one line of text that lets one new member join a share (pure: no I/O).

An invitation holds what the invitee needs to reach and trust the owner (its key fingerprint
and addresses), which share, the permission offered, an expiry time, and a one-time random
secret whose knowledge the invitee proves when accepting. The owner's token stores only
`secret_digest(secret, share_id)` and checks a presented secret with `matches`; whether it was
already used or has expired is the token's bookkeeping.

Code format: `plugshare1:` followed by unpadded base64url of

    msgpack [owner fingerprint (32 bytes), [address, ...], share id, secret, permission (0 read,
             1 write), expires_at (unix seconds)(, [[relay id (32 bytes), address], ...])]
             ||  first 4 bytes of SHA-256(domain || msgpack)

The last field, the relays the owner stays joined to (see `plugshare.relay`), is left out
when there are none, so such codes are byte for byte what older versions make and read.

An address is 6 bytes (IPv4 + port) or 18 bytes (IPv6 + port), or [hostname, port]. The
checksum turns a mistyped or truncated code into a clear error instead of a wrong invitation.
With one IPv4 address and a 16-byte secret a code is about 140 characters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import struct
import time
from collections.abc import Iterable
from typing import Any, Literal

import attrs
import msgpack

from plugshare.errors import PlugshareError
from plugshare.token.identity import format_node_id

PREFIX = "plugshare1:"
SECRET_MIN, SECRET_MAX = 16, 32
MAX_ADDRESSES = 16
MAX_RELAYS = 4
MAX_SHARE_ID = 200
MAX_TTL = 365 * 86400
_CHECKSUM = 4
_CHECKSUM_DOMAIN = b"plugshare invitation v1\x00"
_DIGEST_DOMAIN = b"plugshare invitation secret v1\x00"
_PERMISSIONS = ("read", "write")  # index = wire value
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_TTL = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

Permission = Literal["read", "write"]
HostPort = tuple[str, int]
RelayHop = tuple[bytes, str, int]  # relay id, host, port


class InvitationError(PlugshareError, ValueError):
    """An invitation code or field is malformed, damaged, or out of range."""


class InvitationExpired(InvitationError):
    """The invitation's expiry time has passed."""


class InvalidTtl(InvitationError):
    """A validity duration such as `1h` is not well formed or out of range."""


# --- validation ---------------------------------------------------------------------------


def _check_address(address: object) -> HostPort:
    if not isinstance(address, (tuple, list)) or len(address) != 2:
        raise InvitationError(f"an owner address is a (host, port) pair, got {address!r}")
    host, port = address
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvitationError(f"port of owner address {host!r} must be 1-65535, got {port!r}")
    if not isinstance(host, str) or not host:
        raise InvitationError(f"host of an owner address must be a non-empty string, got {host!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise InvitationError(f"{host!r} is neither an IP address nor a host name") from None
        return host, port
    if ip.is_unspecified:
        raise InvitationError(f"{host} is not an address a peer can connect to; give a real one")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise InvitationError(f"{host}: a scoped IPv6 address means nothing on another machine")
    return str(ip), port


def _addresses(value: Iterable[Any]) -> tuple[HostPort, ...]:
    if isinstance(value, (str, bytes)):
        raise InvitationError("owner addresses are a list of (host, port) pairs")
    addresses = tuple(_check_address(a) for a in value)
    if len(addresses) > MAX_ADDRESSES:
        raise InvitationError(
            f"{len(addresses)} owner addresses; at most {MAX_ADDRESSES} fit in a code"
        )
    return addresses


def _check_fingerprint(_inst: Any, _attr: Any, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise InvitationError(f"the owner fingerprint must be 32 bytes, got {value!r:.80}")


def _check_share_id(_inst: Any, _attr: Any, value: object) -> None:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_SHARE_ID
        or not value.isprintable()
    ):
        raise InvitationError(
            f"the share id must be 1-{MAX_SHARE_ID} printable characters, got {value!r:.80}"
        )


def _check_secret(_inst: Any, _attr: Any, value: object) -> None:
    if not isinstance(value, bytes) or not SECRET_MIN <= len(value) <= SECRET_MAX:
        raise InvitationError(f"the invitation secret must be {SECRET_MIN}-{SECRET_MAX} bytes")


def _check_permission(_inst: Any, _attr: Any, value: object) -> None:
    if value not in _PERMISSIONS:
        raise InvitationError(f"permission must be 'read' or 'write', got {value!r}")


def _check_expires(_inst: Any, _attr: Any, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvitationError(
            f"expires_at must be a non-negative integer (unix seconds), got {value!r}"
        )


# --- the model ----------------------------------------------------------------------------


def _relays(value: Iterable[Any]) -> tuple[RelayHop, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvitationError("owner relays are a list of (relay id, host, port)")
    relays = []
    for item in value:
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise InvitationError(f"an owner relay is (relay id, host, port), got {item!r:.80}")
        relay_id, host, port = item
        if not isinstance(relay_id, bytes) or len(relay_id) != 32:
            raise InvitationError("a relay id is 32 bytes")
        relays.append((relay_id, *_check_address((host, port))))
    if len(relays) > MAX_RELAYS:
        raise InvitationError(f"{len(relays)} owner relays; at most {MAX_RELAYS} fit in a code")
    return tuple(relays)


@attrs.frozen
class Invitation:
    """One invitation to one share, for one new member."""

    owner_fingerprint: bytes = attrs.field(validator=_check_fingerprint)
    owner_addresses: tuple[HostPort, ...] = attrs.field(converter=_addresses)
    share_id: str = attrs.field(validator=_check_share_id)
    secret: bytes = attrs.field(validator=_check_secret, repr=False)
    permission: Permission = attrs.field(validator=_check_permission)
    expires_at: int = attrs.field(validator=_check_expires)
    owner_relays: tuple[RelayHop, ...] = attrs.field(default=(), converter=_relays)

    @classmethod
    def new(
        cls,
        owner_fingerprint: bytes,
        owner_addresses: Iterable[HostPort],
        share_id: str,
        permission: Permission,
        ttl_seconds: int,
        *,
        now: float | None = None,
        secret_size: int = SECRET_MIN,
        relays: Iterable[RelayHop] = (),
    ) -> Invitation:
        """A fresh invitation with a random secret, valid for `ttl_seconds` from `now`."""
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
            raise InvalidTtl(
                f"the validity must be a positive number of seconds, got {ttl_seconds!r}"
            )
        if not SECRET_MIN <= secret_size <= SECRET_MAX:
            raise InvitationError(f"secret_size must be {SECRET_MIN}-{SECRET_MAX} bytes")
        issued = int(time.time() if now is None else now)
        return cls(
            owner_fingerprint,
            owner_addresses,
            share_id,
            secrets.token_bytes(secret_size),
            permission,
            issued + ttl_seconds,
            relays,
        )

    @property
    def owner_node_id(self) -> str:
        return format_node_id(self.owner_fingerprint)

    def digest(self) -> bytes:
        """What the owner's token stores for this invitation: see `secret_digest`."""
        return secret_digest(self.secret, self.share_id)

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at

    def check_not_expired(self, now: float) -> None:
        """Raise `InvitationExpired` if the invitation has expired at `now` (unix seconds)."""
        if self.is_expired(now):
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.expires_at))
            raise InvitationExpired(
                f"this invitation expired at {when}; ask the share's owner for a new one"
            )

    def encode(self) -> str:
        """The one-line code: `plugshare1:` and base64url text (URL- and chat-safe)."""
        fields = [
            self.owner_fingerprint,
            [_pack_address(h, p) for h, p in self.owner_addresses],
            self.share_id,
            self.secret,
            _PERMISSIONS.index(self.permission),
            self.expires_at,
        ]
        if self.owner_relays:
            fields.append([[relay_id, _pack_address(h, p)] for relay_id, h, p in self.owner_relays])
        payload = msgpack.packb(fields, use_bin_type=True)
        raw = payload + _checksum(payload)
        return PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, code: str) -> Invitation:
        """The invitation a code holds; `InvitationError` saying what is wrong with it.

        Whitespace anywhere (line breaks added by a chat or mail client) is ignored.
        """
        if not isinstance(code, str):
            raise InvitationError(f"an invitation code is text, got {type(code).__name__}")
        compact = "".join(code.split())
        if not compact:
            raise InvitationError("the invitation code is empty")
        head, sep, body = compact.partition(":")
        if not sep or not head.lower().startswith("plugshare"):
            raise InvitationError(
                f"this is not a plugshare invitation code (it should start with {PREFIX!r})"
            )
        if head.lower() + sep != PREFIX:
            raise InvitationError(
                f"invitation code version {head!r} is not supported (expected {PREFIX!r}); "
                "is it from a newer plugshare?"
            )
        bad = next((i for i, ch in enumerate(body) if not _BASE64URL.fullmatch(ch)), None)
        if bad is not None:
            raise InvitationError(
                f"the invitation code has {body[bad]!r} at position {len(PREFIX) + bad + 1}, "
                "which never occurs in a code; copy it again"
            )
        if len(body) % 4 == 1:
            raise _incomplete()
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise _incomplete() from None
        payload, check = raw[:-_CHECKSUM], raw[-_CHECKSUM:]
        if len(raw) <= _CHECKSUM or not hmac.compare_digest(check, _checksum(payload)):
            raise _incomplete()
        if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != body:
            raise _incomplete()  # a typo in the last character's unused bits: not our output
        return _from_payload(payload)


def _incomplete() -> InvitationError:
    return InvitationError(
        "the invitation code is damaged or incomplete (its checksum does not match); "
        "copy the whole code again"
    )


def _checksum(payload: bytes) -> bytes:
    return hashlib.sha256(_CHECKSUM_DOMAIN + payload).digest()[:_CHECKSUM]


def _pack_address(host: str, port: int) -> bytes | list[Any]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return [host, port]
    return ip.packed + struct.pack(">H", port)


def _unpack_address(value: object) -> HostPort:
    if isinstance(value, bytes) and len(value) in (6, 18):
        ip = ipaddress.ip_address(value[:-2])
        return str(ip), struct.unpack(">H", value[-2:])[0]
    if isinstance(value, list) and len(value) == 2:
        return value[0], value[1]
    raise InvitationError(f"the invitation code holds a malformed address {value!r:.60}")


def _from_payload(payload: bytes) -> Invitation:
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise InvitationError(f"the invitation code is not well formed ({exc})") from None
    if not isinstance(fields, list) or len(fields) not in (6, 7):
        raise InvitationError("the invitation code is not well formed (wrong number of fields)")
    fingerprint, addresses, share_id, secret, permission, expires_at = fields[:6]
    relays = fields[6] if len(fields) == 7 else []
    if not isinstance(relays, list) or not all(isinstance(r, list) and len(r) == 2 for r in relays):
        raise InvitationError("the invitation code is not well formed (relays)")
    if not isinstance(addresses, list):
        raise InvitationError("the invitation code is not well formed (addresses)")
    if isinstance(permission, bool) or permission not in (0, 1):
        raise InvitationError(f"the invitation code names an unknown permission {permission!r}")
    return Invitation(
        fingerprint,
        [_unpack_address(a) for a in addresses],
        share_id,
        secret,
        _PERMISSIONS[permission],
        expires_at,
        [(relay_id, *_unpack_address(address)) for relay_id, address in relays],
    )


def decode(code: str) -> Invitation:
    """Module-level alias of `Invitation.decode`."""
    return Invitation.decode(code)


# --- the secret ---------------------------------------------------------------------------


def secret_digest(secret: bytes, share_id: str) -> bytes:
    """SHA-256 of the secret, bound to the share id: what the owner's token keeps. The secret
    is 128+ random bits, so a plain hash is as strong as a slow one here."""
    if not isinstance(secret, bytes) or not isinstance(share_id, str):
        raise InvitationError("secret_digest takes the secret as bytes and the share id as text")
    sid = share_id.encode("utf-8")
    return hashlib.sha256(_DIGEST_DOMAIN + struct.pack(">H", len(sid)) + sid + secret).digest()


def matches(stored_digest: bytes, secret: bytes, share_id: str) -> bool:
    """Whether `secret` is the one whose digest was stored for `share_id`, in constant time."""
    return hmac.compare_digest(stored_digest, secret_digest(secret, share_id))


# --- durations ----------------------------------------------------------------------------


def parse_ttl(text: str) -> int:
    """Seconds in a duration like `90s`, `30m`, `1h`, `2d` or `1w` (one number, one unit)."""
    if not isinstance(text, str):
        raise InvalidTtl(f"a duration is text like 1h, got {type(text).__name__}")
    s = text.strip().lower()
    if not s:
        raise InvalidTtl("the duration is empty; write e.g. 90s, 30m, 1h, 2d or 1w")
    if s.isdigit():
        raise InvalidTtl(f"duration {text!r} has no unit; write e.g. {s}s, {s}m or {s}h")
    m = _TTL.fullmatch(s)
    if m is None:
        raise InvalidTtl(
            f"duration {text!r} is not a number followed by one unit (s, m, h, d or w), e.g. 1h"
        )
    seconds = int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds <= 0:
        raise InvalidTtl(f"duration {text!r} must be longer than zero")
    if seconds > MAX_TTL:
        raise InvalidTtl(f"duration {text!r} is longer than the limit of 365 days")
    return seconds
