"""`plugshare audit` on a real node (issue #11 item 16): filters that find the refusals among
the owner's reads, and a prune that keeps the log verifiable."""

from __future__ import annotations

import json

import httpx


def test_audit_filters_refusals_by_principal_and_time(node):
    app = node.cli("--json", "app", "add", "reader", "--doctype", "io.notes", "--perm", "read")
    assert app.returncode == 0, app.stdout
    credential = json.loads(app.stdout)["credential"]
    for i in range(3):
        assert node.cli("doc", "put", "io.notes", '{"t": 1}', "--id", f"n{i}").returncode == 0
    with httpx.Client(base_url=node.api_url, timeout=30,
                      headers={"authorization": f"Bearer {credential}"}) as http:
        for i in range(4):
            assert http.put(f"/data/io.notes/x{i}", json={"t": 2}).status_code == 403
        assert http.get("/data/io.tasks/").status_code == 403

    denied = json.loads(node.cli("--json", "audit", "--denied", "--principal", "app:reader",
                                 "--tail", "100").stdout)["entries"]
    assert len(denied) == 5 and not any(e["allowed"] for e in denied)
    assert {e["doc_id"] for e in denied} >= {f"x{i}" for i in range(4)}
    everything = json.loads(node.cli("--json", "audit", "--tail", "1000").stdout)["entries"]
    assert any(e["allowed"] and e["principal"] == "owner:owner" for e in everything)
    nothing = node.cli("audit", "--since", "2099-01-01")
    assert nothing.returncode == 0 and "(no matching entries)" in nothing.stdout
    recent = json.loads(node.cli("--json", "audit", "--since", "1h", "--tail", "1000").stdout)
    assert len(recent["entries"]) == len(everything) or len(recent["entries"]) >= 8
    bad = node.cli("audit", "--since", "last tuesday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_audit_prune_keeps_the_log_verifiable(node):
    for i in range(3):
        node.cli("doc", "put", "io.notes", '{"t": 1}', "--id", f"p{i}")
    pruned = json.loads(node.cli("--json", "audit", "--prune", "0s").stdout)
    assert set(pruned) == {"segments", "entries", "verifiable_from"}
    verified = node.cli("audit", "--verify", "--tail", "5")
    assert verified.returncode == 0 and "chain verified" in verified.stdout, verified.stdout
    assert "audit_prune" in verified.stdout
