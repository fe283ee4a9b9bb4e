"""A blind relay for nodes that cannot reach each other directly (behind NAT).

Public face: `RelayAddress` (``ID@host:port``), the node's side (`join_relay`,
`request_session`, `open_session`, `RelayError`, `RelayRefused`) and the server
(`RelayServer`, `RelayLimits`). The wire protocol is in `plugshare.relay.protocol`.
"""

from plugshare.relay.client import RelayError, RelayRefused, join_relay, open_session, request_session
from plugshare.relay.identity import RelayAddress
from plugshare.relay.quota import RelayLimits

__all__ = [
    "RelayAddress",
    "RelayError",
    "RelayLimits",
    "RelayRefused",
    "join_relay",
    "open_session",
    "request_session",
]
