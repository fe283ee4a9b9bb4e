"""A blind relay for nodes that cannot reach each other directly (behind NAT).

Public face: `RelayAddress` (``ID@host:port``), the node's side (`join_relay`,
`request_session`, `open_session`, `RelayError`, `RelayRefused`) and the server
(`RelayServer`, `RelayLimits`). The wire protocol is in `plugshare.relay.protocol`.
"""

from typing import TYPE_CHECKING, Any

from plugshare.relay.identity import RelayAddress
from plugshare.relay.quota import RelayLimits

if TYPE_CHECKING:
    from plugshare.relay.client import RelayError, RelayRefused, join_relay, open_session, request_session

_CLIENT = {"RelayError", "RelayRefused", "join_relay", "open_session", "request_session"}


def __getattr__(name: str) -> Any:
    # The node's side (trio and its sockets) loads on first use: reading node.toml, which
    # parses relay addresses, is on every command line's path and needs none of it.
    if name in _CLIENT:
        from plugshare.relay import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "RelayAddress",
    "RelayError",
    "RelayLimits",
    "RelayRefused",
    "join_relay",
    "open_session",
    "request_session",
]
