"""The test proxy takes a burst of connections as a CouchDB node does: a store with many
requests in flight opens that many connections at once, and a listen queue shorter than
the burst makes the kernel drop or reset some of them (seen as a `Connection reset by
peer` on a busy machine), a fault of the harness and not of the store under test."""

import socket
import struct
import threading
import time

from tests.support.couch_proxy import CouchProxy

BURST = 64  # more than the 48 requests the store's contract suite has in flight at once
TCP_ESTABLISHED = 1


def _tcp_state(sock: socket.socket) -> int:
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


def test_a_burst_of_connections_waits_in_the_listen_queue_while_nothing_accepts():
    proxy = CouchProxy("http://127.0.0.1:9")  # never reached: no request is sent
    proxy.come_up()
    server = proxy._server
    clients: list[socket.socket] = []
    try:
        server.shutdown()  # the accept loop stops; the socket still listens
        clients = []
        for _ in range(BURST):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", proxy.port))
            clients.append(sock)
        deadline = time.monotonic() + 3.0  # past the first SYN retransmission (1 s)
        while time.monotonic() < deadline:
            established = sum(_tcp_state(s) == TCP_ESTABLISHED for s in clients)
            if established == BURST:
                break
            time.sleep(0.05)
        assert established == BURST, f"{BURST - established} of {BURST} left waiting"
    finally:
        for sock in clients:
            sock.close()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        proxy.go_down()
