"""Files benchmark between real nodes (a script, not a test):

    python bench/files.py [--size-mb 1024] [--small 10000] [--small-kb 16,128] [--no-sealed]
                          [--no-rsync] [--json PATH]

Two `plugshare run` subprocesses on 127.0.0.1 (embedded store), a share between them,
everything through the local API. Measures, side by side in one run:
  - one big file (--size-mb) put on A (`PUT /data/...`, streamed from disk), then synced to B:
    MB/s from the PUT returning on A to the revision written on B, and the peak RSS (VmHWM,
    reset after the upload) of each node process and its token during the sync; and, all
    along the sync, a 1 KB doc written on A every 50 ms, one at a time: from its PUT sent to
    B's batch event for it, beside the same measured idle after the sync (issue 13: a large
    file never delays small documents);
    clear (a plain share), then sealed (an encrypted share: chunks sealed in A's token as
    they stream in, each opened and checked by B's token as it arrives);
  - the same file copied by `rsync -e ssh` between two directories over loopback, through a
    throwaway sshd (temp host key and authorized key, its own port; the system sshd is not
    touched);
  - --small files of each --small-kb size (a run per size): time for B's join to bring them
    all, vs bytes (files/s, MB/s, ms per MB).
Goals (issue 13): clear >= 200 MB/s, sealed >= 150 MB/s, >= half of rsync's; RSS <= 150 MB.
Prints a table, and the numbers as JSON (stdout, or --json PATH).
"""

from __future__ import annotations

import os.path
import sys

# bench/ holds a `token.py`, which would shadow the standard library's `token` module.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, _HERE)

from sync import EventFollower, Table, memory_mb, ms, percentile  # noqa: E402

from tests.node.cluster import Cluster, ClusterNode, share_between, wait_until  # noqa: E402

del sys.path[0]  # bench/ again: only `sync` was wanted from it

DOCTYPE = "bench.files"
MB = 1024 * 1024
RSS_LIMIT_MB = 150


def reset_peak(pid: int) -> None:
    """Reset a process's VmHWM to its current RSS (Linux: `5` into clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass  # not allowed here: the peak then covers the upload too


def make_file(path: Path, size: int) -> str:
    """A file of `size` random bytes; its SHA-256 (hex)."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            piece = os.urandom(min(MB, left))
            digest.update(piece)
            out.write(piece)
            left -= len(piece)
    return digest.hexdigest()


def _client(node: ClusterNode) -> httpx.Client:
    running = node.running
    return httpx.Client(base_url=running.api_url, timeout=httpx.Timeout(60, read=None),
                        headers={"Authorization": f"Bearer {running.credential}"})


def _from_disk(path: Path):
    with path.open("rb") as source:
        while piece := source.read(MB):
            yield piece


def _pids(node: ClusterNode) -> dict[str, int]:
    pids = {"node": node.pid}
    token = node.status().get("token_pid")
    if token:
        pids["token"] = token
    return pids


def _reset_peaks(*nodes: ClusterNode) -> dict[str, dict[str, int]]:
    """Each node's and token's pid, their peak RSS reset to now."""
    pids = {node.name: _pids(node) for node in nodes}
    for node_pids in pids.values():
        for pid in node_pids.values():
            reset_peak(pid)
    return pids


def _peaks(pids: dict[str, dict[str, int]]) -> dict[tuple[str, str], float]:
    return {(name, what): memory_mb(pid)[1]
            for name, node_pids in pids.items() for what, pid in node_pids.items()}


def _report_peaks(table: Table, label: str, peaks: dict[tuple[str, str], float]) -> None:
    for (name, what), peak in peaks.items():
        over = "" if what != "node" or peak <= RSS_LIMIT_MB else "  OVER"
        table.add(f"[{label}] peak RSS of {name}'s {what} during the sync", f"{peak:.0f} MB",
                  f"(goal <= {RSS_LIMIT_MB} MB){over}" if what == "node" else "",
                  **{f"{label}_rss_{name}_{what}_mb": peak})


# -- plugshare ----------------------------------------------------------------------------


class LiveProbe:
    """1 KB docs written on A one at a time, each timed from its PUT sent to the batch event
    on B that brought it (B's /events stream, checked by one read of the doc on B: no
    polling, which would load B). Runs in a thread until `stop()`; `samples` in seconds."""

    def __init__(self, a: ClusterNode, b: ClusterNode, share: str, prefix: str):
        self.a, self.b, self.prefix = a, b, prefix
        self.samples: list[float] = []
        self.put_times: list[float] = []  # PUT sent -> its answer on A
        self.follower = EventFollower(b, share)
        self.error: BaseException | None = None  # what stopped the thread early, if anything
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LiveProbe:
        self._thread.start()
        return self

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(60)
        self.follower.stop.set()
        if self.error is not None:
            raise RuntimeError(f"the live probe stopped early: {self.error!r}") from self.error
        return self.samples

    def _run(self) -> None:
        try:
            self._probe()
        except BaseException as exc:  # said by stop(), in the main thread
            self.error = exc

    def _probe(self) -> None:
        with _client(self.a) as on_a, _client(self.b) as on_b:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                doc_id = f"{self.prefix}-{i}"
                self.follower.drain()
                sent = time.perf_counter()
                on_a.put(f"/data/{DOCTYPE}/{doc_id}",
                         json={"title": "probe", "body": "x" * 900}).raise_for_status()
                returned = time.perf_counter()
                while True:  # the next batch event that brought it (not the file's)
                    arrived, _ = self.follower.events.get(timeout=60)
                    if on_b.get(f"/data/{DOCTYPE}/{doc_id}").status_code == 200:
                        break
                self.samples.append(arrived - sent)
                self.put_times.append(returned - sent)
                self._stop.wait(0.05)


def _latency(samples: list[float]) -> str:
    if not samples:
        return "no sample"
    return (f"p50 {ms(statistics.median(samples))} / "
            f"p99 {ms(percentile(samples, 99))} ms ({len(samples)} docs)")


def big_file(root: Path, source: Path, sha: str, *, sealed: bool, table: Table) -> float:
    """A and B sharing DOCTYPE (encrypted when `sealed`); the file put on A, timed until B
    holds its revision; B's copy read back and compared. Returns MB/s of the sync."""
    label = "sealed" if sealed else "clear"
    size = source.stat().st_size
    cluster = Cluster(root / f"big-{label}")
    a, b = cluster.add("a"), cluster.add("b")
    try:
        share_between(a, [b], name="files", doctype=DOCTYPE, encrypt=sealed)
        with _client(a) as http:
            started = time.perf_counter()
            put = http.put(f"/data/{DOCTYPE}/big/file.bin", content=_from_disk(source),
                           headers={"content-type": "application/octet-stream"})
            put.raise_for_status()
            uploaded = time.perf_counter()
        rev = put.json()["rev"]
        table.add(f"[{label}] put {size // MB} MB on A (API, streamed)",
                  f"{size / MB / (uploaded - started):.0f} MB/s", f"({uploaded - started:.1f} s)",
                  **{f"{label}_put_mbps": size / MB / (uploaded - started)})
        pids = _reset_peaks(a, b)
        probe = LiveProbe(a, b, "files", "during").start()
        started = time.perf_counter()
        wait_until(lambda: (b.get("big") or {}).get("_rev") == rev,
                   timeout=max(600, size / MB), interval=0.05, what="the file's revision on b")
        elapsed = time.perf_counter() - started
        during = probe.stop()
        during_puts = probe.put_times
        peaks = _peaks(pids)
        rate = size / MB / elapsed
        table.add(f"[{label}] sync {size // MB} MB A -> B", f"{rate:.0f} MB/s",
                  f"({elapsed:.1f} s; goal >= {150 if sealed else 200} MB/s)",
                  **{f"{label}_sync_mbps": rate})
        _report_peaks(table, label, peaks)
        probe = LiveProbe(a, b, "files", "idle").start()
        time.sleep(min(10.0, max(3.0, elapsed)))
        idle = probe.stop()
        numbers = {f"{label}_live_{when}_p50_ms": 1000 * statistics.median(samples)
                   for when, samples in (("during", during), ("idle", idle)) if samples}
        table.add(f"[{label}] live 1 KB doc A -> B during the sync, PUT sent -> on B",
                  _latency(during), f"(the PUT on A alone: {_latency(during_puts)}; idle, same "
                  f"nodes after the sync: {_latency(idle)})", **numbers)
        with _client(b) as http:
            check = hashlib.sha256()
            started = time.perf_counter()
            with http.stream("GET", f"/data/{DOCTYPE}/big/file.bin") as got:
                got.raise_for_status()
                for piece in got.iter_bytes():
                    check.update(piece)
            read = time.perf_counter() - started
        assert check.hexdigest() == sha, f"[{label}] B's copy differs from the file"
        table.add(f"[{label}] read it back on B (API)", f"{size / MB / read:.0f} MB/s",
                  "(equal)", **{f"{label}_read_mbps": size / MB / read})
        return rate
    finally:
        cluster.close()
        shutil.rmtree(root / f"big-{label}", ignore_errors=True)


def small_files(root: Path, count: int, size_kb: int, table: Table) -> None:
    """`count` files of `size_kb` KB on A (8 uploads at a time), then B joins: time until
    B holds the last one."""
    cluster = Cluster(root / f"small-{size_kb}")
    a, b = cluster.add("a"), cluster.add("b")
    try:
        a.cli_json("share", "create", "files", "--doctype", DOCTYPE)
        size = size_kb * 1024

        # A client per uploading thread, kept: making an httpx client costs ~20 ms of CPU
        # (an SSL context), which capped this at ~37 files/s whatever the node did.
        local = threading.local()
        clients = []

        def put(i: int) -> None:
            if not hasattr(local, "http"):
                local.http = _client(a)
                clients.append(local.http)
            local.http.put(f"/data/{DOCTYPE}/s{i:06d}/photo.jpg", content=os.urandom(size),
                           headers={"content-type": "image/jpeg"}).raise_for_status()

        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(put, range(count)))
        finally:
            for http in clients:
                http.close()
        load = time.perf_counter() - started
        table.add(f"[small] put {count} x {size_kb} KB on A", f"{count / load:.0f} files/s",
                  f"({load:.1f} s)")
        code = a.cli_json("share", "invite", "files")["code"]
        pids = _reset_peaks(a, b)
        started = time.perf_counter()
        b.cli_json("share", "accept", "--no-progress", code)
        last = f"s{count - 1:06d}"
        total = count * size

        def all_there() -> bool:
            return bool((b.get(last) or {}).get("_attachments")) and \
                b.status()["store"]["doc_count"] >= count

        wait_until(all_there, timeout=max(600, count / 5), interval=0.5,
                   what="every small file on b")
        elapsed = time.perf_counter() - started
        table.add(f"[small] sync {count} x {size_kb} KB ({total / MB:.0f} MB) A -> B",
                  f"{count / elapsed:.0f} files/s",
                  f"({elapsed:.1f} s, {total / MB / elapsed:.1f} MB/s, "
                  f"{elapsed / (total / MB) * 1000:.1f} ms per MB)",
                  **{f"small_{size_kb}kb_files_per_s": count / elapsed,
                     f"small_{size_kb}kb_mbps": total / MB / elapsed,
                     f"small_{size_kb}kb_seconds": elapsed, f"small_{size_kb}kb_bytes": total})
        _report_peaks(table, f"small {size_kb} KB", _peaks(pids))
    finally:
        cluster.close()
        shutil.rmtree(root / f"small-{size_kb}", ignore_errors=True)


# -- rsync -e ssh -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rsync_over_ssh(root: Path, source: Path, table: Table) -> float | None:
    """`rsync -e ssh` of `source` into another directory through a throwaway sshd on a
    loopback port (temp host and user keys); MB/s, or None when it cannot run here."""
    sshd, rsync = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("rsync")
    if not (os.path.exists(sshd) and rsync and shutil.which("ssh-keygen")):
        table.add("rsync -e ssh", "skipped", "(needs openssh-server and rsync)")
        return None
    work = root / "ssh"
    work.mkdir()
    for key in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / key)],
                       check=True)
    shutil.copy(work / "user.pub", work / "authorized_keys")
    os.chmod(work / "authorized_keys", 0o600)
    port = _free_port()
    config = work / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {work / 'host'}\n"
        f"AuthorizedKeysFile {work / 'authorized_keys'}\nPidFile {work / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin yes\n"
        "Subsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd insists on
    daemon = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _listening(port) or daemon.poll() is not None, timeout=10,
                   what="the throwaway sshd")
        if daemon.poll() is not None:
            table.add("rsync -e ssh", "skipped", f"(sshd: {daemon.stderr.read().decode()[-200:]})")
            return None
        target = root / "rsync-target"
        target.mkdir()
        ssh = (f"ssh -i {work / 'user'} -p {port} -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
        started = time.perf_counter()
        subprocess.run([rsync, "-e", ssh, str(source), f"127.0.0.1:{target}/"], check=True)
        elapsed = time.perf_counter() - started
        size = source.stat().st_size
        assert (target / source.name).stat().st_size == size
        rate = size / MB / elapsed
        table.add(f"rsync -e ssh {size // MB} MB over loopback", f"{rate:.0f} MB/s",
                  f"({elapsed:.1f} s)", rsync_mbps=rate)
        shutil.rmtree(target)
        return rate
    finally:
        daemon.terminate()
        daemon.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="the big file's size")
    parser.add_argument("--small", type=int, default=10000, help="how many small files")
    parser.add_argument("--small-kb", default="16,128",
                        help="each small file's size, a run per size (time vs bytes)")
    parser.add_argument("--no-sealed", action="store_true", help="skip the sealed run")
    parser.add_argument("--no-rsync", action="store_true", help="skip rsync -e ssh")
    parser.add_argument("--json", type=Path, help="write the numbers there, not to stdout")
    args = parser.parse_args()
    table = Table()
    with tempfile.TemporaryDirectory(prefix="bench-files-") as tmp:
        root = Path(tmp)
        source = root / "file.bin"
        sha = make_file(source, args.size_mb * MB)
        clear = big_file(root, source, sha, sealed=False, table=table)
        if not args.no_sealed:
            sealed = big_file(root, source, sha, sealed=True, table=table)
            table.add("sealed / clear", f"{sealed / clear:.0%}", "")
        if not args.no_rsync:
            rate = rsync_over_ssh(root, source, table)
            if rate:
                table.add("clear / rsync -e ssh", f"{clear / rate:.0%}", "(goal >= 50%)")
        source.unlink()
        for size_kb in [int(k) for k in args.small_kb.split(",") if k] if args.small else []:
            small_files(root, args.small, size_kb, table)
    table.print()
    numbers = json.dumps(table.numbers, indent=2, sort_keys=True)
    if args.json:
        args.json.write_text(numbers + "\n")
    else:
        print(numbers)


if __name__ == "__main__":
    main()
