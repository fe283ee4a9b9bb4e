"""What a node run by systemd needs: readiness notification (`Type=notify`) and knowing when
stderr is the journal (which stamps every line itself).

Both are small, documented protocols (sd_notify(3), systemd.exec(5) JOURNAL_STREAM): a
datagram of `KEY=VALUE` lines to $NOTIFY_SOCKET, and a `device:inode` pair to compare with
stderr. Written here rather than taken from libsystemd's bindings, which need the C library
and its headers at install time for these few lines."""

from __future__ import annotations

import os
import socket
from typing import IO

__all__ = ["notify", "stderr_is_journal"]


def notify(*states: str) -> bool:
    """Tell the service manager `states` (e.g. "READY=1", "STOPPING=1", "STATUS=..."); a
    no-op without $NOTIFY_SOCKET. True when the message was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
        return True
    except OSError:
        return False  # the manager went away: nothing to tell


def stderr_is_journal(stream: IO | None = None) -> bool:
    """True when `stream` (stderr by default) is the journal stream systemd connected: its
    device and inode are those $JOURNAL_STREAM names. An inherited variable with stderr
    redirected elsewhere does not count."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    import sys

    stream = stream if stream is not None else sys.stderr
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))
