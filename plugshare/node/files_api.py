"""`/data/{doctype}/{id}/{name}`: a document's attachment over HTTP, streamed both ways.

GET (and HEAD) serve it with its content type, its digest as ETag and `Range` (one range:
206, or 416 outside the file); PUT streams a body in (`?rev=` or If-Match; no rev creates the
document; a `Content-MD5` header is checked against the data); DELETE removes it. The
document's id is the path segment after the doctype as sent, so an id holding `/` is sent
as `%2F` (as the CLI does); the attachment's name is the rest.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from plugshare.node.files import Files
from plugshare.store import BadRequest, RangeNotSatisfiable
from plugshare.store.attachments import DEFAULT_CONTENT_TYPE


def attachment_target(request: Request) -> tuple[str, str] | None:
    """(document id, attachment name) when the raw path names an attachment, else None."""
    raw = request.scope.get("raw_path") or b""
    parts = raw.decode("latin-1").split("?", 1)[0].split("/", 4)  # '', data, T, id, name
    if len(parts) < 5:
        return None
    return unquote(parts[3]), unquote(parts[4])


def named_rev(request: Request) -> str | None:
    rev = request.query_params.get("rev")
    tags = [t.strip() for t in request.headers.get("if-match", "").split(",") if t.strip()]
    if not tags:
        return rev
    if len(tags) != 1 or not (len(tags[0]) > 1 and tags[0][0] == tags[0][-1] == '"'):
        raise BadRequest("If-Match must be one quoted revision")
    if rev is not None and rev != tags[0][1:-1]:
        raise BadRequest("?rev= and If-Match differ")
    return tags[0][1:-1]


def declared_digest(request: Request) -> str | None:
    """CouchDB's `Content-MD5` (base64 of the MD5), as a store digest."""
    value = request.headers.get("content-md5")
    if value is None:
        return None
    try:
        if len(base64.b64decode(value, validate=True)) == 16:
            return "md5-" + value
    except (binascii.Error, ValueError):
        pass
    raise BadRequest(f"Content-MD5 {value!r} is not the base64 of an MD5 digest")


def declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise BadRequest(f"Content-Length {value!r} is not a number")
    return int(value)


def parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """One `bytes=` range as half-open offsets; None for no range (or several: the whole
    file is then served, as HTTP allows). `RangeNotSatisfiable` outside the file."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()) or \
            (first and not first.isdigit()) or (last and not last.isdigit()):
        raise BadRequest(f"malformed Range {header!r}")
    if not first:  # the last N bytes
        if int(last) == 0:
            raise RangeNotSatisfiable(f"range {header!r} selects no bytes")
        return max(0, length - int(last)), length
    start = int(first)
    stop = min(length, int(last) + 1) if last else length
    if start >= length or stop <= start:
        raise RangeNotSatisfiable(f"range {header!r} is outside the attachment "
                                  f"({length} bytes)")
    return start, stop


async def request_body(request: Request):
    """The request body as it streams in; a client gone halfway is a clear refusal (the
    store then keeps the document as it was)."""
    try:
        async for piece in request.stream():
            if piece:
                yield piece
    except ClientDisconnect:
        raise BadRequest("the upload was cut before its end") from None


async def serve(request: Request, files: Files, doctype: str, doc_id: str,
                name: str) -> Response:
    credential = request.state.credential
    if request.method == "PUT":
        rev = await files.put(
            credential, doctype, doc_id, name, named_rev(request),
            request.headers.get("content-type") or DEFAULT_CONTENT_TYPE, request_body(request),
            digest=declared_digest(request), length=declared_length(request))
        return JSONResponse({"id": doc_id, "rev": rev, "ok": True}, status_code=201)
    if request.method == "DELETE":
        rev = await files.delete(credential, doctype, doc_id, name, named_rev(request))
        return JSONResponse({"id": doc_id, "rev": rev, "ok": True})
    rev, stub, seal = await files.stub(credential, doctype, doc_id, name,
                                       rev=request.query_params.get("rev"))
    return await attachment_response(
        request, stub, lambda wanted: files.open(doc_id, name, rev, wanted, stub=stub,
                                                 seal=seal))


async def attachment_response(request: Request, stub: dict,
                              open_data: Callable[[tuple[int, int] | None], Awaitable[Any]]
                              ) -> Response:
    """GET/HEAD of an attachment whose read is decided: its content type, its digest as
    ETag (304 on If-None-Match), one `Range` (206, 416 outside), the data streamed from
    `open_data(range)` (-> (meta, chunks))."""
    length, etag = stub["length"], f'"{stub["digest"]}"'
    headers = {"etag": etag, "accept-ranges": "bytes",
               "content-type": stub.get("content_type") or DEFAULT_CONTENT_TYPE}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    try:
        wanted = parse_range(request.headers.get("range"), length)
    except RangeNotSatisfiable as exc:
        return JSONResponse({"error": "range_not_satisfiable", "reason": exc.reason},
                            status_code=416, headers={"content-range": f"bytes */{length}"})
    status = 200
    if wanted is not None:
        status = 206
        headers["content-range"] = f"bytes {wanted[0]}-{wanted[1] - 1}/{length}"
    headers["content-length"] = str(length if wanted is None else wanted[1] - wanted[0])
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    _meta, chunks = await open_data(wanted)
    return StreamingResponse(chunks, status_code=status, headers=headers)
