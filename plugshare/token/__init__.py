"""The secure token: the trusted side of every node, in a process of its own.

This package's public face is what the node may use: the client of the token process
(`client.TokenClient`, started by `supervisor.TokenProcess`), the paths of a home's token, the
errors every refusal arrives as, identity helpers on public keys, and TLS helpers on public
certificates. Everything else (`token.py`, `door.py`, the keystores, the vault, the rules, the
envelopes) is the token's inside, loaded only in the token process (`python -m plugshare.token`);
the import contracts in pyproject.toml keep it so.
"""

from .errors import (
    AccessDenied,
    AlreadyExists,
    AuthenticationError,
    IntegrityError,
    InvalidArgument,
    InvalidNodeIdError,
    KeystoreError,
    NotFound,
    RollbackError,
    RuleError,
    TokenBusyError,
    TokenError,
    TokenStateError,
    WrongSecretError,
)
from .identity import fingerprint_of, format_node_id, parse_node_id
from .principal import OWNER, Decision, Principal

__all__ = [
    "AccessDenied", "AlreadyExists", "AuthenticationError", "Decision", "IntegrityError",
    "InvalidArgument", "InvalidNodeIdError", "KeystoreError", "NotFound", "OWNER", "Principal",
    "RollbackError", "RuleError", "TokenBusyError", "TokenError", "TokenStateError",
    "WrongSecretError", "fingerprint_of", "format_node_id", "parse_node_id",
]
