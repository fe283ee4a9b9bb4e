"""A real node (and its token process) SIGKILLed under concurrent writers, at seeded random
points: every write it acknowledged is there after the restart, and so is the audit entry of
every decision it answered (group commit in the store and in the token must not ack early)."""

import os
import random
import signal
import threading
from pathlib import Path

import httpx

from tests.node.cluster import cluster, wait_until  # noqa: F401  (fixture)

DOCTYPE = "crash.notes"
WRITERS = 8


def token_pid(node_pid: int) -> int:
    children = [pid for task in Path(f"/proc/{node_pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"plugshare.token" in cmdline:
            return int(pid)
    raise AssertionError(f"no token process among the children {children} of {node_pid}")


def write_until_killed(base: str, credential: str, prefix: str, acked: list[str],
                       stop: threading.Event) -> None:
    with httpx.Client(headers={"Authorization": f"Bearer {credential}"}, timeout=30) as http:
        i = 0
        while not stop.is_set():
            doc_id = f"{prefix}-{i}"
            try:
                answer = http.put(f"{base}/couch/{DOCTYPE}/{doc_id}", json={"i": i})
            except httpx.HTTPError:
                return  # the node died under us
            if answer.status_code == 201:
                acked.append(doc_id)
            i += 1


def test_a_sigkill_loses_no_acknowledged_write_and_no_answered_audit_entry(cluster):
    node = cluster.add("a")
    credential = node.cli_json("app", "add", "crasher", "--doctype", DOCTYPE,
                               "--perm", "write")["credential"]
    seed = random.Random(1512)
    all_acked: list[str] = []
    for round_ in range(3):
        base = node.running.api_url
        acked: list[str] = []
        stop = threading.Event()
        writers = [threading.Thread(target=write_until_killed,
                                    args=(base, credential, f"r{round_}w{w}", acked, stop))
                   for w in range(WRITERS)]
        for writer in writers:
            writer.start()
        kill_after = seed.randint(20, 300)  # acknowledged writes before the kill
        try:
            wait_until(lambda: len(acked) >= kill_after, timeout=120,
                       what=f"{kill_after} writes acknowledged")
            os.kill(token_pid(node.pid), signal.SIGKILL)
            node.kill()
        finally:
            stop.set()
            for writer in writers:
                writer.join(timeout=60)
        all_acked += acked
        node.start()
        with httpx.Client(headers={"Authorization": f"Bearer {credential}"},
                          timeout=30) as http:
            missing = [doc_id for doc_id in all_acked
                       if http.get(f"{node.running.api_url}/couch/{DOCTYPE}/{doc_id}"
                                   ).status_code != 200]
        assert not missing, f"round {round_}: {len(missing)} acknowledged writes lost: " \
                            f"{missing[:5]}"
        audit = node.api("GET", "/token/audit",
                         params={"tail": "100000", "principal": "app:crasher"})
        audited = {e["doc_id"] for e in audit["entries"]
                   if e["action"] == "write" and e["allowed"]}
        unaudited = [doc_id for doc_id in all_acked if doc_id not in audited]
        assert not unaudited, f"round {round_}: {len(unaudited)} answered writes have no " \
                              f"audit entry: {unaudited[:5]}"
