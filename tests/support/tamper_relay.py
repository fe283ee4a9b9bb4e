"""A relay that cheats, for tests: a forwarding proxy in front of a real `plugshare relay`.

Nodes are given the proxy's address with the real relay's id pinned, so their control
connections (TLS to the relay, end to end) pass through untouched. The session connections
(plain TCP to the relay, carrying the nodes' own end-to-end TLS after `Ready`) are where a
relay operator could cheat, and where this proxy does, as its mode file says at the start of
each session connection (changing the mode closes the sessions it carries, so the nodes
redial under the new one):

- `honest`: forward bytes as they are (the control case);
- `flip`: after pairing, flip one byte inside the first encrypted TLS record the node sends;
- `replay`: after pairing, send the first encrypted TLS record the node sends a second time;
- `redirect`: pair the session with another node than the one dialled: the proxy dials the
  node named by `--redirect-to` through the real relay itself and splices the two.

Each cheat done is one line in the events file (`flip`, `replay`, `redirect`), so a test
can wait until it happened. Run it (in the public namespace) with

    python -m tests.support.tamper_relay --listen HOST:PORT --upstream HOST:PORT \\
        --mode-file PATH --events PATH [--redirect-to NODE_ID]

`TamperRelay` starts it from a test and drives it.
"""

from __future__ import annotations

import argparse
import ssl
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import trio

from plugshare.relay.protocol import (ALPN_PROTOCOL, RELAY_VERSION, Challenge, Connect, Decoder,
                                      Ready, Session, SessionGranted, encode)

MODES = ("honest", "flip", "replay", "redirect")
_APPLICATION_DATA = 0x17  # TLS 1.3 sends everything after ServerHello as this record type
_CHUNK = 65536


class RecordTamper:
    """One direction of a paired session: whole TLS records in, possibly altered bytes out.
    Records are held until complete (as a TLS endpoint would), so a cheat hits one record."""

    def __init__(self, mode: str, log: callable):
        self.mode = mode
        self._log = log
        self._buffer = bytearray()
        self._encrypted_seen = 0

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while len(self._buffer) >= 5:
            length = int.from_bytes(self._buffer[3:5], "big")
            if len(self._buffer) < 5 + length:
                break
            record = bytearray(self._buffer[: 5 + length])
            del self._buffer[: 5 + length]
            out += self._cheat(record)
        return bytes(out)

    def _cheat(self, record: bytearray) -> bytes:
        if record[0] != _APPLICATION_DATA:
            return bytes(record)
        self._encrypted_seen += 1
        if self._encrypted_seen != 1:
            return bytes(record)
        if self.mode == "flip":
            record[5 + (len(record) - 5) // 2] ^= 0x01
            self._log("flip")
        elif self.mode == "replay":
            self._log("replay")
            return bytes(record) * 2
        return bytes(record)


class Proxy:
    def __init__(self, upstream: tuple[str, int], mode_file: Path, events: Path,
                 redirect_to: bytes | None):
        self.upstream = upstream
        self.mode_file = mode_file
        self.events = events
        self.redirect_to = redirect_to
        self._sessions: set[trio.CancelScope] = set()

    async def cut_sessions_on_mode_change(self) -> None:
        """A new mode applies to every session from then on: those it carries are closed
        (the nodes redial); control connections are left alone."""
        mode = self.mode()
        while True:
            await trio.sleep(0.1)
            if (now := self.mode()) != mode:
                mode = now
                self.log("cut", f"{len(self._sessions)} sessions, now {mode}")
                for scope in list(self._sessions):
                    scope.cancel()

    def log(self, event: str, detail: str = "") -> None:
        with open(self.events, "a") as out:
            out.write(f"{event} {time.strftime('%H:%M:%S')} {detail}\n")

    def mode(self) -> str:
        mode = self.mode_file.read_text().strip()
        return mode if mode in MODES else "honest"

    async def handle(self, client: trio.SocketStream) -> None:
        try:
            async with client:
                first = await client.receive_some(_CHUNK)
                if not first:
                    return
                upstream = await trio.open_tcp_stream(*self.upstream)
                async with upstream:
                    if first[0] != RELAY_VERSION:  # a control connection: TLS to the relay
                        await upstream.send_all(first)
                        await _splice(client, upstream, None, None)
                    else:
                        with trio.CancelScope() as scope:
                            self._sessions.add(scope)
                            try:
                                await self._session(client, upstream, first)
                            finally:
                                self._sessions.discard(scope)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # either side went away (also inside a nursery): so does this connection
        except* Exception:  # anything else ends this connection only, said on stderr
            traceback.print_exc()

    async def _session(self, client: trio.SocketStream, upstream: trio.SocketStream,
                       first: bytes) -> None:
        mode = self.mode()
        self.log("session", mode)
        from_client = Decoder()
        from_client.feed(first)
        while (session := from_client.next_message()) is None:
            from_client.feed(await _receive(client))
        assert isinstance(session, Session), session
        await upstream.send_all(encode(session))
        early = from_client.rest()  # link bytes sent before Ready (none expected)
        from_upstream = Decoder()
        while (answer := from_upstream.next_message()) is None:
            from_upstream.feed(await _receive(upstream))
        await client.send_all(encode(answer))
        if not isinstance(answer, Ready):
            return  # refused: the relay closes
        late = from_upstream.rest()  # the partner's first link bytes, if they came with Ready
        if mode == "redirect" and self.redirect_to is not None:
            # The half that speaks first (its ClientHello) is the one that dialled: give it
            # another node than the one it asked for, instead of its real partner.
            if not early and not late:
                early, late = await _first_to_speak(client, upstream)
            if early[:1] == b"\x16" and early[5:6] == b"\x01":
                other = await self._open_session(await self._dial(self.redirect_to))
                self.log("redirect")
                async with other:
                    await other.send_all(early)
                    await _splice(client, other, None, None)
                return
        # Only what the node sends into the relay: each byte of the link passes through two
        # halves when both nodes use this proxy, and two flips would cancel out.
        up = RecordTamper(mode if mode in ("flip", "replay") else "honest", self.log)
        down = RecordTamper("honest", self.log)
        if early:
            await upstream.send_all(up.feed(early))
        if late:
            await client.send_all(down.feed(late))
        await _splice(client, upstream, up, down)

    async def _open_session(self, key: bytes) -> trio.SocketStream:
        """A session connection to the real relay with `key`, once it answers Ready."""
        stream = await trio.open_tcp_stream(*self.upstream)
        await stream.send_all(encode(Session(session_key=key)))
        decoder = Decoder()
        while (answer := decoder.next_message()) is None:
            decoder.feed(await _receive(stream))
        if not isinstance(answer, Ready):
            await stream.aclose()
            raise OSError(f"the relay would not pair the redirected session: {answer}")
        if rest := decoder.rest():  # pragma: no cover - the dialled node speaks second
            raise OSError(f"{len(rest)} bytes came before the dialler spoke")
        return stream

    async def _dial(self, node_id: bytes) -> bytes:
        """Ask the real relay for a session with `node_id`, as any dialer may: its key."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # a cheat does not care who the relay is
        context.set_alpn_protocols([ALPN_PROTOCOL])
        stream = trio.SSLStream(await trio.open_tcp_stream(*self.upstream), context,
                                server_hostname="relay")
        async with stream:
            decoder = Decoder()
            while not isinstance(message := decoder.next_message(), Challenge):
                decoder.feed(await _receive(stream))
            await stream.send_all(encode(Connect(node_id=node_id)))
            while (message := decoder.next_message()) is None:
                decoder.feed(await _receive(stream))
            if not isinstance(message, SessionGranted):
                raise OSError(f"the relay would not dial the other node: {message}")
            return message.session_key


async def _first_to_speak(client, upstream) -> tuple[bytes, bytes]:
    """Whichever side sends first: (bytes from the client, b"") or (b"", bytes from upstream)."""
    heard: dict[str, bytes] = {}

    async def listen(name, stream, nursery):
        heard[name] = await _receive(stream)
        nursery.cancel_scope.cancel()  # a cancelled receive_some loses no bytes

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen, "client", client, nursery)
        nursery.start_soon(listen, "upstream", upstream, nursery)
    return heard.get("client", b""), heard.get("upstream", b"")


async def _receive(stream) -> bytes:
    data = await stream.receive_some(_CHUNK)
    if not data:
        raise trio.BrokenResourceError("closed")
    return data


async def _splice(client, upstream, up: RecordTamper | None, down: RecordTamper | None) -> None:
    async def pump(source, sink, tamper):
        try:
            while data := await source.receive_some(_CHUNK):
                await sink.send_all(tamper.feed(data) if tamper else data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        nursery.cancel_scope.cancel()  # one side closed: close both

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, client, upstream, up)
        nursery.start_soon(pump, upstream, client, down)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _serve(args: argparse.Namespace) -> None:
    from plugshare.token import parse_node_id

    redirect = parse_node_id(args.redirect_to) if args.redirect_to else None
    proxy = Proxy(_host_port(args.upstream), Path(args.mode_file), Path(args.events), redirect)
    host, port = _host_port(args.listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    print("listening", flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.cut_sessions_on_mode_change)
        await trio.serve_listeners(proxy.handle, listeners)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--mode-file", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--redirect-to")
    trio.run(_serve, parser.parse_args(argv))


class TamperRelay:
    """The proxy as a process in namespace `ns` (see the module docstring), from a test."""

    def __init__(self, workdir: Path, ns_prefix: Sequence[str], listen: tuple[str, int],
                 upstream: tuple[str, int], redirect_to: str | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.mode_file, self.events_file = workdir / "mode", workdir / "events"
        self.log_file = workdir / "log"  # its stderr
        self.mode_file.write_text("honest")
        self.events_file.write_text("")
        self.address = listen
        self._argv = [*ns_prefix, sys.executable, "-m", "tests.support.tamper_relay",
                      "--listen", f"{listen[0]}:{listen[1]}",
                      "--upstream", f"{upstream[0]}:{upstream[1]}",
                      "--mode-file", str(self.mode_file), "--events", str(self.events_file)]
        if redirect_to:
            self._argv += ["--redirect-to", redirect_to]
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Listen (again: a restart cuts every connection it carried)."""
        assert self.process is None, "already running"
        with open(self.log_file, "a") as log:
            self.process = subprocess.Popen(self._argv, stdout=subprocess.PIPE, stderr=log,
                                            text=True)
        line = self.process.stdout.readline()  # "listening", or nothing if it died
        if line.strip() != "listening":
            self.stop()
            raise RuntimeError(f"the tampering relay did not start: {self.log_file.read_text()}")

    def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode_file.write_text(mode)

    def count(self, event: str) -> int:
        """How many times it did `event` (a line each: event, time, detail)."""
        return [line.split(" ", 1)[0] for line in self.events_file.read_text().splitlines()].count(event)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process.stdout.close()
            self.process = None


if __name__ == "__main__":
    main()
