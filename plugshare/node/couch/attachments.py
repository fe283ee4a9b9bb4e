"""`/couch/{db}/{id}/{name}`: a document's attachment through the CouchDB API.

GET/HEAD stream it (as the local API does: content type, digest ETag, Range); PUT streams a
body in (`?rev=` or If-Match), DELETE removes it; both decided by the token as a write of
the document in this database (its doctype, or its share's scope), with the node's and the
shares' caps. An id holding `/` is sent as `%2F`, as CouchDB wants it."""

from __future__ import annotations

from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from plugshare.node import files_api
from plugshare.node.couch.errors import missing
from plugshare.node.couch.view import DatabaseView, check_doc_id
from plugshare.store.attachments import DEFAULT_CONTENT_TYPE


def target(request: Request) -> tuple[str, str] | None:
    """(document id, attachment name) when the raw path names an attachment, else None."""
    raw = (request.scope.get("raw_path") or b"").decode("latin-1").split("?", 1)[0]
    parts = raw.split("/", 5)  # '', couch, db, id, name
    if len(parts) < 5 or parts[3].startswith("_"):  # _local/..., _design/...: not files
        return None
    return unquote(parts[3]), "/".join(unquote(p) for p in parts[4:])


async def serve(request: Request, view: DatabaseView, files, doc_id: str,
                name: str) -> Response:
    check_doc_id(doc_id)
    credential = request.state.credential
    if request.method == "PUT":
        rev = await files.put(
            credential, view.db.doctype, doc_id, name, files_api.named_rev(request),
            request.headers.get("content-type") or DEFAULT_CONTENT_TYPE,
            files_api.request_body(request), digest=files_api.declared_digest(request),
            length=files_api.declared_length(request), share=view.db.share)
        return JSONResponse({"ok": True, "id": doc_id, "rev": rev}, status_code=201,
                            headers={"etag": f'"{rev}"'})
    if request.method == "DELETE":
        rev = await files.delete(credential, view.db.doctype, doc_id, name,
                                 files_api.named_rev(request), share=view.db.share)
        return JSONResponse({"ok": True, "id": doc_id, "rev": rev})
    doc = await view.get(doc_id, request.query_params.get("rev"))
    stub = (doc.get("_attachments") or {}).get(name)
    if doc.get("_deleted") or not isinstance(stub, dict):
        raise missing()
    stub, seal = await files.sealing(doc_id, doc["_rev"], name, stub)
    if seal is not None:  # opened by the token as it streams out
        return await files_api.attachment_response(
            request, stub, lambda wanted: files.open(doc_id, name, doc["_rev"], wanted,
                                                     stub=stub, seal=seal))
    return await files_api.attachment_response(  # fetched first if a share fetched on read
        request, stub, lambda wanted: files.open(doc_id, name, doc["_rev"], wanted))
