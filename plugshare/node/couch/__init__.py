"""A CouchDB-compatible API for apps and CouchDB clients (PouchDB, CouchDB's replicator),
mounted at `/couch` of the local API (issue 12).

Each virtual database (`/couch/{doctype}`, `/couch/share:{name}`) shows exactly the documents
the token lets the caller's credential read, and takes exactly the writes it allows, decided
per document by the token. Errors have CouchDB's shape and names.

Public face: `CouchParts` (what the API serves from) and `couch_routes(parts)`, the routes
`api.py` adds under `/couch`."""

from __future__ import annotations

import functools
import secrets
from typing import Any, Awaitable, Callable

import attrs
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plugshare.errors import PlugshareError
from plugshare.node.couch.errors import CouchError, as_couch, error_response
from plugshare.node.couch.routes import endpoints

__all__ = ["MOUNT", "CouchParts", "couch_routes"]

MOUNT = "/couch"


@attrs.frozen
class CouchParts:
    call: Callable[..., Awaitable[Any]]  # the token's door
    documents: Any  # plugshare.node.documents.Documents: its store, and where writes land
    events: Any  # the node's event bus: API writes are published as doc.written
    max_body: int  # bytes a request body may hold
    files: Any = None  # plugshare.node.files.Files: attachments' writes (caps, decisions)
    # where inline attachment data waits for the token's decision: the node's home (on the
    # disk the store is on; the temp dir may be memory, a tmpfs); None: the temp dir
    spool_dir: Any = None
    instance: str = attrs.field(factory=lambda: secrets.token_hex(16))


def couch_routes(parts: CouchParts) -> list[Route]:
    """The routes of the CouchDB API under MOUNT, each answering errors in CouchDB's shape
    (they sit in the local API's router, and so in its OpenAPI document)."""
    return [Route(MOUNT + route.path, _couch_errors(route.endpoint), methods=route.methods)
            for route in endpoints(parts)]


_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}


def _couch_errors(endpoint):
    @functools.wraps(endpoint)
    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except PlugshareError as exc:
            return error_response(as_couch(exc))
        except HTTPException as exc:
            error = _HTTP_ERRORS.get(exc.status_code, "bad_request")
            return error_response(CouchError(exc.status_code, error, str(exc.detail)))

    return answer
