"""Request bodies of the `/couch` API: JSON, read as it streams in and refused past a cap
(also a chunked body, which declares no length), with CouchDB's errors."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from plugshare.node.couch.errors import CouchError, bad_request

JSON_TYPES = ("application/json",)


def _too_large(cap: int) -> CouchError:
    return CouchError(413, "request_entity_too_large", f"the body is over {cap} bytes")


def check_json_type(request: Request) -> None:
    """415 `bad_content_type` for a body declared as something else than JSON (CouchDB's
    check on writes); no declared type is taken as JSON."""
    declared = request.headers.get("content-type", "application/json")
    media = declared.split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES:
        raise CouchError(415, "bad_content_type", "Content-Type must be application/json")


async def json_body(request: Request, cap: int, *, check_type: bool = True,
                    empty: Any = None) -> Any:
    """The request's JSON body. 415 `bad_content_type` for a body declared as something
    else than JSON (CouchDB's check on writes), 413 past `cap` bytes (nothing is read
    beyond), 400 for malformed JSON."""
    if check_type:
        check_json_type(request)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise _too_large(cap)
    raw = bytearray()
    async for chunk in request.stream():
        if len(raw) + len(chunk) > cap:
            raise _too_large(cap)
        raw += chunk
    if not raw and empty is not None:
        return empty
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("invalid UTF-8 JSON") from None


async def json_object(request: Request, cap: int, *, check_type: bool = True) -> dict:
    body = await json_body(request, cap, check_type=check_type)
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    return body
