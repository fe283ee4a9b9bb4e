"""The local API follows HTTP's conventions (issue #11 item 15): `GET /` describes it,
`/openapi.json` is an OpenAPI document of every route (generated from the routes, so a new
route cannot be left out), HEAD answers like GET without a body (and never writes), and
documents carry their revision as an ETag and honour If-Match / If-None-Match.

A real node over a real socket; the OpenAPI document is checked with a real validator."""

from __future__ import annotations

import httpx
import pytest
from openapi_spec_validator import validate

from plugshare.node.api import ApiParts, create_app
from plugshare.node.openapi import openapi_path


@pytest.fixture
def api(node):
    with httpx.Client(base_url=node.api_url,
                      headers={"authorization": f"Bearer {node.credential}"},
                      timeout=30) as client:
        yield client


def put(api, doc_id: str, body: dict, **kwargs) -> httpx.Response:
    return api.put(f"/data/io.notes/{doc_id}", json=body, **kwargs)


def test_the_root_describes_the_api_without_a_credential(node):
    answer = httpx.get(node.api_url + "/", timeout=30)
    assert answer.status_code == 200
    body = answer.json()
    assert body["name"] == "plugshare" and body["openapi"] == "/openapi.json"
    assert body["version"]
    assert node.node_id not in answer.text  # nothing about whose node it is


def test_openapi_lists_every_route_and_method_and_is_valid(node):
    answer = httpx.get(node.api_url + "/openapi.json", timeout=30)
    assert answer.status_code == 200
    spec = answer.json()
    validate(spec)
    app = create_app(ApiParts(call=None, documents=None, admin=None, sharing=None, events=None,
                              peers_status=list, status=None))
    served = {(openapi_path(route.path), method.lower())
              for route in app.app.routes for method in route.methods if method != "HEAD"}
    described = {(path, method) for path, item in spec["paths"].items()
                 for method in item if method in ("get", "put", "post", "delete")}
    assert served == described
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            summary = operation.get("summary", "")
            assert summary and not summary.startswith(method.upper()), (
                f"{method.upper()} {path}: its endpoint's docstring says nothing of it")


def test_head_answers_like_get_without_a_body_and_writes_nothing(api):
    rev = put(api, "h1", {"title": "one"}).json()["rev"]
    head = api.head("/data/io.notes/h1")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == f'"{rev}"'
    assert api.get("/data/io.notes/h1").json()["_rev"] == rev  # HEAD wrote nothing
    assert api.head("/data/io.notes/missing").status_code == 404
    assert api.head("/docs/h1").status_code == 200
    assert api.head("/data/io.notes/").status_code == 200


def test_a_document_carries_its_rev_as_etag(api):
    rev = put(api, "e1", {"title": "one"}).json()["rev"]
    got = api.get("/data/io.notes/e1")
    assert got.headers["etag"] == f'"{rev}"'
    assert api.get("/docs/e1").headers["etag"] == f'"{rev}"'
    assert api.get("/data/io.notes/e1", headers={"if-none-match": f'"{rev}"'}).status_code == 304


def test_if_match_stands_for_the_rev_on_put_and_delete(api):
    rev1 = put(api, "m1", {"title": "one"}).json()["rev"]
    rev2 = put(api, "m1", {"title": "two"}, headers={"if-match": f'"{rev1}"'}).json()["rev"]
    assert rev2.startswith("2-")
    stale = put(api, "m1", {"title": "three"}, headers={"if-match": f'"{rev1}"'})
    assert stale.status_code == 409 and stale.json()["error"] == "conflict"
    both = put(api, "m1", {"title": "x", "_rev": rev2}, headers={"if-match": f'"{rev1}"'})
    assert both.status_code == 400 and both.json()["error"] == "bad_request"
    assert api.get("/data/io.notes/m1").json()["title"] == "two"
    gone = api.delete("/data/io.notes/m1", headers={"if-match": f'"{rev2}"'})
    assert gone.status_code == 200 and gone.json()["ok"] is True
    assert api.get("/data/io.notes/m1").status_code == 404


def test_an_idle_keep_alive_connection_outlives_a_client_pools_expiry(node):
    """Seen under load: httpx keeps an idle connection in its pool for 5 s, and the API
    closed idle connections after 5 s too, so a PUT sent on one at that moment met a reset
    ("Connection reset by peer"). The API keeps them well past common pool expiries: a
    connection idle for 6 s still serves the next request, on the same socket."""
    import http.client
    import time
    from urllib.parse import urlsplit

    address = urlsplit(node.api_url)
    headers = {"Authorization": f"Bearer {node.credential}"}
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        conn.request("GET", "/status", headers=headers)
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        sock = conn.sock
        time.sleep(6)
        conn.request("GET", "/status", headers=headers)
        again = conn.getresponse()  # RemoteDisconnected when the node had closed it
        again.read()
        assert again.status == 200 and conn.sock is sock
    finally:
        conn.close()
