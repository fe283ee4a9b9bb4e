"""The local API's HTTP server (plugshare/node/http_server.py) over real loopback sockets,
driven byte by byte: keep-alive and pipelining, every bound a client could stretch (idle,
slow headers, huge headers, a stalled body, connections at once), 100-continue, a client
that leaves a live answer, an answer given before its body was read, and shutdown."""

from __future__ import annotations

import contextlib
import json
import socket

import pytest
import trio

from plugshare.node import http_server


async def echo_app(scope, receive, send):
    """Answers each request with its method, path and body; /boom fails, /nothing answers
    nothing, /early answers without reading the body."""
    if scope["path"] == "/boom":
        raise RuntimeError("the app failed")
    if scope["path"] == "/nothing":
        return
    body = b""
    if scope["path"] != "/early":
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
    text = f"{scope['method']} {scope['path']} {len(body)}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})


def held_until(release: trio.Event):
    """`echo_app`, but /slow waits for `release` before it answers."""

    async def slow(scope, receive, send):
        if scope["path"] == "/slow":
            await release.wait()
        await echo_app(scope, receive, send)

    return slow


@contextlib.asynccontextmanager
async def running(app, **limits):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: http_server.serve(
            app, sock, limits=http_server.Limits(**limits), shutdown_trigger=stop.wait,
            task_status=task_status))
        try:
            yield port, stop
        finally:
            stop.set()


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def read_until_closed(stream: trio.SocketStream, limit: float = 5.0) -> bytes:
    data = b""
    with trio.fail_after(limit):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def read_answer(stream: trio.SocketStream) -> bytes:
    """One answer with a Content-Length (enough for these tests)."""
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


async def test_a_connection_is_kept_and_pipelined_requests_are_answered_in_order():
    async with running(echo_app) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(stream)).endswith(b"GET /one 0")
        await stream.send_all(b"PUT /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                              b"GET /three HTTP/1.1\r\nHost: x\r\n\r\n")
        both = b""
        with trio.fail_after(5):
            while not both.endswith(b"GET /three 0"):
                both += await stream.receive_some(65536)
        first, second = both.split(b"HTTP/1.1 200 OK\r\n")[1:]
        assert first.endswith(b"PUT /two 3") and second.endswith(b"GET /three 0")
        assert b"\r\ndate: " in second.lower()


async def test_an_idle_connection_is_closed_after_the_keep_alive_delay():
    async with running(echo_app, keep_alive=0.3) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_answer(stream)
        with trio.fail_after(3):
            assert await stream.receive_some(100) == b""


async def test_headers_that_trickle_in_are_answered_408_and_the_connection_closed():
    async with running(echo_app, header_timeout=0.3) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        answer = await read_until_closed(stream)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        silent = await connect(port)  # a new connection owes its first request as soon
        assert (await read_until_closed(silent, limit=3)).startswith(b"HTTP/1.1 408 ")


async def test_headers_over_the_cap_get_431_and_bad_requests_400_and_others_are_served():
    async with running(echo_app, max_header_bytes=4096) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
        assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 431 ")
        stream = await connect(port)
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        answer = await read_until_closed(stream)
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "bad_request"
        stream = await connect(port)
        await stream.send_all(b"GET /%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n")  # not UTF-8: replaced
        assert (await read_answer(stream)).startswith(b"HTTP/1.1 200 ")


async def test_a_client_waiting_for_100_continue_gets_it_when_the_app_reads_the_body():
    async with running(echo_app) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                              b"Expect: 100-continue\r\n\r\n")
        with trio.fail_after(5):
            interim = await stream.receive_some(100)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        await stream.send_all(b"hello")
        assert (await read_answer(stream)).endswith(b"PUT /up 5")


async def test_a_live_answer_learns_that_its_client_has_gone():
    ended = trio.Event()

    async def live(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass  # the (empty) body, if the answer's start has not read it
        ended.set()

    async with running(live) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            assert b"first" in await stream.receive_some(1000)  # chunked, under way
        await stream.aclose()
        with trio.fail_after(5):
            await ended.wait()


async def test_a_body_that_stalls_ends_as_a_disconnect_for_the_app():
    seen = []

    async def reader(scope, receive, send):
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break

    async with running(reader, body_idle=0.3) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
        await read_until_closed(stream)
    assert seen == ["http.request", "http.disconnect"]


async def test_an_app_that_fails_or_answers_nothing_gives_500_and_the_server_goes_on():
    async with running(echo_app) as (port, _):
        for path in (b"/boom", b"/nothing"):
            stream = await connect(port)
            await stream.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 500 ")
        stream = await connect(port)
        await stream.send_all(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(stream)).endswith(b"GET /fine 0")


async def test_an_answer_given_before_its_body_was_read_arrives_whole_then_the_close():
    """Closing with a body still coming would make the kernel reset the connection, which
    can destroy the answer before the client reads it: the server half-closes and drops
    what comes for a moment first."""
    async with running(echo_app) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"PUT /early HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n")

        async def upload():
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for _ in range(40):
                    await stream.send_all(b"x" * 100_000)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            answer = await read_until_closed(stream)
            nursery.cancel_scope.cancel()
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"PUT /early 0"), answer


async def test_head_sends_the_headers_of_get_and_no_body():
    async with running(echo_app) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /g HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            data = b""
            while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"GET /g 0"):
                data += await stream.receive_some(65536)
        head_answer, _, get_answer = data.partition(b"\r\n\r\n")
        assert b"content-length: 9" in head_answer.lower()  # "HEAD /h 0", unsent
        assert get_answer.startswith(b"HTTP/1.1 200 ")


async def test_connections_beyond_the_cap_wait_their_turn():
    release = trio.Event()
    slow = held_until(release)

    async with running(slow, max_connections=2) as (port, _):
        first, second, third = [await connect(port) for _ in range(3)]
        for stream in (first, second):
            await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(0.2)
        await third.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.move_on_after(0.5) as waited:
            await third.receive_some(100)
        assert waited.cancelled_caught  # not served while two requests are in flight
        release.set()
        assert (await read_answer(third)).endswith(b"GET / 0")


async def test_at_the_cap_the_oldest_idle_connection_makes_room():
    """Idle keep-alive connections must not lock others out: at the cap, the one idle the
    longest is closed (a client reconnects; a request in flight is never cut)."""
    async with running(echo_app, max_connections=2) as (port, _):
        oldest, newer = await connect(port), await connect(port)
        for stream in (oldest, newer):
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_answer(stream)
        third = await connect(port)
        await third.send_all(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(third)).endswith(b"GET /third 0")
        with trio.fail_after(3):
            assert await oldest.receive_some(100) == b""


async def test_shutdown_finishes_the_request_in_flight_and_closes_idle_connections():
    release = trio.Event()
    slow = held_until(release)

    async with running(slow, graceful=5.0) as (port, stop):
        idle = await connect(port)
        await idle.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_answer(idle)
        busy = await connect(port)
        await busy.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        fresh = await connect(port)  # connected, nothing sent yet
        await trio.sleep(0.1)
        stop.set()
        with trio.fail_after(3):
            assert await idle.receive_some(100) == b""  # closed at once
            assert await fresh.receive_some(100) == b""  # and so is this one
        with pytest.raises(OSError):
            await connect(port)  # no longer listening
        release.set()
        answer = await read_until_closed(busy)
        assert answer.endswith(b"GET /slow 0") and b"connection: close" in answer.lower()


async def test_a_chunked_body_that_also_claims_a_small_length_is_not_read_to_its_end():
    """With both headers h11 follows the chunks: a body declared small by its
    Content-Length but chunked without end is not read and dropped for ever."""
    async with running(echo_app) as (port, _):
        stream = await connect(port)
        await stream.send_all(b"PUT /early HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                              b"Content-Length: 5\r\n\r\n")

        async def chunks_without_end():
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:
                    await stream.send_all(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
                    await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(chunks_without_end)
            answer = await read_until_closed(stream)
            nursery.cancel_scope.cancel()
        assert answer.endswith(b"PUT /early 0") and b"connection: close" in answer.lower()
