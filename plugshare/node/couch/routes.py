"""The CouchDB endpoints of the `/couch` API (Starlette): HTTP mapped onto `DatabaseView`.

Every request is authenticated before it gets here (`api._Guard`); the token's `db.list`
then says which databases its credential may open, and each document read or write is the
token's decision (see `view.py`). Unknown query parameters are ignored, as CouchDB does."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from plugshare import __version__
from plugshare.node.couch import attachments as files_routes
from plugshare.node.couch import body as bodies
from plugshare.node.couch import inline, mango, params
from plugshare.node.couch.inline_scan import BULK_DOCS, ONE_DOC
from plugshare.node.couch.spool import SPOOLING, inline_body, multipart_body
from plugshare.node.couch.databases import names, resolve
from plugshare.node.couch.errors import CouchError, bad_request, forbidden
from plugshare.node.couch.feeds import FeedSlots, follow
from plugshare.node.couch.view import (CONFLICT_REASON, DESIGN_REASON, DatabaseView,
                                      check_doc_id)

MAX_UUIDS = 1_000  # ids in one _uuids answer (CouchDB's default max_count)
MAX_DOCS = 10_000  # documents in one _bulk_docs, ids in one _bulk_get/_revs_diff/keys
COUCHDB_VERSION = "3.3.3"  # the CouchDB API this one answers like
INSTANCE_START = "0"
# `_find` queries running at once: each holds its database's documents in memory and then
# evaluates them in a worker thread (seconds of CPU for a heavy selector over a large
# database); more wait their turn, holding nothing, and the other threads stay free.
FIND_SLOTS = 2
ALL_DOCS_INDEX = {"ddoc": None, "name": "_all_docs", "type": "special",
                  "def": {"fields": [{"_id": "asc"}]}}


def _json(body: Any, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


class DocCounts:
    """A database's `doc_count` for a principal, kept while the store's update_seq stays:
    PouchDB asks for the info at every checkpoint, and counting reads every document. (A
    rule changed since is seen at the next write.)"""

    MAX = 256  # (principal, database) pairs kept

    def __init__(self):
        self._known: dict[tuple[str, str], tuple[Any, int]] = {}

    async def count(self, view: DatabaseView, update_seq: Any) -> int:
        key = (view.db.principal, view.db.name)
        known = self._known.get(key)
        if known is not None and known[0] == update_seq:
            return known[1]
        count = await view.count()
        if len(self._known) >= self.MAX:
            self._known.pop(next(iter(self._known)))
        self._known[key] = (update_seq, count)
        return count


class _Feed(StreamingResponse):
    """A streamed feed that gives its slot back however it ends (client gone included)."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def endpoints(parts) -> list[Route]:
    """The routes, relative to the mount point (`/couch`)."""
    call = parts.call
    slots = FeedSlots()
    counts = DocCounts()
    cap = parts.max_body
    find_slots = trio.CapacityLimiter(FIND_SLOTS)
    spool_slots = trio.CapacityLimiter(SPOOLING)

    def write_body(request: Request, data_path: tuple):
        """A write's body, attachment data inline spooled: JSON within the body cap, data
        within the node's attachment cap (in all, per request). A doc PUT may also be
        `multipart/related` (CouchDB's replicator: the data in parts after the JSON)."""
        limits = {"max_json": cap, "max_data": parts.files.max_size, "slots": spool_slots,
                  "directory": parts.spool_dir}
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if data_path == ONE_DOC and request.method == "PUT" and media == "multipart/related":
            return multipart_body(request, **limits)
        return inline_body(request, data_path, **limits)

    async def open_view(request: Request) -> DatabaseView:
        opened = await call("db.list", credential=request.state.credential)
        db = resolve(request.path_params["db"], opened)
        return DatabaseView(db, request.state.credential, documents=parts.documents,
                            call=call, publish=parts.events.publish)

    async def welcome(request: Request) -> Response:
        """GET: CouchDB's welcome: this API's version and vendor"""
        return _json({"couchdb": "Welcome", "version": COUCHDB_VERSION,
                      "vendor": {"name": "plugshare", "version": __version__},
                      "features": [], "uuid": parts.instance})

    async def uuids(request: Request) -> Response:
        """GET: new random document ids (?count=N, at most MAX_UUIDS), as CouchDB serves them"""
        count = request.query_params.get("count", "1")
        if not count.isdigit() or not 0 < int(count) <= MAX_UUIDS:
            raise bad_request(f"count must be a number from 1 to {MAX_UUIDS}")
        return _json({"uuids": [uuid.uuid4().hex for _ in range(int(count))]},
                     headers={"cache-control": "must-revalidate, no-cache"})

    async def session(request: Request) -> Response:
        """GET: who this credential is, in CouchDB's shape (no cookie sessions: every request
        carries its credential)"""
        who = await call("auth", credential=request.state.credential)
        return _json({"ok": True, "userCtx": {"name": who["id"], "roles": []},
                      "info": {"authentication_handlers": ["default"],
                               "authenticated": "default"}})

    async def all_dbs(request: Request) -> Response:
        """GET: the databases this credential may open (doctypes, and shares as share:NAME)"""
        return _json(names(await call("db.list", credential=request.state.credential)))

    async def database(request: Request) -> Response:
        """GET: a database's info as this credential sees it (doc_count, update_seq)
        PUT: databases are virtual: an existing one answers 412 file_exists
        POST: create a document with a new id (or the body's _id)
        DELETE: databases are virtual: refused (403)"""
        view = await open_view(request)
        if request.method == "PUT":
            raise CouchError(412, "file_exists", "The database could not be created, the "
                                                 "file already exists.")
        if request.method == "POST":
            async with write_body(request, ONE_DOC) as (doc, spool):
                result = await _write_one(view, doc, new_edits=True, spool=spool)
            return _json({"ok": True, "id": result["id"], "rev": result["rev"]}, 201)
        if request.method == "DELETE":
            raise forbidden("databases are virtual: they cannot be deleted")
        update_seq = await view.store.update_seq()  # the count is the scope's, not the store's
        return _json({
            "db_name": view.db.name, "doc_count": await counts.count(view, update_seq),
            "doc_del_count": 0,
            "update_seq": update_seq, "purge_seq": 0, "compact_running": False,
            "sizes": {"active": 0, "external": 0, "file": 0}, "disk_format_version": 8,
            "instance_start_time": INSTANCE_START,
            "props": {}, "cluster": {"q": 1, "n": 1, "w": 1, "r": 1},
        })

    async def changes(request: Request) -> Response:
        """GET: the changes this credential may see (since, limit, include_docs, style,
        feed=normal|longpoll|continuous|eventsource, heartbeat, timeout, filter=_doc_ids or
        _selector)
        POST: the same, with doc_ids or selector in the body"""
        view = await open_view(request)
        query = request.query_params
        if params.flag(query, "descending"):
            raise bad_request("descending is not supported on _changes: the feed is read from "
                              "the store oldest first, a page at a time; read it with since "
                              "and reverse it, or use _all_docs?descending=true")
        feed = params.feed(query)
        since = params.since(query)
        limit = params.count(query, "limit")
        include_docs = params.flag(query, "include_docs")
        style = query.get("style", "main_only")
        if style not in ("main_only", "all_docs"):
            raise bad_request(f"Invalid value for 'style': {style!r} (main_only or all_docs)")
        heartbeat = params.milliseconds(query, "heartbeat")
        timeout = params.milliseconds(query, "timeout")
        body = await _optional_body(request, cap) if request.method == "POST" else {}
        doc_ids, selector = _filter(query, body)
        if since == "now":
            since = await view.store.update_seq()
        options = {"doc_ids": doc_ids, "selector": selector, "all_leaves": style == "all_docs",
                   "include_docs": include_docs}

        async def page(after, count: int):
            return await view.changes(after, max(count, 1), **options)

        if feed == "normal":
            rows, last_seq = await page(since, params.MAX_LIMIT if limit is None
                                        else min(limit, params.MAX_LIMIT))
            return _json({"results": rows, "last_seq": last_seq, "pending": 0})
        if timeout is None and heartbeat is None:
            timeout = params.DEFAULT_TIMEOUT_MS / 1000
        release = slots.take(view.db.principal)
        try:
            lines = follow(page, view.store.wait_for_change, feed=feed, since=since, limit=limit,
                           heartbeat=heartbeat, timeout=timeout)
            media = {"eventsource": "text/event-stream", "continuous": "application/json",
                     "longpoll": "application/json"}[feed]
            return _Feed(lines, release, media_type=media,
                         headers={"cache-control": "no-store", "x-accel-buffering": "no"})
        except BaseException:
            release()
            raise

    async def revs_diff(request: Request) -> Response:
        """POST: the revisions of {id: [rev...]} this database lacks"""
        view = await open_view(request)
        asked = await bodies.json_object(request, cap)
        if len(asked) > MAX_DOCS:
            raise _too_many("ids")
        for doc_id, revs in asked.items():
            if not isinstance(revs, list) or not all(isinstance(r, str) for r in revs) \
                    or len(revs) > MAX_DOCS:
                raise bad_request(f"revisions of {doc_id!r} must be a list of revs")
        # Ids no document here has (`_design/...`: a PouchDB keeps its indexes in such docs)
        # lack every revision: the push sends them, and _bulk_docs refuses each alone.
        never = {i: {"missing": revs} for i, revs in asked.items() if i.startswith("_")}
        diff = await view.revs_diff({i: r for i, r in asked.items() if i not in never})
        return _json({**diff, **never})

    async def bulk_docs(request: Request) -> Response:
        """POST: write many documents ({"docs": [...], "new_edits": bool}); a refused or
        conflicting document is an error in its own result"""
        view = await open_view(request)
        async with write_body(request, BULK_DOCS) as (body, spool):
            docs = body.get("docs")
            new_edits = body.get("new_edits", True)
            if not isinstance(docs, list):
                raise bad_request("POST body must include `docs` parameter.")
            if not isinstance(new_edits, bool):
                raise bad_request("`new_edits` parameter must be a boolean.")
            if len(docs) > MAX_DOCS:
                raise _too_many("documents")
            results = [_as_refusal(r) for r in await view.write(docs, new_edits=new_edits,
                                                                spool=spool)]
        if not new_edits:  # CouchDB answers only the failures of replicated revisions
            results = [r for r in results if "error" in r]
        return _json(results, 201)

    async def bulk_get(request: Request) -> Response:
        """POST: many documents by id and rev ({"docs": [{"id", "rev"?}]}, ?revs=true)"""
        view = await open_view(request)
        body = await bodies.json_object(request, cap)
        asked = body.get("docs")
        if not isinstance(asked, list):
            raise bad_request("Missing JSON list of 'docs'.")
        if len(asked) > MAX_DOCS:
            raise _too_many("documents")
        wanted = []
        for item in asked:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise bad_request("each of 'docs' must be an object with a text 'id'")
            rev = item.get("rev")
            if rev is not None and not isinstance(rev, str):
                raise bad_request("'rev' must be text")
            wanted.append((item["id"], rev))
        revs = params.flag(request.query_params, "revs")
        results = await view.bulk_get(wanted, revs=revs)
        if params.flag(request.query_params, "attachments"):  # data inline, streamed
            return StreamingResponse(inline.results_with_data(results, _inline_data(parts.files)),
                                     media_type="application/json")
        return _json({"results": results})

    async def ensure_full_commit(request: Request) -> Response:
        """POST: every write is durable when answered: nothing to commit"""
        await open_view(request)
        return _json({"ok": True, "instance_start_time": INSTANCE_START}, 201)

    async def local_doc(request: Request) -> Response:
        """GET: a local document of this credential (replication checkpoints)
        PUT: store one (its _rev is 0-N)
        DELETE: remove one"""
        view = await open_view(request)
        local_id = request.path_params["local_id"]
        if request.method == "GET":
            return _json(await view.get_local(local_id))
        if request.method == "DELETE":
            await view.delete_local(local_id, request.query_params.get("rev"))
            return _json({"ok": True, "id": "_local/" + local_id, "rev": "0-0"})
        rev = await view.put_local(local_id, await bodies.json_object(request, cap))
        return _json({"ok": True, "id": "_local/" + local_id, "rev": rev}, 201)

    async def design(request: Request) -> Response:
        """Design documents and views are not supported (403 forbidden)."""
        await open_view(request)
        raise forbidden(DESIGN_REASON)

    async def all_docs(request: Request) -> Response:
        """GET: the documents this credential may read here, by id (keys, key, startkey,
        endkey, inclusive_end, limit, skip, descending, include_docs, update_seq)
        POST: the same, with {"keys": [...]} in the body"""
        view = await open_view(request)
        query = request.query_params
        keys = None
        if request.method == "POST":
            keys = (await bodies.json_object(request, cap)).get("keys")
            if keys is None:
                raise bad_request("POST _all_docs needs {\"keys\": [...]}")
        else:
            given, keys = params.json_value(query, "keys")
            keys = keys if given else None
        if keys is not None and (not isinstance(keys, list) or len(keys) > MAX_DOCS):
            raise bad_request(f"`keys` must be a JSON list of at most {MAX_DOCS} ids")
        has_key, key = params.json_value(query, "key")
        _, start = params.json_value(query, "startkey", "start_key")
        _, end = params.json_value(query, "endkey", "end_key")
        if has_key:
            start = end = key
        for name, value in (("startkey", start), ("endkey", end)):
            if value is not None and not isinstance(value, str):
                raise bad_request(f"`{name}` must be a JSON string (a document id)")
        answer = await view.all_docs(
            keys=keys, start=start, end=end,
            inclusive_end=params.flag(query, "inclusive_end", True),
            descending=params.flag(query, "descending"), skip=params.count(query, "skip", 0),
            limit=params.limit(query), include_docs=params.flag(query, "include_docs"))
        if params.flag(query, "update_seq"):
            answer["update_seq"] = await view.store.update_seq()
        return _json(answer)

    async def document(request: Request) -> Response:
        """GET: a document (rev, revs, revs_info, open_revs, conflicts, latest; ETag: its rev)
        PUT: create or update a document (_rev, If-Match or ?rev=; ?new_edits=false)
        DELETE: delete a document (?rev= or If-Match)"""
        view = await open_view(request)
        attachment = files_routes.target(request)
        if attachment is not None:
            return await files_routes.serve(request, view, parts.files, *attachment)
        doc_id = check_doc_id(request.path_params["doc_id"])
        query = request.query_params
        if request.method in ("GET", "HEAD"):
            return await _read(request, view, doc_id, parts.files)
        if request.method == "DELETE":
            rev = _named_rev(request, query.get("rev"), None)
            await view.get(doc_id)  # a doc it may not read is missing, not refused
            if rev is None:
                raise CouchError(409, "conflict", CONFLICT_REASON)
            result = await _write_one(view, {"_id": doc_id, "_rev": rev, "_deleted": True},
                                      new_edits=True)
            return _json({"ok": True, "id": doc_id, "rev": result["rev"]},
                         headers={"etag": f'"{result["rev"]}"'})
        async with write_body(request, ONE_DOC) as (doc, spool):
            if doc.get("_id", doc_id) != doc_id:
                raise bad_request("Document id must match the id in the URL")
            rev = _named_rev(request, query.get("rev"), doc.get("_rev"))
            doc = {**doc, "_id": doc_id, **({"_rev": rev} if rev is not None else {})}
            new_edits = params.flag(query, "new_edits", True)
            result = await _write_one(view, doc, new_edits=new_edits, spool=spool)
        return _json({"ok": True, "id": doc_id, "rev": result["rev"]}, 201,
                     headers={"etag": f'"{result["rev"]}"'})

    async def find(request: Request) -> Response:
        """POST: the documents this credential may read here that match a Mango selector
        (selector, fields, sort, limit, skip, bookmark); scans, as no index is kept"""
        view = await open_view(request)
        query = _mango_query(await bodies.json_object(request, cap))
        async with find_slots:
            docs = await view.all_live()
            answer = await trio.to_thread.run_sync(_run_mango, query, docs)
        return _json(answer)

    async def explain(request: Request) -> Response:
        """POST: how a _find query would run: always over the special _all_docs index"""
        view = await open_view(request)
        query = _mango_query(await bodies.json_object(request, cap))
        return _json({"dbname": view.db.name, "index": ALL_DOCS_INDEX,
                      "selector": query.selector, "opts": {}, "limit": query.limit,
                      "skip": query.skip, "fields": "all_fields" if query.fields is None
                      else [".".join(f) for f in query.fields],
                      "range": {"start_key": None, "end_key": "<MAX>"}})

    async def index(request: Request) -> Response:
        """GET: the indexes: only the special _all_docs one
        POST: creating an index is refused (403): _find scans"""
        await open_view(request)
        if request.method == "POST":
            raise forbidden("indexes are not supported here: _find scans the documents")
        return _json({"total_rows": 1, "indexes": [ALL_DOCS_INDEX]})

    return [
        Route("/", welcome, methods=["GET"]),
        Route("/_all_dbs", all_dbs, methods=["GET"]),
        Route("/_uuids", uuids, methods=["GET"]),
        Route("/_session", session, methods=["GET"]),
        Route("/{db}", database, methods=["GET", "PUT", "POST", "DELETE"]),
        Route("/{db}/", database, methods=["GET", "PUT", "POST", "DELETE"]),
        Route("/{db}/_changes", changes, methods=["GET", "POST"]),
        Route("/{db}/_revs_diff", revs_diff, methods=["POST"]),
        Route("/{db}/_bulk_docs", bulk_docs, methods=["POST"]),
        Route("/{db}/_bulk_get", bulk_get, methods=["POST"]),
        Route("/{db}/_ensure_full_commit", ensure_full_commit, methods=["POST"]),
        Route("/{db}/_local/{local_id:path}", local_doc, methods=["GET", "PUT", "DELETE"]),
        Route("/{db}/_design/{rest:path}", design,
              methods=["GET", "PUT", "POST", "DELETE"]),
        Route("/{db}/_view/{rest:path}", design, methods=["GET", "POST"]),
        Route("/{db}/_all_docs", all_docs, methods=["GET", "POST"]),
        Route("/{db}/_find", find, methods=["POST"]),
        Route("/{db}/_explain", explain, methods=["POST"]),
        Route("/{db}/_index", index, methods=["GET", "POST"]),
        Route("/{db}/{doc_id:path}", document, methods=["GET", "PUT", "DELETE"]),
    ]


async def _read(request: Request, view: DatabaseView, doc_id: str, files) -> Response:
    query = request.query_params
    if "open_revs" in query:
        # the query is checked whole before any read (as CouchDB parses it first)
        open_revs = None if query["open_revs"] == "all" else \
            _rev_list(query, "open_revs", '`open_revs` must be "all" or a JSON list of revisions')
        since = _rev_list(query, "atts_since", "`atts_since` must be a JSON list of revisions")
        found = await view.open_revs(doc_id, open_revs)
        if "application/json" not in request.headers.get("accept", ""):
            # As CouchDB answers it, the files' data always with it (its replicator reads
            # open_revs so, never asking for attachments): those of `atts_since` as stubs.
            boundary = secrets.token_hex(16)
            return StreamingResponse(
                inline.open_revs_multipart(found, _inline_data(files), boundary, since),
                media_type=f'multipart/mixed; boundary="{boundary}"')
        if params.flag(query, "attachments"):  # with the data, streamed
            return StreamingResponse(
                inline.open_revs_with_data(found, _inline_data(files), since),
                media_type="application/json")
        return _json(found)
    revs = params.flag(query, "revs")
    revs_info = params.flag(query, "revs_info")
    doc = await view.get(doc_id, query.get("rev"), conflicts=params.flag(query, "conflicts"),
                         revs=revs or revs_info)
    if revs_info:
        history = doc["_revisions"]
        doc = {**doc, "_revs_info": [
            {"rev": f"{history['start'] - i}-{h}", "status": "available" if i == 0 else "missing"}
            for i, h in enumerate(history["ids"])]}
        if not revs:
            doc.pop("_revisions")
    etag = f'"{doc["_rev"]}"'
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"etag": etag})
    return _json(doc, headers={"etag": etag})


def _rev_list(query, name: str, error: str) -> list[str] | None:
    """The JSON list of revisions in parameter `name` (None when absent), else a 400."""
    given, revs = params.json_value(query, name)
    if given and (not isinstance(revs, list) or len(revs) > MAX_DOCS
                  or not all(isinstance(r, str) for r in revs)):
        raise bad_request(error)
    return revs if given else None


def _named_rev(request: Request, query_rev: str | None, body_rev: Any) -> str | None:
    """The revision a write names: ?rev=, the body's _rev, or If-Match; those given must
    agree (400 otherwise, as CouchDB answers)."""
    if body_rev is not None and not isinstance(body_rev, str):
        raise bad_request("_rev must be a string")
    if query_rev is not None and body_rev is not None and query_rev != body_rev:
        raise bad_request("Document rev from request body and query string have different "
                          "values")
    rev = query_rev if query_rev is not None else body_rev
    match = request.headers.get("if-match")
    if match is not None:
        tag = match.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        tag = tag[1:-1] if len(tag) >= 2 and tag[0] == tag[-1] == '"' else tag
        if rev is None:
            rev = tag
        elif rev != tag:  # CouchDB's answer; a stale If-Match alone is a 409 conflict
            raise bad_request("Document rev and etag have different values")
    return rev


async def _write_one(view: DatabaseView, doc: dict, *, new_edits: bool,
                     spool=None) -> dict:
    """One document written through the batch path: its result, or its error raised."""
    [result] = await view.write([doc], new_edits=new_edits, spool=spool)
    if "error" in result:
        status = {"conflict": 409, "forbidden": 403, "bad_request": 400,
                  "not_found": 404}.get(result["error"], 400)
        raise CouchError(status, result["error"], result["reason"])
    return result


# Per-document errors PouchDB's replicator moves past; any other ends its replication.
_TOLERATED = frozenset({"forbidden", "unauthorized", "conflict"})


def _as_refusal(result: dict) -> dict:
    """A per-document error of `_bulk_docs` as CouchDB names a refused write: `forbidden`
    (what CouchDB answers when validation refuses a document), its reason kept. A malformed
    document is no reason to end a replication: it is refused alone."""
    if "error" in result and result["error"] not in _TOLERATED:
        return {**result, "error": "forbidden"}
    return result


async def _optional_body(request: Request, cap: int) -> dict:
    """A POST body that may be empty (`_changes`)."""
    body = await bodies.json_body(request, cap, check_type=False, empty={})
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    return body


def _filter(query, body: dict):
    """(doc_ids, selector) of a `_changes` request's `filter`."""
    name = query.get("filter")
    if name is None:
        return None, None
    if name == "_doc_ids":
        given, ids = params.json_value(query, "doc_ids")
        if not given:
            ids = body.get("doc_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise bad_request("filter=_doc_ids needs `doc_ids`, a JSON list of ids")
        if len(ids) > MAX_DOCS:
            raise _too_many("ids")
        return set(ids), None
    if name == "_selector":
        selector = body.get("selector")
        if not isinstance(selector, dict):
            raise bad_request("filter=_selector needs a `selector` object in the body")
        return None, _compile_selector(selector)
    if name in ("_view", "_design") or "/" in name:
        raise forbidden(DESIGN_REASON)
    raise bad_request(f"unknown filter {name!r} (_doc_ids or _selector)")


def _compile_selector(selector: dict):
    try:
        predicate = mango.compile_selector(selector)
    except mango.MangoError as exc:
        raise bad_request(str(exc)) from None

    def matches(doc: dict) -> bool:
        try:
            return predicate(doc)
        except mango.MangoError as exc:  # mid-scan: a $regex automaton past its bound
            raise bad_request(str(exc)) from None

    return matches


def _run_mango(query: mango.Query, docs: list[dict]) -> dict:
    """`mango.run`, its MangoErrors (a $regex too costly on some document) as a 400."""
    try:
        return mango.run(query, docs)
    except mango.MangoError as exc:
        raise bad_request(str(exc)) from None


def _mango_query(body: dict) -> mango.Query:
    try:
        return mango.parse_query(body)
    except mango.MangoError as exc:
        raise bad_request(str(exc)) from None


def _too_many(what: str) -> CouchError:
    return CouchError(413, "request_entity_too_large", f"at most {MAX_DOCS} {what} per request")




def _inline_data(files) -> inline.OpenAttachment:
    """Inline data read as `/couch` attachment GETs read it (fetched first when a share
    fetched on read lacks it)."""
    return lambda doc_id, name, rev: files.open(doc_id, name, rev, None)
