"""The local app API: HTTP on 127.0.0.1, a bearer credential on every request.

This module only maps HTTP onto the node: authentication and every decision belong to the
token (each request is one command carrying the caller's credential), document semantics to
`Documents`. Only the owner sees the node's status, shares and peers. Errors are JSON
`{"error": ..., "reason": ...}` with a 4xx status (409 stale rev, 403 refused, 404 missing).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import attrs

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from plugshare import __version__, token
from plugshare.errors import PlugshareError
from plugshare.node.access import AuthenticationFailed, bearer
from plugshare.node.couch import MOUNT as COUCH, CouchParts, couch_routes
from plugshare.node.on_read import mark_absent
from plugshare.node.events import events_route
from plugshare.node.files import DEFAULT_MAX_ATTACHMENT, Files
from plugshare.node import files_api
from plugshare.node.openapi import PUBLIC_PATHS, build_openapi



@attrs.frozen
class ApiParts:
    """What the API serves from: the node's parts, given by the node that wires them."""

    call: Callable[..., Awaitable[Any]]  # the token's door
    documents: Any
    admin: Any
    sharing: Any
    events: Any
    peers_status: Callable[[], list]
    status: Callable[[], Awaitable[dict]]
    nearby: Callable[[], list] = list  # nodes found on the LAN that are not peers (yet)
    max_attachment: int = DEFAULT_MAX_ATTACHMENT  # bytes, per attachment ([api] config)
    open_stored: Callable[..., Awaitable[Any]] | None = None  # data, fetched if not here
    set_fetch_mode: Callable[[str, object], Awaitable[dict]] | None = None
    pin: Callable[[object, bool], Awaitable[dict]] | None = None  # for eager download
    pins: Callable[[], list[str]] | None = None
    spool_dir: Any = None  # where /couch spools inline attachment data (None: the temp dir)

MAX_BODY = 8 * 1024 * 1024  # a document larger than this is refused (413)
RECENTLY_AUTHENTICATED = 1024  # credentials remembered by the guard (see `_RecentCredentials`)
RECENT_FOR = 2.0  # seconds: how long the guard trusts that a credential is known to the token

# The token speaks in its own errors; this is how they read over HTTP.
_TOKEN_ERRORS = [
    (token.AuthenticationError, (401, "unauthorized")),  # a command's own authentication
    (token.NotFound, (404, "not_found")),
    (token.AlreadyExists, (409, "conflict")),
    (token.AccessDenied, (403, "forbidden")),
    (token.IntegrityError, (502, "integrity")),
    (token.InvalidArgument, (400, "bad_request")),
]


class ApiError(PlugshareError):
    def __init__(self, status: int, error: str, reason: str):
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason


def _error(status: int, error: str, reason: str) -> JSONResponse:
    return JSONResponse({"error": error, "reason": reason}, status_code=status)


def _too_large() -> ApiError:
    return ApiError(413, "too_large", f"the body is over {MAX_BODY} bytes")


async def _json_body(request: Request) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large()
    # Read as it streams in and stop at the cap: a chunked body declares no length, so the
    # header alone cannot refuse it, and `request.body()` would buffer all of it first.
    raw = bytearray()
    async for chunk in request.stream():
        if len(raw) + len(chunk) > MAX_BODY:
            raise _too_large()
        raw += chunk
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_request", f"the body is not valid JSON: {exc}") from None


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _text(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, "bad_request", f"{key!r} is required (a non-empty string)")
    return value


def _selector(body: dict) -> dict | None:
    selector = body.get("selector")
    if selector is not None and not isinstance(selector, dict):
        raise ApiError(400, "bad_request", "'selector' must be a JSON object")
    return selector


def _listing(answer: dict) -> JSONResponse:
    body = {"docs": answer["docs"], "total": len(answer["docs"])}
    if answer.get("tampered"):
        body["tampered"] = answer["tampered"]  # failed the token's checks: 502 one by one
    return JSONResponse(body)


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "false").lower() in ("true", "1", "yes")


def _etag(rev: str) -> str:
    return f'"{rev}"'


def _doc_response(request: Request, doc: dict) -> Response:
    """A document with its revision as ETag; 304 when If-None-Match already has it."""
    rev = doc.get("_rev")
    headers = {"etag": _etag(rev)} if rev else {}
    if rev and _etag(rev) in _etags(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    return JSONResponse(doc, headers=headers)


def _etags(header: str | None) -> list[str]:
    return [tag.strip() for tag in header.split(",")] if header else []


def _if_match_rev(request: Request, rev: str | None) -> str | None:
    """The rev a write names: `rev` (body `_rev` or `?rev=`), or If-Match; both must agree."""
    tags = _etags(request.headers.get("if-match"))
    if not tags:
        return rev
    if len(tags) != 1 or not (tags[0].startswith('"') and tags[0].endswith('"')):
        raise ApiError(400, "bad_request", "If-Match must be one quoted revision")
    matched = tags[0][1:-1]
    if rev is not None and rev != matched:
        raise ApiError(400, "bad_request", "the document's rev and If-Match differ")
    return matched


def create_app(node: ApiParts) -> Starlette:
    docs = node.documents
    files = Files(docs, max_size=node.max_attachment, open_stored=node.open_stored)

    async def get_doc(request: Request, doctype: str | None = None) -> Response:
        doc = await docs.get(
            request.state.credential,
            request.path_params["doc_id"],
            doctype=doctype,
            rev=request.query_params.get("rev"),
            conflicts=_flag(request, "conflicts"),
        )
        return _doc_response(request, await mark_absent(docs.store, doc))

    async def delete_doc(request: Request, doctype: str | None = None) -> Response:
        rev = await docs.delete(
            request.state.credential,
            request.path_params["doc_id"],
            _if_match_rev(request, request.query_params.get("rev")) or "",
            doctype=doctype,
        )
        return JSONResponse({"id": request.path_params["doc_id"], "rev": rev, "ok": True})

    async def typed_doc(request: Request) -> Response:
        """GET: a document (ETag: its rev; If-None-Match answers 304)
        PUT: create or update a document (its _rev, or If-Match)
        DELETE: delete a document (?rev= or If-Match)
        At /data/{doctype}/{id}/{name}: an attachment (see files_api), streamed"""
        doctype = request.path_params["doctype"]
        attachment = files_api.attachment_target(request)
        if attachment is not None:
            return await files_api.serve(request, files, doctype, *attachment)
        if request.method in ("GET", "HEAD"):
            return await get_doc(request, doctype)
        if request.method == "DELETE":
            return await delete_doc(request, doctype)
        body = await _json_body(request)
        if isinstance(body, dict):
            rev = _if_match_rev(request, body.get("_rev"))
            if rev is not None:
                body = {**body, "_rev": rev}
        doc_id, rev = await docs.put(
            request.state.credential, doctype, request.path_params["doc_id"], body
        )
        return JSONResponse({"id": doc_id, "rev": rev, "ok": True}, status_code=201)

    async def typed_collection(request: Request) -> Response:
        """GET: the documents of a doctype the credential may read
        POST: create a document with a new id"""
        doctype = request.path_params["doctype"]
        if request.method == "POST":
            body = await _json_body(request)
            doc_id, rev = await docs.put(request.state.credential, doctype, None, body)
            return JSONResponse({"id": doc_id, "rev": rev, "ok": True}, status_code=201)
        return _listing(await docs.list(request.state.credential, doctype))

    async def any_doc(request: Request) -> Response:
        """GET: a document by id alone (ETag: its rev)
        DELETE: delete a document by id alone (?rev= or If-Match)"""
        if request.method == "DELETE":
            return await delete_doc(request)
        return await get_doc(request)

    async def all_docs(request: Request) -> Response:
        """GET: the documents the credential may read (?doctype= to narrow)"""
        return _listing(await docs.list(request.state.credential,
                                        request.query_params.get("doctype")))

    call = node.call

    async def owner_only(request: Request, action: str) -> None:
        await call("owner.check", credential=request.state.credential, action=action)

    async def status(request: Request) -> Response:
        """GET: the node's name, id, addresses, store, peers and shares (owner only)"""
        await owner_only(request, "status")
        return JSONResponse(await node.status())

    admin = node.admin

    async def apps(request: Request) -> Response:
        """GET: the apps the token knows (owner only)
        POST: register an app with its first rule; answers its credential, once"""
        who = request.state.credential
        if request.method == "POST":
            body = _object(await _json_body(request))
            credential = await admin.add_app(who, _text(body, "name"), _text(body, "doctype"),
                                       _text(body, "perm"), _selector(body))
            return JSONResponse({"name": body["name"], "credential": credential},
                                status_code=201)
        return JSONResponse({"apps": await admin.list_apps(who)})

    async def app_item(request: Request) -> Response:
        """DELETE: remove an app and its credential"""
        await admin.remove_app(request.state.credential, request.path_params["name"])
        return JSONResponse({"ok": True})

    async def rules(request: Request) -> Response:
        """GET: the token's access rules (owner only)
        POST: add a rule for an app, a peer or a role"""
        who = request.state.credential
        if request.method == "POST":
            body = _object(await _json_body(request))
            rule = await admin.add_rule(who, _text(body, "doctype"), _text(body, "subject_kind"),
                                  _text(body, "subject"), _text(body, "perm"), _selector(body))
            return JSONResponse(rule, status_code=201)
        return JSONResponse({"rules": await admin.list_rules(who)})

    async def rule_item(request: Request) -> Response:
        """DELETE: remove a rule"""
        await admin.remove_rule(request.state.credential, request.path_params["rule_id"])
        return JSONResponse({"ok": True})

    async def encrypt(request: Request) -> Response:
        """POST: store a doctype sealed from now on (sensitive)"""
        return JSONResponse(
            await admin.encrypt(request.state.credential, request.path_params["doctype"])
        )

    sharing = node.sharing

    async def shares(request: Request) -> Response:
        """GET: the shares this node owns or is a member of (owner only)
        POST: create a share of a doctype (with a selector, encrypted, expiring)"""
        if request.method == "POST":
            body = _object(await _json_body(request))
            encrypted = body.get("encrypt", False)
            if not isinstance(encrypted, bool):
                raise ApiError(400, "bad_request", "'encrypt' must be true or false")
            expires = body.get("expires")
            if expires is not None and (not isinstance(expires, (int, float))
                                        or isinstance(expires, bool)):
                raise ApiError(400, "bad_request", "'expires' must be a unix time")
            caps = {k: body[k] for k in ("max_attachment_size", "attachment_types")
                    if body.get(k) is not None}  # the token checks them
            share = await sharing.create(request.state.credential, _text(body, "name"),
                                         _text(body, "doctype"), _selector(body), encrypted,
                                         expires, **caps)
            return JSONResponse(share, status_code=201)
        await owner_only(request, "share_list")
        return JSONResponse({"shares": await sharing.list(),
                             "pending": sharing.pending_joins()})

    async def share_item(request: Request) -> Response:
        """GET: one share: its rule, members and sync state (owner only)
        DELETE: forget a share this node left or was removed from (its documents stay)"""
        if request.method == "DELETE":
            await owner_only(request, "share_forget")  # before the share is looked up
            return JSONResponse(await sharing.forget(request.state.credential,
                                                     request.path_params["name"]))
        await owner_only(request, "share_show")
        return JSONResponse(await sharing.show(request.path_params["name"]))

    async def share_invite(request: Request) -> Response:
        """POST: an invitation code for a share (read-only or write, with a time to live)"""
        await owner_only(request, "share_invite")  # before the share is looked up: no oracle
        body = _object(await _json_body(request))
        read_only = body.get("read_only", False)
        if not isinstance(read_only, bool):
            raise ApiError(400, "bad_request", "'read_only' must be true or false")
        ttl = body.get("ttl") or "1h"
        if not isinstance(ttl, str):
            raise ApiError(400, "bad_request", "'ttl' must be a duration such as 1h or 30m")
        expires = body.get("expires")
        if expires is not None and (not isinstance(expires, (int, float))
                                    or isinstance(expires, bool)):
            raise ApiError(400, "bad_request", "'expires' must be a unix time")
        return JSONResponse(await sharing.invite(request.state.credential,
                                                 request.path_params["name"],
                                                 read_only=read_only, ttl=ttl,
                                                 membership_expires=expires), status_code=201)

    async def invitations(request: Request) -> Response:
        """GET: the open invitations (of one share, or of all; owner only)"""
        await owner_only(request, "share_invitations")  # before the share is looked up
        name = request.path_params.get("name") or request.query_params.get("share")
        return JSONResponse({"invitations": await sharing.invitations(
            request.state.credential, name)})

    async def invitation_item(request: Request) -> Response:
        """DELETE: cancel an open invitation, by its code or its id"""
        await owner_only(request, "share_cancel_invitation")  # before the share is looked up
        return JSONResponse(await sharing.cancel_invitation(
            request.state.credential, request.path_params["name"],
            request.path_params["invitation"]))

    async def share_links(request: Request) -> Response:
        """GET: the links for outside clients (of this share; at /links of all), without their
        secrets (owner only)
        POST: a link for a CouchDB-protocol client ({"permission": "read" or "write",
        "expires": unix time, optional}); answers its credential, once"""
        who, name = request.state.credential, request.path_params.get("name")
        if request.method == "POST":
            body = _object(await _json_body(request))
            expires = body.get("expires")
            if expires is not None and (not isinstance(expires, (int, float))
                                        or isinstance(expires, bool)):
                raise ApiError(400, "bad_request", "'expires' must be a unix time")
            return JSONResponse(await sharing.link(who, name, permission=_text(body, "permission"),
                                                   expires=expires), status_code=201)
        return JSONResponse({"links": await sharing.links(who, name)})

    async def share_link_item(request: Request) -> Response:
        """DELETE: unlink: the link's credential stops working at once"""
        return JSONResponse(await sharing.unlink(request.state.credential,
                                                 request.path_params["name"],
                                                 request.path_params["link"]))

    async def share_revoke(request: Request) -> Response:
        """POST: revoke a member (the share's key is rotated)"""
        await owner_only(request, "share_revoke")  # before the share is looked up: no oracle
        body = _object(await _json_body(request))
        return JSONResponse(await sharing.revoke(request.state.credential,
                                                 request.path_params["name"],
                                                 _text(body, "member")))

    async def share_fetch(request: Request) -> Response:
        """PUT: how this node fetches a share's attachment data: `{"fetch": "eager" |
        "on-read"}` (eager: as documents arrive; on-read: when first read)"""
        await owner_only(request, "share_fetch")  # before the share is looked up
        if node.set_fetch_mode is None:
            raise ApiError(404, "not_found", "this node does not set fetch modes")
        body = _object(await _json_body(request))
        return JSONResponse(await node.set_fetch_mode(request.path_params["name"],
                                                      body.get("fetch")))

    async def pins(request: Request) -> Response:
        """GET: the documents this node pins for eager download (their attachment data
        fetched as they arrive, in a share it fetches on read)"""
        await owner_only(request, "pins")
        if node.pins is None:
            raise ApiError(404, "not_found", "this node does not pin documents")
        return JSONResponse({"pins": node.pins()})

    async def pin(request: Request) -> Response:
        """PUT: pin a document for eager download
        DELETE: unpin it (its data stays; its next revisions follow their share's fetch mode)"""
        await owner_only(request, "pin")
        if node.pin is None:
            raise ApiError(404, "not_found", "this node does not pin documents")
        return JSONResponse(await node.pin(request.path_params["doc_id"],
                                           request.method == "PUT"))

    async def share_leave(request: Request) -> Response:
        """POST: leave a share this node is a member of"""
        await owner_only(request, "share_leave")  # before the share is looked up
        return JSONResponse(await sharing.leave(request.state.credential,
                                                request.path_params["name"]))

    async def join(request: Request) -> Response:
        """POST: accept an invitation code and join its share (202 if its owner is
        unreachable: the join is then pending, retried until the invitation expires)"""
        body = _object(await _json_body(request))
        as_name = body.get("as")
        if as_name is not None and not isinstance(as_name, str):
            raise ApiError(400, "bad_request", "'as' must be a name")
        result = await sharing.accept(request.state.credential, _text(body, "code"),
                                      as_name=as_name)
        # 202: the owner is unreachable; the join waits for it (GET /joins)
        return JSONResponse(result, status_code=202 if result.get("pending") else 201)

    async def joins(request: Request) -> Response:
        """GET: the joins waiting for an unreachable owner, retried by themselves (owner
        only)"""
        await owner_only(request, "share_list")
        return JSONResponse({"joins": sharing.pending_joins()})

    async def join_item(request: Request) -> Response:
        """DELETE: stop waiting for the owner of a pending join (by its share id)"""
        return JSONResponse(await sharing.cancel_pending_join(request.state.credential,
                                                              request.path_params["share"]))

    async def peers(request: Request) -> Response:
        """GET: the peers this node knows, connected or not, and nodes nearby on the LAN
        (owner only)"""
        await owner_only(request, "peers")
        return JSONResponse({"peers": node.peers_status(), "nearby": node.nearby()})

    async def audit(request: Request) -> Response:
        """GET: the last entries of the token's audit log (?tail=N, ?verify=true; filters:
        ?denied=true or ?allowed=true, ?principal=app:NAME, ?since=UNIX_TIME)"""
        params = request.query_params
        tail = params.get("tail", "20")
        if not tail.isdigit() or not 0 < int(tail) <= 100_000:
            raise ApiError(400, "bad_request", "tail must be a number from 1 to 100000")
        allowed = False if _flag(request, "denied") else True if _flag(request, "allowed") else None
        since = params.get("since")
        if since is not None:
            try:
                since = float(since)
            except ValueError:
                raise ApiError(400, "bad_request", "since must be a Unix time") from None
        return JSONResponse(await admin.audit(
            request.state.credential, int(tail), _flag(request, "verify"), allowed=allowed,
            principal=params.get("principal") or None, since=since))

    async def audit_prune(request: Request) -> Response:
        """POST: drop the audit log's segments older than {"before": UNIX_TIME}; what stays
        remains verifiable from a checkpoint"""
        before = _object(await _json_body(request)).get("before")
        if not isinstance(before, (int, float)) or isinstance(before, bool):
            raise ApiError(400, "bad_request", "'before' must be a Unix time")
        return JSONResponse(await admin.audit_prune(request.state.credential, before))

    async def describe(request: Request) -> Response:
        """GET: what this API is and where its OpenAPI document is (no credential needed)"""
        return JSONResponse({
            "name": "plugshare", "version": __version__,
            "description": "a personal-cloud node's local API: documents, shares, token",
            "openapi": "/openapi.json",
            "authentication": "Authorization: Bearer <credential>",
        })

    async def openapi(request: Request) -> Response:
        """GET: this API's OpenAPI document (no credential needed)"""
        return JSONResponse(spec)

    routes = [
        Route("/", describe, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        Route("/data/{doctype}/", typed_collection, methods=["GET", "POST"]),
        Route("/data/{doctype}/{doc_id:path}", typed_doc, methods=["GET", "PUT", "DELETE"]),
        Route("/docs/", all_docs, methods=["GET"]),
        Route("/docs/{doc_id:path}", any_doc, methods=["GET", "DELETE"]),
        Route("/token/apps", apps, methods=["GET", "POST"]),
        Route("/token/apps/{name}", app_item, methods=["DELETE"]),
        Route("/token/rules", rules, methods=["GET", "POST"]),
        Route("/token/rules/{rule_id}", rule_item, methods=["DELETE"]),
        Route("/token/encrypt/{doctype}", encrypt, methods=["POST"]),
        Route("/token/audit", audit, methods=["GET"]),
        Route("/token/audit/prune", audit_prune, methods=["POST"]),
        Route("/shares", shares, methods=["GET", "POST"]),
        Route("/shares/{name}", share_item, methods=["GET", "DELETE"]),
        Route("/shares/{name}/invite", share_invite, methods=["POST"]),
        Route("/invitations", invitations, methods=["GET"]),
        Route("/shares/{name}/invitations", invitations, methods=["GET"]),
        Route("/shares/{name}/invitations/{invitation}", invitation_item, methods=["DELETE"]),
        Route("/links", share_links, methods=["GET"]),
        Route("/shares/{name}/links", share_links, methods=["GET", "POST"]),
        Route("/shares/{name}/links/{link}", share_link_item, methods=["DELETE"]),
        Route("/shares/{name}/revoke", share_revoke, methods=["POST"]),
        Route("/shares/{name}/leave", share_leave, methods=["POST"]),
        Route("/shares/{name}/fetch", share_fetch, methods=["PUT"]),
        Route("/pins", pins, methods=["GET"]),
        Route("/pins/{doc_id:path}", pin, methods=["PUT", "DELETE"]),
        Route("/join", join, methods=["POST"]),
        Route("/joins", joins, methods=["GET"]),
        Route("/joins/{share}", join_item, methods=["DELETE"]),
        Route("/peers", peers, methods=["GET"]),
        events_route(node.events, authorize=_owner_only(node)),
        *couch_routes(CouchParts(call=call, documents=docs, events=node.events,
                                 max_body=MAX_BODY, files=files,
                                 spool_dir=node.spool_dir)),  # the CouchDB API
    ]
    spec = build_openapi(routes, version=__version__, basic_under=COUCH)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        names = {404: "not_found", 405: "method_not_allowed"}
        return _error(exc.status_code, names.get(exc.status_code, "bad_request"), exc.detail)

    async def plugshare_error(request: Request, exc: PlugshareError) -> Response:
        status, error = next(
            (mapped for kind, mapped in _TOKEN_ERRORS if isinstance(exc, kind)),
            (getattr(exc, "status", 400), getattr(exc, "error", "bad_request")),
        )
        return _error(status, error, getattr(exc, "reason", str(exc)))

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, PlugshareError: plugshare_error},
    )
    return _Guard(app, node)


def _owner_only(node: ApiParts):
    """Sync events name every share and peer: only the owner may follow them."""

    async def authorize(request: Request) -> None:
        await node.call("owner.check", credential=request.state.credential,
                              action="watch")

    return authorize


class _RecentCredentials:
    """Digests of the credentials the token authenticated in the last RECENT_FOR seconds,
    at most RECENTLY_AUTHENTICATED of them (oldest forgotten first).

    Not an access decision: every command the request then makes carries the credential and
    the token authenticates it again (a revoked one gets its 401 from there). This only spares
    the guard's own `auth` round trip, whose job is to answer 401 *before reading a body*
    for a caller the token does not know; a caller it knew two seconds ago may have its body
    (bounded by MAX_BODY) read before that 401."""

    def __init__(self) -> None:
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    @staticmethod
    def _key(credential: str) -> bytes:
        return hashlib.sha256(credential.encode()).digest()

    def known(self, credential: str) -> bool:
        key = self._key(credential)
        at = self._seen.get(key)
        if at is None:
            return False
        if time.monotonic() - at > RECENT_FOR:
            del self._seen[key]
            return False
        return True

    def remember(self, credential: str) -> None:
        key = self._key(credential)
        self._seen[key] = time.monotonic()
        self._seen.move_to_end(key)
        while len(self._seen) > RECENTLY_AUTHENTICATED:
            self._seen.popitem(last=False)

    def forget(self, credential: str) -> None:
        self._seen.pop(self._key(credential), None)


def _challenge(scope) -> str:
    """The WWW-Authenticate of a 401: CouchDB clients send Basic only once asked for it."""
    couch = scope["path"] == COUCH or scope["path"].startswith(COUCH + "/")
    return 'Basic realm="plugshare"' if couch else "Bearer"


class _Guard:
    """ASGI middleware: every request carries a credential the token knows (401 otherwise);
    the credential then travels with each command the request makes. One token call per
    request: a credential the token authenticated moments ago goes straight to its command,
    which authenticates it anyway (a 401 from there gets the same challenge header)."""

    def __init__(self, app: Starlette, node: ApiParts):
        self.app = app
        self.node = node
        self.recent = _RecentCredentials()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] in PUBLIC_PATHS and scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)  # describes the API; holds no data
        # (A body left unread by a 401 or 413 is the HTTP server's to handle.)
        request = Request(scope, receive)
        try:
            credential = bearer(request.headers.get("authorization"))
            if not self.recent.known(credential):
                await self.node.call("auth", credential=credential)
                self.recent.remember(credential)
        except (AuthenticationFailed, token.AuthenticationError) as exc:
            response = _error(401, "unauthorized", str(exc))
            response.headers["www-authenticate"] = _challenge(scope)
            return await response(scope, receive, send)
        except PlugshareError as exc:  # the token process is down: 503, nothing decided
            response = _error(getattr(exc, "status", 503), getattr(exc, "error", "unavailable"),
                              str(exc))
            return await response(scope, receive, send)
        scope.setdefault("state", {})["credential"] = credential

        async def send_challenging(message) -> None:
            # the command's token refused the credential: the guard's 401, as it would be
            if message["type"] == "http.response.start" and message["status"] == 401:
                self.recent.forget(credential)
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"www-authenticate"]
                headers.append((b"www-authenticate", _challenge(scope).encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_challenging)
