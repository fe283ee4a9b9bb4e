"""What `share accept`, `share invite`, `share show` and `share leave` say, on real nodes
through the real command line (issue #11 items 7 and 8): the count a finished accept prints
is the count it ended with; Ctrl-C during the initial sync says the sync goes on and exits
130; a share that ended (left, revoked) shows no member as active for us and no sync state;
re-using one's own used code is refused instead of joining again; `invite` says until when
its code and the membership hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.node.cluster import Cluster, wait_until


@pytest.fixture
def pair(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        yield cluster.add("alice"), cluster.add("bob")
    finally:
        cluster.close()
        print(cluster.logs())


def test_accept_prints_the_doc_count_it_ended_with(pair):
    alice, bob = pair
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    for i in range(3):
        alice.put("io.notes", {"n": i}, f"n{i}")
    code = alice.cli_json("share", "invite", "notes")["code"]
    done = bob.cli("share", "accept", code)
    assert done.returncode == 0, done.stderr
    assert "3 docs" in done.stdout and "0 docs" not in done.stdout, done.stdout + done.stderr


SHARE = {"id": "s1", "name": "notes", "doctype": "io.notes", "role": "member",
         "permission": "write", "status": "active", "encrypted": False, "docs": 0,
         "members": [{"name": "alice", "status": "active"}, {"name": "bob", "status": "active"}],
         "peers": [{"peer": "alice", "state": "initial", "done": 10, "total": 3000}]}


def test_ctrl_c_during_the_initial_sync_says_it_goes_on_and_exits_130(tmp_path):
    """The command is a client of the node's API; here the node's side is played by a
    server whose share's initial sync never ends, so Ctrl-C always comes mid-sync (with real
    nodes an empty share may be live before any signal can come)."""
    import threading

    import trio
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from plugshare.node.events import EventBus, events_route
    from tests.node.conftest import init_node
    from tests.node.test_events import serve_app

    home = tmp_path / "bob"
    init_node(home, "--name", "bob")
    credential = (home / "owner.credential").read_text().strip()

    async def join(request):
        return JSONResponse(SHARE, status_code=201)

    async def status(request):
        return JSONResponse({"name": "bob", "shares": [SHARE], "peers": []})

    app = Starlette(routes=[Route("/join", join, methods=["POST"]),
                            Route("/status", status), events_route(EventBus())])

    async def guarded(scope, receive, send):
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != \
                f"Bearer {credential}".encode():
            return await JSONResponse({"error": "unauthorized"}, status_code=401)(
                scope, receive, send)
        await app(scope, receive, send)

    started, stop, urls = threading.Event(), threading.Event(), []

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            urls.append(await nursery.start(serve_app, guarded))
            started.set()
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    server = threading.Thread(target=lambda: trio.run(serve), daemon=True)
    server.start()
    try:
        assert started.wait(30)
        (home / "run.json").write_text(json.dumps({"pid": os.getpid(), "api": urls[0]}))
        accept = subprocess.Popen(
            [sys.executable, "-m", "plugshare", "--home", str(home), "share", "accept", "CODE"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        first = accept.stderr.readline()
        assert first.startswith("joined 'notes'"), first + accept.stderr.read()
        listening = accept.stderr.readline()  # from now on Ctrl-C is the view's to take
        assert "Ctrl-C stops watching" in listening, listening
        accept.send_signal(signal.SIGINT)
        out, err = accept.communicate(timeout=60)
    finally:
        stop.set()
        server.join(30)
    assert accept.returncode == 130, (out, err)
    assert "goes on" in err and "0 docs" not in out, (out, err)


def test_an_ended_share_shows_no_active_self_and_no_sync(pair):
    alice, bob = pair
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    bob.cli_json("share", "accept", "--no-progress",
                 alice.cli_json("share", "invite", "notes")["code"])
    wait_until(lambda: bob.share("notes")["peers"] and
               bob.share("notes")["peers"][0].get("state") == "live", 60, what="live sync")
    bob.cli_json("share", "leave", "notes")
    shown = bob.cli_json("share", "show", "notes")
    assert shown["status"] == "left"
    me = next(m for m in shown["members"] if m["name"] == "bob")
    assert me["status"] == "left", shown["members"]
    assert shown["peers"] == [], shown["peers"]
    text = bob.cli_ok("share", "show", "notes")
    assert "sync " not in text, text
    assert all("active" not in line for line in text.splitlines() if "bob" in line), text


def test_reusing_ones_own_used_code_is_refused(pair):
    alice, bob = pair
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    code = alice.cli_json("share", "invite", "notes")["code"]
    bob.cli_json("share", "accept", "--no-progress", code)
    again = bob.cli("--json", "share", "accept", "--no-progress", code)
    assert again.returncode == 1, again.stdout
    assert "already a member" in json.loads(again.stdout)["reason"]


def test_invite_says_until_when_the_code_and_the_membership_hold(pair):
    alice, _ = pair
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    done = alice.cli("share", "invite", "notes", "--ttl", "30m", "--expires", "2d")
    assert done.returncode == 0, done.stderr
    code, = done.stdout.split()  # stdout stays the bare code, for $(...)
    assert "valid until" in done.stderr and "membership until" in done.stderr, done.stderr


def test_a_left_share_can_be_forgotten_and_an_active_one_cannot(pair):
    alice, bob = pair
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    alice.put("io.notes", {"t": 1}, "kept")
    bob.cli_json("share", "accept", "--no-progress",
                 alice.cli_json("share", "invite", "notes")["code"])
    wait_until(lambda: bob.get("kept"), 60, what="bob to get the doc")
    active = bob.cli("--json", "share", "rm", "notes")
    assert active.returncode == 1 and "leave it first" in json.loads(active.stdout)["reason"]
    owner = alice.cli("--json", "share", "rm", "notes")
    assert owner.returncode == 1 and "owner" in json.loads(owner.stdout)["reason"]
    bob.cli_json("share", "leave", "notes")
    assert bob.cli_ok("share", "rm", "notes").strip() == "forgot 'notes'"
    assert bob.cli_json("share", "list")["shares"] == []
    assert "(no shares)" in bob.cli_ok("share", "list")
    assert bob.get("kept") is not None  # its documents stay
