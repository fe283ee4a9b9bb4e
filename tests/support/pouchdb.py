"""A real CouchDB-compatible server for tests and benchmarks: pouchdb-server from npm.

`running_pouchdb_server()` installs pouchdb-server into the repo's ignored `.cache/` on first
use (under a file lock, so parallel sessions don't race), starts it in memory on a free
loopback port with its config and log in a temporary directory, and stops its whole process
group at exit.

pouchdb-server 4.2.0 departs from CouchDB where the store relies on it; the launcher below
(JavaScript that patches pouchdb-server's modules before starting it) brings it in line:

- it has no per-database `_revs_limit` (GET/PUT `/{db}/_revs_limit`); PouchDB does stem
  revision trees, but to a limit fixed when a database object is made. The launcher adds the
  endpoint and feeds the limit to PouchDB's write path, so stemming is done by the server;
- its `_revs_diff` reports revisions it knows only as ancestors (without a body) as missing,
  and never sends `possible_ancestors`. CouchDB reports a revision missing only when it is not
  in the revision tree at all, and lists the leaves of a lower generation as possible
  ancestors (leaving the key out when there are none). The launcher answers that way;
- it skips a replicated revision it already knows without merging the history that came
  with it, so a stemmed or partial tree is never re-joined to ancestors delivered later.
  CouchDB merges every delivered path into the tree. The launcher lets PouchDB merge, and
  writes nothing when the merge changed nothing (a known revision stays a no-op);
- it finds whether a revision is a tombstone by its hash alone, so a tree where one hash
  appears at two generations (never made by real edits: a hash covers its parent, but made by
  the contract suite's random histories) gets the wrong flag. The launcher matches the
  generation too;
- it has no `/{db}/_local_docs` (CouchDB >= 2.0), which the store lists its staging records
  with (GET) and finds staged chunks with (POST, by keys). The launcher counts each
  database's local docs as the adapter writes and removes them, and lists them by id (start
  and end keys, limit, skip, include_docs) or by the keys asked for.

`running_pouchdb_server(stock=True)` starts it without the launcher, as npm ships it: what a
node meets on a pouchdb-server nobody patched (tests/store/test_couchdb_stock_server.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.support.ports import free_loopback_port

POUCHDB_SERVER_VERSION = "4.2.0"
REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_DIR = REPO_ROOT / ".cache" / "pouchdb-server"
STARTUP_TIMEOUT = 60.0  # seconds; a cold node start on a loaded CI machine is slow
INSTALL_TIMEOUT = 900.0
_PORT_ATTEMPTS = 5


# Runs pouchdb-server (its main module is argv[2]) with `/{db}/_revs_limit` added. The limit
# reaches PouchDB through `processDocs(revLimit, docInfos, db, ...)`, which the LevelDB-based
# adapters (the in-memory one included) call through the module object for every write.
_LAUNCHER_JS = (Path(__file__).parent / "pouchdb_launcher.js").read_text()


class PouchDBServerError(RuntimeError):
    """pouchdb-server could not be installed or started."""


def server_main(install_dir: Path = INSTALL_DIR) -> Path:
    return install_dir / "node_modules" / "pouchdb-server" / "lib" / "index.js"


def ensure_installed(install_dir: Path = INSTALL_DIR) -> Path:
    """Install pouchdb-server with npm unless it is there already; return its main module."""
    return ensure_npm_package(
        install_dir, f"pouchdb-server@{POUCHDB_SERVER_VERSION}", server_main(install_dir)
    )


def ensure_npm_package(install_dir: Path, spec: str, main: Path) -> Path:
    """`npm install spec` into `install_dir` (a project of its own under the ignored `.cache/`)
    unless `main`, the module that install provides, is there already; return `main`."""
    if main.exists():
        return main
    install_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = install_dir.parent / (install_dir.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be installing right now
        if not main.exists():
            _npm_install(install_dir, spec)
    if not main.exists():
        raise PouchDBServerError(
            f"npm finished but {main} is missing; remove {install_dir} and retry"
        )
    return main


def _npm_install(install_dir: Path, spec: str) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise PouchDBServerError(
            "npm is not on PATH: install Node.js (>= 18) and npm to run the CouchDB tests"
        )
    install_dir.mkdir(parents=True, exist_ok=True)
    manifest = install_dir / "package.json"
    if not manifest.exists():  # npm wants a project to install into
        manifest.write_text(f'{{"name": "plugshare-test-{install_dir.name}", "private": true}}\n')
    command = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(install_dir), spec]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False,
            cwd=install_dir,
        )
    except subprocess.TimeoutExpired as exc:
        raise PouchDBServerError(
            f"`{' '.join(command)}` did not finish within {INSTALL_TIMEOUT:.0f}s"
        ) from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise PouchDBServerError(
            f"`{' '.join(command)}` failed with exit code {done.returncode}:\n{tail}"
        )




def _answers(url: str, server_uuid: str) -> bool:
    """True if *our* server answers on `url` (not another one that grabbed the port)."""
    try:
        with urllib.request.urlopen(url + "/", timeout=2) as response:
            return json.loads(response.read()).get("uuid") == server_uuid
    except (OSError, ValueError, AttributeError):
        return False


def _stop(process: subprocess.Popen) -> None:
    """Stop the server's whole process group (node may have spawned helpers)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _start(node: str, main: Path, workdir: Path, port: int, *, stock: bool) -> subprocess.Popen:
    if stock:
        entry = [str(main)]  # pouchdb-server as npm ships it
    else:
        launcher = workdir / "launch.js"
        launcher.write_text(_LAUNCHER_JS)
        entry = [str(launcher), str(main)]
    output = open(workdir / "server.out", "wb")
    try:
        return subprocess.Popen(
            [
                node, *entry,
                "--in-memory", "--host", "127.0.0.1", "--port", str(port),
                "--dir", str(workdir), "--config", str(workdir / "config.json"),
                "--no-stdout-logs", "--no-color",
            ],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so _stop reaches every child
        )
    finally:
        output.close()


def _wait_until_answering(
    process: subprocess.Popen, url: str, server_uuid: str, workdir: Path
) -> bool:
    """True once the server answers; False if it exited (e.g. the port was taken meanwhile)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if _answers(url, server_uuid):
            return True
        time.sleep(0.1)
    _stop(process)
    output = (workdir / "server.out").read_text(errors="replace")[-2000:]
    raise PouchDBServerError(
        f"pouchdb-server did not answer on {url} within {STARTUP_TIMEOUT:.0f}s:\n{output}"
    )


@contextlib.contextmanager
def running_pouchdb_server(*, stock: bool = False) -> Iterator[str]:
    """Run an in-memory pouchdb-server on a free loopback port; yield `http://127.0.0.1:PORT`.

    `stock=True` starts it as npm ships it, without the launcher's patches (no `_revs_limit`,
    PouchDB's own `_revs_diff` and merge): what a node meets on a server nobody patched."""
    node = shutil.which("node")
    if node is None:
        raise PouchDBServerError("node is not on PATH: install Node.js (>= 18) and npm")
    main = ensure_installed()
    with tempfile.TemporaryDirectory(prefix="pouchdb-server-") as tmp:
        workdir = Path(tmp)
        server_uuid = uuid.uuid4().hex
        config = {
            "couchdb": {"uuid": server_uuid},  # tells our server apart from any other
            "log": {"level": "warning"},  # "info" costs a log-file write per request
        }
        (workdir / "config.json").write_text(json.dumps(config))
        for _ in range(_PORT_ATTEMPTS):
            port = free_loopback_port()
            url = f"http://127.0.0.1:{port}"
            process = _start(node, main, workdir, port, stock=stock)
            if _wait_until_answering(process, url, server_uuid, workdir):
                break
            output = (workdir / "server.out").read_text(errors="replace")[-2000:]
            if "already in use" not in output:  # only a port taken meanwhile is worth a retry
                raise PouchDBServerError(f"pouchdb-server exited at startup:\n{output}")
        else:
            raise PouchDBServerError(
                f"pouchdb-server found no free port in {_PORT_ATTEMPTS} attempts:\n{output}"
            )
        try:
            yield url
        finally:
            _stop(process)


if __name__ == "__main__":
    import sys

    from tests.support.pouchdb_client import POUCHDB_VERSION, ensure_client_installed

    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python -m tests.support.pouchdb --install")
    print(f"pouchdb-server {POUCHDB_SERVER_VERSION}: {ensure_installed()}")
    print(f"pouchdb {POUCHDB_VERSION} (the test client): {ensure_client_installed()}")
