"""The token's inside in one place, for the token process and the token's own tests.

Nothing outside `plugshare.token` imports this (see the import contracts in pyproject.toml):
the node reaches the token only through its process, with `plugshare.token.client`.
"""

from . import *  # noqa: F403 (the public face too)
from . import __all__ as _public
from .audit import AuditEntry
from .door import Door
from .envelope import CLEAR_FIELDS, ENVELOPE_FIELD, DocKey, open_doc
from .keystore import Keystore
from .pkcs11_keystore import Pkcs11Keystore
from .rules import Rule
from .shares import InvitationRefused, LeaveRequestRefused
from .soft_keystore import SoftKeystore
from .token import AppInfo, PeerInfo, Token, TokenInfo

__all__ = [*_public, "AppInfo", "AuditEntry", "CLEAR_FIELDS", "DocKey", "Door", "ENVELOPE_FIELD",
           "InvitationRefused", "Keystore", "LeaveRequestRefused", "PeerInfo", "Pkcs11Keystore",
           "Rule", "SoftKeystore", "Token", "TokenInfo", "open_doc"]
