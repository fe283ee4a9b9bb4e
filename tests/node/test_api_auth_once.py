"""One token call per API request (issue 15 item 2): the guard skips its own `auth` for a
credential the token authenticated moments ago, and lets the command authenticate it. A
credential revoked in between still gets a 401, with the challenge the guard would send."""

from __future__ import annotations

import httpx


def _client(node, credential: str) -> httpx.Client:
    return httpx.Client(base_url=node.api_url, timeout=60.0,
                        headers={"Authorization": f"Bearer {credential}"})


def test_a_credential_revoked_after_use_gets_the_guards_401_on_both_apis(node):
    with _client(node, node.credential) as owner:
        added = owner.post("/token/apps", json={"name": "writer", "doctype": "io.once",
                                                "perm": "write"})
        assert added.status_code == 201, added.text
        credential = added.json()["credential"]
        with _client(node, credential) as app:
            # known to the token: both APIs serve it (and the guard now remembers it)
            assert app.put("/data/io.once/a", json={"n": 1}).status_code == 201
            assert app.get("/couch/io.once/a").status_code == 200
            assert owner.delete("/token/apps/writer").status_code in (200, 204)

            put = app.put("/data/io.once/b", json={"n": 2})
            assert put.status_code == 401, put.text
            assert put.json()["error"] == "unauthorized"
            assert put.headers["www-authenticate"] == "Bearer"

            couch = app.put("/couch/io.once/c", json={"n": 3})
            assert couch.status_code == 401, couch.text
            assert couch.json()["error"] == "unauthorized"
            assert couch.headers["www-authenticate"] == 'Basic realm="plugshare"'

        assert owner.get("/data/io.once/b").status_code == 404  # nothing was written
