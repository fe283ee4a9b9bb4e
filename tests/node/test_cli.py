"""The command line and the local API against real nodes (subprocesses, real sockets)."""

from __future__ import annotations

import json
import signal
import socket
import stat

import httpx

from tests.node.conftest import init_node, plugshare, start_node


def test_init_creates_a_private_home_and_refuses_a_second_init(tmp_path):
    home = tmp_path / "n1"
    done = init_node(home, "--name", "n1")
    assert "node id:" in done.stdout
    credential = home / "owner.credential"
    assert stat.S_IMODE(credential.stat().st_mode) == 0o600
    assert len(credential.read_text().strip()) >= 32
    before = sorted(p.name for p in home.iterdir())
    config_before = (home / "node.toml").read_text()

    again = plugshare(home, "init", "--name", "other")
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "already holds a plugshare node" in again.stderr
    assert sorted(p.name for p in home.iterdir()) == before
    assert (home / "node.toml").read_text() == config_before


def test_status_and_documents_through_the_api(node):
    status = node.cli("--json", "status")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["name"] == "alice"
    assert info["api"] == node.api_url
    assert info["store"]["backend"] == "sqlite"
    assert info["node_id"] == node.node_id

    put = node.cli("--json", "doc", "put", "io.notes", '{"title": "first"}', "--id", "n1")
    assert put.returncode == 0, put.stderr
    rev1 = json.loads(put.stdout)["rev"]
    assert rev1.startswith("1-")

    got = json.loads(node.cli("--json", "doc", "get", "n1").stdout)
    assert got == {"_id": "n1", "_rev": rev1, "doctype": "io.notes", "title": "first"}

    upd = node.cli("--json", "doc", "put", "io.notes", '{"title": "second"}', "--id", "n1",
                   "--rev", rev1)
    rev2 = json.loads(upd.stdout)["rev"]
    assert rev2.startswith("2-")
    asked = json.loads(node.cli("--json", "doc", "get", "n1", "--rev", rev2).stdout)
    assert asked["title"] == "second" and asked["_rev"] == rev2

    # stdin, generated id
    piped = node.cli("--json", "doc", "put", "io.tasks", "-", input='{"todo": "x"}')
    task_id = json.loads(piped.stdout)["id"]

    listing = json.loads(node.cli("--json", "doc", "list").stdout)
    assert sorted(d["_id"] for d in listing["docs"]) == sorted(["n1", task_id])
    only_notes = json.loads(node.cli("--json", "doc", "list", "--doctype", "io.notes").stdout)
    assert [d["_id"] for d in only_notes["docs"]] == ["n1"]

    rm = node.cli("--json", "doc", "rm", "n1", "--rev", rev2)
    assert rm.returncode == 0, rm.stderr
    assert json.loads(rm.stdout)["rev"].startswith("3-")
    gone = node.cli("doc", "get", "n1")
    assert gone.returncode == 1 and "not_found" in gone.stderr


def test_bad_input_gives_one_clear_line_and_changes_nothing(node):
    rev = json.loads(node.cli("--json", "doc", "put", "t", '{"a": 1}', "--id", "d").stdout)["rev"]

    cases = [
        (("doc", "put", "t", "{not json"), "not valid JSON"),
        (("doc", "put", "t", "[1, 2]"), "must be a JSON object"),
        (("doc", "put", "t", '{"a": 2}', "--id", "_secret"), "may not start with '_'"),
        (("doc", "put", "t", '{"a": 2}', "--id", "d"), "conflict"),  # no rev on a live doc
        (("doc", "put", "t", '{"a": 2}', "--id", "d", "--rev", "1-" + "0" * 32), "conflict"),
        (("doc", "put", "t", '{"_weird": 2}', "--id", "e"), "bad_request"),
        (("doc", "get", "missing"), "not_found"),
        (("doc", "rm", "d", "--rev", "9-" + "0" * 32), "conflict"),
    ]
    for args, expected in cases:
        done = node.cli(*args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr
        assert expected in done.stderr, (args, done.stderr)

    doc = json.loads(node.cli("--json", "doc", "get", "d").stdout)
    assert doc["_rev"] == rev and doc["a"] == 1
    ids = [d["_id"] for d in json.loads(node.cli("--json", "doc", "list").stdout)["docs"]]
    assert ids == ["d"]

    usage = node.cli("doc", "put")
    assert usage.returncode == 2 and "Usage" in usage.stderr


def test_api_authenticates_and_answers_json_errors(node):
    base = node.api_url
    assert httpx.get(f"{base}/status").status_code == 401
    wrong = httpx.get(f"{base}/status", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"

    auth = {"Authorization": f"Bearer {node.credential}"}
    with httpx.Client(base_url=base, headers=auth) as api:
        created = api.put("/data/io.notes/a", json={"x": 1})
        assert created.status_code == 201
        assert api.get("/data/io.notes/a").json()["x"] == 1
        assert api.get("/data/io.other/a").status_code == 404  # served only under its doctype
        bad = api.put("/data/io.notes/b", content=b"{oops")
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["reason"]
        stale = api.put("/data/io.notes/a", json={"x": 2, "_rev": "1-" + "f" * 32})
        assert stale.status_code == 409 and stale.json()["error"] == "conflict"
        mismatch = api.put("/data/io.notes/c", json={"doctype": "io.other"})
        assert mismatch.status_code == 400
        assert api.get("/nowhere").json()["error"] == "not_found"
        assert api.get("/data/io.notes/a").json()["x"] == 1


def test_no_node_running_names_plugshare_run(tmp_path):
    home = tmp_path / "idle"
    init_node(home)
    done = plugshare(home, "status")
    assert done.returncode == 1
    assert "plugshare run" in done.stderr and done.stderr.count("\n") == 1
    missing = plugshare(tmp_path / "nowhere", "status")
    assert missing.returncode == 1 and "plugshare init" in missing.stderr


def test_port_in_use_is_one_clear_error(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        home = tmp_path / "busy"
        done = plugshare(home, "init", "--api-listen", f"127.0.0.1:{port}", "--no-discovery")
        assert done.returncode == 0, done.stderr
        run = plugshare(home, "run", timeout=60)
        assert run.returncode == 1
        error_lines = [l for l in run.stderr.splitlines() if l.startswith("Error:")]
        assert len(error_lines) == 1 and f"127.0.0.1:{port}" in error_lines[0]
        assert "Traceback" not in run.stderr
        assert not (home / "run.json").exists()
    finally:
        blocker.close()


def test_bad_config_key_is_named_with_its_file(tmp_path):
    home = tmp_path / "cfg"
    init_node(home)
    config = home / "node.toml"
    config.write_text(config.read_text().replace("[api]", "[api]\nlisten_typo = 1"))
    done = plugshare(home, "run")
    assert done.returncode == 1
    assert str(config) in done.stderr and "listen_typo" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigint_and_sigterm_stop_the_node_cleanly(tmp_path):
    home = tmp_path / "stop"
    init_node(home)
    for sig in (signal.SIGINT, signal.SIGTERM):
        running = start_node(home)
        put = running.cli("doc", "put", "t", '{"kept": true}', "--id", f"d{sig}")
        assert put.returncode == 0, put.stderr
        assert running.stop(sig) == 0
        assert not (home / "run.json").exists()
    # nothing lost across the restarts
    running = start_node(home)
    try:
        ids = [d["_id"] for d in json.loads(running.cli("--json", "doc", "list").stdout)["docs"]]
        assert ids == sorted(f"d{s}" for s in (signal.SIGINT, signal.SIGTERM))
    finally:
        running.stop()


def test_couchdb_backend_stores_docs_on_the_server(tmp_path, couchdb_url):
    home = tmp_path / "bob"
    init_node(home, "--name", "bob", "--store", "couchdb", "--couchdb-url", couchdb_url)
    running = start_node(home)
    try:
        put = running.cli("--json", "doc", "put", "io.notes", '{"title": "on the server"}',
                          "--id", "srv1")
        assert put.returncode == 0, put.stderr
        status = json.loads(running.cli("--json", "status").stdout)
        assert status["store"]["backend"] == "couchdb"
        # visible with a plain HTTP client on the server itself (what curl would show)
        raw = httpx.get(f"{couchdb_url}/plugshare-bob/srv1").json()
        assert raw["title"] == "on the server" and raw["doctype"] == "io.notes"
        assert raw["_rev"] == json.loads(put.stdout)["rev"]
    finally:
        running.stop()


def test_unreachable_couchdb_is_one_clear_error(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    home = tmp_path / "nocouch"
    init_node(home, "--store", "couchdb", "--couchdb-url", f"http://127.0.0.1:{port}")
    done = plugshare(home, "run")
    assert done.returncode == 1
    assert f"127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr
