"""Binding the node's listening sockets up front, so a port in use is one clear error."""

from __future__ import annotations

import errno
import os
import socket

from plugshare.config import Address
from plugshare.errors import PlugshareError


class ListenError(PlugshareError):
    """A listening address cannot be bound (port in use, no permission, bad host)."""


def bind_listener(address: Address, what: str) -> socket.socket:
    """Bind and listen on `address` now, so a port in use is one clear error at start-up."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if os.name != "nt":  # a restarted node rebinds its port despite old links in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address.host, address.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        hint = {
            errno.EADDRINUSE: "is another node running? pick another port in node.toml",
            errno.EACCES: "ports below 1024 need privileges; pick another port",
        }.get(exc.errno, "check the address in node.toml")
        raise ListenError(f"cannot listen on {address} for the {what}: {exc.strerror} ({hint})")
    sock.setblocking(False)
    return sock
