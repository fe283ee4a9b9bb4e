"""The local API's OpenAPI document, generated from its routes (apispec builds it).

Each route's endpoint says what it does in its docstring: a line `METHOD: summary` per method
(or a first line for all of them), so a route added to the API is in the document with no
second list to keep in step. Errors share one shape, `{"error", "reason"}`."""

from __future__ import annotations

import inspect
import re
from typing import Iterable

from apispec import APISpec
from starlette.routing import Route

__all__ = ["PUBLIC_PATHS", "build_openapi", "openapi_path", "summaries"]

PUBLIC_PATHS = frozenset({"/", "/openapi.json"})  # served without a credential: no data
_METHODS = ("GET", "PUT", "POST", "DELETE")
_METHOD_LINE = re.compile(r"^\s*(GET|PUT|POST|DELETE|HEAD):\s*(.+)$")


def openapi_path(path: str) -> str:
    """Starlette's `/data/{doctype}/{doc_id:path}` as OpenAPI spells it."""
    return re.sub(r"\{(\w+)(?::\w+)?\}", r"{\1}", path)


def summaries(endpoint) -> dict[str, str]:
    """{METHOD: summary} from `endpoint`'s docstring: its `METHOD: text` lines, else its
    first line for every method."""
    doc = inspect.getdoc(endpoint) or ""
    per_method = {}
    for line in doc.splitlines():
        match = _METHOD_LINE.match(line)
        if match:
            per_method[match.group(1)] = match.group(2).strip()
    if per_method:
        return per_method
    first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
    return {method: first for method in _METHODS} if first else {}


def build_openapi(routes: Iterable, *, version: str, basic_under: str | None = None) -> dict:
    """The OpenAPI document of `routes`; those under the prefix `basic_under` (the CouchDB
    API, whose clients send Basic) take HTTP Basic as well as Bearer."""
    spec = APISpec(
        title="plugshare local API", version=version, openapi_version="3.1.0",
        info={"description": "A node's documents, shares and token, for local apps. Every "
                             "route but / and /openapi.json needs `Authorization: Bearer "
                             "<credential>` (the CouchDB API also takes HTTP Basic, any user "
                             "name and the credential as the password); what a credential "
                             "may do is the token's decision."},
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    if basic_under is not None:  # any user name, the credential as the password
        spec.components.security_scheme("basic", {"type": "http", "scheme": "basic"})
    spec.components.schema("Error", {
        "type": "object", "required": ["error", "reason"],
        "properties": {"error": {"type": "string"}, "reason": {"type": "string"}},
    })
    error = {"description": "an error: 400 bad input, 401 no or unknown credential, 403 "
                            "refused by the token, 404, 409 stale rev, 413 too large, 502 "
                            "a sealed document failed authentication, 503 token restarting",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for route in routes:
        if not isinstance(route, Route):
            continue
        said = summaries(route.endpoint)
        path = openapi_path(route.path)
        parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                      for name in re.findall(r"\{(\w+)", path)]
        operations = {}
        for method in sorted(route.methods - {"HEAD"}):
            operation = {
                "summary": said.get(method) or f"{method} {path}",
                "responses": {"2XX": {"description": "success (JSON)"}, "default": error},
            }
            if parameters:
                operation["parameters"] = parameters
            if path in PUBLIC_PATHS:
                operation["security"] = []
            elif basic_under is not None and (path == basic_under
                                              or path.startswith(basic_under + "/")):
                operation["security"] = [{"bearer": []}, {"basic": []}]
            else:
                operation["security"] = [{"bearer": []}]
            operations[method.lower()] = operation
        spec.path(path=path, operations=operations)
    return spec.to_dict()
