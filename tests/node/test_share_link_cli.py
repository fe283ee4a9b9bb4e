"""Share links on real nodes through the command line (issue #12 item 4): `share link` prints
a URL whose credential the node's token accepts for that share alone, `share links` / `share
show` list it, `share unlink`, an expiry and a revocation of the member that made it end it,
and the audit log names it. Until the CouchDB API (`/couch/...`) lands, the credential is
used on `/data/{doctype}/{id}`: the same token decides both."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import httpx

from tests.node.cluster import cluster, share_between, wait_until  # noqa: F401 (fixture)

NOTES = "io.notes"


def _as(api_url: str, credential: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, timeout=30,
                        headers={"authorization": f"Bearer {credential}"})


def _put(node, doc_id: str, doctype: str, body: dict) -> None:
    done = node.cli("doc", "put", doctype, json.dumps(body), "--id", doc_id)
    assert done.returncode == 0, done.stderr


def test_share_link_prints_a_url_whose_credential_reads_that_share_alone(node):
    assert node.cli("share", "create", "notes", "--doctype", NOTES,
                    "--selector", '{"tag": "shared"}').returncode == 0
    _put(node, "s1", NOTES, {"tag": "shared", "text": "for the link"})
    _put(node, "p1", NOTES, {"tag": "private", "text": "not for the link"})
    _put(node, "t1", "io.tasks", {"tag": "shared"})

    made = node.cli("share", "link", "notes", "--read-only")
    assert made.returncode == 0, made.stderr
    url = urlsplit(made.stdout.strip())
    api = urlsplit(node.api_url)
    assert (url.scheme, url.hostname, url.port) == ("http", api.hostname, api.port)
    assert url.path == "/couch/share:notes"
    link_id, credential = url.username, url.password
    assert credential.startswith(f"ps1.{link_id}.")
    assert f"link {link_id}, read-only, until unlinked" in made.stderr
    assert "listens on loopback only" in made.stderr and "[api] listen" in made.stderr

    with _as(node.api_url, credential) as link:
        assert link.get("/data/io.notes/s1").json()["text"] == "for the link"
        assert link.get("/data/io.notes/p1").status_code == 404  # outside the selector
        assert link.get("/data/io.tasks/t1").status_code == 403  # another doctype
        assert [d["_id"] for d in link.get("/data/io.notes/").json()["docs"]] == ["s1"]
        assert [d["_id"] for d in link.get("/docs/").json()["docs"]] == ["s1"]
        put = link.put("/data/io.notes/new", json={"tag": "shared"})
        assert put.status_code == 403, put.text  # read-only
        # nothing of the node's administration is a link's
        for method, path in [("GET", "/status"), ("GET", "/shares"), ("GET", "/shares/notes"),
                             ("GET", "/token/apps"), ("GET", "/token/rules"),
                             ("GET", "/token/audit"), ("GET", "/peers"), ("GET", "/events"),
                             ("GET", "/links"), ("GET", "/shares/notes/links"),
                             ("POST", "/shares/notes/invite"), ("GET", "/invitations")]:
            kwargs = {"json": {}} if method == "POST" else {}
            answer = link.request(method, path, **kwargs)
            assert answer.status_code == 403, (path, answer.status_code, answer.text)
        answer = link.post("/shares/notes/links", json={"permission": "write"})
        assert answer.status_code == 403, answer.text

    listed = node.cli("share", "links")
    assert listed.returncode == 0 and link_id in listed.stdout and "active" in listed.stdout
    rows = json.loads(node.cli("--json", "share", "links", "notes").stdout)["links"]
    assert [(r["id"], r["share"], r["permission"], r["status"]) for r in rows] == [
        (link_id, "notes", "read", "active")]
    assert credential.split(".")[2] not in json.dumps(rows)
    shown = node.cli("share", "show", "notes")
    assert f"link     {link_id}  read   active" in shown.stdout, shown.stdout

    audit = json.loads(node.cli("--json", "audit", "--principal", f"link:{link_id}",
                                "--tail", "1000").stdout)["entries"]
    assert {(e["action"], e["doc_id"], e["allowed"]) for e in audit} >= {
        ("read", "s1", True), ("read", "p1", False), ("write", "new", False)}

    gone = node.cli("share", "unlink", "notes", made.stdout.strip())  # by its URL
    assert gone.returncode == 0 and f"link {link_id} of share 'notes' unlinked" in gone.stdout
    with _as(node.api_url, credential) as link:
        refused = link.get("/data/io.notes/s1")
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    rows = json.loads(node.cli("--json", "share", "links").stdout)["links"]
    assert [r["status"] for r in rows] == ["unlinked"]
    again = node.cli("share", "unlink", "notes", credential)  # by its credential
    assert again.returncode == 1 and "no link" in again.stderr
    refusals = json.loads(node.cli("--json", "audit", "--denied", "--principal",
                                   f"link:{link_id}", "--tail", "100").stdout)["entries"]
    assert refusals[-1]["action"] == "authenticate" and "unlinked" in refusals[-1]["reason"]


def test_a_write_link_writes_in_scope_and_an_expired_link_is_refused(node):
    assert node.cli("share", "create", "notes", "--doctype", NOTES,
                    "--selector", '{"tag": "shared"}').returncode == 0
    made = node.cli("--json", "share", "link", "notes", "--expires", "1h")
    assert made.returncode == 0, made.stdout
    link = json.loads(made.stdout)
    assert set(link) >= {"url", "id", "credential", "share", "permission", "expires"}
    assert link["permission"] == "write" and link["share"] == "notes"
    assert link["credential"] in link["url"] and link["expires"] is not None
    with _as(node.api_url, link["credential"]) as client:
        assert client.put("/data/io.notes/w1", json={"tag": "shared"}).status_code == 201
        assert client.put("/data/io.notes/w2", json={"tag": "private"}).status_code == 403
    doc = json.loads(node.cli("--json", "doc", "get", "w1").stdout)
    assert doc["tag"] == "shared"

    with _as(node.api_url, node.credential) as owner:  # hostile bodies: 400, nothing made
        for body in [{}, {"permission": "admin"}, {"permission": "read", "expires": "1h"},
                     {"permission": "read", "expires": 1.0}, {"permission": ["read"]},
                     {"permission": "read", "expires": 1e300}]:
            answer = owner.post("/shares/notes/links", json=body)
            assert answer.status_code == 400, (body, answer.text)
            assert answer.json()["error"] == "bad_request"
        assert owner.post("/shares/notes/links", content=b"{").status_code == 400
        assert owner.delete("/shares/notes/links/" + "0" * 16).status_code == 404
        assert len(owner.get("/links").json()["links"]) == 1
    bad = node.cli("share", "link", "notes", "--expires", "soon")
    assert bad.returncode == 2 and "--expires" in bad.stderr
    unknown = node.cli("share", "link", "nope")
    assert unknown.returncode == 1 and "no share named 'nope'" in unknown.stderr

    short = json.loads(node.cli("--json", "share", "link", "notes", "--expires", "2s").stdout)
    with _as(node.api_url, short["credential"]) as client:
        wait_until(lambda: client.get("/data/io.notes/w1").status_code == 401, timeout=60,
                   what="the 2 s link to expire")
    rows = {r["id"]: r["status"] for r in
            json.loads(node.cli("--json", "share", "links").stdout)["links"]}
    assert rows == {link["id"]: "active", short["id"]: "expired"}
    assert node.cli("share", "unlink", "notes", link["id"]).returncode == 0  # by its id
    with _as(node.api_url, link["credential"]) as client:
        assert client.get("/data/io.notes/w1").status_code == 401


def test_a_members_link_ends_when_the_owner_revokes_the_member(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    share_between(alice, [bob], name="notes", doctype=NOTES)
    alice.put(NOTES, {"text": "hello"}, "n1")
    made = bob.cli_json("share", "link", "notes", "--read-only")
    with _as(bob.running.api_url, made["credential"]) as client:
        wait_until(lambda: client.get("/data/io.notes/n1").status_code == 200, timeout=60,
                   what="n1 to reach bob and be readable through bob's link")
        alice.cli_ok("share", "revoke", "notes", "bob")
        wait_until(lambda: client.get("/data/io.notes/n1").status_code == 401, timeout=60,
                   what="bob's link to stop working once bob learns it was revoked")
    [row] = bob.cli_json("share", "links")["links"]
    assert row["status"] == "ended" and "revoked" in row["reason"]
    refused = bob.cli("share", "link", "notes")
    assert refused.returncode == 1 and "revoked" in refused.stderr


def test_the_link_url_opens_the_share_database_for_a_couchdb_client(node):
    """The URL itself is what a
    CouchDB client uses: HTTP Basic with the link's id and credential."""
    assert node.cli("share", "create", "notes", "--doctype", NOTES).returncode == 0
    _put(node, "s1", NOTES, {"text": "hi"})
    _put(node, "t1", "io.tasks", {"text": "not shared"})
    url = urlsplit(node.cli("share", "link", "notes", "--read-only").stdout.strip())
    base = f"{url.scheme}://{url.hostname}:{url.port}"
    with httpx.Client(base_url=base, timeout=30, auth=(url.username, url.password)) as couch:
        assert couch.get(url.path).status_code == 200
        assert couch.get(f"{url.path}/s1").json()["text"] == "hi"
        assert couch.get("/couch/io.tasks").status_code in (401, 403, 404)
    node.cli("share", "unlink", "notes", url.username)
    with httpx.Client(base_url=base, timeout=30, auth=(url.username, url.password)) as couch:
        assert couch.get(url.path).status_code == 401


def test_the_link_url_names_an_address_outside_clients_can_reach():
    """`share link` builds the URL from the API address the node runs on (run.json)."""
    import socket

    from plugshare.cli import _link_url

    link = {"id": "0123456789abcdef", "credential": "ps1.0123456789abcdef.c2VjcmV0",
            "share": "notes"}
    userinfo = "0123456789abcdef:ps1.0123456789abcdef.c2VjcmV0"
    url, note = _link_url("http://127.0.0.1:7414", link)
    assert url == f"http://{userinfo}@127.0.0.1:7414/couch/share:notes"
    assert "loopback only" in note and "[api] listen" in note
    assert "loopback only" in _link_url("http://[::1]:7414", link)[1]
    assert _link_url("http://192.168.1.20:7414", link) == (
        f"http://{userinfo}@192.168.1.20:7414/couch/share:notes", None)
    assert _link_url("http://[fd00::5]:7414", link)[0] == \
        f"http://{userinfo}@[fd00::5]:7414/couch/share:notes"
    anywhere, note = _link_url("http://0.0.0.0:7414", link)  # every address: the host's name
    assert anywhere == f"http://{userinfo}@{socket.gethostname()}:7414/couch/share:notes"
    assert note is None
