"""A fault-injecting HTTP proxy in front of a CouchDB-compatible server: what Apache CouchDB
(3.x, clustered) does that pouchdb-server does not, made to happen on demand in tests.

`running_couch_proxy(upstream_url)` listens on a free loopback port (real sockets, one thread
per connection, HTTP/1.1 keep-alive) and relays every request to `upstream_url`. Each fault
below is off until a test turns it on, and most are counted (`n` next requests) so a test
says exactly what happens; a negative count means every other time, for as long as it runs:

- `writes_below_quorum = n`: the next n answers `201 Created` become `202 Accepted` (the
  write happened, but a cluster would say it is not yet on a write quorum of nodes);
- `opaque_seqs = True`: every seq in `_changes` answers and the database's `update_seq` is
  handed out as a fresh string (`<seq>-<nonce>`), so two reads of the same state differ;
  they are mapped back when the client sends them as `since`;
- `replay_changes = n`: the next n `_changes` reads from a seq restart one update earlier
  (a cluster node that resumes a feed it cannot place exactly sends rows already seen:
  delivery is at-least-once). Only for servers whose seqs are integers (pouchdb-server);
- `revs_diff_lies = n`: the next n `_revs_diff` answers report every revision asked for
  as missing (a node that has not seen a write made on another one);
- `cut_longpolls = n`: the next n longpoll `_changes` requests get their answer's status and
  headers, then a connection reset (the server restarted mid-feed);
- `cut_writes = n`: the next n document writes reach the server, and then the connection is
  reset instead of answered (a node that failed between doing a write and saying so);
- `server_errors = n`: the next n requests are answered `503` without reaching the server
  (a node that is up but cannot serve, e.g. lost its quorum);
- `endless_answers = n`: the next n requests for a document (`GET /db/id`) are answered
  `200` with a JSON body that never ends (streamed until the client hangs up): a server, or
  whoever sits before it, that would make the client hold any amount of memory;
- `refuse_shards = n`: the next n database creations with `?q=` are refused with `400`
  (a server that is not a CouchDB cluster and does not know the parameter);
- `go_down()` / `come_up()`: stop listening and reset every open connection (a node that
  went away: connections are refused), then listen again on the same port.

`requests` records `(method, path with query)` of every request relayed, for tests that check
what the client sent. Two proxies in front of one server model two nodes of one cluster.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "te", "trailer", "upgrade", "proxy-connection"}
UPSTREAM_TIMEOUT = 120.0


class CouchProxy:
    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port or 80)
        self.upstream_prefix = parts.path.rstrip("/")
        self._auth = None
        if parts.username is not None:
            import base64
            from urllib.parse import unquote

            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._auth = "Basic " + base64.b64encode(pair).decode()
        self.lock = threading.Lock()
        self.writes_below_quorum = 0
        self.opaque_seqs = False
        self.replay_changes = 0
        self.revs_diff_lies = 0
        self.cut_longpolls = 0
        self.server_errors = 0
        self.cut_writes = 0
        self.refuse_shards = 0
        self.endless_answers = 0
        self.requests: list[tuple[str, str]] = []
        self._seqs: dict[str, object] = {}  # seq handed out -> the server's own
        self._connections: set[socket.socket] = set()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life cycle ---------------------------------------------------------------------

    def come_up(self) -> None:
        proxy = self

        class Handler(_Handler):
            pass

        Handler.proxy = proxy
        server = _QuietServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def go_down(self) -> None:
        """Stop listening (new connections are refused) and reset every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self.lock:
            connections, self._connections = set(self._connections), set()
        for sock in connections:
            _reset(sock)

    # -- the faults, applied by the handler ---------------------------------------------

    def take(self, fault: str) -> bool:
        """Use one occurrence of a counted fault; False when it is off."""
        with self.lock:
            left = getattr(self, fault)
            if left < 0:  # every other time: -1 applies it and arms -2, which skips it
                setattr(self, fault, -2 if left == -1 else -1)
                return left == -1
            if left == 0:
                return False
            setattr(self, fault, left - 1)
            return True

    def hand_out(self, seq: object) -> object:
        if not self.opaque_seqs or seq is None:
            return seq
        token = f"{seq}-{uuid.uuid4().hex[:12]}"
        with self.lock:
            self._seqs[token] = seq
        return token

    def server_seq(self, since: str) -> str:
        with self.lock:
            real = self._seqs.get(since)
        if real is None:
            return since
        return real if isinstance(real, str) else json.dumps(real)


class _QuietServer(http.server.ThreadingHTTPServer):
    # A CouchDB node listens with a queue of 128 or more, the socketserver default is 5: a
    # store opening 48 connections at once on a busy machine then met resets (syncookies).
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:
        pass  # a client gone mid-answer (a cancelled longpoll, a cut): nothing to report


def _reset(sock: socket.socket) -> None:
    """Cut a connection, as a crashed server's kernel would (RST once the socket is closed).
    `shutdown` first: a socket its handler thread still reads is not closed by `close()`."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    proxy: CouchProxy
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.proxy.lock:
            self.proxy._connections.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.proxy.lock:
            self.proxy._connections.discard(self.connection)

    def log_message(self, format, *args) -> None:  # noqa: A002  (quiet)
        pass

    def do_GET(self):
        self._relay()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_COPY = do_GET

    def _relay(self) -> None:
        proxy = self.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        parts = urlsplit(self.path)
        params = parse_qsl(parts.query, keep_blank_values=True)
        with proxy.lock:
            proxy.requests.append((self.command, self.path))
        if proxy.take("server_errors"):
            return self._refuse(503, "internal_server_error", "the node cannot serve now")
        segments = [s for s in parts.path.split("/") if s]
        if (self.command == "GET" and len(segments) == 2 and not segments[1].startswith("_")
                and proxy.take("endless_answers")):
            return self._endless()
        if (self.command == "PUT" and any(k == "q" for k, _ in params)
                and proxy.take("refuse_shards")):
            return self._refuse(400, "bad_request", "unknown parameter q")
        is_changes = parts.path.endswith("/_changes")
        longpoll = is_changes and ("feed", "longpoll") in params
        if is_changes:
            params = [(k, proxy.server_seq(v) if k == "since" else v) for k, v in params]
            since = dict(params).get("since", "0")
            if (not longpoll and since.isdigit() and int(since) > 0
                    and proxy.take("replay_changes")):
                params = [(k, str(int(v) - 1) if k == "since" else v) for k, v in params]
        path = proxy.upstream_prefix + parts.path + ("?" + urlencode(params) if params else "")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if proxy._auth and "Authorization" not in headers:
            headers["Authorization"] = proxy._auth
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            upstream.request(self.command, path, body=body, headers=headers)
            response = upstream.getresponse()
            if _is_write(self.command, parts.path) and proxy.take("cut_writes"):
                response.read()
                self.close_connection = True
                _reset(self.connection)
            elif longpoll:
                self._stream(response, cut=proxy.take("cut_longpolls"))
            else:
                self._answer(parts.path, body, response)
        finally:
            upstream.close()

    def _refuse(self, status: int, error: str, reason: str) -> None:
        content = json.dumps({"error": error, "reason": reason}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def _endless(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = b"a" * 65536
        self.wfile.write(b'%x\r\n{"_id":"x","pad":"\r\n' % len(b'{"_id":"x","pad":"'))
        with contextlib.suppress(OSError):  # until the client hangs up
            while True:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.close_connection = True

    def _send_head(self, status: int, response: http.client.HTTPResponse, extra: dict) -> None:
        self.send_response(status)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP and key.lower() != "date" \
                    and key.lower() != "server":
                self.send_header(key, value)
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()

    def _stream(self, response: http.client.HTTPResponse, *, cut: bool) -> None:
        self._send_head(response.status, response, {"Transfer-Encoding": "chunked"})
        self.wfile.flush()
        if cut:
            self.close_connection = True
            _reset(self.connection)
            return
        while True:
            piece = response.read1(65536)
            if not piece:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _answer(self, path: str, request_body: bytes | None,
                response: http.client.HTTPResponse) -> None:
        proxy = self.proxy
        content = response.read()
        status = response.status
        if status in (200, 201) and _is_write(self.command, path) \
                and proxy.take("writes_below_quorum"):
            status = 202
        if status == 200 and proxy.opaque_seqs:
            content = self._opaque(path, content)
        if status == 200 and path.endswith("/_revs_diff") and request_body \
                and proxy.take("revs_diff_lies"):
            asked = json.loads(request_body)
            content = json.dumps(
                {doc_id: {"missing": revs} for doc_id, revs in asked.items() if revs}
            ).encode()
        self._send_head(status, response, {"Content-Length": str(len(content))})
        if self.command != "HEAD":
            self.wfile.write(content)

    def _opaque(self, path: str, content: bytes) -> bytes:
        proxy = self.proxy
        segments = [s for s in path.split("/") if s]
        try:
            data = json.loads(content)
        except ValueError:
            return content
        if path.endswith("/_changes") and isinstance(data, dict):
            for row in data.get("results", ()):
                row["seq"] = proxy.hand_out(row.get("seq"))
            data["last_seq"] = proxy.hand_out(data.get("last_seq"))
        elif len(segments) == 1 and isinstance(data, dict) and "update_seq" in data:
            data["update_seq"] = proxy.hand_out(data["update_seq"])
        else:
            return content
        return json.dumps(data).encode()


def _is_write(method: str, path: str) -> bool:
    """A request that writes documents (what a cluster answers 202 below quorum)."""
    segments = [s for s in path.split("/") if s]
    if method == "POST":
        return segments[-1:] == ["_bulk_docs"]
    return method in ("PUT", "DELETE") and len(segments) >= 2 and segments[1] != "_revs_limit"


@contextlib.contextmanager
def running_couch_proxy(upstream_url: str) -> Iterator[CouchProxy]:
    proxy = CouchProxy(upstream_url)
    proxy.come_up()
    try:
        yield proxy
    finally:
        proxy.go_down()
