"""Attachments larger than the `/couch` body cap (8 MiB), inline in the JSON as PouchDB
sends them (issue 13): a real PouchDB pushes and pulls a 20 MiB file through a real node,
whose memory stays bounded; a push cut halfway or lying about its data changes nothing."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.node.cluster import Cluster, ClusterNode, cluster, wait_until  # noqa: F401
from tests.node.test_pouchdb_replication import NOTES, add_app, db_url, shown
from tests.support.pouchdb_client import pouchdb_puppet

MiB = 1024 * 1024
BIG = 20 * MiB
GROWTH_BOUND_KIB = 60 * 1024  # generous: the file's base64 alone is 27 MiB
DEADLINE = 120.0


def md5_digest(data: bytes) -> str:
    return "md5-" + base64.b64encode(hashlib.md5(data).digest()).decode()


def peak_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def spool_files(node: ClusterNode) -> list[str]:
    """The node's open unnamed files in its home (where requests spool data:
    `HOME/#123 (deleted)`)."""
    out = []
    for fd in Path(f"/proc/{node.pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if os.path.dirname(target) == str(node.home.resolve()) and target.endswith(" (deleted)"):
            out.append(target)
    return out


@contextlib.contextmanager
def cut_push(node: ClusterNode, credential: str, doc: dict, keep: float) -> Iterator[None]:
    """A `_bulk_docs` push of `doc` (new_edits=false) whose connection closes after `keep`
    of its body was sent, on leaving the block."""
    body = json.dumps({"docs": [doc], "new_edits": False}).encode()
    address = urlsplit(node.running.api_url)
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        token = base64.b64encode(f"app:{credential}".encode()).decode()
        sock.sendall((f"POST /couch/{NOTES}/_bulk_docs HTTP/1.1\r\nHost: {address.netloc}\r\n"
                      f"Authorization: Basic {token}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode())
        sock.sendall(body[:int(len(body) * keep)])
        yield


@pytest.mark.parametrize("backend", ["sqlite", "couchdb"])
async def test_pouchdb_pushes_and_pulls_a_20_mib_attachment_through_a_node(
        cluster: Cluster, tmp_path, backend, request):
    store = () if backend == "sqlite" else (
        "--store", "couchdb", "--couchdb-url", request.getfixturevalue("couchdb_url"))
    node = cluster.add("a", *store)
    credential = add_app(node, "notes", NOTES, "write")
    url = db_url(node, NOTES, credential, "notes")
    data = os.urandom(BIG)
    digest = md5_digest(data)
    peak_before = peak_kib(node.pid)
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        await pouch.put({"_id": "big", "title": "t", "_attachments": {"big.bin": {
            "content_type": "application/x-big", "data": base64.b64encode(data).decode()}}})
        result = await pouch.replicate_to(url, timeout=DEADLINE)
        assert result["ok"] and result["docs_written"] == 1, shown(result)
        assert result["errors"] == [], shown(result)
        sent_rev = (await pouch.get("big"))["_rev"]
    growth = peak_kib(node.pid) - peak_before
    assert growth < GROWTH_BOUND_KIB, f"the node's peak memory grew by {growth} KiB"
    stub = node.get("big")["_attachments"]["big.bin"]
    assert stub["digest"] == digest and stub["length"] == BIG
    assert node.get("big")["_rev"] == sent_rev

    # and back into a fresh PouchDB, equal
    async with pouchdb_puppet(tmp_path / "pouch2") as pouch:
        result = await pouch.replicate_from(url, timeout=DEADLINE)
        assert result["ok"] and result["doc_write_failures"] == 0, shown(result)
        doc = await pouch.get("big", attachments=True)
        assert doc["_rev"] == sent_rev
        att = doc["_attachments"]["big.bin"]
        assert att["digest"] == digest
        assert base64.b64decode(att["data"]) == data

    # a push of the next revision cut halfway leaves the revision there, and nothing spooled
    generation, _, parent = sent_rev.partition("-")
    other = os.urandom(12 * MiB)
    child = {"_id": "big", "_rev": f"{int(generation) + 1}-{'c' * 32}", "doctype": NOTES,
             "_revisions": {"start": int(generation) + 1, "ids": ["c" * 32, parent]},
             "_attachments": {"big.bin": {"content_type": "application/x-big",
                                          "digest": md5_digest(other), "revpos": 2,
                                          "data": base64.b64encode(other).decode()}}}
    assert not spool_files(node)
    with cut_push(node, credential, child, keep=0.5):
        # half of 12 MiB is past what a request spools in memory: a file holds it
        wait_until(lambda: spool_files(node), DEADLINE, what="the push spooled to a file")
    wait_until(lambda: not spool_files(node), DEADLINE, what="the cut push's spool gone")
    assert node.get("big")["_rev"] == sent_rev

    # a push that lies about its digest, or its length, is refused for that doc alone
    with httpx.Client(base_url=node.running.api_url, auth=("app", credential),
                      timeout=DEADLINE) as http:
        for lie, field in (({"digest": md5_digest(b"other")}, "digest"),
                           ({"length": len(other) - 1}, "bytes")):
            lying = {**child, "_attachments": {"big.bin": {**child["_attachments"]["big.bin"],
                                                           **lie}}}
            refused = http.post(f"/couch/{NOTES}/_bulk_docs",
                                json={"docs": [lying], "new_edits": False})
            assert refused.status_code == 201, refused.text
            assert refused.json()[0]["error"] == "forbidden", refused.text
            assert field in refused.json()[0]["reason"], refused.text
        assert node.get("big")["_rev"] == sent_rev
        got = http.get(f"/couch/{NOTES}/big/big.bin")
        assert got.status_code == 200 and hashlib.md5(got.content).digest() == \
            hashlib.md5(data).digest()
        # the honest one lands, over the old 8 MiB body cap
        taken = http.post(f"/couch/{NOTES}/_bulk_docs",
                          json={"docs": [child], "new_edits": False})
        assert taken.status_code == 201 and taken.json() == [], taken.text
        assert node.get("big")["_rev"] == child["_rev"]
        assert http.get(f"/couch/{NOTES}/big/big.bin").content == other
    assert not spool_files(node)
