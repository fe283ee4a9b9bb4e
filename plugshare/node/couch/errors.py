"""CouchDB's error shape for the `/couch` API: `{"error", "reason"}` with CouchDB's status
codes and error names, for this API's own refusals and for the token's and the store's."""

from __future__ import annotations

from starlette.responses import JSONResponse

from plugshare import token
from plugshare.errors import PlugshareError
from plugshare.store import base as store

NO_DATABASE = "Database does not exist."


class CouchError(PlugshareError):
    def __init__(self, status: int, error: str, reason: str):
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason


def bad_request(reason: str) -> CouchError:
    return CouchError(400, "bad_request", reason)


def no_database() -> CouchError:
    return CouchError(404, "not_found", NO_DATABASE)


def missing() -> CouchError:
    return CouchError(404, "not_found", "missing")


def forbidden(reason: str) -> CouchError:
    return CouchError(403, "forbidden", reason)


# A refusal from the token or the store, as CouchDB names it.
_MAPPED: list[tuple[type[Exception], int, str]] = [
    (token.AuthenticationError, 401, "unauthorized"),
    (token.NotFound, 404, "not_found"),
    (token.AccessDenied, 403, "forbidden"),
    (token.InvalidArgument, 400, "bad_request"),
    (token.AlreadyExists, 409, "conflict"),
    (token.IntegrityError, 502, "integrity"),
    (store.NotFound, 404, "not_found"),
    (store.Conflict, 409, "conflict"),
    (store.BadRequest, 400, "bad_request"),
    (store.Forbidden, 403, "forbidden"),
    (store.Unavailable, 503, "unavailable"),
]


def as_couch(exc: PlugshareError) -> CouchError:
    if isinstance(exc, CouchError):
        return exc
    for kind, status, error in _MAPPED:
        if isinstance(exc, kind):
            reason = getattr(exc, "reason", None) or str(exc)
            if error == "not_found" and kind is not token.NotFound:
                reason = "missing" if "does not exist" in reason or "deleted" in reason \
                    else reason
            return CouchError(status, error, reason)
    return CouchError(getattr(exc, "status", 500), getattr(exc, "error", "unknown_error"),
                      getattr(exc, "reason", None) or str(exc))


def error_response(exc: CouchError) -> JSONResponse:
    return JSONResponse({"error": exc.error, "reason": exc.reason}, status_code=exc.status)
