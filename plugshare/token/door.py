"""The token's command interface: the one door between the node and the token.

The node hands the token what it has (a credential or a peer, the request, the stored
documents) and gets back what it may do: the clear document to serve, the stored form to
write, the documents that may leave, or a refusal. It never builds decision metadata and never
sees a key. Every command is decided here and leaves one audit entry per decision (one per
document for batches); replication uses batch commands, one call per batch.

`Door.handle(command, args)` is all the token process serves (see `server.py`, `wire.py`);
`COMMANDS` lists the commands of protocol version 1 with the arguments each takes. Refusals
are `TokenError`s whose messages never say more than the caller may read: a document the
caller may not read is "not found", whether it exists or not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from plugshare.errors import PlugshareError
from plugshare.sharing import invitation as _invitation
from plugshare.sharing import manifest as _manifest

from . import chunkseal, tls
from .envelope import ENVELOPE_FIELD, is_sealed, open_doc, sealed_kid
from .errors import AccessDenied, IntegrityError, InvalidArgument, NotFound, TokenError
from .principal import APP_KIND, LINK_KIND, OWNER, Decision, Principal
from .rules import ACTION_LEVEL
from .shares import REMOVAL_FIELD, _scope_refusal, doctype_change_refusal, removal
from .token import Token

__all__ = ["COMMANDS", "Door", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = 1
MAX_BATCH = 10_000  # documents in one batch command
INVITATION_ID_LENGTH = 12  # hex digits of an invitation key shown as its id
DELEGATION_LIFETIME = 7 * 86400  # seconds a certified TLS key stays valid

_ALLOWED = Decision(True, "the owner may do everything")
_CHUNKS = "node:attachments"  # who seals and opens attachment chunks: the node's data path
MAX_CHUNKS = 32  # chunks per seal/open command (8 MiB): one audit entry, one settle each


def _arg(args: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *,
         optional: bool = False) -> Any:
    value = args.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidArgument(f"argument {key!r} must be {names}")
    return value


def _doc_arg(args: Mapping[str, Any], key: str, *, optional: bool = False) -> dict | None:
    doc = _arg(args, key, dict, optional=optional)
    if doc is not None and not isinstance(doc.get("_id"), str):
        raise InvalidArgument(f"argument {key!r} must be a document with a text _id")
    return doc


def _docs_arg(args: Mapping[str, Any], key: str = "docs") -> list[dict]:
    docs = _arg(args, key, list)
    if len(docs) > MAX_BATCH:
        raise InvalidArgument(f"at most {MAX_BATCH} documents per batch, got {len(docs)}")
    for doc in docs:
        if not isinstance(doc, dict) or not isinstance(doc.get("_id"), str):
            raise InvalidArgument(f"{key} must be documents, each with a text _id")
    return docs


def _not_found(doc_id: Any) -> NotFound:
    return NotFound(f"no document {doc_id!r}")


def _bare_tombstone(doc: Mapping[str, Any]) -> dict:
    """A deletion as stored and served: what identifies it, never a body."""
    return {k: doc[k] for k in ("_id", "_rev", "_deleted", "_revisions", "doctype")
            if k in doc}


def _view_removal_tag(principal: Principal) -> str:
    """What a removal made for one app's view names in its REMOVAL_FIELD, where a share's
    removal names the share: never a share id, so no share ever carries it."""
    return f"view:{principal.label}"


def _parent_rev(doc: Mapping[str, Any], new_edits: bool) -> str | None:
    """The revision a write continues: its `_rev`, or for a replicated revision (new_edits
    false) the one before it in its `_revisions`."""
    if new_edits:
        return doc.get("_rev")
    history = doc.get("_revisions")
    if not isinstance(history, Mapping):
        return None
    start, ids = history.get("start"), history.get("ids")
    if type(start) is not int or not isinstance(ids, list) or len(ids) < 2:
        return None
    return f"{start - 1}-{ids[1]}"


def _write_generation(doc: Mapping[str, Any], landing: Any, new_edits: bool) -> int:
    """The generation the store gives this write (sealed docs bind it): a replicated
    revision keeps its own; an edit is its `_rev`'s plus one; a creation continues after
    the tombstone it lands on, if any."""
    def generation_of(rev: Any) -> int:
        head = rev.partition("-")[0] if isinstance(rev, str) else ""
        if not head.isdigit() or int(head) < 1:
            raise InvalidArgument(f"rev {rev!r} is not of the form N-hash")
        return int(head)

    rev = doc.get("_rev")
    if not new_edits:
        return generation_of(rev)
    if rev is not None:
        return generation_of(rev) + 1
    if isinstance(landing, Mapping) and landing.get("_deleted") is True:
        return generation_of(landing.get("_rev")) + 1
    return 1


class Door:
    """Serves the token's commands over one `Token` (owned: `close` closes it)."""

    def __init__(self, token: Token, *, clock: Callable[[], float] = time.time,
                 standalone: bool = True):
        self._token = token
        self._clock = clock
        self._standalone = standalone  # started alone (`plugshare token run`), not by a node
        self._handlers: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            name: getattr(self, "_cmd_" + name.replace(".", "_")) for name in COMMANDS
        }

    def close(self) -> None:
        self._token.flush()
        self._token.close()

    def settle(self) -> None:
        """Make durable what the commands answered so far decided (the server calls this
        after sending each group of answers)."""
        self._token.flush()

    def handle(self, command: str, args: Mapping[str, Any]) -> Any:
        """Run one command; its audit entries reach the sealed log at the next `settle`."""
        handler = self._handlers.get(command)
        if handler is None:
            raise InvalidArgument(f"unknown token command {command!r}")
        if not isinstance(args, Mapping):
            raise InvalidArgument("command arguments must be a map")
        try:
            return handler(args)
        except TokenError:
            raise
        except PlugshareError as exc:  # a malformed manifest, invitation...: the caller's input
            raise InvalidArgument(str(exc)) from None

    # -- deciding, quietly, then recording once ------------------------------------------

    def _principal(self, args: Mapping[str, Any]) -> Principal:
        return self._token.authenticate(_arg(args, "credential", str))

    def _judge(self, principal: Principal, action: str, meta: Mapping[str, Any]) -> Decision:
        """The rules' answer, not yet audited (the caller records exactly one entry)."""
        if principal == OWNER:
            return _ALLOWED  # also for a stored doc without a doctype
        if not isinstance(meta.get("doctype"), str):
            return Decision(False, "the document has no doctype")
        return self._token.judge(principal, action, meta)

    def _may_touch_doctype(self, principal: Principal, action: str, doctype: str) -> bool:
        token = self._token
        if principal == OWNER:
            return True
        if principal.kind == LINK_KIND:
            return token.link_may_touch_doctype(principal.id, action, doctype)
        subjects = token._subjects.get((principal.kind, principal.id))
        return bool(subjects) and token._rules.match_doctype(
            subjects, ACTION_LEVEL[action], doctype) is not None

    def _record(self, who: str, action: str, meta: Mapping[str, Any] | None,
                decision: Decision) -> None:
        doctype = meta.get("doctype") if meta is not None else None
        self._token._audit_record(who, action, doctype if isinstance(doctype, str) else None,
                                  meta.get("_id") if meta is not None else None,
                                  decision.allowed, decision.reason)

    def _owner(self, args: Mapping[str, Any], action: str) -> None:
        """Managing the token, shares, peers or the node's status is the owner's alone."""
        principal = self._principal(args)
        if principal != OWNER:
            reason = f"only the owner may {action}; {principal.label} may not"
            self._token._audit_record(principal.label, action, None, None, False, reason)
            raise AccessDenied(Decision(False, reason), reason)

    # -- opening a stored document for a principal ----------------------------------------

    def _open(self, principal: Principal, stored: dict, action: str = "read") -> dict:
        """The clear document `principal` may read, decided and audited once. `NotFound`
        when the rules say no (existence is not revealed); `IntegrityError` when the stored
        form is not what the token wrote (altered ciphertext, a stripped envelope)."""
        decision = self._judge(principal, action, stored)
        if not decision.allowed:
            self._record(principal.label, action, stored, decision)
            raise _not_found(stored.get("_id"))
        try:
            clear = self._unseal(stored)
        except (IntegrityError, NotFound) as exc:
            self._record(principal.label, "decrypt", stored, Decision(False, str(exc)))
            raise IntegrityError(f"document {stored.get('_id')!r}: {exc}") from None
        except AccessDenied as exc:  # a share key this node no longer may use
            self._record(principal.label, action, stored, Decision(False, str(exc)))
            raise _not_found(stored.get("_id")) from None
        self._record(principal.label, action, stored, decision)
        return clear

    def _unseal(self, stored: dict) -> dict:
        """The clear form of a stored document, checking that what should be sealed is."""
        token = self._token
        if stored.get("_deleted") is True and not is_sealed(stored):
            return stored  # a tombstone carries no body
        if not is_sealed(stored):
            doctype = stored.get("doctype")
            if isinstance(doctype, str) and token.is_sensitive(doctype):
                raise IntegrityError(f"doctype {doctype!r} is sensitive but the document is "
                                     "stored in clear (injected, or its envelope stripped)")
            share_id = token.encrypted_share_for(stored)
            if share_id is not None:
                raise IntegrityError(f"share {share_id} is encrypted but the document is "
                                     "stored in clear (injected, or its envelope stripped)")
            return stored
        kid = sealed_kid(stored)
        self._check_share_key_usable(kid)
        return _clear_stubs(open_doc(stored, token._doc_key(kid)[1]))

    def _check_share_key_usable(self, kid: str) -> None:
        """A share's key opens documents only while this node's membership is active and
        the share has not expired; past that, the token destroys its copy (also here)."""
        token = self._token
        share_id = token._share_of_kid(kid)
        if share_id is not None:
            ended = token._share_ended(share_id)
            if ended is not None:
                raise AccessDenied(Decision(False, ended), f"read refused: {ended}")

    def _stored_form(self, doc: dict, generation: int) -> dict:
        """How `doc` (clear, decided) is to be stored: sealed under an encrypted share's key
        (so members open it), under its doctype's key if sensitive, else in clear."""
        token = self._token
        if doc.get("_deleted") is True:
            return doc
        share_id = token.encrypted_share_for(doc)
        if share_id is not None:
            return token.encrypt_doc(doc, generation=generation, share_id=share_id)
        if token.is_sensitive(doc["doctype"]):
            return token.encrypt_doc(doc, generation=generation)
        return doc

    # -- documents: apps and the owner -----------------------------------------------------

    def _cmd_auth(self, args: Mapping[str, Any]) -> dict:
        principal = self._principal(args)
        return {"kind": principal.kind, "id": principal.id, "label": principal.label}

    def _cmd_doc_read(self, args: Mapping[str, Any]) -> dict:
        """{credential, doc (stored), doctype?, share?} -> {doc}: the document as the caller
        may see it. A doc of another doctype than the route's, or outside the scope of
        `share` (a share's id), is not found."""
        principal = self._principal(args)
        stored = _doc_arg(args, "doc")
        doctype = _arg(args, "doctype", str, optional=True)
        entry = self._share_opened(principal, args)
        if entry is not None and _scope_refusal(entry, stored) is not None:
            self._record(principal.label, "read", stored,
                         Decision(False, _scope_refusal(entry, stored)))
            raise _not_found(stored["_id"])
        if doctype is not None and not self._may_touch_doctype(principal, "read", doctype):
            refusal = Decision(False, f"no rule lets {principal.label} read {doctype!r} documents")
            self._record(principal.label, "read", {"doctype": doctype, "_id": stored["_id"]},
                         refusal)
            raise AccessDenied(refusal, refusal.reason)
        if doctype is not None and stored.get("doctype") != doctype:
            self._record(principal.label, "read", {"doctype": doctype, "_id": stored["_id"]},
                         Decision(False, "the document is of another doctype"))
            raise _not_found(stored["_id"])
        return {"doc": self._open(principal, stored)}

    def _cmd_doc_list(self, args: Mapping[str, Any]) -> dict:
        """{credential, doctype?, docs, share?, only_removals?} -> {docs, tampered}: the rows
        the caller may read, in clear; rows it may not read (or outside the scope of `share`,
        a share's id) are left out, tampered rows named by id only. A tombstone is served
        (bare: id, rev, doctype) when the caller may read documents of its doctype: a
        follower of the changes feed learns that a document it may have copied is gone.
        With `only_removals` (other leaves of docs whose winner the caller may not read)
        only the removals made for the caller are served: its app's, or the opened share's,
        which exist only where it could read the revision before; never the id of a doc it
        could not read."""
        principal = self._principal(args)
        doctype = _arg(args, "doctype", str, optional=True)
        docs = _docs_arg(args)
        entry = self._share_opened(principal, args)
        only_removals = _arg(args, "only_removals", bool, optional=True) or False
        mine = _view_removal_tag(principal)
        if doctype is not None and not self._may_touch_doctype(principal, "read", doctype):
            refusal = Decision(False, f"no rule lets {principal.label} list {doctype!r} documents")
            self._record(principal.label, "list", {"doctype": doctype}, refusal)
            raise AccessDenied(refusal, refusal.reason)
        served, tampered = [], []
        for stored in docs:
            if doctype is not None and stored.get("doctype") != doctype:
                continue
            if entry is not None and _scope_refusal(entry, stored) is not None:
                continue
            if only_removals and (stored.get("_deleted") is not True or stored.get(
                    REMOVAL_FIELD) != (mine if entry is None else entry.manifest.share_id)):
                continue
            if stored.get("_deleted") is True:
                seen = self._may_see_tombstone(principal, "read", stored, entry)
                self._record(principal.label, "list", stored, Decision(
                    seen, "a deletion of a doctype the caller may read" if seen
                    else f"no rule lets {principal.label} read {stored.get('doctype')!r} "
                         "documents"))
                if seen:
                    served.append(_bare_tombstone(stored))
                continue
            try:
                served.append(self._open(principal, stored, "list"))
            except NotFound:
                continue
            except IntegrityError:
                tampered.append(stored["_id"])
        return {"docs": served, "tampered": tampered}

    def _cmd_doc_count(self, args: Mapping[str, Any]) -> int:
        """{credential, docs, doctype?, share?} -> how many of the live `docs` the caller may
        read, as `doc.list` would serve them (not audited, like `share.count`: a count serves
        no document, and a database's info asks for one)."""
        principal = self._principal(args)
        doctype = _arg(args, "doctype", str, optional=True)
        docs = _docs_arg(args)
        entry = self._share_opened(principal, args)
        if doctype is not None and not self._may_touch_doctype(principal, "read", doctype):
            return 0
        return sum(1 for stored in docs
                   if stored.get("_deleted") is not True
                   and (doctype is None or stored.get("doctype") == doctype)
                   and (entry is None or _scope_refusal(entry, stored) is None)
                   and self._judge(principal, "list", stored).allowed)

    def _cmd_doc_write(self, args: Mapping[str, Any]) -> dict:
        """{credential, doc (clear, with _id, doctype, maybe _rev), current (the stored
        winner, else its tombstone, or None), generation, share?} -> {doc: the form to store,
        removals?: tombstones to store beside it (new_edits=false), one per share this node
        owns that the write takes the doc out of}."""
        principal = self._principal(args)
        doc = _doc_arg(args, "doc")
        current = _doc_arg(args, "current", optional=True)
        generation = _arg(args, "generation", int)
        entry = self._share_opened(principal, args)
        return self._decide_write(principal, doc, current, generation, entry)

    def _cmd_doc_write_batch(self, args: Mapping[str, Any]) -> dict:
        """{credential, docs (clear), current: {id: the stored winner, else its tombstone},
        new_edits, share?} -> {results}: for each doc in order, what `doc.write` answers, or
        {"error", "reason"} for a doc refused ("forbidden") or malformed ("bad_request"); a
        refusal never fails the others. With new_edits=false each doc carries its `_rev`
        and `_revisions` (a replicated revision, stored as given)."""
        principal = self._principal(args)
        docs = _docs_arg(args)
        current = _arg(args, "current", dict)
        new_edits = _arg(args, "new_edits", bool)
        entry = self._share_opened(principal, args)
        results: list[dict] = []
        for doc in docs:
            landing = current.get(doc["_id"])
            try:
                generation = _write_generation(doc, landing, new_edits)
                results.append(self._decide_write(
                    principal, doc, landing if isinstance(landing, dict) else None,
                    generation, entry, new_edits=new_edits))
            except AccessDenied as exc:
                results.append({"id": doc["_id"], "error": "forbidden", "reason": str(exc)})
            except (InvalidArgument, NotFound) as exc:
                results.append({"id": doc["_id"], "error": "bad_request", "reason": str(exc)})
        return {"results": results}

    def _decide_write(self, principal: Principal, doc: dict, current: dict | None,
                      generation: int, entry: Any = None, *, new_edits: bool = True) -> dict:
        """One write decided and audited: {doc: the form to store, removals?}, or
        `AccessDenied` / `InvalidArgument`. `current` is the stored winner it lands on (else
        its tombstone, or None); `entry` the share the write is confined to, if any."""
        if not isinstance(doc.get("doctype"), str):
            raise InvalidArgument("a document needs a doctype")
        allowed_fields = ("_id", "_rev", "_deleted", "_attachments") + (
            () if new_edits else ("_revisions",))
        if ENVELOPE_FIELD in doc or any(
                k.startswith("_") and k not in allowed_fields for k in doc):
            raise InvalidArgument(
                f"a document may not carry {ENVELOPE_FIELD!r} or fields starting with '_' "
                f"other than {', '.join(allowed_fields)}")
        live = current is not None and current.get("_deleted") is not True
        if live:
            # A writer may not overwrite a doc it could not write (one outside its selector,
            # or of another doctype, or outside the share it writes through) by making the
            # new version fit its rule.
            replace = self._judge(principal, "write", current)
            if replace.allowed and entry is not None and _scope_refusal(entry, current):
                replace = Decision(False, _scope_refusal(entry, current))
            if not replace.allowed:
                self._record(principal.label, "write", doc, replace)
                raise AccessDenied(replace, "this id belongs to a document you may not write")
        # Also over a tombstone: a doc re-created under another doctype would split from the
        # copies its shares hold (their tombstone, or the old doctype's live revision).
        changed = doctype_change_refusal(current, doc) if current is not None else None
        if changed is not None:
            self._record(principal.label, "write", doc, Decision(False, changed))
            if not live and not self._judge(principal, "write", current).allowed:
                # the old doctype is not the caller's to learn
                raise AccessDenied(Decision(False, changed),
                                   "this id belongs to a document you may not write")
            raise InvalidArgument(changed)
        if doc.get("_deleted") is True:
            return self._decide_removal(principal, doc, current if live else None, entry)
        decision = self._judge(principal, "write", doc)
        if decision.allowed and entry is not None and _scope_refusal(entry, doc) is not None:
            decision = Decision(False, _scope_refusal(entry, doc))
        if decision.allowed and doc.get("_attachments"):
            seal, sealed = self._attachment_seal(doc)
            if sealed is None and seal is not None:
                sealed = self._inline_attachment_refusal(doc)
                if sealed is None:
                    doc, sealed = _stored_stubs(doc, current)
            if sealed is None:
                sealed = self._new_data_refusal(doc)
            if sealed is not None:
                self._record(principal.label, "write", doc, Decision(False, sealed))
                raise InvalidArgument(sealed)
        self._record(principal.label, "write", doc, decision)
        if not decision.allowed:
            raise AccessDenied(decision, f"write refused: {decision.reason}")
        answer: dict[str, Any] = {"doc": self._stored_form(doc, generation)}
        if live and _parent_rev(doc, new_edits) == current.get("_rev"):  # edits the winner
            answer["removals"] = self._removals(principal, current, doc)
        return answer

    def _decide_removal(self, principal: Principal, doc: dict, live: dict | None,
                        entry: Any) -> dict:
        """A deletion: allowed when the caller may write the live doc it removes (a tombstone
        has no fields a selector could match), or, over no live doc, may write documents of
        its doctype. The stored tombstone is bare: a body sent with it could be in clear
        what a sealed doctype keeps sealed."""
        if live is not None:
            decision = self._judge(principal, "write", live)  # scope checked by the caller
        elif self._may_see_tombstone(principal, "write", doc, entry):
            decision = Decision(True, f"{principal.label} may write {doc['doctype']!r} "
                                      "documents")
        else:
            decision = Decision(False, f"no rule lets {principal.label} delete "
                                       f"{doc['doctype']!r} documents")
        self._record(principal.label, "delete", doc, decision)
        if not decision.allowed:
            raise AccessDenied(decision, f"delete refused: {decision.reason}")
        return {"doc": _bare_tombstone(doc)}

    # -- attachments: decided as the document's own writes -------------------------------

    def _attachment_seal(self, doc: Mapping[str, Any]) -> tuple[dict | None, str | None]:
        """(the scope `doc`'s attachment data is sealed under, as `share.seal_chunks` takes
        it: {share} for a doc of an encrypted share, {doctype} for a sensitive doctype, None
        for clear data; why attachments are refused on it, else None). A sensitive doctype's
        doc in a plain share is refused: its members could not open data sealed under this
        node's key, and the link does not open chunks for them yet."""
        token = self._token
        share_id = token.encrypted_share_for(doc)
        if share_id is not None:
            return {"share": share_id}, None
        doctype = doc.get("doctype")
        if not (isinstance(doctype, str) and token.is_sensitive(doctype)):
            return None, None
        now = time.time()
        for entry in self._token._book._entries.values():
            if entry.active_at(now) and _scope_refusal(entry, doc) is None:
                return None, (f"doctype {doctype!r} is sensitive and the document is in plain "
                              f"share {entry.manifest.name!r}: its attachments are refused "
                              "until the link can carry them opened")
        return {"doctype": doctype}, None

    @staticmethod
    def _inline_attachment_refusal(doc: Mapping[str, Any]) -> str | None:
        """Why a doc write may not carry its attachments' data inline (sealed docs only):
        that data would be stored in clear. Stubs (data already stored, sealed) pass."""
        inline = [name for name, stub in (doc.get("_attachments") or {}).items()
                  if not (isinstance(stub, Mapping) and stub.get("stub") is True)]
        if not inline:
            return None
        return (f"attachments {sorted(inline)} carry data inline on a sealed document: write "
                "them through the attachment API (/data/{doctype}/{id}/{name}), which seals "
                "them as they stream in")

    def _new_data_refusal(self, doc: Mapping[str, Any]) -> str | None:
        """Why the attachment data a write brings (its `follows` entries, streamed in by the
        node once the write is decided) is refused by the shares the doc is in (their size
        and content type caps, as `att.write` applies them), else None."""
        for name, entry in sorted((doc.get("_attachments") or {}).items()):
            if not isinstance(entry, Mapping) or entry.get("follows") is not True:
                continue
            content_type = entry.get("content_type")
            cap, refusal = self._attachment_caps(
                doc, content_type if isinstance(content_type, str) else None)
            if refusal is not None:
                return f"attachment {name!r}: {refusal}"
            length = entry.get("length")
            if cap is not None and isinstance(length, int) and length > cap:
                return (f"attachment {name!r} ({length} bytes) is over the share's cap of "
                        f"{cap} bytes")
        return None

    def _attachment_caps(self, doc: Mapping[str, Any], content_type: str | None
                         ) -> tuple[int | None, str | None]:
        """(the smallest size cap of the shares held here whose scope covers `doc`, None
        for no cap; why `content_type` is refused by one of them, else None)."""
        cap, refusal = None, None
        now = time.time()
        for entry in self._token._book._entries.values():
            if not entry.active_at(now) or _scope_refusal(entry, doc) is not None:
                continue
            rule = entry.manifest.rule
            if rule.max_attachment_size is not None:
                cap = rule.max_attachment_size if cap is None else min(cap,
                                                                       rule.max_attachment_size)
            if content_type is not None and refusal is None:
                refused = rule.attachment_refusal(content_type)
                if refused is not None:
                    refusal = f"share {entry.manifest.name!r}: {refused}"
        return cap, refusal

    def _cmd_att_write(self, args: Mapping[str, Any]) -> dict:
        """{credential, doctype, id, name, current (the stored winner, else its tombstone, or
        None), content_type? (absent: a removal), share?} -> {max_length: the most bytes the
        attachment may hold under the rules of the shares it is in (None: no cap; the node
        enforces it as the data streams, the token never sees the data), base: for a
        document not live yet, the form to store first (the attachment is written on it)}.
        Decided as a write of the document itself (its rule, its share's scope), audited
        once; `AccessDenied` / `InvalidArgument` (a share's content types, a sealed doc)."""
        principal = self._principal(args)
        doctype = _arg(args, "doctype", str)
        doc_id = _arg(args, "id", str)
        name = _arg(args, "name", str)
        current = _doc_arg(args, "current", optional=True)
        content_type = _arg(args, "content_type", str, optional=True)
        entry = self._share_opened(principal, args)
        live = current is not None and current.get("_deleted") is not True
        target = current if live else {"_id": doc_id, "doctype": doctype}
        meta = {"_id": doc_id, "doctype": doctype}
        if live and current.get("doctype") != doctype:
            # another doctype's document: answered as a missing one
            self._record(principal.label, "write", meta,
                         Decision(False, "the document is of another doctype"))
            raise _not_found(doc_id)
        if not live and current is not None and current.get("doctype") != doctype:
            self._record(principal.label, "write", meta,
                         Decision(False, "the id was a document of another doctype"))
            raise AccessDenied(Decision(False, "doctype change"),
                               "this id belongs to a document you may not write")
        decision = self._judge(principal, "write", target)
        if decision.allowed and entry is not None and _scope_refusal(entry, target):
            decision = Decision(False, _scope_refusal(entry, target))
        if not decision.allowed:
            self._record(principal.label, "write", target, decision)
            if live and not self._judge(principal, "read", current).allowed:
                raise _not_found(doc_id)  # existence is not revealed
            raise AccessDenied(decision, f"write refused: {decision.reason}")
        seal, refusal = self._attachment_seal(target)
        if content_type is None:
            refusal = None  # a removal leaves nothing in clear
        cap, type_refusal = self._attachment_caps(target, content_type)
        if refusal is None:
            refusal = type_refusal
        if refusal is not None:
            self._record(principal.label, "write", target, Decision(False, refusal))
            raise InvalidArgument(refusal)
        self._record(principal.label, "write", target,
                     Decision(True, f"{decision.reason} (attachment {name!r})"))
        base = None if live else (self._stored_form(dict(target), 1) if seal else dict(target))
        return {"max_length": cap, "base": base, "seal": seal}

    def _cmd_att_sealing(self, args: Mapping[str, Any]) -> dict:
        """{doc (stored)} -> {seal}: the scope its attachments' data is sealed under (as
        `share.open_chunks` takes it), None when it is stored in clear. A sealed document's
        attachments are sealed under the scope of its envelope's key."""
        stored = _doc_arg(args, "doc")
        if not is_sealed(stored) or not stored.get("_attachments"):
            return {"seal": None}
        kid, token = sealed_kid(stored), self._token
        doctype = stored.get("doctype")
        if isinstance(doctype, str) and token._state.doctype_keys.get(doctype) == kid:
            return {"seal": {"doctype": doctype}}
        for share_id in token._state.share_keys:
            if kid in token.share_key_ids(share_id):
                return {"seal": {"share": share_id}}
        raise NotFound(f"no data key {kid} here for the attachments of {stored['_id']!r}")

    def _cmd_att_seal_revision(self, args: Mapping[str, Any]) -> dict:
        """{current (the stored, sealed leaf), attachments (the new revision's stubs),
        generation} -> {doc}: the new revision's stored form, its envelope binding the new
        stubs (their sealed data's digests and lengths). The write was decided by
        `att.write`; the data was sealed by `share.seal_chunks`."""
        current = _doc_arg(args, "current")
        attachments = _arg(args, "attachments", dict)
        generation = _arg(args, "generation", int)
        if not is_sealed(current):
            raise InvalidArgument(f"document {current['_id']!r} is not stored sealed")
        clear = open_doc(current, self._token._doc_key(sealed_kid(current))[1])
        clear["_attachments"] = attachments
        return {"doc": self._stored_form(clear, generation)}

    def _may_see_tombstone(self, principal: Principal, action: str, tombstone: dict,
                           entry: Any) -> bool:
        """A tombstone carries no fields to match a rule's selector: it is the caller's when
        a rule gives it `action` on some documents of its doctype (or, for a principal bound
        to one share, when the share's permission allows it: its scope is checked apart)."""
        doctype = tombstone.get("doctype")
        if not isinstance(doctype, str):
            return principal == OWNER
        if self._judge(principal, action, tombstone).allowed:
            return True
        return self._may_touch_doctype(principal, action, doctype)

    # -- virtual databases: what a credential may open -----------------------------------

    def _share_opened(self, principal: Principal, args: Mapping[str, Any]) -> Any:
        """The held share named by the optional `share` argument (an id), once checked that
        `principal` may open it; None without one. `NotFound` for a share it may not open,
        whether or not it exists."""
        share_id = _arg(args, "share", str, optional=True)
        if share_id is None:
            return None
        entry = self._token._book._entries.get(share_id)
        if entry is None or not entry.active_at(time.time()) or \
                not self._may_open_share(principal, entry):
            self._record(principal.label, "open", {"_id": share_id},
                         Decision(False, "share not held here or not open to the caller"))
            raise NotFound("Database does not exist.")
        return entry

    def _may_open_share(self, principal: Principal, entry: Any) -> bool:
        if principal == OWNER:
            return True
        if principal.kind == "link":  # a share link opens its own share's database only
            return self._token.link_share(principal.id) == entry.manifest.share_id
        return self._may_touch_doctype(principal, "read", entry.manifest.rule.doctype)

    def _cmd_db_list(self, args: Mapping[str, Any]) -> dict:
        """{credential} -> {principal, any_doctype, doctypes, shares: [{id, name, doctype}]}: the
        virtual databases the caller may open: the doctypes its rules let it read (the
        owner: any), and the shares held here it may read through."""
        principal = self._principal(args)
        token = self._token
        subjects = token._subjects.get((principal.kind, principal.id)) or ()
        doctypes = set(token._rules.doctypes(subjects, ACTION_LEVEL["read"]))
        now = time.time()
        shares = [{"id": e.manifest.share_id, "name": e.manifest.name,
                   "doctype": e.manifest.rule.doctype}
                  for e in token._book._entries.values()
                  if e.active_at(now) and self._may_open_share(principal, e)]
        if principal == OWNER:
            doctypes |= {r.doctype for r in token.list_rules()}
            doctypes |= {s["doctype"] for s in shares}
        return {"principal": principal.label, "any_doctype": principal == OWNER,
                "doctypes": sorted(doctypes),
                "shares": sorted(shares, key=lambda s: (s["name"], s["id"]))}

    def _removals(self, principal: Principal, current: dict, doc: dict) -> list[dict]:
        """The removals (tombstones, one per share) that take `current` out of the shares
        this node owns whose scope `doc` leaves: the node stores them beside `doc`, and each
        share carries its own to the members like a deletion. One audit entry each."""
        out = []
        for share_id in self._token._book.removals(current, doc):
            tombstone = removal(share_id, current)
            self._record(principal.label, "share-remove", tombstone, Decision(
                True, f"the write takes the document out of share {share_id!r}"))
            out.append(tombstone)
        for app in self._apps_losing(current, doc):
            tombstone = removal(_view_removal_tag(app), current)
            self._record(principal.label, "view-remove", tombstone, Decision(
                True, f"the write takes the document out of what {app.label} may read"))
            out.append(tombstone)
        return out

    def _apps_losing(self, current: dict, doc: dict) -> list[Principal]:
        """The apps that may read `current` but not `doc`, its next revision: each gets a
        removal of its own (`_view_removal_tag`), which `doc.list` serves to it alone, so
        the copy its CouchDB client holds is deleted at its next pull (a sibling tombstone
        never wins over the live revision anywhere else, and no share carries it)."""
        doctype = doc.get("doctype")
        if not isinstance(doctype, str) or doc.get("_deleted") is True:
            return []
        losing = []
        for name in sorted(self._token._state.apps):
            app = Principal(APP_KIND, name)
            if self._may_touch_doctype(app, "read", doctype) \
                    and self._judge(app, "read", current).allowed \
                    and not self._judge(app, "read", doc).allowed:
                losing.append(app)
        return losing

    def _cmd_doc_delete(self, args: Mapping[str, Any]) -> dict:
        """{credential, current (stored winner), rev} -> {doc}: the tombstone to store (it
        keeps the doctype, so shares of that doctype replicate the deletion)."""
        principal = self._principal(args)
        current = _doc_arg(args, "current")
        rev = _arg(args, "rev", str)
        if not self._judge(principal, "read", current).allowed and \
                not self._judge(principal, "write", current).allowed:
            self._record(principal.label, "delete", current,
                         Decision(False, "may neither read nor write this document"))
            raise _not_found(current["_id"])
        decision = self._judge(principal, "write", current)
        self._record(principal.label, "delete", current, decision)
        if not decision.allowed:
            raise AccessDenied(decision, f"delete refused: {decision.reason}")
        return {"doc": {"_id": current["_id"], "_rev": rev, "_deleted": True,
                        "doctype": current.get("doctype")}}

    def _cmd_doc_reseal(self, args: Mapping[str, Any]) -> dict:
        """{credential, docs} -> {docs}: (owner) the new stored forms of the given docs whose
        stored form is not the one the token would write now (after `doctype.encrypt` or a
        new encrypted share): each continues its doc's revision (same _rev as parent)."""
        self._owner(args, "reseal")
        out = []
        for stored in _docs_arg(args):
            if stored.get("_deleted") is True or not isinstance(stored.get("_rev"), str):
                continue
            wanted = self._reseal_target(stored)
            if wanted is None:
                continue
            if stored.get("_attachments"):  # the node refuses this before: see att.write
                self._record("admin", "reseal", stored, Decision(
                    False, "its attachments' data cannot be sealed yet"))
                continue
            try:
                clear = open_doc(stored, self._token._doc_key(sealed_kid(stored))[1]) \
                    if is_sealed(stored) else stored
            except (IntegrityError, NotFound) as exc:
                self._record("admin", "reseal", stored, Decision(False, str(exc)))
                continue
            generation = int(stored["_rev"].partition("-")[0]) + 1
            out.append(self._stored_form(dict(clear), generation))
        self._token._admin("reseal", None, f"{len(out)} document(s) re-sealed")
        return {"docs": out}

    def _reseal_target(self, stored: dict) -> str | None:
        """The key id family a doc should be sealed under now, if it is not already."""
        token = self._token
        share_id = token.encrypted_share_for(stored)
        kid = sealed_kid(stored) if is_sealed(stored) else None
        if share_id is not None:
            return None if kid in token.share_key_ids(share_id) else f"share:{share_id}"
        doctype = stored.get("doctype")
        if isinstance(doctype, str) and token.is_sensitive(doctype) and kid is None:
            return "doctype"
        return None

    # -- administration (owner only) --------------------------------------------------------

    def _cmd_owner_check(self, args: Mapping[str, Any]) -> dict:
        """{credential, action}: refused unless the caller is the owner (audited)."""
        action = _arg(args, "action", str)
        self._owner(args, action)
        self._token._audit_record(OWNER.label, action, None, None, True, "the owner")
        return {"ok": True}

    def _cmd_app_add(self, args: Mapping[str, Any]) -> dict:
        self._owner(args, "add_app")
        credential = self._token.add_app(
            _arg(args, "name", str), _arg(args, "doctype", str), _arg(args, "perm", str),
            _arg(args, "selector", dict, optional=True))
        return {"name": args["name"], "credential": credential}

    def _cmd_app_list(self, args: Mapping[str, Any]) -> list:
        self._owner(args, "list_apps")
        import attrs

        return [attrs.asdict(app) for app in self._token.list_apps()]

    def _cmd_app_remove(self, args: Mapping[str, Any]) -> dict:
        self._owner(args, "remove_app")
        self._token.remove_app(_arg(args, "name", str))
        return {"ok": True}

    def _cmd_rule_add(self, args: Mapping[str, Any]) -> dict:
        self._owner(args, "add_rule")
        kind, subject = _arg(args, "subject_kind", str), _arg(args, "subject", str)
        self._check_subject(kind, subject)
        rule_id = self._token.add_rule(
            _arg(args, "doctype", str), kind, subject, _arg(args, "perm", str),
            _arg(args, "selector", dict, optional=True))
        return next(_rule_json(r) for r in self._token.list_rules() if r.id == rule_id)

    def _check_subject(self, kind: str, subject: str) -> None:
        """A grant to an app or peer that does not exist would pass to whoever later takes
        that name: refuse it."""
        token = self._token
        if kind == "app" and subject not in {a.name for a in token.list_apps()}:
            raise NotFound(f"no app {subject!r}: add it first (plugshare app add)")
        if kind == "peer":
            from .identity import format_node_id, parse_node_id

            known = {p.node_id for p in token.list_peers()}
            try:
                spelled = format_node_id(parse_node_id(subject))
            except InvalidArgument:
                spelled = subject
            if spelled not in known:
                raise NotFound(f"no peer {subject!r} is pinned here (it must join a share "
                               "first)")

    def _cmd_rule_list(self, args: Mapping[str, Any]) -> list:
        self._owner(args, "list_rules")
        return [_rule_json(r) for r in self._token.list_rules()]

    def _cmd_rule_remove(self, args: Mapping[str, Any]) -> dict:
        self._owner(args, "remove_rule")
        self._token.remove_rule(_arg(args, "rule_id", str))
        return {"ok": True}

    def _cmd_doctype_encrypt(self, args: Mapping[str, Any]) -> dict:
        self._owner(args, "encrypt")
        doctype = _arg(args, "doctype", str)
        self._token.mark_sensitive(doctype)
        return {"doctype": doctype, "sensitive": True}

    def _cmd_audit_tail(self, args: Mapping[str, Any]) -> dict:
        self._owner(args, "audit")
        self._token.flush()  # so the tail includes this very request's decision
        n = _arg(args, "n", int)
        allowed = _arg(args, "allowed", bool, optional=True)
        principal = _arg(args, "principal", str, optional=True)
        since = _arg(args, "since", (int, float), optional=True)
        if allowed is None and principal is None and since is None:
            entries = self._token.audit_tail(n)
        else:
            entries = self._token.audit_search(n, allowed=allowed, principal=principal,
                                               since=since)
        result: dict[str, Any] = {"entries": [_audit_json(e) for e in entries]}
        if args.get("verify"):
            ok, count, first_bad = self._token.audit_verify()
            result["verify"] = {"ok": ok, "entries": count, "first_bad": first_bad}
        return result

    def _cmd_audit_prune(self, args: Mapping[str, Any]) -> dict:
        """{credential, before} -> {segments, entries, verifiable_from}: drop the log's
        whole segments older than `before` (Unix time); the rest stays verifiable."""
        self._owner(args, "audit_prune")
        before = _arg(args, "before", (int, float))
        if before != before or before in (float("inf"), float("-inf")):
            raise InvalidArgument("argument 'before' must be a time")
        return self._token.audit_prune(float(before))

    # -- identity and links -------------------------------------------------------------------

    def _cmd_info(self, args: Mapping[str, Any]) -> dict:
        token = self._token
        from .server import is_dumpable

        return {"version": PROTOCOL_VERSION, "pid": os.getpid(), "dumpable": is_dumpable(),
                "standalone": self._standalone,
                "node_id": token.node_id, "name": token.name,
                "fingerprint": token.fingerprint, "public_key": token.public_key_bytes,
                "x25519": token.x25519_public_bytes}

    def _cmd_link_certify(self, args: Mapping[str, Any]) -> dict:
        """{tls_public_key} -> {delegation}: binds the node's ephemeral TLS key to this
        identity for DELEGATION_LIFETIME (the identity key itself never leaves)."""
        tls_public = _arg(args, "tls_public_key", bytes)
        if len(tls_public) != 32:
            raise InvalidArgument("a TLS key is a 32-byte Ed25519 public key")
        token = self._token
        not_after = int(self._clock()) + DELEGATION_LIFETIME
        statement = tls.delegation_statement(token.public_key_bytes, tls_public, not_after)
        signature = token._identity.sign(statement)
        token._admin("certify_tls_key", None, f"TLS key certified until {not_after}")
        return {"delegation": tls.encode_delegation(token.public_key_bytes, not_after, signature)}

    def _cmd_link_prove(self, args: Mapping[str, Any]) -> dict:
        """{server_id, nonce} -> {signature}: this node's proof on a link it dials; the token
        builds what it signs, so it signs nothing else for this purpose."""
        server_id = _arg(args, "server_id", bytes)
        nonce = _arg(args, "nonce", bytes)
        if len(server_id) != 32 or len(nonce) != 32:
            raise InvalidArgument("server_id and nonce are 32 bytes each")
        token = self._token
        payload = tls.client_auth_payload(server_id, nonce, token.fingerprint)
        return {"signature": token._identity.sign(payload)}

    def _cmd_link_may_connect(self, args: Mapping[str, Any]) -> bool:
        """May this peer hold a link? Members of shares in common, joiners while an
        invitation is open, and (only to learn it) a member revoked from a share held here:
        the node sends it the newest manifests, then closes."""
        token = self._token
        peer = _arg(args, "peer", bytes)
        if token.may_connect(peer):
            return True
        fingerprint = token._fp(peer)
        for manifest in token.shares():
            member = manifest.member(fingerprint)
            if member is not None and member.status != "active" and \
                    token.share_status(manifest.share_id) in ("owner", "active"):
                token._audit_record(token._peer_label(fingerprint), "connect", None, None, True,
                                    f"only to learn its standing in share {manifest.name!r}")
                return True
        return False

    # -- shares: management -----------------------------------------------------------------

    def _manifests(self) -> list[dict]:
        token = self._token
        return [{"manifest": m.to_dict(), "status": token.share_status(m.share_id)}
                for m in token.shares()]

    def _cmd_share_list(self, args: Mapping[str, Any]) -> list:
        """Every share this token knows, with this node's standing: what the node routes by
        (which links to keep, what to push); every document still passes the token."""
        enforce = getattr(self._token, "enforce_expiry", None)
        if enforce is not None:
            enforce()
        return self._manifests()

    def _cmd_share_create(self, args: Mapping[str, Any]) -> dict:
        self._owner(args, "share_create")
        kwargs: dict[str, Any] = {"encrypted": bool(args.get("encrypted", False))}
        expires = args.get("expires")
        if expires is not None:
            kwargs["expires"] = float(_arg(args, "expires", (int, float)))
        kwargs["max_attachment_size"] = _arg(args, "max_attachment_size", int, optional=True)
        kwargs["attachment_types"] = _arg(args, "attachment_types", list, optional=True)
        manifest = self._token.create_share(
            _arg(args, "name", str), _arg(args, "doctype", str),
            _arg(args, "selector", dict, optional=True), **kwargs)
        return manifest.to_dict()

    def _cmd_share_invite(self, args: Mapping[str, Any]) -> dict:
        self._owner(args, "share_invite")
        addresses = [(str(h), int(p)) for h, p in _arg(args, "addresses", list)]
        kwargs: dict[str, Any] = {}
        if args.get("membership_expires") is not None:
            kwargs["membership_expires"] = float(args["membership_expires"])
        if args.get("relays"):  # [[relay id, host, port], ...]: where the owner is reached behind NAT
            kwargs["relays"] = [(bytes(r), str(h), int(p)) for r, h, p in _arg(args, "relays", list)]
        invitation = self._token.issue_invitation(
            _arg(args, "share", str), permission=_arg(args, "permission", str),
            ttl=_arg(args, "ttl", int), addresses=addresses, **kwargs)
        return {"code": invitation.encode(), "permission": invitation.permission,
                "expires_at": invitation.expires_at}

    def _invitation_row(self, key: str, record: Any) -> dict:
        return {"id": key[:INVITATION_ID_LENGTH], "share": record.share_id,
                "permission": record.permission, "expires_at": record.expires_at,
                "membership_expires": record.membership_expires}

    def _cmd_share_invitations(self, args: Mapping[str, Any]) -> dict:
        """{credential, share?} -> {invitations}: the open ones (not used, not expired), of
        every share or of one; each names an id (its secret's digest: it opens nothing)."""
        self._owner(args, "share_invitations")
        share = _arg(args, "share", str, optional=True)
        rows = self._token._book.open_invitations(time.time())
        return {"invitations": [self._invitation_row(k, r) for k, r in rows
                                if share is None or r.share_id == share]}

    def _cmd_share_cancel_invitation(self, args: Mapping[str, Any]) -> dict:
        """{credential, share, invitation} -> the cancelled invitation: `invitation` is its
        code or id; the code admits no one afterwards."""
        self._owner(args, "share_cancel_invitation")
        share = _arg(args, "share", str)
        token = self._token
        token._owned(share, "cancel_invitation", "cancel invitations to")
        key, record = token._book.cancel_invitation(share, _arg(args, "invitation", str),
                                                    time.time())
        token._admin("cancel_invitation", None,
                     f"invitation {key[:INVITATION_ID_LENGTH]} to share {share!r} cancelled")
        token._changed()
        return self._invitation_row(key, record)

    def _cmd_share_link(self, args: Mapping[str, Any]) -> dict:
        """{credential, share, permission, expires?} -> {id, credential, share, permission,
        created, expires}: a link to the share for an outside client (owner only). The
        credential is shown this once; the token keeps only its hash."""
        self._owner(args, "share_link")
        expires = _arg(args, "expires", (int, float), optional=True)
        credential, link = self._token.create_link(
            _arg(args, "share", str), permission=_arg(args, "permission", str),
            expires=None if expires is None else float(expires))
        return {"id": link.id, "credential": credential, "share": link.share_id,
                "permission": link.permission, "created": link.created,
                "expires": link.expires}

    def _cmd_share_unlink(self, args: Mapping[str, Any]) -> dict:
        """{credential, share, link} -> the link as listed: its credential stops working."""
        self._owner(args, "share_unlink")
        self._token.remove_link(_arg(args, "share", str), _arg(args, "link", str))
        rows = self._token.list_links(_arg(args, "share", str))
        return next(r for r in rows if r["id"] == args["link"])

    def _cmd_share_links(self, args: Mapping[str, Any]) -> dict:
        """{credential, share?} -> {links}: every link (of one share, or of all) without its
        secret, with its status (active, expired, ended, unlinked)."""
        self._owner(args, "share_links")
        return {"links": self._token.list_links(_arg(args, "share", str, optional=True))}

    def _cmd_share_join(self, args: Mapping[str, Any]) -> dict:
        """{credential, code, manifest, key} (joiner): take the owner's answer."""
        self._owner(args, "share_accept")
        invitation = _invitation.Invitation.decode(_arg(args, "code", str))
        manifest = _manifest.Manifest.from_dict(_arg(args, "manifest", dict))
        key = _arg(args, "key", bytes, optional=True)
        return self._token.join_share(invitation, manifest, key).to_dict()

    def _cmd_share_redeem(self, args: Mapping[str, Any]) -> dict:
        """{peer, share, secret, name, public_key, x25519} (owner): admit a joiner whose
        link proved `public_key`."""
        peer = _arg(args, "peer", bytes)
        public_key = _arg(args, "public_key", bytes)
        from .identity import fingerprint_of

        if fingerprint_of(public_key) != peer:
            raise InvalidArgument("the joiner's public key is not the one its link proved")
        manifest, key = self._token.redeem_invitation(
            _arg(args, "share", str), _arg(args, "secret", bytes),
            joiner_public_key=public_key, joiner_name=_arg(args, "name", str),
            joiner_x25519=_arg(args, "x25519", bytes),
            joiner_relays=tuple(str(r) for r in (_arg(args, "relays", list, optional=True) or ())))
        return {"manifest": manifest.to_dict(), "key": key}

    def _cmd_share_accept_manifest(self, args: Mapping[str, Any]) -> dict:
        """{peer, manifest, grants?} -> {manifest, changed, grants}."""
        manifest = _manifest.Manifest.from_dict(_arg(args, "manifest", dict))
        grants = args.get("grants")
        kwargs = {"grants": grants} if grants else {}
        current, changed = self._token.accept_manifest(
            manifest, sender=_arg(args, "peer", bytes), **kwargs)
        return {"manifest": current.to_dict(), "changed": changed}

    def _cmd_share_grants(self, args: Mapping[str, Any]) -> dict:
        """{share} -> {grants}: the share's keys wrapped to each active member (end to end:
        safe to forward), sent along with its manifest."""
        grants = getattr(self._token, "key_grants", None)
        if grants is None:
            return {"grants": {}}
        try:
            return {"grants": grants(_arg(args, "share", str))}
        except NotFound:
            return {"grants": {}}

    def _cmd_share_revoke(self, args: Mapping[str, Any]) -> dict:
        self._owner(args, "share_revoke")
        return self._token.revoke_member(_arg(args, "share", str),
                                         _arg(args, "member", str)).to_dict()

    def _cmd_share_leave(self, args: Mapping[str, Any]) -> dict:
        """{credential, share} -> {request}: leave (locally at once); the signed request is
        for the owner."""
        self._owner(args, "share_leave")
        share = _arg(args, "share", str)
        request = self._token.leave_request(share)
        self._token.leave_share(share)
        return {"request": request}

    def _cmd_share_forget(self, args: Mapping[str, Any]) -> dict:
        """{credential, share} -> {}: forget a share this node no longer takes part in."""
        self._owner(args, "share_forget")
        self._token.forget_share(_arg(args, "share", str))
        return {}

    def _cmd_share_apply_leave(self, args: Mapping[str, Any]) -> dict:
        return self._token.apply_leave_request(
            _arg(args, "request", dict), _arg(args, "peer", bytes)).to_dict()

    # -- shares: documents crossing ------------------------------------------------------------

    def _share_entry(self, share_id: str):
        entry = self._token._book._entries.get(share_id)
        if entry is None:
            raise NotFound(f"share {share_id!r} is not held by this node")
        return entry

    def _cmd_share_count(self, args: Mapping[str, Any]) -> int:
        """{share, docs} -> how many of `docs` are in the share's scope (not audited: a
        count serves no document)."""
        entry = self._share_entry(_arg(args, "share", str))
        return sum(1 for doc in _docs_arg(args) if doc.get("_deleted") is not True
                   and _scope_refusal(entry, doc) is None)

    def _cmd_share_may_push(self, args: Mapping[str, Any]) -> bool:
        return self._token.decide_outgoing(_arg(args, "share", str),
                                           _arg(args, "peer", bytes)).allowed

    def _cmd_share_outgoing(self, args: Mapping[str, Any]) -> dict:
        """{share, peer, docs (leaf revisions with _revisions)} -> {verdicts}: for each doc in
        order, None (it may leave as given), {"doc": the form to send} (a sensitive doctype's
        opened: the peer seals it with its own key) or {"withheld": reason}. An encrypted
        share's docs leave sealed, as stored. Docs are never echoed back needlessly."""
        token = self._token
        share_id, peer = _arg(args, "share", str), _arg(args, "peer", bytes)
        docs = _docs_arg(args)
        label = token._peer_label(token._fp(peer))
        token._share_ended(share_id)  # an expiry passed: the keys go before anything leaves
        standing = token._book.outgoing(share_id, token._fp(peer))
        if not standing.allowed:
            for doc in docs:
                self._record(label, "share-send", doc, standing)
            return {"verdicts": [{"withheld": standing.reason}] * len(docs)}
        entry = self._share_entry(share_id)
        encrypted = entry.manifest.encrypted
        share_kids = token.share_key_ids(share_id)
        verdicts: list[dict | None] = []
        for doc in docs:
            refusal = _scope_refusal(entry, doc)
            form = doc
            if refusal is None and doc.get("_deleted") is not True:
                sealed = is_sealed(doc)
                try:
                    if encrypted and (not sealed or sealed_kid(doc) not in share_kids):
                        refusal = "not sealed under the share's key (re-seal pending)"
                    elif not encrypted and sealed and doc.get("_attachments"):
                        # its data is sealed under a key the members do not hold
                        refusal = ("its attachments are stored sealed under this node's "
                                   "key: the link does not carry them opened yet")
                    elif not encrypted and sealed:
                        form = open_doc(doc, token._doc_key(sealed_kid(doc))[1])
                except (IntegrityError, NotFound) as exc:
                    refusal = f"cannot be opened here: {exc}"
            decision = standing if refusal is None else Decision(False, refusal)
            self._record(label, "share-send", doc, decision)
            if refusal is not None:
                verdicts.append({"withheld": refusal})
            else:
                verdicts.append(None if form is doc else {"doc": form})
        return {"verdicts": verdicts}

    def _cmd_share_incoming(self, args: Mapping[str, Any]) -> dict:
        """{share, peer, docs, existing: {id: local winner, or its tombstone}} -> {results}:
        for each doc in order None (store it as sent), {"doc": the form to store} or {"refused": reason}. Decides membership, write
        permission, scope, the current manifest, the local doc it would land on, and for an
        encrypted share the ciphertext; a sensitive doctype arriving in a plain share is
        sealed under this node's key before it is stored."""
        token = self._token
        share_id, peer = _arg(args, "share", str), token._fp(_arg(args, "peer", bytes))
        docs = _docs_arg(args)
        existing = _arg(args, "existing", dict)
        label = token._peer_label(peer)
        book = token._book
        token._share_ended(share_id)  # an expiry passed: the keys go before anything lands
        results = []
        for doc in docs:
            local = existing.get(doc["_id"])
            decision = book.incoming(share_id, peer, doc, local if isinstance(local, dict) else None)
            form = doc
            if decision.allowed:
                try:
                    form = self._incoming_form(share_id, doc)
                except (IntegrityError, NotFound, InvalidArgument) as exc:
                    decision = Decision(False, f"tampered or unreadable: {exc}")
            self._record(label, "share-receive", doc, decision)
            if not decision.allowed:
                results.append({"refused": decision.reason})
            else:
                results.append(None if form is doc else {"doc": form})
        return {"results": results}

    # -- attachment chunks of an encrypted share or a sensitive doctype (chunkseal) ----------

    def _chunk_keys(self, args: Mapping[str, Any], kid: str | None = None):
        """(scope, doctype, ChunkKeys) for `share` (an encrypted share) or `doctype` (a
        sensitive one), given exactly one; the newest key, or `kid` when it is one of them."""
        token = self._token
        share_id = _arg(args, "share", str, optional=True)
        doctype = _arg(args, "doctype", str, optional=True)
        if (share_id is None) == (doctype is None):
            raise InvalidArgument("give exactly one of 'share' and 'doctype'")
        if share_id is not None:
            if not self._share_entry(share_id).manifest.encrypted:
                raise InvalidArgument(f"share {share_id!r} is not encrypted: its chunks are not sealed")
            scope, kids = f"share:{share_id}", token.share_key_ids(share_id)
        else:
            scope = f"doctype:{doctype}"
            kids = (token._state.doctype_keys[doctype],) if token.is_sensitive(doctype) else ()
        if not kids:
            raise NotFound(f"no data key for {scope}")
        if kid is not None and kid not in kids:
            raise IntegrityError(f"a chunk sealed under key {kid}, which is not one of {scope}'s")
        chosen = kid or kids[-1]
        return scope, doctype, chunkseal.ChunkKeys(chosen, token._doc_key(chosen)[0])

    def _chunk_args(self, args: Mapping[str, Any], sealed: bool):
        doc_id, name = _arg(args, "doc_id", str), _arg(args, "name", str)
        revpos, first = _arg(args, "revpos", int), _arg(args, "first", int)
        last, chunks = _arg(args, "last", bool), _arg(args, "chunks", list)
        limit = chunkseal.CHUNK_SIZE if sealed else chunkseal.PLAINTEXT_CHUNK
        if not (doc_id and name and revpos >= 1 and first >= 0):
            raise InvalidArgument("doc_id and name must not be empty, revpos >= 1, first >= 0")
        if not 0 < len(chunks) <= MAX_CHUNKS or any(
                not isinstance(c, bytes) or len(c) > limit for c in chunks):
            raise InvalidArgument(f"chunks must be 1..{MAX_CHUNKS} byte strings of at most {limit} bytes")
        return doc_id, name, revpos, first, last, chunks

    def _cmd_share_seal_chunks(self, args: Mapping[str, Any]) -> dict:
        """{share | doctype, doc_id, name, revpos, first, last, chunks} -> {chunks, addresses}:
        chunks `first`, `first + 1`... of an attachment (the final one of the file when
        `last`) sealed, and their keyed content addresses. One audit entry."""
        doc_id, name, revpos, first, last, chunks = self._chunk_args(args, sealed=False)
        scope, doctype, keys = self._chunk_keys(args)
        final = len(chunks) - 1
        sealed = [keys.seal(scope, doc_id, name, revpos, first + i, last and i == final, c)
                  for i, c in enumerate(chunks)]
        self._token._audit_record(_CHUNKS, "attachment-seal", doctype, doc_id, True,
                                  f"{len(chunks)} chunks of {name!r} in {scope}")
        return {"chunks": sealed, "addresses": [keys.address(c) for c in chunks]}

    def _cmd_share_open_chunks(self, args: Mapping[str, Any]) -> dict:
        """{share | doctype, doc_id, name, revpos, first, last, chunks, check_only?} ->
        {chunks}: the plaintext of sealed chunks, each checked where it stands (index,
        attachment, document, revision, scope, end of file); with `check_only`, {checked: n}
        and no plaintext (a node checking what it receives has no use for it). A chunk that
        fails is `IntegrityError`, audited as refused; nothing of the call is returned."""
        doc_id, name, revpos, first, last, chunks = self._chunk_args(args, sealed=True)
        check_only = _arg(args, "check_only", bool, optional=True) is True
        final = len(chunks) - 1
        opened, scope, doctype = [], None, _arg(args, "doctype", str, optional=True)
        try:
            for i, chunk in enumerate(chunks):
                scope, doctype, keys = self._chunk_keys(args, chunkseal.sealed_kid(chunk))
                clear = keys.open(scope, doc_id, name, revpos, first + i, last and i == final, chunk)
                if not check_only:
                    opened.append(clear)
        except IntegrityError as exc:
            self._token._audit_record(_CHUNKS, "attachment-open", doctype, doc_id, False,
                                      f"tampered chunk refused: {exc}")
            raise
        self._token._audit_record(_CHUNKS, "attachment-open", doctype, doc_id, True,
                                  f"{len(chunks)} chunks of {name!r} in {scope}")
        return {"checked": len(chunks)} if check_only else {"chunks": opened}

    def _incoming_form(self, share_id: str, doc: dict) -> dict:
        token = self._token
        if doc.get("_deleted") is True:
            return doc
        entry = self._share_entry(share_id)
        if entry.manifest.encrypted:
            kid = sealed_kid(doc)  # book.incoming checked it is one of the share's keys
            open_doc(doc, token._doc_key(kid)[1])  # authenticates; the plaintext is dropped
            return doc
        if is_sealed(doc):
            raise IntegrityError("a plain share's document arrived sealed")
        if token.is_sensitive(doc["doctype"]):
            generation = int(str(doc.get("_rev", "0-")).partition("-")[0] or 0)
            if generation < 1:
                raise InvalidArgument("a replicated revision needs a rev of the form N-hash")
            return token.encrypt_doc(doc, generation=generation)
        return doc


def _rule_json(rule) -> dict[str, Any]:
    import attrs

    return attrs.asdict(rule)


def _audit_json(entry) -> dict[str, Any]:
    return {
        "seq": entry.seq, "time": entry.time, "principal": entry.principal,
        "action": entry.action, "doctype": entry.doctype, "doc_id": entry.doc_id,
        "allowed": entry.allowed, "reason": entry.reason, "hash": entry.hash.hex(),
        "count": entry.count,  # over 1: that many alike refusals of unidentified callers
    }


def _clear_stubs(clear: dict) -> dict:
    """An opened sealed document as readers see it: its attachments' clear lengths (the
    stored stubs describe the sealed data)."""
    attachments = clear.get("_attachments")
    if isinstance(attachments, Mapping) and attachments:
        clear["_attachments"] = {
            name: {**stub, "length": chunkseal.clear_length(stub["length"])}
            if isinstance(stub, Mapping) and isinstance(stub.get("length"), int) else stub
            for name, stub in attachments.items()}
    return clear


def _stored_stubs(doc: dict, current: Mapping[str, Any] | None) -> tuple[dict, str | None]:
    """(`doc` with its attachment stubs, as a reader sent them back, replaced by the stored
    stubs they name, which its envelope binds; why not, else None). A stub must name an
    attachment of the revision it lands on, by name and digest."""
    stored = (current or {}).get("_attachments") or {}
    out = {}
    for name, stub in (doc.get("_attachments") or {}).items():
        held = stored.get(name)
        if not isinstance(held, Mapping) or (
                stub.get("digest") is not None and stub.get("digest") != held.get("digest")):
            return doc, (f"attachment stub {name!r} names no attachment of the revision it "
                         "is written on")
        out[name] = {k: held[k] for k in ("content_type", "digest", "length", "revpos")
                     if k in held} | {"stub": True}
    return {**doc, "_attachments": out}, None


# Protocol version 1: command -> the arguments it takes (for the docs and the tests).
COMMANDS: dict[str, tuple[str, ...]] = {
    "auth": ("credential",),
    "doc.read": ("credential", "doc", "doctype?", "share?"),
    "doc.list": ("credential", "docs", "doctype?", "share?", "only_removals?"),
    "doc.count": ("credential", "docs", "doctype?", "share?"),
    "doc.write": ("credential", "doc", "current?", "generation", "share?"),
    "doc.write_batch": ("credential", "docs", "current", "new_edits", "share?"),
    "db.list": ("credential",),
    "doc.delete": ("credential", "current", "rev"),
    "att.write": ("credential", "doctype", "id", "name", "current?", "content_type?",
                  "share?"),
    "att.sealing": ("doc",),
    "att.seal_revision": ("current", "attachments", "generation"),
    "doc.reseal": ("credential", "docs"),
    "owner.check": ("credential", "action"),
    "app.add": ("credential", "name", "doctype", "perm", "selector?"),
    "app.list": ("credential",),
    "app.remove": ("credential", "name"),
    "rule.add": ("credential", "doctype", "subject_kind", "subject", "perm", "selector?"),
    "rule.list": ("credential",),
    "rule.remove": ("credential", "rule_id"),
    "doctype.encrypt": ("credential", "doctype"),
    "audit.tail": ("credential", "n", "verify?", "allowed?", "principal?", "since?"),
    "audit.prune": ("credential", "before"),
    "info": (),
    "link.certify": ("tls_public_key",),
    "link.prove": ("server_id", "nonce"),
    "link.may_connect": ("peer",),
    "share.list": (),
    "share.create": ("credential", "name", "doctype", "selector?", "encrypted?", "expires?",
                     "max_attachment_size?", "attachment_types?"),
    "share.invite": ("credential", "share", "permission", "ttl", "addresses", "relays?",
                     "membership_expires?"),
    "share.invitations": ("credential", "share?"),
    "share.cancel_invitation": ("credential", "share", "invitation"),
    "share.link": ("credential", "share", "permission", "expires?"),
    "share.unlink": ("credential", "share", "link"),
    "share.links": ("credential", "share?"),
    "share.join": ("credential", "code", "manifest", "key?"),
    "share.redeem": ("peer", "share", "secret", "name", "public_key", "x25519", "relays?"),
    "share.accept_manifest": ("peer", "manifest", "grants?"),
    "share.grants": ("share",),
    "share.revoke": ("credential", "share", "member"),
    "share.leave": ("credential", "share"),
    "share.forget": ("credential", "share"),
    "share.apply_leave": ("peer", "request"),
    "share.count": ("share", "docs"),
    "share.may_push": ("share", "peer"),
    "share.outgoing": ("share", "peer", "docs"),
    "share.incoming": ("share", "peer", "docs", "existing"),
    "share.seal_chunks": ("share?", "doctype?", "doc_id", "name", "revpos", "first", "last",
                          "chunks"),
    "share.open_chunks": ("share?", "doctype?", "doc_id", "name", "revpos", "first", "last",
                          "chunks"),
}
