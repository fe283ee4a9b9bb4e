"""The query parameters of the `/couch` API, read as CouchDB reads them (pure).

Values come as text; booleans are `true`/`false`, numbers decimal, `key`-like parameters JSON.
A malformed value is a `bad_request`. Parameters this API does not know are ignored, as
CouchDB ignores them (`conflicts` on `_changes`, `stale`, `r`...)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from plugshare.node.couch.errors import bad_request

MAX_LIMIT = 10_000  # rows one request answers at most (a larger `limit` is capped)
FEEDS = ("normal", "longpoll", "continuous", "eventsource")
_SEQUENCE = re.compile(r"[0-9]+(-[A-Za-z0-9_=-]+)?")
DEFAULT_TIMEOUT_MS = 60_000  # a longpoll or continuous feed without heartbeat ends after this


def flag(params: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if value in ("true", "false"):
        return value == "true"
    raise bad_request(f"Invalid boolean parameter {name!r}: {value!r} (true or false)")


def count(params: Mapping[str, str], name: str, default: int | None = None, *,
          cap: int | None = None) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    if not value.isascii() or not value.isdigit():
        raise bad_request(f"Invalid value for {name!r}: {value!r} (a whole number)")
    number = int(value)
    return min(number, cap) if cap is not None else number


def limit(params: Mapping[str, str]) -> int:
    """`limit`, capped at MAX_LIMIT (also when absent: one answer is bounded)."""
    return count(params, "limit", MAX_LIMIT, cap=MAX_LIMIT)


def json_value(params: Mapping[str, str], *names: str) -> tuple[bool, Any]:
    """(given, value) of the first of `names` present, parsed as JSON."""
    for name in names:
        if name in params:
            try:
                return True, json.loads(params[name])
            except ValueError:
                raise bad_request(f"Invalid JSON in parameter {name!r}") from None
    return False, None


def since(params: Mapping[str, str]) -> str | int:
    """`since`: 0, `now`, or a sequence this API handed out: opaque, checked by the store,
    but of CouchDB's form whatever the backend (a number, then maybe `-` and base64url), so
    a malformed one is refused here even where the store would take it. A JSON-quoted
    sequence (as some clients send) is taken unquoted."""
    value = params.get("since", "0")
    if value == "now":
        return "now"
    if value.startswith('"') and value.endswith('"') and len(value) >= 2:
        value = value[1:-1]
    if len(value) > 1000 or not _SEQUENCE.fullmatch(value):
        raise bad_request(f"Malformed sequence supplied in 'since' parameter: {value!r}")
    return int(value) if value.isascii() and value.isdigit() else value


def feed(params: Mapping[str, str]) -> str:
    value = params.get("feed", "normal")
    if value not in FEEDS:
        raise bad_request(f"Invalid value for 'feed': {value!r} (one of {', '.join(FEEDS)})")
    return value


def milliseconds(params: Mapping[str, str], name: str) -> float | None:
    """A duration parameter in milliseconds, as seconds (`heartbeat=true` is CouchDB's
    default of 60 s)."""
    if params.get(name) == "true" and name == "heartbeat":
        return 60.0
    value = count(params, name)
    return None if value is None else value / 1000
