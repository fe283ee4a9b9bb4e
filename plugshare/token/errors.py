"""Every way the token refuses something, as one exception hierarchy.

Callers catch `TokenError` for "the token said no"; the subclasses say why, and every message
names what is wrong (and, where it helps, what to do about it).
"""

from __future__ import annotations

from plugshare.errors import PlugshareError


class TokenError(PlugshareError):
    """Base of every token failure."""


class TokenStateError(TokenError):
    """The sealed state on disk is missing, truncated, tampered with or otherwise unusable."""


class RollbackError(TokenStateError):
    """The sealed state is authentic but older than the anchor kept in the keystore."""


class TokenBusyError(TokenError):
    """Another process holds the token's state directory."""


class KeystoreError(TokenError):
    """The keystore cannot be opened or used (missing, misconfigured, device refused)."""


class WrongSecretError(KeystoreError):
    """The passphrase or PIN protecting the master key is wrong."""


class AuthenticationError(TokenError):
    """A credential, challenge response or peer key did not prove who the caller claims to be."""


class InvalidArgument(TokenError, ValueError):
    """A caller passed something malformed (bad name, unknown action, bad node id...)."""


class RuleError(InvalidArgument):
    """A rule or selector is malformed; the message says which part and why."""


class InvalidNodeIdError(InvalidArgument):
    """A node id string is not well formed or fails its check characters (a typo)."""


class AccessDenied(TokenError):
    """The rules do not let this principal do this; `decision.reason` says why."""

    def __init__(self, decision: object, message: str):
        super().__init__(message)
        self.decision = decision


class NotFound(TokenError, KeyError):
    """An app, peer, rule, doctype key or share key the caller named does not exist."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(TokenError):
    """The caller tried to create something that already exists."""


class IntegrityError(TokenError):
    """An encrypted document or wrapped key failed authentication: flipped bit, moved to
    another document, revision or doctype, or sealed under another key."""


class InvitationRefused(TokenError):
    """The owner's token will not redeem an invitation (unknown, already used, expired, for
    another share, or the joiner cannot be admitted); the message says why and what to do."""


class LeaveRequestRefused(TokenError):
    """A leave request is authentic but cannot be applied (a replay from before the member
    was admitted again, or it names a manifest version the owner never made)."""
