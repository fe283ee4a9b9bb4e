"""The token transport over a real Unix socket: server, client and supervisor, with the
stand-in dispatcher of tests/token/echo_token.py (in this process, or as a child process)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from plugshare.errors import PlugshareError
from plugshare.token import errors as token_errors
from plugshare.token.client import TokenClient
from plugshare.token.server import is_dumpable, serve
from plugshare.token.supervisor import TokenProcess
from plugshare.token.wire import (
    ERROR_KINDS,
    CommandError,
    Decoder,
    Response,
    TokenUnavailable,
    WireError,
    encode_request,
)

from tests.token.echo_token import EchoDispatcher

ECHO = "tests.token.echo_token"
NOBODY = 65534


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte limit of a Unix socket path.
    directory = tempfile.mkdtemp(prefix="tok-", dir="/tmp")
    try:
        yield Path(directory) / "token.sock"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def serving(path: Path, **options) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(path, EchoDispatcher(), task_status=task_status, **options))
        yield nursery
        nursery.cancel_scope.cancel()


def raw_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return trio.socket.from_stdlib_socket(sock)


async def read_until_eof(sock) -> bytes:
    """Everything the server sends before hanging up (a reset counts as hanging up: it is what
    closing a socket with unread input does)."""
    data = b""
    with trio.fail_after(5):
        try:
            while chunk := await sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def answers(data: bytes) -> list[Response]:
    decoder = Decoder("response")
    decoder.feed(data)
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


# --- in-process server -------------------------------------------------------------------


async def test_round_trip(sock_path: Path) -> None:
    async with serving(sock_path), TokenClient.open(sock_path) as client:
        assert await client.call("noop") is None
        assert await client.call("echo", a=1, b=b"\x00", c=["x", {"d": None}]) == {
            "a": 1, "b": b"\x00", "c": ["x", {"d": None}]}


async def test_concurrent_calls_get_their_own_answers(sock_path: Path) -> None:
    results: dict[tuple[int, int], object] = {}

    async def worker(client: TokenClient, task: int) -> None:
        for i in range(25):
            results[task, i] = await client.call("echo", task=task, i=i, pad="x" * (task * i))

    async with serving(sock_path), TokenClient.open(sock_path) as client:
        async with trio.open_nursery() as nursery:
            for task in range(40):
                nursery.start_soon(worker, client, task)
    assert len(results) == 40 * 25
    for (task, i), result in results.items():
        assert result == {"task": task, "i": i, "pad": "x" * (task * i)}


@pytest.mark.parametrize("kind", sorted(k for k in ERROR_KINDS if k not in ("internal", "bad_request")))
async def test_refusals_come_back_as_their_class(sock_path: Path, kind: str) -> None:
    async with serving(sock_path), TokenClient.open(sock_path) as client:
        with pytest.raises(ERROR_KINDS[kind]) as caught:
            await client.call("raise", kind=kind, reason=f"because {kind}")
        assert type(caught.value) is ERROR_KINDS[kind]
        assert str(caught.value) == f"because {kind}"
        assert await client.call("noop") is None  # the connection survives a refusal


async def test_access_denied_and_not_found(sock_path: Path) -> None:
    async with serving(sock_path), TokenClient.open(sock_path) as client:
        with pytest.raises(token_errors.AccessDenied, match="app x may not"):
            await client.call("raise", kind="access_denied", reason="app x may not")
        with pytest.raises(token_errors.InvalidArgument, match="unknown command 'nope'"):
            await client.call("nope")


async def test_unexpected_exception_is_internal_and_leaks_nothing(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="plugshare.token.server")
    async with serving(sock_path), TokenClient.open(sock_path) as client:
        with pytest.raises(CommandError) as caught:
            await client.call("crash", detail="hunter2")
        assert "hunter2" not in str(caught.value) and "secret" not in str(caught.value)
        with pytest.raises(CommandError):
            await client.call("unpackable")  # a result msgpack cannot carry
        assert await client.call("noop") is None
    assert "hunter2" in caplog.text and "Traceback" in caplog.text  # in the token's log only


async def test_garbage_from_one_client_does_not_affect_another(sock_path: Path) -> None:
    async with serving(sock_path), TokenClient.open(sock_path) as client:
        assert await client.call("echo", n=1) == {"n": 1}
        for garbage in (b"\x00\x00\x00\x02\xc1\xc1", b"\xff\xff\xff\xff", b"\x00\x00\x00\x03\x93\x01\x02\x03"):
            bad = raw_connect(sock_path)
            await bad.send(garbage)
            [answer] = answers(await read_until_eof(bad))  # one answer, then hung up on
            assert answer.id == 0 and answer.kind == "bad_request" and answer.reason
            bad.close()
            assert await client.call("echo", n=2) == {"n": 2}


async def test_valid_requests_before_garbage_are_answered(sock_path: Path) -> None:
    async with serving(sock_path):
        sock = raw_connect(sock_path)
        await sock.send(encode_request(1, "echo", {"a": 1}) + encode_request(2, "noop", {}) + b"\x00\x00\x00\x00")
        got = answers(await read_until_eof(sock))
        assert [(a.id, a.ok, a.kind) for a in got] == [(1, True, None), (2, True, None), (0, False, "bad_request")]


async def test_pipelined_requests_are_answered_in_order(sock_path: Path) -> None:
    async with serving(sock_path):
        sock = raw_connect(sock_path)
        batch = b"".join(encode_request(i, "big", {"size": 200_000}) for i in range(1, 21))
        await sock.send(batch)  # 20 answers of 200 kB each: sent in several flushes
        decoder, got = Decoder("response"), []
        with trio.fail_after(10):
            while len(got) < 20:
                decoder.feed(await sock.recv(1 << 20))
                while (answer := decoder.next_message()) is not None:
                    got.append(answer)
        assert [a.id for a in got] == list(range(1, 21))
        assert all(a.result == b"x" * 200_000 for a in got)
        sock.close()


async def test_slow_byte_by_byte_client_does_not_block_others(sock_path: Path) -> None:
    async with serving(sock_path), TokenClient.open(sock_path) as client:
        slow = raw_connect(sock_path)
        frame = encode_request(9, "echo", {"slow": True})
        for i, byte in enumerate(frame):
            await slow.send(bytes([byte]))
            assert await client.call("echo", i=i) == {"i": i}
        with trio.fail_after(5):
            [answer] = answers(await slow.recv(65536))
        assert answer == Response(9, True, {"slow": True})
        slow.close()


async def test_oversized_request_is_refused(sock_path: Path) -> None:
    async with serving(sock_path, max_frame=1000), TokenClient.open(sock_path) as client:
        with pytest.raises(TokenUnavailable, match="over the cap of 1000"):
            await client.call("echo", blob=b"x" * 2000)
        assert await client.call("noop") is None  # reconnected


async def test_connection_limit(sock_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(sock_path, max_connections=2):
        async with TokenClient.open(sock_path) as one, TokenClient.open(sock_path) as two:
            assert await one.call("noop") is None and await two.call("noop") is None
            extra = raw_connect(sock_path)
            await extra.send(encode_request(1, "noop", {}))
            assert await read_until_eof(extra) == b""  # closed at once, never answered
            extra.close()
        assert "already 2 connections" in caplog.text
        async with TokenClient.open(sock_path) as three:  # slots are freed on close
            assert await three.call("noop") is None


async def test_socket_file_is_0600_and_removed_on_exit(sock_path: Path) -> None:
    async with serving(sock_path):
        mode = os.lstat(sock_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert not sock_path.exists()


async def test_stale_socket_is_replaced(sock_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nobody listens: what a killed token leaves behind
    async with serving(sock_path), TokenClient.open(sock_path) as client:
        assert await client.call("noop") is None


async def test_refuses_a_path_that_is_not_a_socket(sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(PlugshareError, match="is not a socket"):
        await serve(sock_path, EchoDispatcher())
    assert sock_path.read_text() == "precious"


async def test_refuses_to_steal_a_live_socket(sock_path: Path) -> None:
    async with serving(sock_path):
        with pytest.raises(PlugshareError, match="already serving"):
            await serve(sock_path, EchoDispatcher())


async def test_refuses_a_too_long_path() -> None:
    with pytest.raises(PlugshareError, match="longer than 107 bytes"):
        await serve("/tmp/" + "x" * 120, EchoDispatcher())


NOBODY_PROBE = """
import os, socket, sys
os.setuid(int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("permission denied"); sys.exit()
try:
    s.sendall(bytes.fromhex(sys.argv[3]))
    print("answered" if s.recv(65536) else "closed")
except (BrokenPipeError, ConnectionResetError):
    print("closed")
"""


async def nobody_probe(path: Path) -> str:
    frame = encode_request(1, "noop", {}).hex()
    result = await trio.run_process([sys.executable, "-c", NOBODY_PROBE, str(path), str(NOBODY), frame],
                                    capture_stdout=True)
    return result.stdout.decode().strip()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a probe as another uid")
async def test_other_uid_is_refused(sock_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.chmod(sock_path.parent, 0o755)
    async with serving(sock_path):
        assert await nobody_probe(sock_path) == "permission denied"  # the 0600 file mode
        os.chmod(sock_path, 0o666)  # were the mode lost, SO_PEERCRED still says no
        assert await nobody_probe(sock_path) == "closed"
        async with TokenClient.open(sock_path) as client:  # and our uid still gets in
            assert await client.call("noop") is None
    assert f"running as uid {NOBODY}" in caplog.text


async def test_client_without_server_raises_unavailable(sock_path: Path) -> None:
    with pytest.raises(TokenUnavailable, match="cannot reach the token process"):
        async with TokenClient.open(sock_path):
            pass


async def test_server_restart_is_picked_up(sock_path: Path) -> None:
    async with trio.open_nursery() as outer:
        server_scope = trio.CancelScope()

        async def run_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with server_scope:
                await serve(sock_path, EchoDispatcher(), task_status=task_status)

        await outer.start(run_server)
        async with TokenClient.open(sock_path) as client:
            assert await client.call("noop") is None
            server_scope.cancel()
            await trio.sleep(0.05)
            with pytest.raises(TokenUnavailable):
                await client.call("noop")
            with pytest.raises(TokenUnavailable, match="cannot reach"):
                await client.call("noop")  # the reconnect fails too: nobody listens
            async with serving(sock_path):
                assert await client.call("echo", back=True) == {"back": True}


async def test_closed_client_raises_unavailable(sock_path: Path) -> None:
    async with serving(sock_path):
        async with TokenClient.open(sock_path) as client:
            assert await client.call("noop") is None
        with pytest.raises(TokenUnavailable, match="closed"):
            await client.call("noop")


async def test_connect_into_a_nursery_of_ones_own(sock_path: Path) -> None:
    async with serving(sock_path), trio.open_nursery() as nursery:
        async with await TokenClient.connect(sock_path, nursery) as client:
            assert await client.call("echo", x=1) == {"x": 1}
        assert not client.connected  # and its reader task has ended, so the nursery can exit


async def test_encoding_refusal_does_not_break_the_connection(sock_path: Path) -> None:
    async with serving(sock_path), TokenClient.open(sock_path) as client:
        with pytest.raises(WireError):
            await client.call("echo", bad={1, 2})
        assert await client.call("noop") is None


def test_this_process_is_dumpable() -> None:
    assert is_dumpable()  # pytest itself is not hardened: the control for the child tests


# --- the token as a child process --------------------------------------------------------


def echo_process(path: Path, *extra: str, **options) -> TokenProcess:
    return TokenProcess(["--socket", str(path), *extra], path, module=ECHO, **options)


async def test_supervisor_starts_a_hardened_child(sock_path: Path) -> None:
    async with echo_process(sock_path).run() as proc, TokenClient.open(sock_path) as client:
        assert proc.pid is not None and proc.pid != os.getpid()
        assert await client.call("pid") == proc.pid
        assert await client.call("is_dumpable") is False
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        assert [line.split()[-3:] for line in limits.splitlines() if line.startswith("Max core file size")] == [
            ["0", "0", "bytes"]]
        assert proc.restarts == 0
        pid = proc.pid
    assert proc.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_unhardened_child_is_dumpable(sock_path: Path) -> None:
    async with echo_process(sock_path, "--no-harden").run(), TokenClient.open(sock_path) as client:
        assert await client.call("is_dumpable") is True


MEM_PROBE = """
import os, sys
os.setuid(int(sys.argv[2]))
try:
    os.close(os.open(f"/proc/{sys.argv[1]}/mem", os.O_RDONLY))
    print("opened")
except PermissionError:
    print("denied")
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the child and the probe as another uid")
@pytest.mark.parametrize("harden", [True, False], ids=["hardened", "control"])
async def test_same_uid_cannot_read_a_hardened_childs_memory(sock_path: Path, harden: bool) -> None:
    os.chmod(sock_path.parent, 0o777)
    extra = ["--as-uid", str(NOBODY)] + ([] if harden else ["--no-harden"])
    async with echo_process(sock_path, *extra).run() as proc:
        probe = await trio.run_process([sys.executable, "-c", MEM_PROBE, str(proc.pid), str(NOBODY)],
                                       capture_stdout=True)
    assert probe.stdout.decode().strip() == ("denied" if harden else "opened")


async def test_restarts_back_off(sock_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="plugshare.token.supervisor")
    async with echo_process(sock_path, "--exit-after", "0.01").run() as proc:
        with trio.fail_after(20):
            while proc.restarts < 3:
                await trio.sleep(0.05)
    delays = [r.args[2] for r in caplog.records if r.msg.startswith("token process pid %d exited")]
    assert delays[:3] == [0.1, 0.2, 0.4]


async def test_killed_child_fails_pending_calls_and_is_restarted(sock_path: Path) -> None:
    async with echo_process(sock_path).run() as proc, TokenClient.open(sock_path) as client:
        first_pid = proc.pid
        failures: list[BaseException] = []

        async def pending_call() -> None:
            try:
                await client.call("sleep", seconds=30)
            except TokenUnavailable as error:
                failures.append(error)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(pending_call)
            await trio.sleep(0.2)  # all five are waiting on the token
            os.kill(first_pid, signal.SIGKILL)
        assert len(failures) == 5

        with trio.fail_after(10):
            while True:  # the restart takes a moment; calls meanwhile say unavailable
                try:
                    new_pid = await client.call("pid")
                    break
                except TokenUnavailable:
                    await trio.sleep(0.05)
        assert new_pid == proc.pid != first_pid
        assert proc.restarts == 1
        assert await client.call("echo", again=1) == {"again": 1}


async def test_cancelled_call_does_not_break_the_connection(sock_path: Path) -> None:
    async with echo_process(sock_path).run(), TokenClient.open(sock_path) as client:
        with trio.move_on_after(0.1) as scope:
            await client.call("sleep", seconds=0.4)
        assert scope.cancelled_caught
        assert await client.call("echo", after=1) == {"after": 1}  # the late answer is dropped
        assert client.connected


async def test_child_that_fails_to_start(sock_path: Path) -> None:
    with pytest.raises(TokenUnavailable, match="exited before it was ready") as caught:
        async with echo_process(sock_path, "--fail", "no keystore at /nowhere").run():
            pass
    assert "no keystore at /nowhere" in str(caught.value)
    assert "exit status 2" in str(caught.value)


async def test_child_that_never_gets_ready(sock_path: Path) -> None:
    # Long enough for the child to start Python, import trio and say so on a loaded machine
    # (1 s was not, under a load average of 16 on 2 cores): the timeout is waited out whole.
    with pytest.raises(TokenUnavailable, match="not ready after 5.0 s") as caught:
        async with echo_process(sock_path, "--hang", ready_timeout=5.0).run():
            pass
    assert "starting, slowly" in str(caught.value)


async def test_child_ignoring_sigterm_is_killed(sock_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="plugshare.token.supervisor")
    async with echo_process(sock_path, "--ignore-term", stop_timeout=0.5).run() as proc:
        pid = proc.pid
    assert "ignored SIGTERM" in caplog.text
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)



async def test_no_answer_leaves_before_its_decision_is_settled(sock_path: Path) -> None:
    """A decision's audit entry is durable before the answer it justifies leaves the token:
    however requests are grouped (pipelined on two connections here), an answer arrives
    only after a settle covering its decision (the token process writes the last settled
    decision to a file, durably, and the test reads it on each answer)."""
    settle_file = sock_path.parent / "settled"
    early: list[tuple[int, int]] = []

    def settled() -> int:
        text = settle_file.read_text().strip() if settle_file.exists() else ""
        return int(text or 0)

    async def caller(client: TokenClient, calls: int) -> None:
        for _ in range(calls):
            decision = (await client.call("decide"))["decision"]
            if settled() < decision:
                early.append((decision, settled()))

    async with echo_process(sock_path, "--settle-file", str(settle_file)).run():
        async with TokenClient.open(sock_path) as one, TokenClient.open(sock_path) as two:
            async with trio.open_nursery() as callers:
                for client in (one, two) * 4:
                    callers.start_soon(caller, client, 50)
    assert early == [], f"{len(early)} of 400 answers arrived before their settle: {early[:5]}"
