"""Accepting connections through a shortage of file descriptors or memory, for the servers
on trio listeners (the peer port, the local API, the relay)."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

# accept() failures that say the process or system is out of something, not that the
# listener is broken: wait and try again (trio.serve_listeners does too, but logs each retry).
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def accept(listener: trio.SocketListener, what: str, log: logging.Logger, *,
                 retry: float = 0.1, retry_max: float = 2.0) -> trio.SocketStream:
    """The next connection on `listener`. While accept() fails for want of descriptors or
    memory, wait `retry` seconds, doubling up to `retry_max`, and try again: said once when
    it starts ("cannot accept `what`") and once when it passes. Other errors are raised."""
    delay = 0.0
    while True:
        try:
            stream = await listener.accept()
        except OSError as error:
            if error.errno not in CAPACITY_ERRNOS:
                raise
            if not delay:
                log.error("cannot accept %s: %s; retrying until it passes", what,
                          errno.errorcode.get(error.errno, error.errno))
            delay = min(max(delay * 2, retry), retry_max)
            await trio.sleep(delay)
            continue
        if delay:
            log.warning("accepting %s again", what)
        return stream


async def accept_forever(listener: trio.SocketListener, nursery: trio.Nursery,
                         handle: Callable[[trio.SocketStream], Awaitable[None]], what: str,
                         log: logging.Logger, *, retry: float = 0.1,
                         retry_max: float = 2.0) -> NoReturn:
    """Accept connections on `listener` (closed when this ends), each handled in `nursery`,
    through any shortage of descriptors or memory (see `accept`)."""
    async with listener:
        while True:
            stream = await accept(listener, what, log, retry=retry, retry_max=retry_max)
            nursery.start_soon(handle, stream)
