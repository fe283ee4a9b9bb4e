"""The command line and the local API against real nodes (subprocesses, real sockets)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys

import httpx

from tests.node.conftest import init_node, plugshare, start_node


def bare(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line exactly as given: no `--home` put in front."""
    return subprocess.run([sys.executable, "-m", "plugshare", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


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


def test_hints_are_commands_to_copy_and_paste(tmp_path):
    home = tmp_path / "my home"
    done = init_node(home)
    run = f"plugshare run --home {shlex.quote(str(home))}"
    assert f"start it with: {run}" in done.stdout
    offline = plugshare(home, "status")
    assert offline.returncode == 1 and f"`{run}`" in offline.stderr
    # the home is the default one (PLUGSHARE_HOME): the plain command is the right one
    default = bare("status", env={"PLUGSHARE_HOME": str(home)})
    assert default.returncode == 1 and "start it with `plugshare run`" in default.stderr
    nowhere = tmp_path / "no where"
    missing = plugshare(nowhere, "status")
    assert f"`plugshare init --home {shlex.quote(str(nowhere))}`" in missing.stderr


def test_json_and_home_go_after_the_command_too(node):
    home = str(node.home)
    status = bare("status", "--json", "--home", home)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["name"] == "alice"
    put = bare("doc", "put", "io.notes", '{"title": "t"}', "--home", home, "--id", "n1", "--json")
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["id"] == "n1"
    created = bare("share", "create", "my notes", "--doctype", "io.notes", "--home", home)
    assert created.returncode == 0, created.stderr
    shown = bare("share", "show", "my notes", "--json", "--home", home)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["name"] == "my notes"


def test_failures_with_json_are_one_json_error_on_stdout(node, tmp_path):
    missing = node.cli("doc", "get", "nope", "--json")
    assert missing.returncode == 1 and missing.stderr == ""
    assert json.loads(missing.stdout) == {"error": "not_found", "reason": json.loads(
        missing.stdout)["reason"]}
    assert missing.stdout.count("\n") == json.dumps(json.loads(missing.stdout),
                                                    indent=2).count("\n") + 1
    idle = tmp_path / "idle"
    init_node(idle)
    offline = plugshare(idle, "status", "--json")
    assert offline.returncode == 1 and offline.stderr == ""
    error = json.loads(offline.stdout)
    assert error["error"] == "node_unreachable" and "plugshare run --home" in error["reason"]
    usage = node.cli("doc", "put", "--json")
    assert usage.returncode == 2 and usage.stderr == ""
    assert json.loads(usage.stdout)["error"] == "usage"


def test_share_create_hint_and_status_text(node):
    created = node.cli("share", "create", "my notes", "--doctype", "io.notes")
    assert created.returncode == 0, created.stderr
    invite = shlex.join(["plugshare", "share", "invite", "my notes", "--home", str(node.home)])
    assert f"`{invite}`" in created.stdout
    status = node.cli("status")
    assert status.returncode == 0, status.stderr
    peer_line, = [l for l in status.stdout.splitlines() if l.startswith("peer ")]
    address = json.loads(node.cli("status", "--json").stdout)["peer_address"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    assert peer_line.split() == ["peer", address]


def test_rules_for_unknown_subjects_are_refused(node):
    ghost = node.cli("rule", "add", "--doctype", "io.notes", "--app", "ghost", "--perm", "read")
    assert ghost.returncode == 1 and ghost.stderr.count("\n") == 1
    assert "no app 'ghost'" in ghost.stderr and "plugshare app add" in ghost.stderr
    stranger = node.cli("rule", "add", "--doctype", "io.notes", "--peer", node.node_id,
                        "--perm", "read")
    assert stranger.returncode == 1 and "no peer" in stranger.stderr
    assert json.loads(node.cli("rule", "list", "--json").stdout)["rules"] == []
    # a known app and any role are fine
    assert node.cli("app", "add", "notes", "--doctype", "io.notes", "--perm", "read").returncode == 0
    before = len(json.loads(node.cli("rule", "list", "--json").stdout)["rules"])  # its grant
    for subject in (("--app", "notes"), ("--role", "family")):
        done = node.cli("rule", "add", "--doctype", "io.tasks", *subject, "--perm", "read")
        assert done.returncode == 0, done.stderr
    assert len(json.loads(node.cli("rule", "list", "--json").stdout)["rules"]) == before + 2


def test_one_rule_for_names(tmp_path):
    spaced = plugshare(tmp_path / "a", "init", "--name", "my laptop")
    assert spaced.returncode == 2 and not (tmp_path / "a" / "node.toml").exists()
    member = plugshare(tmp_path / "a", "share", "accept", "CODE", "--as", "bob the builder")
    assert member.returncode == 2
    for done, value in ((spaced, "my laptop"), (member, "bob the builder")):
        assert f"{value!r} must be 1-63 letters, digits, '.', '_' or '-'" in done.stderr
    assert "e.g. 'my-laptop'" in spaced.stderr


def test_the_default_node_name_is_the_host_name(tmp_path):
    home = tmp_path / "plugshare"
    info = json.loads(init_node(home, "--json").stdout)
    host = socket.gethostname().split(".")[0]
    expected = re.sub(r"[^A-Za-z0-9._-]+", "-", host).strip("-._")[:63] or "node"
    assert info["name"] == expected


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
        database = status["store"]["database"]
        assert database.startswith("plugshare-bob-")  # the node id keeps two bobs apart
        raw = httpx.get(f"{couchdb_url}/{database}/srv1").json()
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
