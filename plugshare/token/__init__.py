"""The secure token: the trusted side of every node.

The node uses `Token` (and the models and errors below) and nothing else; everything else in
this package is the token's inside.
"""

from .audit import AuditEntry
from .envelope import CLEAR_FIELDS, ENVELOPE_FIELD, DocKey, open_doc
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
from .keystore import Keystore
from .pkcs11_keystore import Pkcs11Keystore
from .principal import OWNER, Decision, Principal
from .rules import Rule
from .shares import InvitationRefused, LeaveRequestRefused
from .soft_keystore import SoftKeystore
from .token import AppInfo, PeerInfo, Token, TokenInfo

__all__ = [
    "AccessDenied", "AlreadyExists", "AppInfo", "AuditEntry", "AuthenticationError",
    "CLEAR_FIELDS", "Decision", "DocKey", "ENVELOPE_FIELD", "IntegrityError", "InvalidArgument",
    "InvalidNodeIdError", "InvitationRefused", "Keystore", "KeystoreError", "LeaveRequestRefused",
    "NotFound", "OWNER", "PeerInfo",
    "Pkcs11Keystore", "Principal", "RollbackError", "Rule", "RuleError", "SoftKeystore",
    "Token", "TokenBusyError", "TokenError", "TokenInfo", "TokenStateError", "WrongSecretError",
    "fingerprint_of", "format_node_id", "open_doc", "parse_node_id",
]
