"""Token transport benchmark (a script, not a test): python bench/token_wire.py [--calls N]

Runs the stand-in token (tests/token/echo_token.py, hardened, real `serve`) as a child process
under `TokenProcess`, connects one `TokenClient`, and measures:
  - round-trip latency p50/p99 of a no-op command, one call at a time (goal p50 <= 100 us);
  - the same with a 1 KiB argument echoed back;
  - throughput with 8 tasks calling concurrently over the one connection;
  - for reference, the codec alone (encode + decode of request and answer, no I/O).
"""

from __future__ import annotations

import os.path
import sys

# bench/token.py is named like the standard library's `token` module (imported by inspect,
# which trio imports); drop this directory from the import path before anything else.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import trio  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)  # the child runs `python -m tests.token.echo_token` from here

from plugshare.token.client import TokenClient  # noqa: E402
from plugshare.token.supervisor import TokenProcess  # noqa: E402
from plugshare.token.wire import Decoder, encode_request, encode_result  # noqa: E402


def percentiles(samples_ns: list[int]) -> tuple[float, float, float]:
    ordered = sorted(samples_ns)
    p50 = ordered[len(ordered) // 2] / 1000
    p99 = ordered[int(len(ordered) * 0.99)] / 1000
    return p50, p99, statistics.fmean(ordered) / 1000


async def latency(client: TokenClient, calls: int, **args: object) -> tuple[float, float, float]:
    cmd = "echo" if args else "noop"
    for _ in range(min(1000, calls)):  # warm up
        await client.call(cmd, **args)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        await client.call(cmd, **args)
        samples.append(clock() - start)
    return percentiles(samples)


async def throughput(client: TokenClient, tasks: int, calls: int) -> float:
    per_task = calls // tasks

    async def worker() -> None:
        for _ in range(per_task):
            await client.call("noop")

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)
    return per_task * tasks / (time.perf_counter() - start)


def codec_us(n: int = 20000) -> float:
    server, client = Decoder("request"), Decoder("response")
    start = time.perf_counter()
    for i in range(1, n + 1):
        server.feed(encode_request(i, "noop", {}))
        request = server.next_message()
        client.feed(encode_result(request.id, None))
        client.next_message()
    return (time.perf_counter() - start) / n * 1e6


async def main(calls: int) -> None:
    directory = tempfile.mkdtemp(prefix="tokbench-", dir="/tmp")
    path = Path(directory) / "token.sock"
    try:
        async with TokenProcess(["--socket", str(path)], path, module="tests.token.echo_token").run(), \
                TokenClient.open(path) as client:
            rows = [
                ("no-op, 1 task", *await latency(client, calls)),
                ("1 KiB echo, 1 task", *await latency(client, calls, blob=b"x" * 1024)),
            ]
            rate1 = await throughput(client, 1, calls)
            rate8 = await throughput(client, 8, calls * 2)
    finally:
        for leftover in Path(directory).iterdir():
            leftover.unlink()
        os.rmdir(directory)

    print(f"token transport over a Unix socket, {calls} calls per latency row ({os.cpu_count()} cores)")
    print(f"{'':22} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    for name, p50, p99, mean in rows:
        print(f"{name:22} {p50:8.1f} {p99:8.1f} {mean:8.1f}")
    print(f"{'throughput, 1 task':22} {rate1:8.0f} calls/s")
    print(f"{'throughput, 8 tasks':22} {rate8:8.0f} calls/s")
    print(f"{'codec only (no I/O)':22} {codec_us():8.1f} us per round trip")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    trio.run(main, parser.parse_args().calls)
