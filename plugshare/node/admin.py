"""Managing the token through the node: apps, rules, sensitive doctypes, the audit log.

Each request is one token command carrying the caller's credential; the token decides that
only the owner may, and keeps the rules and keys. This module only relays and shapes answers.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from plugshare.node.documents import Documents

TokenCall = Callable[..., Awaitable[Any]]


class Admin:
    def __init__(self, call: TokenCall, documents: Documents):
        self._call = call
        self.documents = documents

    async def add_app(self, credential: str, name: str, doctype: str, perm: str,
                      selector: dict | None) -> str:
        answer = await self._call("app.add", credential=credential, name=name, doctype=doctype,
                                  perm=perm, selector=selector)
        return answer["credential"]

    async def list_apps(self, credential: str) -> list[dict[str, Any]]:
        return await self._call("app.list", credential=credential)

    async def remove_app(self, credential: str, name: str) -> None:
        await self._call("app.remove", credential=credential, name=name)

    async def add_rule(self, credential: str, doctype: str, subject_kind: str, subject: str,
                       perm: str, selector: dict | None) -> dict[str, Any]:
        return await self._call("rule.add", credential=credential, doctype=doctype,
                                subject_kind=subject_kind, subject=subject, perm=perm,
                                selector=selector)

    async def list_rules(self, credential: str) -> list[dict[str, Any]]:
        return await self._call("rule.list", credential=credential)

    async def remove_rule(self, credential: str, rule_id: str) -> None:
        await self._call("rule.remove", credential=credential, rule_id=rule_id)

    async def encrypt(self, credential: str, doctype: str) -> dict[str, Any]:
        """From now on `doctype` is stored sealed; its existing live docs are re-written
        sealed (a new revision each), so the database keeps no clear copy of a winner."""
        await self.documents.refuse_sealing_files(credential, doctype, "doctype_encrypt")
        answer = await self._call("doctype.encrypt", credential=credential, doctype=doctype)
        answer["rewritten"] = await self.documents.reseal(credential)
        return answer

    async def audit(self, credential: str, tail: int, verify: bool, *,
                    allowed: bool | None = None, principal: str | None = None,
                    since: float | None = None) -> dict[str, Any]:
        return await self._call("audit.tail", credential=credential, n=tail, verify=verify,
                                allowed=allowed, principal=principal, since=since)

    async def audit_prune(self, credential: str, before: float) -> dict[str, Any]:
        return await self._call("audit.prune", credential=credential, before=before)
