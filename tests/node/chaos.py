"""A seeded chaos run over three real nodes, for the convergence tests (test_convergence.py).

`Chaos` says what a run does (how many operations of each kind, which faults); `run_chaos`
starts the nodes (a, b on SQLite; c on CouchDB, behind a pouchdb-server this module starts and
can cut), makes the shares, plays the plan drawn from the seed, lets everything come back and
quiesce, and returns the `Outcome`: every write the nodes acknowledged or may have made, and each
node's final revision trees read from its store after a clean stop. `problems(outcome)` lists
every way the outcome breaks convergence, durability or scope.

The plan (which op, on which node, which doc, when a fault strikes) is a function of the seed
alone; how the nodes interleave is not, so a seed reproduces the plan, not the timing.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import httpx
import trio

from plugshare.store import couchdb_database_name
from plugshare.store.couchdb import CouchDBStore
from plugshare.store.sqlite import SQLiteStore
from tests.node.cluster import ApiError, Cluster, ClusterNode, wait_until
from tests.support.pouchdb_disk import PouchDBOnDisk

NOTES, TASKS, HEALTH, PRIVATE = "io.notes", "io.tasks", "io.health", "io.private"
DOCTYPES = (NOTES, TASKS, HEALTH, PRIVATE)
NODES = ("a", "b", "c")
COUCH_NODE = "c"


@attrs.frozen
class ShareSpec:
    name: str
    doctype: str
    owner: str
    members: tuple[str, ...]  # the owner included
    selector: dict | None = None
    encrypt: bool = False

    def in_scope(self, doctype: str, body: dict) -> bool:
        if doctype != self.doctype:
            return False
        return self.selector is None or all(body.get(k) == v for k, v in self.selector.items())


# One share of each kind. `health` leaves `a` out, so a's io.health docs must never leave it;
# io.private is shared by nobody, and io.tasks only with `"shared": true`.
SHARES = (
    ShareSpec("notes", NOTES, "a", ("a", "b", "c")),
    ShareSpec("tasks", TASKS, "a", ("a", "b", "c"), selector={"shared": True}),
    ShareSpec("health", HEALTH, "b", ("b", "c"), encrypt=True),
)
SHARE_OF = {share.doctype: share for share in SHARES}


@attrs.frozen
class Chaos:
    """What a run does. Op weights are relative; a weight of 0 turns that kind off."""

    ops: int = 140
    create: int = 30
    edit: int = 30
    delete: int = 8
    conflict: int = 12  # the same doc edited on two nodes from the same revision
    resolve: int = 6  # a losing leaf of a conflict deleted (CouchDB's way to resolve)
    recreate: int = 4  # a deleted doc written again without a rev
    scope_change: int = 0  # an io.tasks doc edited into or out of the share's selector
    doctype_change: int = 0  # a shared doc re-written under another doctype
    node_kills: int = 3  # SIGKILL a node, restart it some ops later
    couchdb_cuts: int = 0  # kill the pouchdb-server under c, restart it some ops later
    token_kills: int = 0  # SIGKILL a node's token process (its node starts a new one at once)
    quiesce_timeout: float = 90.0


@attrs.frozen
class Write:
    """A write one node was asked to make. `rev` is None when the outcome is unknown (the
    node died or failed mid-request): the write may or may not be there."""

    doc_id: str
    node: str
    doctype: str
    body: dict
    deleted: bool
    rev: str | None


@attrs.frozen
class Leaf:
    rev: str
    deleted: bool
    history: tuple[str, ...]  # the leaf and its ancestors, newest first ("N-hash")


@attrs.define
class Outcome:
    seed: int
    chaos: Chaos
    writes: list[Write]
    trees: dict[str, dict[str, tuple[Leaf, ...]]]  # node -> id -> leaves, the winner first
    doctypes: dict[str, dict[str, str]]  # node -> id -> the winner's doctype in the store
    log: list[str]
    unsettled: str | None = None  # why the members did not come to agree, if they did not


# -- the run ------------------------------------------------------------------------------


class _Run:
    def __init__(self, root: Path, seed: int, chaos: Chaos):
        self.seed, self.chaos = seed, chaos
        # The schedule (op kinds, faults) comes from `plan` alone; each op gets an rng of its
        # own seeded from it, so an op that draws more or less (it depends on what the nodes
        # hold) does not shift the ops after it.
        self.plan = random.Random(seed)
        self.rng = random.Random()
        self.couch = PouchDBOnDisk(root / "couchdb")
        self.cluster = Cluster(root / "nodes")
        self.nodes: dict[str, ClusterNode] = {}
        self.writes: list[Write] = []
        self.ids: list[str] = []  # every doc id created, in order
        self.created_by: dict[str, str] = {}
        self.counter = 0
        self.log: list[str] = []
        self.lock = threading.Lock()  # conflicting edits record their writes from two threads
        self.last_refusal: str | None = None  # the last API error met while quiescing
        self.acked: collections.Counter = collections.Counter()  # op kind -> acked writes
        self.restart_at: dict[str, int] = {}  # node name (or "couchdb") -> op index

    def note(self, text: str) -> None:
        self.log.append(text)

    # -- setup --------------------------------------------------------------------------

    def start(self) -> None:
        self.couch.start()
        for name in NODES:
            extra = (("--store", "couchdb", "--couchdb-url", self.couch.url)
                     if name == COUCH_NODE else ())
            self.nodes[name] = self.cluster.add(name, *extra)
        for share in SHARES:
            owner = self.nodes[share.owner]
            body: dict[str, Any] = {"name": share.name, "doctype": share.doctype,
                                    "encrypt": share.encrypt}
            if share.selector is not None:
                body["selector"] = share.selector
            owner.api("POST", "/shares", json=body)
            for member in share.members:
                if member == share.owner:
                    continue
                code = owner.api("POST", f"/shares/{share.name}/invite", json={})["code"]
                self.nodes[member].api("POST", "/join", json={"code": code})
        for share in SHARES:  # every member knows every other one before the chaos starts
            for name in share.members:
                wait_until(lambda: len(self.nodes[name].share(share.name)["members"])
                           == len(share.members), 60,
                           what=f"{name} to know every member of {share.name}")

    # -- the plan ---------------------------------------------------------------------------

    def play(self) -> None:
        chaos = self.chaos
        faults: dict[int, list[str]] = {}
        # Kills in the first 60 % of the run, cuts after: a restarted node makes new sessions
        # with its peers, which would hide a stream that an earlier cut ended for good.
        split = int(chaos.ops * 0.6)
        for _ in range(chaos.node_kills):
            faults.setdefault(self.plan.randrange(5, split), []).append("kill")
        for _ in range(chaos.couchdb_cuts):
            faults.setdefault(self.plan.randrange(split, chaos.ops - 10), []).append("cut")
        for _ in range(chaos.token_kills):
            faults.setdefault(self.plan.randrange(split, chaos.ops - 10), []).append("token")
        kinds = ["create", "edit", "delete", "conflict", "resolve", "recreate", "scope_change",
                 "doctype_change"]
        weights = [getattr(chaos, kind) for kind in kinds]
        for index in range(chaos.ops):
            self.restart_due(index)
            for fault in faults.get(index, []):
                self.fault(fault, index)
            kind = self.plan.choices(kinds, weights)[0]
            self.rng.seed(self.plan.getrandbits(64))
            before = sum(w.rev is not None for w in self.writes)
            getattr(self, "op_" + kind)()
            self.acked[kind] += sum(w.rev is not None for w in self.writes) - before
        self.note("acknowledged writes by op: " + ", ".join(
            f"{kind} {count}" for kind, count in self.acked.items()))

    def fault(self, kind: str, index: int) -> None:
        later = index + self.plan.randrange(1, 15)  # 1: back at once
        how, name = self.plan.choice(["kill", "term"]), self.plan.choice(NODES)
        if kind == "cut":
            if self.couch.running:
                self.note(f"op {index}: couchdb cut ({how})")
                self.couch.stop(kill=how == "kill")
                self.restart_at["couchdb"] = later
            return
        if kind == "token":
            if self.nodes[name].running is not None:
                try:
                    pid = self.nodes[name].status()["token"]["pid"]
                except (ApiError, httpx.TransportError, ValueError, KeyError):
                    return
                self.note(f"op {index}: SIGKILL the token of {name} (pid {pid})")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        if self.nodes[name].running is not None:
            self.note(f"op {index}: SIGKILL {name}")
            self.nodes[name].kill()
            self.restart_at[name] = later

    def restart_due(self, index: int | None) -> None:
        """Restart what is due (everything when `index` is None). The CouchDB server first:
        a node cannot open a store whose server is down."""
        for what in ["couchdb", *NODES]:
            at = self.restart_at.get(what)
            if at is None or (index is not None and at > index):
                continue
            if what == COUCH_NODE and not self.couch.running:
                continue  # waits for its server
            del self.restart_at[what]
            self.note(f"op {index}: restart {what}")
            if what == "couchdb":
                self.couch.start()
            else:
                self.nodes[what].start()

    # -- operations ---------------------------------------------------------------------

    def running(self) -> list[str]:
        return [name for name in NODES if self.nodes[name].running is not None]

    def body(self, doctype: str, shared: bool | None = None) -> dict:
        self.counter += 1
        body: dict[str, Any] = {"title": f"w{self.counter}", "n": self.counter,
                                "pad": self.rng.randrange(10**6)}
        if doctype == TASKS:
            body["shared"] = self.rng.random() < 0.7 if shared is None else shared
        return body

    def put(self, name: str, doctype: str, doc_id: str, body: dict,
            rev: str | None = None) -> str | None:
        """PUT through the node's API; the new rev, or None if refused or unknown. Every
        attempt is recorded (an unknown outcome with rev None)."""
        node = self.nodes[name]
        sent = {**body, "_rev": rev} if rev else body
        try:
            new_rev = node.api("PUT", f"/data/{quote(doctype, safe='')}/{quote(doc_id, safe='')}",
                               json=sent)["rev"]
        except ApiError as exc:
            if exc.status in (400, 403, 404, 409):  # refused: nothing written
                self.note(f"put {doctype}/{doc_id} on {name}: {exc.status} "
                          f"{exc.body.get('error')} {exc.body.get('reason', '')[:100]}")
                return None
            self.note(f"put {doc_id} on {name}: {exc.status} {exc.body.get('error')}")
            new_rev = None
        except (httpx.TransportError, ValueError):
            new_rev = None
        with self.lock:
            self.writes.append(Write(doc_id, name, doctype, body, False, new_rev))
        return new_rev

    def delete(self, name: str, doc_id: str, doctype: str, rev: str) -> None:
        node = self.nodes[name]
        try:
            new_rev = node.api("DELETE", f"/docs/{quote(doc_id, safe='')}",
                               params={"rev": rev})["rev"]
        except ApiError as exc:
            if exc.status in (400, 403, 404, 409):
                return
            new_rev = None
        except (httpx.TransportError, ValueError):
            new_rev = None
        self.writes.append(Write(doc_id, name, doctype, {}, True, new_rev))

    def current(self, name: str, doc_id: str) -> dict | None:
        try:
            return self.nodes[name].get(doc_id)
        except (ApiError, httpx.TransportError, ValueError):
            return None

    def pick_doc(self, name: str, doctypes=DOCTYPES) -> dict | None:
        """A live doc `name` holds, among a few ids drawn at random."""
        candidates = [i for i in self.ids if self.doctype_of(i) in doctypes]
        for doc_id in self.rng.sample(candidates, min(4, len(candidates))):
            doc = self.current(name, doc_id)
            if doc is not None:
                return doc
        return None

    def doctype_of(self, doc_id: str) -> str:
        return doc_id.split("~")[0]

    def op_create(self) -> None:
        names = self.running()
        if not names:
            return
        name = self.rng.choice(names)
        doctype = self.rng.choices(DOCTYPES, [4, 4, 3, 2])[0]
        doc_id = f"{doctype}~{name}~{len(self.ids)}"
        self.ids.append(doc_id)
        self.created_by[doc_id] = name
        self.put(name, doctype, doc_id, self.body(doctype))

    def op_edit(self) -> None:
        names = self.running()
        if not names:
            return
        name = self.rng.choice(names)
        doc = self.pick_doc(name)
        if doc is not None:
            doctype = doc["doctype"]
            self.put(name, doctype, doc["_id"], self.body(doctype, doc.get("shared")),
                     doc["_rev"])

    def op_delete(self) -> None:
        names = self.running()
        if not names:
            return
        name = self.rng.choice(names)
        doc = self.pick_doc(name)
        if doc is not None:
            self.delete(name, doc["_id"], doc["doctype"], doc["_rev"])

    def op_conflict(self) -> None:
        names = self.running()
        if len(names) < 2:
            return
        first, second = self.rng.sample(names, 2)
        shared = [d for d in (NOTES, TASKS, HEALTH)
                  if {first, second} <= set(SHARE_OF[d].members)]
        doc = self.pick_doc(first, shared)
        if doc is None:
            return
        other = self.current(second, doc["_id"])
        if other is None:
            return
        doctype = doc["doctype"]
        # Both revs read before either write, both writes at once: each node edits the
        # revision it holds before the other's edit reaches it (or gets a 409 if it did).
        bodies = [self.body(doctype, doc.get("shared")), self.body(doctype, other.get("shared"))]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda args: self.put(*args),
                          [(first, doctype, doc["_id"], bodies[0], doc["_rev"]),
                           (second, doctype, doc["_id"], bodies[1], other["_rev"])]))

    def op_resolve(self) -> None:
        names = self.running()
        if not names:
            return
        name = self.rng.choice(names)
        candidates = [i for i in self.ids if self.doctype_of(i) != PRIVATE]
        for doc_id in self.rng.sample(candidates, min(6, len(candidates))):
            try:
                doc = self.nodes[name].get(doc_id, conflicts=True)
            except (ApiError, httpx.TransportError, ValueError):
                return
            if doc is not None and doc.get("_conflicts"):
                self.delete(name, doc_id, doc["doctype"], self.rng.choice(doc["_conflicts"]))
                return

    def op_recreate(self) -> None:
        names = self.running()
        if not names:
            return
        name = self.rng.choice(names)
        deleted = {w.doc_id for w in self.writes if w.deleted and w.rev is not None}
        candidates = sorted(deleted)
        for doc_id in self.rng.sample(candidates, min(4, len(candidates))):
            doctype = self.doctype_of(doc_id)
            if self.current(name, doc_id) is None and self._known_to(name, doc_id):
                self.put(name, doctype, doc_id, self.body(doctype))
                return

    def _known_to(self, name: str, doc_id: str) -> bool:
        """Whether `name` may hold the doc at all (so it holds its tombstone once synced)."""
        share = SHARE_OF.get(self.doctype_of(doc_id))
        return self.created_by.get(doc_id) == name or (
            share is not None and name in share.members)

    def op_scope_change(self) -> None:
        names = self.running()
        if not names:
            return
        name = self.rng.choice(names)
        doc = self.pick_doc(name, (TASKS,))
        if doc is not None:
            self.put(name, TASKS, doc["_id"], self.body(TASKS, not doc.get("shared")),
                     doc["_rev"])

    def final_writes(self) -> None:
        """Once everything is back, one new doc from each member of each share: every link must
        still carry data after the faults, whatever the last fault was."""
        for share in SHARES:
            for name in share.members:
                doc_id = f"{share.doctype}~{name}~{len(self.ids)}"
                self.ids.append(doc_id)
                self.created_by[doc_id] = name
                self.put(name, share.doctype, doc_id, self.body(share.doctype, True))

    def final_scope_out(self) -> None:
        """With scope changes on, one more at the end, on a doc every member holds alike: so
        every such run has at least one doc that left the share after reaching its members."""
        share = SHARE_OF[TASKS]
        for doc_id in self.ids:
            if self.doctype_of(doc_id) != TASKS:
                continue
            held = [self.current(name, doc_id) for name in share.members]
            revs = {doc and doc["_rev"] for doc in held}
            if len(revs) == 1 and held[0] is not None and held[0].get("shared") is True:
                name = self.plan.choice(share.members)
                self.note(f"end: {doc_id} edited out of tasks on {name}")
                self.put(name, TASKS, doc_id, self.body(TASKS, False), held[0]["_rev"])
                return
        self.note("end: no tasks doc held alike by every member to edit out of scope")

    def op_doctype_change(self) -> None:
        names = self.running()
        if not names:
            return
        name = self.rng.choice(names)
        doc = self.pick_doc(name, (NOTES, TASKS, HEALTH))
        if doc is not None:
            doctype = self.rng.choice([d for d in DOCTYPES if d != doc["doctype"]])
            self.put(name, doctype, doc["_id"], self.body(doctype), doc["_rev"])

    # -- quiesce and read back -------------------------------------------------------------

    def everything_up(self) -> None:
        if not self.couch.running:
            self.note("end: restart couchdb")
            self.couch.start()
        self.restart_at.clear()
        for name in NODES:
            if self.nodes[name].running is None:
                self.note(f"end: restart {name}")
                self.nodes[name].start()

    def api_view(self) -> dict[str, dict[str, Any]]:
        """node -> id -> (winner doc, sorted conflicts) or None, for every doc id of the run."""
        view: dict[str, dict[str, Any]] = {}
        for name in NODES:
            node = self.nodes[name]
            doc_id = "/docs/"
            try:
                listing = {doc["_id"]: doc for doc in node.api("GET", "/docs/")["docs"]}
                view[name] = {}
                for doc_id in self.ids:
                    if doc_id not in listing:
                        view[name][doc_id] = None
                        continue
                    doc = node.get(doc_id, conflicts=True) or {}
                    view[name][doc_id] = (doc.get("_rev"), doc.get("doctype"),
                                          tuple(sorted(doc.get("_conflicts", ()))))
            except (ApiError, httpx.TransportError) as exc:
                self.last_refusal = f"{name} GET {doc_id}: {exc!r}"
                raise
        return view

    def quiesce(self, timeout: float) -> str | None:
        """Wait until what each share's members see of its docs agrees, the same twice in a
        row (the sync is idle, not just passing through agreement). None once it does; else
        what still disagrees."""
        previous: list[Any] = [None, None]  # the last two views

        def settled() -> bool:
            try:
                view = self.api_view()
            except ApiError as exc:
                if exc.status != 503:  # 503: the token or the store is coming back
                    raise
                return False
            agreed = _agreement(view, self.writes)
            same = view == previous[0]
            previous[:] = [view, previous[0]]
            return not agreed and same

        started = time.monotonic()
        try:
            wait_until(settled, timeout, what="the members to agree", interval=0.5)
        except AssertionError:
            last, before = previous[0] or {}, previous[1] or {}
            disagreeing = _agreement(last, self.writes)
            moving = sorted(f"{doc_id} on {name}" for name in last
                            for doc_id in last[name]
                            if last[name][doc_id] != before.get(name, {}).get(doc_id))
            return (f"{len(disagreeing)} doc(s) still seen differently by a share's members "
                    f"after {timeout:.0f}s: " + "; ".join(disagreeing[:5])
                    + f"; still changing between the last two looks: {moving[:10]}"
                    + (f"; last error: {self.last_refusal}" if self.last_refusal else ""))
        self.note(f"quiesce: settled in {time.monotonic() - started:.1f}s")
        return None

    def restart_all(self) -> None:
        for name in NODES:
            self.nodes[name].stop()
        for name in NODES:
            self.nodes[name].start()

    def read_trees(self) -> tuple[dict, dict]:
        """Stop every node cleanly, then read each one's store directly."""
        for name in NODES:
            self.nodes[name].stop()
        trees, doctypes = {}, {}
        for name in NODES:
            node = self.nodes[name]
            if name == COUCH_NODE:
                db = couchdb_database_name("plugshare", name, node.node_id)
                opener = lambda db=db: CouchDBStore.open(self.couch.url, db)  # noqa: E731
            else:
                opener = lambda node=node: SQLiteStore.open(node.home / "store.sqlite")  # noqa: E731
            trees[name], doctypes[name] = trio.run(_read_store, opener)
        return trees, doctypes

    def close(self) -> None:
        self.cluster.close()
        self.couch.stop()


async def _read_store(opener: Callable) -> tuple[dict, dict]:
    store = await opener()
    try:
        rows, since = [], 0
        while True:
            page = await store.changes(since, limit=500)
            rows += page.results
            if not page.results:
                break
            since = page.last_seq
        tree: dict[str, tuple[Leaf, ...]] = {}
        doctypes: dict[str, str] = {}
        for row in rows:
            got = {doc["_rev"]: doc for doc in await store.bulk_get([(row.id, r) for r in row.revs])}
            leaves = []
            for rev in row.revs:
                doc = got.get(rev)
                if doc is None:
                    leaves.append(Leaf(rev, False, (rev,)))  # unreadable: shows in diffs
                    continue
                revisions = doc["_revisions"]
                history = tuple(f"{revisions['start'] - i}-{h}"
                                for i, h in enumerate(revisions["ids"]))
                leaves.append(Leaf(rev, bool(doc.get("_deleted")), history))
            tree[row.id] = tuple(leaves)
            winner = got.get(row.revs[0]) or {}
            doctypes[row.id] = winner.get("doctype", "")
        return tree, doctypes
    finally:
        await store.aclose()


def run_chaos(root: Path, seed: int, chaos: Chaos) -> Outcome:
    run = _Run(root, seed, chaos)
    started = time.monotonic()
    try:
        run.start()
        run.note(f"setup: {time.monotonic() - started:.1f}s")
        run.play()
        run.note(f"chaos done: {time.monotonic() - started:.1f}s, "
                 f"{len(run.writes)} writes, {len(run.ids)} ids")
        run.everything_up()
        run.final_writes()
        if chaos.scope_change:
            run.quiesce(min(chaos.quiesce_timeout, 15.0))  # so members hold the docs alike
            run.final_scope_out()
        unsettled = run.quiesce(chaos.quiesce_timeout)
        if unsettled is not None:
            # Tells a sync that stopped (a restart gives every link fresh streams) from data
            # that cannot converge.
            run.note("quiesce: " + unsettled)
            run.restart_all()
            after = run.quiesce(max(30.0, chaos.quiesce_timeout / 2))
            unsettled = ("they converged after a restart of every node (a sync that stopped)"
                         if after is None else "not even after a restart of every node"
                         ) + "; before it, " + unsettled
        trees, doctypes = run.read_trees()
        for name, tree in trees.items():
            live = sum(1 for leaves in tree.values() if not leaves[0].deleted)
            conflicted = sum(1 for leaves in tree.values()
                             if sum(not leaf.deleted for leaf in leaves) > 1)
            run.note(f"{name}: {len(tree)} docs, {live} live, {conflicted} in conflict")
        run.note(f"total: {time.monotonic() - started:.1f}s")
    except BaseException:
        print("\n".join(run.log))
        print(run.cluster.logs())
        raise
    finally:
        run.close()
    return Outcome(seed, chaos, run.writes, trees, doctypes, run.log, unsettled)


# -- what must hold ------------------------------------------------------------------------


def _stable_share(doc_id: str, writes: list[Write]) -> ShareSpec | None:
    """The share a doc lives in, if every version ever asked of it was inside that share's
    scope and written by one of its members (no scope or doctype change touched it)."""
    share = SHARE_OF.get(doc_id.split("~")[0])
    if share is None:
        return None
    for write in writes:
        if write.doc_id != doc_id:
            continue
        if write.node not in share.members:
            return None
        if not write.deleted and not share.in_scope(write.doctype, write.body):
            return None
    return share


def _agreement(view: dict[str, dict[str, Any]], writes: list[Write]) -> list[str]:
    """Where the members of a share see one of its (stable) docs differently."""
    out = []
    ids = {w.doc_id for w in writes}
    for doc_id in sorted(ids):
        share = _stable_share(doc_id, writes)
        if share is None:
            continue
        seen = {name: view.get(name, {}).get(doc_id) for name in share.members}
        if len(set(seen.values())) > 1:
            out.append(f"{doc_id}: {seen}")
    return out


def _allowed_on(doc_id: str, node: str, writes: list[Write]) -> list[Write]:
    """The versions of `doc_id` that may be on `node`: its own, and those written inside the
    scope of a share both the writer and `node` are members of."""
    out = []
    for write in writes:
        if write.doc_id != doc_id:
            continue
        if write.node == node:
            out.append(write)
            continue
        share = SHARE_OF.get(write.doctype)
        if (share is not None and {write.node, node} <= set(share.members)
                and (write.deleted or share.in_scope(write.doctype, write.body))):
            out.append(write)
    return out


def problems(outcome: Outcome) -> list[str]:
    found: list[str] = []
    if outcome.unsettled is not None:
        found.append("no quiescence: " + outcome.unsettled)
    writes, trees = outcome.writes, outcome.trees
    ids = sorted({w.doc_id for w in writes})

    # 1. Every member of a share holds the same revision tree of each of its stable docs:
    #    the same leaves (so the same winner and conflicts), each live or deleted alike.
    for doc_id in ids:
        share = _stable_share(doc_id, writes)
        if share is None:
            continue
        seen = {name: trees[name].get(doc_id) for name in share.members}
        leaves = {name: None if t is None else (t[0].rev, sorted((l.rev, l.deleted) for l in t))
                  for name, t in seen.items()}
        if len(set(map(repr, leaves.values()))) > 1:
            found.append(f"diverged {doc_id} ({share.name}): {leaves}")

    # 2. Every acknowledged write is in the tree (a leaf or an ancestor) of the node that
    #    made it, and of every member of the share when the doc is a stable one.
    for write in writes:
        if write.rev is None:
            continue
        share = _stable_share(write.doc_id, writes)
        holders = set(share.members) if share is not None else set()
        holders.add(write.node)
        for name in sorted(holders):
            tree = trees[name].get(write.doc_id, ())
            if not any(write.rev in leaf.history for leaf in tree):
                found.append(f"lost {write.doc_id} {write.rev} (acked by {write.node}) "
                             f"on {name}")

    # 3. Nothing crossed outside a share's scope: a node holds a doc only if one of the
    #    versions it may hold exists, and no leaf it holds is a version it may not hold.
    acked_by_rev = {(w.doc_id, w.rev): w for w in writes if w.rev is not None}
    for name in NODES:
        for doc_id, leaves in trees[name].items():
            allowed = _allowed_on(doc_id, name, writes)
            if not allowed:
                found.append(f"crossed: {doc_id} is on {name}, which never may hold it "
                             f"(doctype {outcome.doctypes[name].get(doc_id)!r})")
                continue
            for leaf in leaves:
                write = acked_by_rev.get((doc_id, leaf.rev))
                if write is not None and not leaf.deleted and write not in allowed:
                    found.append(f"crossed: {doc_id} {leaf.rev} ({write.doctype} "
                                 f"{write.body}, written on {write.node}) is a leaf on {name}")

    # 4. A doc edited out of a share's scope leaves its members: no member still serves, as
    #    its live winner, a version that another member's out-of-scope winner replaced.
    #    (A member's own concurrent edit is not such a version: it is not an ancestor.)
    for doc_id in ids:
        share = SHARE_OF.get(doc_id.split("~")[0])
        if share is None or _stable_share(doc_id, writes) is not None:
            continue
        for name in share.members:
            leaves = trees[name].get(doc_id)
            write = leaves and acked_by_rev.get((doc_id, leaves[0].rev))
            if not write or write.deleted or share.in_scope(write.doctype, write.body):
                continue
            for other in share.members:
                theirs = trees[other].get(doc_id)
                if (other != name and theirs and not theirs[0].deleted
                        and theirs[0].rev in leaves[0].history[1:]):
                    found.append(f"stale: {doc_id} left {share.name} on {name} "
                                 f"({leaves[0].rev}) but {other} still serves {theirs[0].rev}")
    return found
