"""Files between this machine and a document's attachments, for the command line.

Streamed both ways in pieces (a file of any size is never whole in memory), with a rich
progress bar on a terminal and nothing while it runs anywhere else. The digest of what was
sent or received is checked against the node's (`md5-…`, as CouchDB computes it); a download
goes to `PATH.part` first and takes its name only once whole and checked.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from plugshare.errors import PlugshareError
from plugshare.node.client import ApiRefused, NodeClient
from plugshare.store.attachments import digest_of

PIECE = 1024 * 1024  # bytes read or written at a time


class TransferFailed(PlugshareError):
    """The data that arrived is not what the other side holds."""


def _q(text: str) -> str:
    return quote(text, safe="")


class _Bar:
    """A rich progress bar on stderr when it is a terminal; else nothing."""

    def __init__(self, label: str, total: int, show: bool):
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        ) if show else None
        self._label, self._total = label, total

    def __enter__(self) -> _Bar:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=self._total)
        return self

    def advance(self, count: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, count)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()


def _current_rev(client: NodeClient, doctype: str, doc_id: str) -> str | None:
    try:
        return client.request("GET", f"/data/{_q(doctype)}/{_q(doc_id)}")["_rev"]
    except ApiRefused as exc:
        if exc.status == 404:
            return None
        raise


def upload(client: NodeClient, path: Path, *, doctype: str, doc_id: str, name: str,
           content_type: str | None, show: bool) -> dict[str, Any]:
    """Attach the file at `path` to document `doc_id` (made if missing) as `name`;
    {id, rev, name, length, digest}."""
    if not path.is_file():
        raise PlugshareError(f"{path} is not a file")
    size = path.stat().st_size
    content_type = content_type or mimetypes.guess_type(path.name)[0] \
        or "application/octet-stream"
    rev = _current_rev(client, doctype, doc_id)
    md5 = hashlib.md5(usedforsecurity=False)

    def pieces(bar: _Bar) -> Iterator[bytes]:
        with path.open("rb") as source:
            while piece := source.read(PIECE):
                md5.update(piece)
                bar.advance(len(piece))
                yield piece

    with _Bar(f"{name} ↑", size, show) as bar, client.stream(
            "PUT", f"/data/{_q(doctype)}/{_q(doc_id)}/{_q(name)}",
            params={"rev": rev} if rev else None, content=pieces(bar),
            headers={"content-type": content_type, "content-length": str(size)}) as response:
        response.read()
        answer = response.json()
    stub = client.request("GET", f"/data/{_q(doctype)}/{_q(doc_id)}")["_attachments"][name]
    if stub["digest"] != digest_of(md5) or stub["length"] != size:
        raise TransferFailed(f"the node holds {stub['digest']} ({stub['length']} bytes) for "
                             f"{name!r}, not what was sent ({digest_of(md5)}, {size} bytes): "
                             "was the file changed while it was sent?")
    return {"id": doc_id, "rev": answer["rev"], "name": name, "length": size,
            "digest": stub["digest"], "content_type": content_type}


def attachments(client: NodeClient, doc_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the document, its attachments' stubs by name)."""
    doc = client.request("GET", f"/docs/{_q(doc_id)}")
    return doc, doc.get("_attachments") or {}


def download(client: NodeClient, doc_id: str, name: str, out: Path, *,
             show: bool) -> dict[str, Any]:
    """Write attachment `name` of `doc_id` to `out` (via `out.part`); its stub."""
    doc, stubs = attachments(client, doc_id)
    if name not in stubs:
        raise ApiRefused(404, "not_found", f"document {doc_id!r} has no attachment {name!r}")
    stub = stubs[name]
    partial = out.with_name(out.name + ".part")
    md5 = hashlib.md5(usedforsecurity=False)
    try:
        with _Bar(f"{name} ↓", stub["length"], show) as bar, client.stream(
                "GET", f"/data/{_q(doc['doctype'])}/{_q(doc_id)}/{_q(name)}",
                params={"rev": doc["_rev"]}) as response, partial.open("wb") as sink:
            for piece in response.iter_bytes(PIECE):
                md5.update(piece)
                sink.write(piece)
                bar.advance(len(piece))
            sink.flush()
            os.fsync(sink.fileno())
        if digest_of(md5) != stub["digest"]:
            raise TransferFailed(f"{name!r} arrived as {digest_of(md5)}, not {stub['digest']}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"id": doc_id, "rev": doc["_rev"], "name": name, "path": str(out), **stub}
