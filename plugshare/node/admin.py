"""Managing the token through the node: apps, rules, sensitive doctypes, the audit log.

Only the owner may; the token decides that too (`decide_admin`). Rules and keys stay inside
the token: this module only relays requests and shapes answers.
"""

from __future__ import annotations

from typing import Any

import attrs

from plugshare.node.access import Principal
from plugshare.node.documents import Documents
from plugshare.token import AuditEntry, Rule
from plugshare.token.envelope import is_sealed

SUBJECT_KINDS = ("app", "role", "peer")


def _rule_json(rule: Rule) -> dict[str, Any]:
    return attrs.asdict(rule)


def _audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq, "time": entry.time, "principal": entry.principal,
        "action": entry.action, "doctype": entry.doctype, "doc_id": entry.doc_id,
        "allowed": entry.allowed, "reason": entry.reason, "hash": entry.hash.hex(),
    }


class Admin:
    def __init__(self, documents: Documents):
        self.documents = documents
        self.access = documents.access
        self.token = documents.access.token

    # -- apps ---------------------------------------------------------------------------

    def add_app(self, principal: Principal, name: str, doctype: str, perm: str,
                selector: dict | None) -> str:
        self.access.require_owner(principal, "add_app")
        return self.token.add_app(name, doctype, perm, selector)

    def list_apps(self, principal: Principal) -> list[dict[str, Any]]:
        self.access.require_owner(principal, "list_apps")
        return [attrs.asdict(app) for app in self.token.list_apps()]

    def remove_app(self, principal: Principal, name: str) -> None:
        self.access.require_owner(principal, "remove_app")
        self.token.remove_app(name)

    # -- rules --------------------------------------------------------------------------

    def add_rule(self, principal: Principal, doctype: str, subject_kind: str, subject: str,
                 perm: str, selector: dict | None) -> dict[str, Any]:
        self.access.require_owner(principal, "add_rule")
        from plugshare.token import InvalidArgument, NotFound, format_node_id, parse_node_id

        if subject_kind == "app" and subject not in {a.name for a in self.token.list_apps()}:
            raise NotFound(f"no app {subject!r}: add it first (`plugshare app add`)")
        if subject_kind == "peer":
            try:  # any spelling of a node id; a malformed one is the token's to explain
                known = format_node_id(parse_node_id(subject)) in {
                    p.node_id for p in self.token.list_peers()}
            except InvalidArgument:
                known = True
            if not known:
                raise NotFound(f"no peer {subject!r} is known; see `plugshare peers`")
        rule_id = self.token.add_rule(doctype, subject_kind, subject, perm, selector)
        return next(_rule_json(r) for r in self.token.list_rules() if r.id == rule_id)

    def list_rules(self, principal: Principal) -> list[dict[str, Any]]:
        self.access.require_owner(principal, "list_rules")
        return [_rule_json(r) for r in self.token.list_rules()]

    def remove_rule(self, principal: Principal, rule_id: str) -> None:
        self.access.require_owner(principal, "remove_rule")
        self.token.remove_rule(rule_id)

    # -- sensitive doctypes -------------------------------------------------------------

    async def encrypt(self, principal: Principal, doctype: str) -> dict[str, Any]:
        """From now on `doctype` is stored sealed; its existing live docs are re-written
        sealed (a new revision each), so the database keeps no clear copy of a winner."""
        self.access.require_owner(principal, "encrypt")
        self.token.mark_sensitive(doctype)
        rewritten = await self.documents.reseal(
            lambda doc: doc.get("doctype") == doctype and not is_sealed(doc), "doctype")
        return {"doctype": doctype, "sensitive": True, "rewritten": rewritten}

    # -- audit --------------------------------------------------------------------------

    def audit(self, principal: Principal, tail: int, verify: bool) -> dict[str, Any]:
        self.access.require_owner(principal, "audit")
        self.token.flush()  # so the tail includes this very request's decision
        result: dict[str, Any] = {"entries": [_audit_json(e) for e in self.token.audit_tail(tail)]}
        if verify:
            ok, count, first_bad = self.token.audit_verify()
            result["verify"] = {"ok": ok, "entries": count, "first_bad": first_bad}
        return result
