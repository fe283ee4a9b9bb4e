"""The secure token: the one object the node asks for every decision and every key.

Modelled on PlugDB (a secure microcontroller: trusted code and keys inside, only encrypted
data outside). Here the "inside" is this object plus its keystore; the "outside" is the state
directory, which holds only sealed blobs:

    <state_dir>/token.state.0, .1  the whole token state, AES-256-GCM under the state key,
                                   in two slots written in turn (see vault.py)
    <state_dir>/audit/NNNNNNNN.seg the decision log, sealed records (see audit.py)

The state key is wrapped by a keystore master key (a file keystore or a PKCS#11 device) and
every write bumps a version counter that the keystore also records, so an old copy of the
state put back is refused. All methods are synchronous (CPU work and small durable writes)
and meant to be called directly from the node's Trio code, from that one thread: a token is
not thread-safe, and only one process may have a state directory open at a time.

Nothing outside the token package should touch attributes starting with `_`.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from plugshare.sharing import manifest as _manifest

from . import links as linkbook, sharekey, shares as sharebook, state as state_codec, tls, vault
from .audit import MAX_UNFLUSHED, AuditEntry, AuditLog, AuditMeta, genesis_hash, new_meta
from .credentials import matches, new_credential, parse_credential
from .envelope import DocKey, is_sealed, key_id, open_doc, seal_doc, sealed_kid
from .errors import (
    AccessDenied,
    AlreadyExists,
    AuthenticationError,
    IntegrityError,
    InvalidArgument,
    KeystoreError,
    NotFound,
    TokenBusyError,
    TokenStateError,
)
from .identity import (
    CHALLENGE_DOMAIN,
    Identity,
    challenge_message,
    coerce_fingerprint,
    fingerprint_of,
    format_node_id,
    verify_signature,
)
from .keystore import KEY_SIZE, Keystore
from .principal import APP_KIND, LINK_KIND, OWNER, OWNER_KIND, PEER_KIND, Decision, Principal
from .rules import ACTION_LEVEL, PERM_LEVEL, ROLE_KIND, Rule, RuleSet, check_name
from .shares import InvitationRefused, LeaveRequestRefused, ShareBook
from .state import AppRecord, DataKeyRecord, LinkRecord, PeerRecord, TokenState

if TYPE_CHECKING:
    from plugshare.sharing.invitation import HostPort, Invitation
    from plugshare.sharing.manifest import Manifest

AUDIT_DIR = "audit"
CHALLENGE_SIZE = 32
CHALLENGE_TTL = 120.0  # seconds a challenge stays answerable
MAX_OUTSTANDING_CHALLENGES = 1024
_STATE_KEY_CONTEXT = b"plugshare/state-key/v1"
_OWNER_ALLOWED = Decision(True, "the owner may do everything")
_ADMIN = OWNER.label
# The link statements (TLS delegation, client proof) are signed only by their own commands.
_RESERVED_SIGNING_PREFIXES = (CHALLENGE_DOMAIN, sharekey.SIGNING_DOMAIN, tls.DELEGATION_DOMAIN,
                              tls.CLIENT_AUTH_DOMAIN)


@attrs.frozen
class AppInfo:
    name: str
    doctype: str | None  # from the app's own grant rule (None if that rule was removed)
    perm: str | None
    selector: dict[str, Any] | None
    roles: tuple[str, ...]


@attrs.frozen
class PeerInfo:
    node_id: str
    name: str
    public_key: bytes
    roles: tuple[str, ...]


@attrs.frozen
class TokenInfo:
    name: str
    node_id: str
    keystore: str
    state_version: int
    master_keys: tuple[int, ...]
    audit_entries: int


def _data_key_context(kid: str, scope: str) -> bytes:
    return b"plugshare/data-key/v1\x00" + kid.encode("ascii") + b"\x00" + scope.encode("utf-8")


def _check_roles(roles: Iterable[str]) -> list[str]:
    if isinstance(roles, str):
        raise InvalidArgument("roles is a list of role names, not one string")
    return sorted({check_name("role name", r) for r in roles})


def _lock_dir(state_dir: Path) -> int:
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TokenBusyError(
            f"token state {state_dir} is in use by another process (is `plugshare run` going?)"
        ) from None
    return fd


class Token:
    """The narrow interface of the trusted side. Make one with `Token.create` or
    `Token.open`; call `flush()` after each request and `close()` at the end."""

    # --- lifecycle -------------------------------------------------------------------------

    def __init__(
        self,
        *,
        state_dir: Path,
        keystore: Keystore,
        lock_fd: int,
        state: TokenState,
        audit_meta: AuditMeta,
        state_key: bytes,
        state_master: int,
        wrapped_state_key: bytes,
        counter: int,
        slot: int | None = None,
        legacy_file: bool = False,
    ):
        """Private: use `Token.create` or `Token.open`."""
        self._dir = state_dir
        self._keystore = keystore
        self._lock_fd: int | None = lock_fd
        self._state = state
        self._identity = Identity._from_private_bytes(state.signing_key, state.agreement_key)
        self._state_aead = AESGCM(state_key)
        self._state_master = state_master
        self._wrapped_state_key = wrapped_state_key
        self._counter = counter
        self._slots = vault.StateSlots(state_dir, slot)
        self._legacy_file = legacy_file  # a format-1 token.state to remove (see vault.py)
        self._dirty = False
        self._io: ThreadPoolExecutor | None = None  # see `flush`
        self._audit = AuditLog(
            state_dir / AUDIT_DIR, AESGCM(state.audit_key), audit_meta,
            genesis_hash(self._identity.fingerprint),
        )
        self._keys: dict[str, tuple[bytes, DocKey]] = {}  # kid -> unwrapped key (cache)
        self._challenges: OrderedDict[bytes, float] = OrderedDict()
        self._denials: dict[tuple, Decision] = {}
        self._rules = RuleSet(())
        self._subjects: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        self._rebuild_rules()
        self._rebuild_subjects()
        self._book = ShareBook(state, self._identity.fingerprint)
        self._reserved_prefixes = _RESERVED_SIGNING_PREFIXES + sharebook.reserved_signing_prefixes()
        self._peer_labels: dict[bytes, str] = {}  # fingerprint -> audit label (cache)

    @classmethod
    def create(
        cls, state_dir: str | os.PathLike[str], keystore: Keystore, *, name: str
    ) -> tuple[Token, str]:
        """A new token in an empty (or absent) `state_dir`, with a new master key in
        `keystore`. Returns the open token and the owner credential, which is shown once
        and never stored (only its hash is)."""
        check_name("token name", name)
        state_dir = Path(state_dir)
        if state_dir.exists() and any(state_dir.iterdir()):
            raise TokenStateError(
                f"refusing to create a token in {state_dir}: the directory is not empty"
            )
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = _lock_dir(state_dir)
        try:
            master_id = keystore.create()
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            (state_dir / AUDIT_DIR).mkdir(mode=0o700)
            identity = Identity.generate()
            signing, agreement = identity._private_bytes()
            owner_credential, owner_record = new_credential()
            state_key = os.urandom(KEY_SIZE)
            state = TokenState(
                name=name,
                signing_key=signing,
                agreement_key=agreement,
                audit_key=os.urandom(KEY_SIZE),
                owner=owner_record,
                current_master=master_id,
                next_rule=1,
            )
            token = cls(
                state_dir=state_dir,
                keystore=keystore,
                lock_fd=lock_fd,
                state=state,
                audit_meta=new_meta(identity.fingerprint),
                state_key=state_key,
                state_master=master_id,
                wrapped_state_key=keystore.wrap(master_id, state_key, _STATE_KEY_CONTEXT),
                counter=0,
            )
            token._admin("create", None, f"token {name!r} created, node id {token.node_id}")
            token._dirty = True
            token.flush()
        except BaseException:
            keystore.destroy()
            vault.remove_all(state_dir)
            shutil.rmtree(state_dir / AUDIT_DIR, ignore_errors=True)
            os.close(lock_fd)
            raise
        return token, owner_credential

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str], keystore: Keystore) -> Token:
        """The token whose state is in `state_dir`, unlocked with `keystore`.

        Raises `TokenStateError` if the state is missing, truncated or tampered with,
        `RollbackError` if it is an older copy, `WrongSecretError`/`KeystoreError` if the
        keystore will not open, `TokenBusyError` if another process has it open."""
        state_dir = Path(state_dir)
        if not vault.candidates(state_dir):
            raise TokenStateError(
                f"no token state in {state_dir} (create the token first)"
            )
        lock_fd = _lock_dir(state_dir)
        try:
            keystore.open()
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            token = cls._open_newest(state_dir, keystore, lock_fd)
        except BaseException:
            keystore.close()
            os.close(lock_fd)
            raise
        return token

    @classmethod
    def _open_newest(cls, state_dir: Path, keystore: Keystore, lock_fd: int) -> Token:
        """Which state wins at open, and why it keeps the rollback protection exact.

        Invariant (kept by `flush`): the anchor A (the keystore's) is at most the counter of a
        durable, authentic state whose audit records are durable too; and every answer the
        token sent was settled by a flush whose counter is at most A (the anchor advances
        before the answers leave). So the state to open is the newest authentic one that is
        not below A. One newer than A is the trace of a crash after its slot was written and
        before the anchor followed; its answers were never sent, and since its audit record
        was written at the same time as the slot, it is taken only if that record is there
        (`AuditLog.tail_intact`), else the other slot (still not below A) is. A slot torn by
        a crash fails authentication and is skipped; an old copy put back is below A."""
        found = vault.candidates(state_dir)
        opened: list[tuple[vault.Candidate, bytes, bytes]] = []
        errors: list[TokenStateError] = [c.error for c in found if c.error is not None]
        for cand in found:
            if cand.sealed is None:
                continue
            sealed = cand.sealed
            try:
                state_key = keystore.unwrap(
                    sealed.master_id, sealed.wrapped_state_key, _STATE_KEY_CONTEXT
                )
                plaintext = vault.unseal(AESGCM(state_key), sealed, cand.path)
            except IntegrityError:
                errors.append(TokenStateError(
                    f"token state {cand.path}: its state key fails authentication (file "
                    f"altered, or it belongs to another keystore than {keystore.describe()})"
                ))
                continue
            except KeystoreError as exc:
                errors.append(TokenStateError(
                    f"token state {cand.path} cannot be unlocked: {exc}"))
                continue
            except TokenStateError as exc:
                errors.append(exc)
                continue
            opened.append((cand, state_key, plaintext))
        if not opened:
            raise errors[0]
        opened.sort(key=lambda o: o[0].sealed.counter, reverse=True)  # type: ignore[union-attr]
        anchor = keystore.read_anchor()
        newest = opened[0][0]
        for cand, state_key, plaintext in opened:
            sealed = cand.sealed
            assert sealed is not None
            if sealed.counter < anchor:
                break
            state, audit_meta = state_codec.decode(plaintext, str(cand.path))
            token = cls(
                state_dir=state_dir,
                keystore=keystore,
                lock_fd=lock_fd,
                state=state,
                audit_meta=audit_meta,
                state_key=state_key,
                state_master=sealed.master_id,
                wrapped_state_key=sealed.wrapped_state_key,
                counter=sealed.counter,
                slot=cand.slot,
                legacy_file=(state_dir / vault.LEGACY_STATE_FILE).exists(),
            )
            if sealed.counter > anchor and not token._audit.tail_intact():
                token._slots.close()
                continue  # its flush did not finish: the state before it stands
            token._audit.check_open_segment()
            token._audit.remove_stray_segments()
            if sealed.counter > anchor:  # a crash came between state write and anchor
                keystore.advance_anchor(sealed.counter)
            return token
        if errors:  # a newer slot may be what failed: say so beside the rollback
            raise TokenStateError(
                f"{errors[0]}; and the newest authentic state, {newest.path}, is version "
                f"{newest.sealed.counter}, below the keystore's anchor {anchor}: "  # type: ignore[union-attr]
                "refusing to open an older state"
            )
        vault.check_anchor(newest.sealed.counter, anchor, newest.path)  # type: ignore[union-attr]
        raise TokenStateError(  # every state not below the anchor lacks its audit records
            f"token state {newest.path}: the audit records it references are missing or "
            "damaged (the audit log was cut)"
        )

    def close(self) -> None:
        """Flush, forget the keys and release the state directory. Idempotent."""
        if self._lock_fd is None:
            return
        try:
            self._audit.close_windows()  # the refusals counted so far are logged too
            self.flush()
        finally:
            if self._io is not None:
                self._io.shutdown(wait=True)
                self._io = None
            self._keys.clear()
            self._slots.close()
            self._keystore.close()
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """Seal what changed (state and new audit entries) to disk, durably. Does nothing
        (and costs nothing) when nothing changed since the last flush."""
        if not self._dirty and not self._audit.unflushed:
            return
        if self._lock_fd is None:
            raise TokenStateError("the token is closed")
        staged = self._audit.stage()
        meta = staged.meta if staged is not None else self._audit.meta
        counter = self._counter + 1
        blob = vault.seal(
            self._state_aead, counter, self._state_master, self._wrapped_state_key,
            state_codec.encode(self._state, meta),
        )
        slot = self._slots.next
        # What each sync protects, and the order that keeps it (the invariant is stated in
        # `_open_newest`):
        #  1. the audit record (pwrite + fdatasync; + the directory's fsync for a new
        #     segment): the entries of the decisions about to be answered;
        #  2. the new state in the slot not holding the current one (pwrite + fdatasync):
        #     the commit point of the state and of the audit record it references. 1 and 2
        #     run at once (fdatasync releases the GIL): a crash that makes 2 durable without
        #     1 leaves a state newer than the anchor whose record is missing, and open then
        #     takes the other slot;
        #  3. the anchor (the keystore's; the soft one: one of its two slots rewritten in
        #     place): refuses any older state put back. Only once 1 and 2 are durable, or a
        #     crash could leave an anchor above the only state it can open.
        # A crash at any point before 3 is durable leaves the anchor at the previous flush,
        # whose state (the other slot) and records are intact: that flush's answers were sent,
        # this one's were not. After 3, this flush's state opens.
        # The state is rewritten even when only audit entries were added: it is what records
        # the log's length (and head) under the anchor. Records are authenticated and
        # chained, so an edit or a reordering shows, but any prefix of the log is itself a
        # valid log; only an anchored high-water mark tells a cut tail from the whole, so an
        # audit-only settle would still need its anchor write after the append: the same two
        # sequential fdatasyncs, for the saving of one parallel write.
        audit_done = (self._sync_threads().submit(self._audit.write, staged)
                      if staged is not None else None)
        try:
            try:
                self._slots.write(slot, blob)
            finally:
                if audit_done is not None:
                    audit_done.exception()  # wait for it, whatever happened here
            if audit_done is not None:
                audit_done.result()
        except BaseException:
            if staged is not None:
                self._audit.abort(staged)
            raise
        self._counter = counter
        self._slots.current = slot
        self._dirty = False
        if staged is not None:
            self._audit.commit(staged)
        self._keystore.advance_anchor(counter)  # 3: both durable; now the anchor may follow
        if self._legacy_file:  # format 1: the anchor has passed it, it can go
            vault.remove_legacy(self._dir)
            self._legacy_file = False
        self._retire_masters()

    def _sync_threads(self) -> ThreadPoolExecutor:
        """A thread for a flush's audit append, running beside the state's write."""
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-sync")
        return self._io

    def info(self) -> TokenInfo:
        return TokenInfo(
            name=self._state.name,
            node_id=self.node_id,
            keystore=self._keystore.describe(),
            state_version=self._counter,
            master_keys=tuple(self._keystore.master_key_ids()),
            audit_entries=self._audit.meta.next_seq + self._audit.unflushed,
        )

    # --- identity --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the raw Ed25519 public key (32 bytes)."""
        return self._identity.fingerprint

    @property
    def node_id(self) -> str:
        """The fingerprint in its readable, check-summed form."""
        return self._identity.node_id

    @property
    def public_key_bytes(self) -> bytes:
        """Raw Ed25519 public key (32 bytes)."""
        return self._identity.public_key_bytes

    @property
    def x25519_public_bytes(self) -> bytes:
        """Raw X25519 public key (32 bytes), for wrapping share keys to this node."""
        return self._identity.x25519_public_bytes

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of `data` by this node (e.g. a share manifest). Callers put their
        own domain prefix first; the token's own prefixes are refused, so nothing signed
        here can pass for a challenge answer, a wrapped share key, a share manifest or a
        leave request (the token signs those itself, after deciding)."""
        if data.startswith(self._reserved_prefixes):
            raise InvalidArgument("data starts with a prefix reserved for the token's own signatures")
        return self._identity.sign(data)

    @staticmethod
    def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
        """True when `signature` is a valid Ed25519 signature of `data` by `public_key`."""
        return verify_signature(public_key, data, signature)

    def verify_from(self, peer: str | bytes, data: bytes, signature: bytes) -> bool:
        """True when `signature` over `data` verifies with the pinned key of a known peer
        (named by node id or fingerprint), or with this node's own key."""
        fp = coerce_fingerprint(peer)
        if fp == self.fingerprint:
            return verify_signature(self.public_key_bytes, data, signature)
        record = self._state.peers.get(format_node_id(fp))
        if record is None:
            raise NotFound(f"unknown peer {format_node_id(fp)}: its key is not pinned")
        return verify_signature(record.public_key, data, signature)

    # --- principals: owner and apps --------------------------------------------------------

    @property
    def owner(self) -> Principal:
        return OWNER

    def authenticate(self, credential: str) -> Principal:
        """The owner, app or share link holding `credential`; `AuthenticationError` (and an
        audit entry) if it is malformed or unknown, or is a link that no longer works
        (unlinked, expired, its share ended here): refused alike, audited as the link."""
        try:
            cid, secret = parse_credential(credential)
        except AuthenticationError as exc:
            self._refuse_auth(str(exc))
            raise
        state = self._state
        link = state.links.get(cid)
        if cid == state.owner.id:
            if matches(state.owner, secret):
                return OWNER
        elif link is not None:
            if matches(link.credential, secret):
                reason = self._link_refusal(link, time.time())
                if reason is None:
                    return Principal(LINK_KIND, link.id)
                self._audit_record(f"{LINK_KIND}:{link.id}", "authenticate", None, None,
                                   False, reason)
                raise AuthenticationError("unknown or revoked credential")
        else:
            for app in state.apps.values():
                if app.credential.id == cid:
                    if matches(app.credential, secret):
                        return Principal(APP_KIND, app.name)
                    break
        self._refuse_auth("unknown or revoked credential")
        raise AuthenticationError("unknown or revoked credential")

    def _refuse_auth(self, reason: str) -> None:
        self._audit_record("anonymous", "authenticate", None, None, False, reason)

    def add_app(
        self,
        name: str,
        doctype: str,
        perm: str,
        selector: Mapping[str, Any] | None = None,
        *,
        roles: Iterable[str] = (),
    ) -> str:
        """Register a local app with its grant (a rule whose subject is the app) and return
        its credential, shown once."""
        check_name("app name", name)
        if name in self._state.apps:
            raise AlreadyExists(f"an app named {name!r} already exists")
        role_list = _check_roles(roles)
        rule = self._new_rule(doctype, APP_KIND, name, perm, selector)
        credential, record = new_credential()
        self._state.apps[name] = AppRecord(name, record, role_list, rule.id)
        self._state.rules.append(rule)
        self._changed(rules=True)
        self._admin("add_app", doctype, f"app {name!r} added with rule {rule.id} ({perm})")
        return credential

    def list_apps(self) -> list[AppInfo]:
        rules = self._rules.rules
        out = []
        for app in self._state.apps.values():
            grant = rules.get(app.grant_rule) if app.grant_rule else None
            out.append(AppInfo(
                app.name,
                grant.doctype if grant else None,
                grant.perm if grant else None,
                grant.selector if grant else None,
                tuple(app.roles),
            ))
        return out

    def remove_app(self, name: str) -> None:
        """Forget an app: its credential stops working and its rules are removed."""
        if name not in self._state.apps:
            raise NotFound(f"no app named {name!r}")
        del self._state.apps[name]
        self._drop_subject_rules(APP_KIND, name)
        self._changed(rules=True)
        self._admin("remove_app", None, f"app {name!r} removed with its rules")

    # --- principals: share links (see links.py) ---------------------------------------------

    def create_link(
        self, share: str, *, permission: str, expires: float | None = None,
        now: float | None = None,
    ) -> tuple[str, LinkRecord]:
        """A link to `share` (held here) for an outside client, with `permission` ("read" or
        "write") until `expires` (unix seconds, or None). Returns the credential, shown once
        (only its hash is kept), and the record. `AccessDenied` (audited) when this node no
        longer takes part in the share, or the permission exceeds this node's own in it (a
        read-only member makes read links only); `InvalidArgument` for bad fields."""
        now = time.time() if now is None else now
        manifest = self._book.find(share)
        share_id, name = manifest.share_id, manifest.name
        permission = linkbook.check_permission(permission)
        expires = sharebook.check_expiry("the link's expiry", expires, now)
        refusal = self._book.link_refusal(share_id, now)
        own = self._book.own_permission(share_id)
        if refusal is None and PERM_LEVEL[permission] > PERM_LEVEL.get(own or "", 0):
            refusal = (f"this node has {own} permission in share {name!r}; a link may not "
                       f"have more ({permission})")
        if refusal is not None:
            self._audit_record(_ADMIN, "share_link", manifest.rule.doctype, None, False,
                               refusal)
            raise AccessDenied(Decision(False, refusal), f"cannot link share {name!r}: {refusal}")
        linkbook.prune(self._state.links, now)
        linkbook.check_room(self._state.links)
        credential, record = linkbook.new_link(share_id, permission, now, expires)
        self._state.links[record.id] = record
        self._changed()
        until = "" if expires is None else f", until {expires:.0f} (unix time)"
        self._admin("share_link", manifest.rule.doctype,
                    f"share {name!r}: link {record.id} made, {permission}{until}")
        return credential, record

    def remove_link(self, share: str, link_id: str, *, now: float | None = None) -> LinkRecord:
        """Unlink: the link's credential stops working at once. `NotFound` for a link that
        is not this share's (or was unlinked already). Audited."""
        now = time.time() if now is None else now
        manifest = self._book.find(share)
        record = linkbook.find(self._state.links, manifest.share_id, link_id)
        linkbook.end(record, linkbook.UNLINKED, now)
        record.ended = linkbook.UNLINKED  # even a link that had ended otherwise
        self._changed()
        self._admin("share_unlink", manifest.rule.doctype,
                    f"share {manifest.name!r}: link {record.id} unlinked")
        return record

    def list_links(self, share: str | None = None, *, now: float | None = None
                   ) -> list[dict[str, Any]]:
        """The links of every share, or of one, without their secrets: id, share (its id),
        permission, created, expires, status (active, expired, ended, unlinked), reason."""
        now = time.time() if now is None else now
        share_id = self._book.find(share).share_id if share is not None else None
        if linkbook.prune(self._state.links, now):
            self._dirty = True
        rows = []
        for link in self._state.links.values():
            if share_id is not None and link.share_id != share_id:
                continue
            why = linkbook.refusal(link, now)
            share_refusal = None if why else self._book.link_refusal(link.share_id, now)
            rows.append(linkbook.row(link, linkbook.status(link, share_refusal, now),
                                     why or share_refusal))
        return sorted(rows, key=lambda r: r["created"])

    def link_share(self, link_id: str, *, now: float | None = None) -> str | None:
        """The id of the share link `link_id` is bound to, or None once it no longer works
        (unknown, unlinked, expired, or this node's part in the share ended). Not audited."""
        link = self._state.links.get(link_id) if isinstance(link_id, str) else None
        if link is None:
            return None
        return None if self._link_refusal(link, time.time() if now is None else now) \
            else link.share_id

    def _link_refusal(self, link: LinkRecord, now: float) -> str | None:
        """Why `link` does not work now, or None. An end of this node's part in the share is
        recorded in the link, for good: a later membership does not revive it."""
        reason = linkbook.refusal(link, now)
        if reason is not None:
            return reason
        share_refusal = self._book.link_refusal(link.share_id, now)
        if share_refusal is None:
            return None
        linkbook.end(link, share_refusal, now)
        self._dirty = True
        return linkbook.refusal(link, now)

    def _end_links(self, share_id: str, reason: str) -> None:
        """End every link of a share for good (this node's part in it ended, or began anew)."""
        now = time.time()
        for link in linkbook.of_share(self._state.links.values(), share_id):
            if link.ended is None:
                linkbook.end(link, reason, now)
                self._dirty = True
                self._admin("share_link_end", None, f"link {link.id} ended: {reason}")

    def _judge_link(self, principal: Principal, action: str, level: int,
                    meta: Mapping[str, Any]) -> Decision:
        """A link may do `action` on a document iff it works, the document is in its share's
        scope and the action is within both the link's permission and this node's own."""
        link = self._state.links.get(principal.id)
        if link is None:
            return self._denial(principal, False, action, meta.get("doctype"))
        reason = self._link_refusal(link, time.time())
        if reason is not None:
            return Decision(False, reason)
        share_id = link.share_id
        allowed = min(PERM_LEVEL[link.permission],
                      PERM_LEVEL.get(self._book.own_permission(share_id) or "", 0))
        name = self._book.get(share_id).name  # type: ignore[union-attr]
        if level > allowed:
            return Decision(False, f"link {link.id} may only read share {name!r}")
        scope = self._book.scope_refusal(share_id, meta)
        if scope is not None:
            return Decision(False, f"link {link.id}: {scope}")
        return Decision(True, f"link {link.id} may {action} the documents of share {name!r}")

    def link_may_touch_doctype(self, link_id: str, action: str, doctype: str) -> bool:
        """May link `link_id` do `action` on some documents of `doctype` (its share's doctype,
        within its permission)? For a whole listing; each document is still judged."""
        link = self._state.links.get(link_id)
        level = ACTION_LEVEL.get(action)
        if link is None or level is None or self._link_refusal(link, time.time()):
            return False
        manifest = self._book.get(link.share_id)
        allowed = min(PERM_LEVEL[link.permission],
                      PERM_LEVEL.get(self._book.own_permission(link.share_id) or "", 0))
        return manifest is not None and manifest.rule.doctype == doctype and level <= allowed

    # --- principals: peers -----------------------------------------------------------------

    def add_peer(self, public_key: bytes, *, name: str, roles: Iterable[str] = ()) -> str:
        """Pin a peer's Ed25519 public key; returns its node id. Re-adding the same key
        updates name and roles; a node id is never re-pinned to another key."""
        node_id = format_node_id(fingerprint_of(public_key))
        check_name("peer name", name)
        role_list = _check_roles(roles)
        if node_id == self.node_id:
            raise InvalidArgument("a node cannot add itself as a peer")
        self._state.peers[node_id] = PeerRecord(node_id, bytes(public_key), name, role_list)
        self._changed()
        self._admin("add_peer", None, f"peer {node_id} ({name!r}) pinned, roles {role_list}")
        return node_id

    def list_peers(self) -> list[PeerInfo]:
        return [
            PeerInfo(p.node_id, p.name, p.public_key, tuple(p.roles))
            for p in self._state.peers.values()
        ]

    def remove_peer(self, peer: str | bytes) -> None:
        """Unpin a peer: it can no longer authenticate and its rules are removed."""
        node_id = format_node_id(coerce_fingerprint(peer))
        if node_id not in self._state.peers:
            raise NotFound(f"unknown peer {node_id}")
        del self._state.peers[node_id]
        self._drop_subject_rules(PEER_KIND, node_id)
        self._changed(rules=True)
        self._admin("remove_peer", None, f"peer {node_id} removed with its rules")

    def set_roles(self, principal: Principal, roles: Iterable[str]) -> None:
        """Replace the roles of an app or peer."""
        role_list = _check_roles(roles)
        if principal.kind == APP_KIND and principal.id in self._state.apps:
            self._state.apps[principal.id].roles = role_list
        elif principal.kind == PEER_KIND and principal.id in self._state.peers:
            self._state.peers[principal.id].roles = role_list
        else:
            raise NotFound(f"no app or peer {principal.label} to give roles to")
        self._changed()
        self._admin("set_roles", None, f"{principal.label} now has roles {role_list}")

    def new_challenge(self) -> bytes:
        """A fresh random challenge for a peer to sign; single use, valid for 2 minutes."""
        now = time.monotonic()
        challenges = self._challenges
        while challenges and (
            len(challenges) >= MAX_OUTSTANDING_CHALLENGES
            or next(iter(challenges.values())) < now
        ):
            challenges.popitem(last=False)
        challenge = secrets.token_bytes(CHALLENGE_SIZE)
        challenges[challenge] = now + CHALLENGE_TTL
        return challenge

    def sign_challenge(self, challenge: bytes, context: bytes = b"") -> bytes:
        """This node's answer to a peer's challenge. `context` must be what the verifier
        passes too: the verifier's fingerprint and, where available, a TLS channel
        binding, so the answer is good for that verifier and connection only."""
        if len(challenge) != CHALLENGE_SIZE:
            raise InvalidArgument(f"a challenge is {CHALLENGE_SIZE} bytes, got {len(challenge)}")
        return self._identity.sign(challenge_message(challenge, context))

    def verify_peer(
        self, peer: str | bytes, challenge: bytes, signature: bytes, context: bytes = b""
    ) -> Principal:
        """The peer principal if `signature` answers `challenge` (issued by this token, not
        used before, not expired) under the pinned key of `peer`. Otherwise
        `AuthenticationError`, and the refusal is logged."""
        try:
            node_id = format_node_id(coerce_fingerprint(peer))
        except InvalidArgument as exc:
            self._audit_record("anonymous", "peer-auth", None, None, False, str(exc))
            raise AuthenticationError(f"peer authentication refused: {exc}") from None
        label = f"{PEER_KIND}:{node_id}"
        expiry = self._challenges.pop(bytes(challenge), None)
        record = self._state.peers.get(node_id)
        if record is None:
            reason = "unknown peer: its key is not pinned"
        elif expiry is None:
            reason = "challenge was not issued by this token or was already used"
        elif expiry < time.monotonic():
            reason = "challenge expired"
        elif not verify_signature(
            record.public_key, challenge_message(challenge, context), signature
        ):
            reason = "signature does not verify with the pinned key"
        else:
            self._audit_record(label, "peer-auth", None, None, True, "challenge answered")
            return Principal(PEER_KIND, node_id)
        self._audit_record(label, "peer-auth", None, None, False, reason)
        raise AuthenticationError(f"peer {node_id}: {reason}")

    # --- rules and decisions ---------------------------------------------------------------

    def _new_rule(
        self,
        doctype: str,
        subject_kind: str,
        subject: str | bytes,
        perm: str,
        selector: Mapping[str, Any] | None,
    ) -> Rule:
        rule = Rule.make(f"r{self._state.next_rule}", doctype, selector, subject_kind, subject, perm)
        self._state.next_rule += 1
        return rule

    def add_rule(
        self,
        doctype: str,
        subject_kind: str,
        subject: str | bytes,
        perm: str,
        selector: Mapping[str, Any] | None = None,
    ) -> str:
        """Grant `perm` ("read" | "write") on documents of `doctype` matching `selector`
        (None: all) to a subject: ("app", name), ("role", name), ("peer", node id or
        fingerprint) or ("owner", ...). Returns the rule id; `RuleError` if malformed."""
        rule = self._new_rule(doctype, subject_kind, subject, perm, selector)
        self._state.rules.append(rule)
        self._changed(rules=True)
        self._admin(
            "add_rule", rule.doctype, f"rule {rule.id}: {rule.perm} to {rule.subject_label}"
        )
        return rule.id

    def list_rules(self) -> list[Rule]:
        return list(self._state.rules)

    def remove_rule(self, rule_id: str) -> None:
        rules = self._state.rules
        kept = [r for r in rules if r.id != rule_id]
        if len(kept) == len(rules):
            raise NotFound(f"no rule {rule_id!r}")
        self._state.rules = kept
        self._changed(rules=True)
        self._admin("remove_rule", None, f"rule {rule_id} removed")

    def decide(self, principal: Principal, action: str, doc_metadata: Mapping[str, Any]) -> Decision:
        """May `principal` do `action` ("read" | "write" | "list", list meaning read) on the
        document described by `doc_metadata` (its `doctype` and the fields rules look at,
        e.g. the document itself)? Deny by default; the owner may do everything. Every
        answer is logged."""
        decision = self.judge(principal, action, doc_metadata)
        doctype = doc_metadata["doctype"]
        doc_id = doc_metadata.get("_id")
        if doc_id is not None and type(doc_id) is not str:
            doc_id = repr(doc_id)
        if self._audit.record(
            principal.label, action, doctype, doc_id, decision.allowed, decision.reason
        ) >= MAX_UNFLUSHED:
            self.flush()
        return decision

    def judge(self, principal: Principal, action: str, doc_metadata: Mapping[str, Any]) -> Decision:
        """`decide`'s answer without its audit entry, for a caller that records exactly one
        entry for a request made of several checks (the door)."""
        level = ACTION_LEVEL.get(action)
        if level is None:
            raise InvalidArgument(f"action must be read, write or list, got {action!r}")
        try:
            doctype = doc_metadata["doctype"]
        except (KeyError, TypeError):
            raise InvalidArgument("doc_metadata needs a 'doctype'") from None
        kind = principal.kind
        if kind == OWNER_KIND and principal == OWNER:
            return _OWNER_ALLOWED
        if kind == LINK_KIND:  # its share's rule alone, never the rule set
            return self._judge_link(principal, action, level, doc_metadata)
        subjects = self._subjects.get((kind, principal.id))
        return (
            subjects is not None and self._rules.match(subjects, level, doctype, doc_metadata)
        ) or self._denial(principal, subjects is not None, action, doctype)

    def _denial(self, principal: Principal, known: bool, action: str, doctype: Any) -> Decision:
        """The (cached) refusal for a principal, action and doctype no rule allows."""
        key = (principal.label, known, action, doctype)
        decision = self._denials.get(key)
        if decision is None:
            if len(self._denials) >= 4096:
                self._denials.clear()
            reason = (
                f"no rule lets {principal.label} {action} this {doctype!r} document"
                if known else f"unknown principal {principal.label}"
            )
            decision = self._denials[key] = Decision(False, reason)
        return decision

    def decide_admin(self, principal: Principal, action: str) -> Decision:
        """May `principal` manage the token (apps, rules, encryption, audit)? Only the owner
        may; every answer is logged."""
        if principal == OWNER:
            decision = Decision(True, "the owner manages the token")
        else:
            decision = Decision(False, f"only the owner may {action}; {principal.label} may not")
        self._audit_record(principal.label, action, None, None, decision.allowed, decision.reason)
        return decision

    def may_access_doctype(self, principal: Principal, action: str, doctype: str) -> Decision:
        """May `principal` do `action` on at least some documents of `doctype` (for a whole
        listing)? Allowed when a rule grants it, with or without a selector; the listing
        must still check each document with `decide`. Logged."""
        level = ACTION_LEVEL.get(action)
        if level is None:
            raise InvalidArgument(f"action must be read, write or list, got {action!r}")
        if principal.kind == OWNER_KIND and principal == OWNER:
            decision = _OWNER_ALLOWED
        elif principal.kind == LINK_KIND:
            decision = (
                Decision(True, f"{principal.label} may {action} its share's documents (only "
                               "those in the share's scope)")
                if self.link_may_touch_doctype(principal.id, action, doctype) else
                Decision(False, f"{principal.label} may not {action} {doctype!r} documents")
            )
        else:
            subjects = self._subjects.get((principal.kind, principal.id))
            found = self._rules.match_doctype(subjects, level, doctype) if subjects else None
            if subjects is None:
                decision = Decision(False, f"unknown principal {principal.label}")
            elif found is None:
                decision = Decision(
                    False, f"no rule lets {principal.label} {action} {doctype!r} documents"
                )
            else:
                allow, restricted = found
                decision = (
                    Decision(True, allow.reason + " (only documents matching its selector)")
                    if restricted else allow
                )
        self._audit_record(principal.label, action, doctype, None, decision.allowed, decision.reason)
        return decision

    # --- encryption ------------------------------------------------------------------------

    def mark_sensitive(self, doctype: str) -> None:
        """From now on documents of `doctype` are to be stored sealed (makes its data key)."""
        check_name("doctype", doctype)
        if doctype in self._state.doctype_keys:
            return
        kid = self._new_data_key(f"doctype:{doctype}")
        self._state.doctype_keys[doctype] = kid
        self._state.sensitive.append(doctype)
        self._changed()
        self._admin("mark_sensitive", doctype, f"documents of {doctype!r} are sealed (key {kid})")

    def is_sensitive(self, doctype: str) -> bool:
        return doctype in self._state.doctype_keys

    def sensitive_doctypes(self) -> list[str]:
        return list(self._state.sensitive)

    def encrypt_doc(
        self, doc: Mapping[str, Any], *, generation: int, share_id: str | None = None
    ) -> dict[str, Any]:
        """`doc` sealed for storage as revision generation `generation` (parent generation
        + 1), under its doctype's key, or under the newest key of share `share_id`. The
        caller has already decided the write."""
        if share_id is None:
            doctype = doc.get("doctype") if isinstance(doc, Mapping) else None
            kid = self._state.doctype_keys.get(doctype) if isinstance(doctype, str) else None
            if kid is None:
                raise InvalidArgument(
                    f"doctype {doctype!r} is not marked sensitive; there is no key to seal with"
                )
        else:
            ended = self._share_ended(share_id)
            if ended is not None:
                raise AccessDenied(Decision(False, ended), f"cannot seal for share: {ended}")
            kids = self._state.share_keys.get(share_id)
            if not kids:
                raise NotFound(f"no key for share {share_id!r}")
            kid = kids[-1]
        return seal_doc(doc, self._doc_key(kid)[1], generation)

    def decrypt_doc(self, stored: Mapping[str, Any], principal: Principal) -> dict[str, Any]:
        """Sealed mode: decide a read of `stored` (on its clear metadata) and, if allowed,
        return the plaintext document. `AccessDenied` if the rules say no, or (at a member) if
        it is sealed under a key of a share this node no longer takes part in: revoked,
        removed, left, or the share or its membership expired (checked against the clock, so
        it holds offline too; the share's keys are destroyed then); `IntegrityError` if it
        was altered or moved (logged too)."""
        key = self._release(stored, principal)
        if key is None:
            return dict(stored)
        try:
            return open_doc(stored, key)
        except IntegrityError as exc:
            self._integrity_failure(principal, stored, exc)
            raise

    def check_sealed(self, stored: Mapping[str, Any], *, share_id: str) -> None:
        """Authenticate a sealed document of encrypted share `share_id` as it arrives from a
        peer, releasing nothing: `IntegrityError` (logged) if it was altered, moved to
        another id, doctype or generation, or sealed under a key that is not the share's."""
        self._share_ended(share_id)  # destroys the keys of an expired share at a member
        try:
            kid = sealed_kid(stored)
            if kid not in self._state.share_keys.get(share_id, ()):
                raise IntegrityError(
                    f"document {stored.get('_id')!r} is sealed under key {kid}, "
                    f"not a key of share {share_id}")
            open_doc(stored, self._doc_key(kid)[1])  # authenticates; the plaintext is dropped
        except (IntegrityError, NotFound) as exc:
            self._audit_record(f"share:{share_id}", "check-sealed", stored.get("doctype"),
                               stored.get("_id"), False, str(exc))
            raise IntegrityError(str(exc)) from None

    def share_key_ids(self, share_id: str) -> tuple[str, ...]:
        """The ids (not the keys) of a share's data keys, oldest first."""
        return tuple(self._state.share_keys.get(share_id, ()))

    def encrypted_share_for(self, doc_metadata: Mapping[str, Any]) -> str | None:
        """The encrypted share (id) whose rule covers this document, if any: such a document
        is sealed under that share's key, so every member can open it."""
        for share_id, record in self._state.shares.items():
            if (record.manifest.get("encrypted") and share_id in self._state.share_keys
                    and self.share_in_scope(share_id, doc_metadata)):
                return share_id
        return None

    def release_doc_key(self, stored: Mapping[str, Any], principal: Principal) -> DocKey | None:
        """Release mode: decide a read of `stored` and, if allowed, return its data key
        (None for a document stored in clear) for the caller to open with
        `envelope.open_doc`. Faster for bulk reads, at the cost of the key leaving."""
        return self._release(stored, principal)

    def _release(self, stored: Mapping[str, Any], principal: Principal) -> DocKey | None:
        decision = self.decide(principal, "read", stored)
        if not decision.allowed:
            raise AccessDenied(decision, f"read refused: {decision.reason}")
        if not is_sealed(stored):
            if self.is_sensitive(stored["doctype"]) and not stored.get("_deleted"):
                exc = IntegrityError(
                    f"document {stored.get('_id')!r} of sensitive doctype "
                    f"{stored['doctype']!r} is stored in clear (injected or never sealed)"
                )
                self._integrity_failure(principal, stored, exc)
                raise exc
            return None
        try:
            kid = sealed_kid(stored)
        except IntegrityError as exc:
            self._integrity_failure(principal, stored, exc)
            raise
        share_id = self._share_of_kid(kid)
        forgotten = self._state.forgotten_kids.get(kid) if share_id is None else None
        if forgotten is not None:
            self._audit_record(principal.label, "decrypt", stored.get("doctype"),
                               stored.get("_id"), False, forgotten)
            raise AccessDenied(Decision(False, forgotten), f"read refused: {forgotten}")
        if share_id is not None:
            ended = self._share_ended(share_id)
            if ended is not None:
                self._audit_record(
                    principal.label, "decrypt", stored.get("doctype"), stored.get("_id"), False,
                    ended,
                )
                raise AccessDenied(Decision(False, ended), f"read refused: {ended}")
        try:
            return self._doc_key(kid)[1]
        except (IntegrityError, NotFound) as exc:
            self._integrity_failure(principal, stored, exc)
            raise

    def _share_of_kid(self, kid: str) -> str | None:
        """The share a data key belongs to (held, or destroyed here, or named by a manifest
        as its newest), or None for a doctype key or an unknown one."""
        record = self._state.data_keys.get(kid)
        if record is not None:
            return record.scope[6:] if record.scope.startswith("share:") else None
        return self._book.share_of_key(kid)

    def _integrity_failure(self, principal: Principal, stored: Mapping[str, Any], exc: Exception) -> None:
        self._audit_record(
            principal.label, "decrypt", stored.get("doctype"), stored.get("_id"), False, str(exc)
        )

    def create_share_key(self, share_id: str) -> str:
        """A new key for share `share_id` (a share's first key, or a newer one after a
        member left); returns its key id. Documents sealed for the share use the newest.
        At the owner, `revoke_member` and `apply_leave_request` rotate with it and name the
        new key in the signed manifest (`key_id`), which is how members learn they lack it;
        a key made by calling this alone is not announced."""
        check_name("share id", share_id)
        kid = self._new_data_key(f"share:{share_id}")
        self._state.share_keys.setdefault(share_id, []).append(kid)
        self._changed()
        self._admin("create_share_key", None, f"share {share_id!r}: new key {kid}")
        return kid

    def has_share_key(self, share_id: str) -> bool:
        return bool(self._state.share_keys.get(share_id))

    def wrap_share_key_for(
        self, share_id: str, recipient_x25519_public: bytes, recipient_fingerprint: bytes | str
    ) -> bytes:
        """Every key of share `share_id`, sealed to one recipient and signed by this node
        (see sharekey.py). The recipient's X25519 key must come over a channel
        authenticated as `recipient_fingerprint` (the pinned TLS link)."""
        kids = self._state.share_keys.get(share_id)
        if not kids:
            raise NotFound(f"no key for share {share_id!r}")
        keys = [self._doc_key(kid)[0] for kid in kids]
        recipient_fp = coerce_fingerprint(recipient_fingerprint)
        wrapped = sharekey.wrap_keys(
            self._identity, share_id, keys, recipient_x25519_public, recipient_fp
        )
        self._admin(
            "wrap_share_key", None,
            f"share {share_id!r}: {len(keys)} key(s) wrapped for {format_node_id(recipient_fp)}",
        )
        return wrapped

    def accept_share_key(
        self, share_id: str, wrapped: bytes, sender_fingerprint: bytes | str
    ) -> str:
        """Take in the keys of share `share_id` wrapped by `wrap_share_key_for` on the
        sender's token; returns the newest key id. `AuthenticationError` if not made by
        that sender for this node and share."""
        check_name("share id", share_id)
        sender_fp = coerce_fingerprint(sender_fingerprint)
        sender = f"{PEER_KIND}:{format_node_id(sender_fp)}"
        try:
            keys = sharekey.unwrap_keys(self._identity, share_id, wrapped, sender_fp)
        except (AuthenticationError, IntegrityError) as exc:
            self._audit_record(sender, "accept_share_key", None, None, False, str(exc))
            raise
        newest = self._add_share_keys(share_id, keys)
        self._audit_record(
            sender, "accept_share_key", None, None, True,
            f"share {share_id!r}: {len(keys)} key(s) accepted",
        )
        return newest

    def _add_share_keys(self, share_id: str, keys: list[bytes]) -> str:
        """Store unwrapped share keys (oldest first); the newest one's id."""
        scope = f"share:{share_id}"
        kids = self._state.share_keys.setdefault(share_id, [])
        for key in keys:
            kid = key_id(scope, key)
            if kid not in self._state.data_keys:
                self._store_data_key(kid, scope, key)
            if kid not in kids:
                kids.append(kid)
        if share_id in self._state.shares:
            self._book.clear_ended(share_id)
        self._changed()
        return key_id(scope, keys[-1])

    def discard_share_key(self, share_id: str) -> None:
        """Destroy every key of share `share_id` (after leaving it): the key records leave the
        sealed state, the cache forgets them, and the state is flushed at once."""
        kids = self._state.share_keys.pop(share_id, None)
        if kids is None:
            raise NotFound(f"no key for share {share_id!r}")
        for kid in kids:
            self._state.data_keys.pop(kid, None)
            self._keys.pop(kid, None)
        self._changed()
        self._admin("discard_share_key", None, f"share {share_id!r}: keys discarded")
        self.flush()

    def has_current_share_key(self, share_id: str) -> bool:
        """Whether this token holds the newest key of share `share_id`, as its manifest names
        it (a manifest without a key id: whether it holds any key). False for an unknown or
        unencrypted share. A member that is short of it waits for the owner's key grant
        (`key_grants`, forwarded with the manifest)."""
        manifest = self._book.get(share_id)
        if manifest is None or not manifest.encrypted:
            return False
        kids = self._state.share_keys.get(share_id, ())
        return bool(kids) if manifest.key_id is None else manifest.key_id in kids

    # --- shares: access ending, expiry and key grants ----------------------------------------

    def _share_ended(self, share_id: str, now: float | None = None) -> str | None:
        """At a member: why this node no longer takes part in share `share_id` (revoked,
        removed, left, expired), destroying the share's keys here the first time; None
        while it does (and always at the owner, who keeps its keys)."""
        reason = self._book.ended(share_id, time.time() if now is None else now)
        if reason is not None and share_id in self._state.share_keys:
            self._end_share_access(share_id, reason)
        return reason

    def _end_share_access(self, share_id: str, reason: str) -> None:
        """Destroy this node's copy of a share's keys, audited and flushed at once."""
        kids = self._state.share_keys.pop(share_id, [])
        for kid in kids:
            self._state.data_keys.pop(kid, None)
            self._keys.pop(kid, None)
        self._book.set_ended(share_id, reason, kids)
        self._changed()
        self._admin(
            "destroy_share_key", self._book.get(share_id).rule.doctype,  # type: ignore[union-attr]
            f"share {share_id!r}: {len(kids)} key(s) destroyed: {reason}",
        )
        self.flush()

    def enforce_expiry(self, now: float | None = None) -> list[str]:
        """Apply every expiry that has passed at `now` (default: the clock): at a member, the
        keys of each share it no longer takes part in (its membership or the share expired,
        or it was revoked) are destroyed, audited and flushed. The node calls this
        periodically; every decision and decryption also checks lazily. Returns the ids of
        the shares whose keys were destroyed by this call. The owner keeps its keys (its
        documents are its own); it just stops admitting expired members and shares."""
        now = time.time() if now is None else now
        destroyed = []
        for manifest in self._book.manifests():
            share_id = manifest.share_id
            had = share_id in self._state.share_keys
            if self._book.ended(share_id, now) is not None and had:
                self._share_ended(share_id, now)
                destroyed.append(share_id)
        return destroyed

    def key_grants(self, share_id: str) -> dict[bytes, bytes]:
        """The keys of encrypted share `share_id` wrapped to each of its active members but
        this node: {member fingerprint (32 bytes): wrapped keys (see sharekey.py)}, to send
        with the manifest (`accept_manifest(manifest, grants)`). At the owner, every key of
        the share, wrapped afresh once per newest key and member (cached in the state); at a
        member, the grants it verified when it accepted the manifest, so it can forward them
        (each is end-to-end wrapped to its recipient and signed by the owner). Members whose
        X25519 key the manifest does not carry (admitted by an older version) and expired
        members get none. Empty for an unencrypted share; `NotFound` for an unknown one."""
        manifest = self._book.get(share_id)
        if manifest is None:
            raise NotFound(f"share {share_id!r} is not held by this node")
        if not manifest.encrypted:
            return {}
        now = time.time()
        record = self._book.record(share_id)
        recipients = {
            m.fingerprint: m for m in manifest.active_members()
            if m.fingerprint != self.fingerprint and m.x25519 is not None
            and not m.is_expired(now)
        }
        if manifest.owner != self.fingerprint:
            if self._share_ended(share_id, now) is not None:
                return {}
            return {
                fp: blob for fp, blob in
                ((bytes.fromhex(k), v) for k, v in record.grants.items()) if fp in recipients
            }
        kids = self._state.share_keys.get(share_id)
        if not kids or manifest.is_expired(now):
            return {}
        if record.grants_key != kids[-1]:
            record.grants, record.grants_key = {}, kids[-1]
            self._dirty = True
        missing = [fp for fp in recipients if fp.hex() not in record.grants]
        if missing:
            keys = [self._doc_key(kid)[0] for kid in kids]
            for fp in missing:
                record.grants[fp.hex()] = sharekey.wrap_keys(
                    self._identity, share_id, keys, recipients[fp].x25519,  # type: ignore[arg-type]
                    fp,
                )
            self._dirty = True
            self._admin(
                "wrap_share_key", manifest.rule.doctype,
                f"share {manifest.name!r}: {len(keys)} key(s) (newest {kids[-1]}) granted to "
                + ", ".join(recipients[fp].name for fp in missing),
            )
        return {fp: record.grants[fp.hex()] for fp in recipients}

    def _take_grants(
        self, manifest: Manifest, grants: object, label: str, changed: bool
    ) -> None:
        """At a member, after accepting `manifest`: take this node's own key grant if it
        lacks the share's newest key, and keep the other members' verified grants to forward.
        A grant that fails verification is refused and audited; nothing is raised."""
        share_id, name = manifest.share_id, manifest.name
        doctype = manifest.rule.doctype

        def refuse(reason: str) -> None:
            self._audit_record(label, "accept_key_grant", doctype, None, False,
                               f"share {name!r}: {reason}")

        if not manifest.encrypted or manifest.owner == self.fingerprint:
            return
        if not isinstance(grants, Mapping):
            refuse(f"key grants must be a map, got {type(grants).__name__}")
            return
        if len(grants) > len(manifest.members):
            refuse(f"{len(grants)} key grants for {len(manifest.members)} members: refused")
            return
        if self._share_ended(share_id) is not None:
            return  # an ended member takes no keys, and forwards none
        record = self._book.record(share_id)
        kept: dict[str, bytes] = {} if changed else dict(record.grants)
        for raw_fp, blob in grants.items():
            try:
                fp = _grant_fingerprint(raw_fp)
            except InvalidArgument as exc:
                refuse(str(exc))
                continue
            if not isinstance(blob, (bytes, bytearray, memoryview)):
                refuse(f"the key grant for {format_node_id(fp)} is not bytes")
                continue
            blob = bytes(blob)
            if fp == self.fingerprint:
                self._take_own_grant(manifest, blob, label)
                continue
            member = manifest.member(fp)
            if member is None or member.status != "active" or member.x25519 is None:
                refuse(f"a key grant for {format_node_id(fp)}, which is not an active member "
                       "with a known X25519 key")
                continue
            try:
                sharekey.verify_wrapped(blob, share_id, manifest.owner, fp, member.x25519)
            except (AuthenticationError, IntegrityError) as exc:
                refuse(f"the key grant for {member.name!r} is refused: {exc}")
                continue
            kept[fp.hex()] = blob
        if kept != record.grants:
            record.grants = kept
            self._dirty = True

    def _take_own_grant(self, manifest: Manifest, blob: bytes, label: str) -> None:
        share_id, name = manifest.share_id, manifest.name
        try:
            if self.has_current_share_key(share_id):
                # nothing new for this node: check it (cheap), but do not unwrap it again
                sharekey.verify_wrapped(
                    blob, share_id, manifest.owner, self.fingerprint, self.x25519_public_bytes
                )
                return
            keys = sharekey.unwrap_keys(self._identity, share_id, blob, manifest.owner)
        except (AuthenticationError, IntegrityError) as exc:
            self._audit_record(label, "accept_key_grant", manifest.rule.doctype, None, False,
                               f"share {name!r}: this node's key grant is refused: {exc}")
            return
        newest = self._add_share_keys(share_id, keys)
        note = "" if manifest.key_id in (None, newest) else (
            f"; the manifest names key {manifest.key_id}, which this grant does not carry"
        )
        self._audit_record(
            label, "accept_key_grant", manifest.rule.doctype, None, True,
            f"share {name!r}: {len(keys)} key(s) accepted from the owner's grant, newest "
            f"{newest}{note}",
        )

    def rotate_master_key(self) -> int:
        """Make a new master key and use it from now on: the state is sealed under a new
        state key wrapped by it at once, data keys are re-wrapped lazily when next used, and
        an old master key is destroyed once nothing is wrapped by it. Returns its id."""
        master_id = self._keystore.new_master_key()
        state_key = os.urandom(KEY_SIZE)
        self._wrapped_state_key = self._keystore.wrap(master_id, state_key, _STATE_KEY_CONTEXT)
        self._state_aead = AESGCM(state_key)
        self._state_master = master_id
        self._state.current_master = master_id
        self._keys.clear()  # so each data key is re-wrapped under the new master on next use
        self._changed()
        self._admin("rotate_master_key", None, f"master key {master_id} in use")
        self.flush()
        return master_id

    def _new_data_key(self, scope: str) -> str:
        key = os.urandom(KEY_SIZE)
        kid = key_id(scope, key)
        self._store_data_key(kid, scope, key)
        return kid

    def _store_data_key(self, kid: str, scope: str, key: bytes) -> None:
        master = self._state.current_master
        wrapped = self._keystore.wrap(master, key, _data_key_context(kid, scope))
        self._state.data_keys[kid] = DataKeyRecord(kid, scope, master, wrapped)
        self._keys[kid] = (key, DocKey(kid, key))

    def _doc_key(self, kid: str) -> tuple[bytes, DocKey]:
        """An unwrapped data key (cached); re-wrapped under the current master if needed."""
        cached = self._keys.get(kid)
        if cached is not None:
            return cached
        record = self._state.data_keys.get(kid)
        if record is None:
            raise NotFound(f"this token holds no key {kid} (share key not accepted, or discarded)")
        key = self._keystore.unwrap(record.master_id, record.wrapped, _data_key_context(kid, record.scope))
        if key_id(record.scope, key) != kid:
            raise IntegrityError(f"data key {kid} unwraps to a key with another id")
        current = self._state.current_master
        if record.master_id != current:
            record.wrapped = self._keystore.wrap(current, key, _data_key_context(kid, record.scope))
            record.master_id = current
            self._dirty = True
        entry = (key, DocKey(kid, key))
        self._keys[kid] = entry
        return entry

    def _retire_masters(self) -> None:
        """Destroy master keys nothing refers to any more (only after a durable flush)."""
        in_use = {self._state_master, self._state.current_master}
        in_use.update(r.master_id for r in self._state.data_keys.values())
        for master_id in self._keystore.master_key_ids():
            if master_id not in in_use:
                self._keystore.destroy_master_key(master_id)

    # --- shares: the manifests this token holds ---------------------------------------------

    def create_share(
        self,
        name: str,
        doctype: str,
        selector: Mapping[str, Any] | None = None,
        *,
        encrypted: bool = False,
        expires: float | None = None,
        now: float | None = None,
        max_attachment_size: int | None = None,
        attachment_types: list[str] | None = None,
    ) -> Manifest:
        """A new share of the `doctype` documents matching `selector` (None: all), owned by
        this node: manifest version 1, signed, with this node (named as the token) its only
        member. `RuleError` for a malformed selector (or, for an encrypted share, one that
        tests sealed fields), `AlreadyExists` if a share of that name is known here,
        `InvalidArgument` for an `expires` (unix seconds, signed in the manifest) not after
        `now` (default: the clock). Once expired, members lose access (their tokens destroy
        the share's keys) and the owner stops admitting them; the owner keeps its keys. An
        encrypted share gets its first share key, named in the manifest (`key_id`)."""
        check_name("share name", name)
        check_name("doctype", doctype)
        if not isinstance(encrypted, bool):
            raise InvalidArgument(f"encrypted is True or False, got {encrypted!r}")
        expires = sharebook.check_expiry(
            "the share's expiry", expires, time.time() if now is None else now
        )
        rule = sharebook.share_rule(doctype, selector, encrypted=encrypted,
                                    max_attachment_size=max_attachment_size,
                                    attachment_types=attachment_types)
        if self._book.name_taken(name):
            raise AlreadyExists(f"a share named {name!r} is already known here; pick another name")
        manifest = sharebook.draft_manifest(
            name, self.public_key_bytes, self.name, rule, encrypted, expires=expires
        )
        if encrypted:
            kid = self.create_share_key(manifest.share_id)
            manifest = _manifest.with_key_id(manifest, kid)
        manifest = _manifest.sign(manifest, self._identity.sign)
        self._book.put(manifest)
        self._changed()
        self._admin(
            "create_share", doctype,
            f"share {name!r} ({manifest.share_id}) created{', encrypted' if encrypted else ''}",
        )
        return manifest

    def shares(self) -> list[Manifest]:
        """Every share this token knows: owned, joined, and those it left or was revoked from."""
        return self._book.manifests()

    def share(self, name_or_id: str) -> Manifest:
        """A share by id or name; `NotFound` if unknown, `InvalidArgument` if several known
        shares bear that name (then name it by id)."""
        return self._book.find(name_or_id)

    def share_status(self, name_or_id: str, *, now: float | None = None) -> str:
        """This node's standing in a share: "owner", "active", "revoked" (by the owner),
        "left" (it left), "removed" (no longer listed: the owner applied its leave), or
        "expired" (a member whose membership or share has expired at `now`, default the
        clock)."""
        return self._book.status(
            self._book.find(name_or_id).share_id, time.time() if now is None else now
        )

    def _owned(self, share: str, action: str, verb: str) -> Manifest:
        try:
            return self._book.owned(share, verb)
        except AccessDenied as exc:
            self._audit_record(_ADMIN, action, None, None, False, str(exc))
            raise

    # --- shares: invitations and membership --------------------------------------------------

    def issue_invitation(
        self,
        share: str,
        *,
        permission: str,
        ttl: int,
        addresses: Iterable[HostPort],
        now: float | None = None,
        membership_expires: float | None = None,
        relays: Iterable[tuple[bytes, str, int]] = (),
    ) -> Invitation:
        """An invitation for one new member of `share` (owned here) with `permission` ("read"
        or "write"), valid `ttl` seconds from `now`, naming `addresses` where this node
        listens. Only its secret's digest is kept; print `.encode()`. `AccessDenied` for a
        share this node does not own; `InvitationError`/`InvalidTtl` for bad fields.
        `membership_expires` (unix seconds, after `now`; `InvalidArgument` otherwise) is when
        the joined member's membership ends (its signed `Member.expires`): then its token
        destroys the share's keys and the owner stops admitting it. `InvalidArgument` too
        for a share that has expired."""
        manifest = self._owned(share, "issue_invitation", "invite members to")
        now = time.time() if now is None else now
        if manifest.is_expired(now):
            raise InvalidArgument(f"share {manifest.name!r} has expired; it admits no one")
        membership_expires = sharebook.check_expiry(
            "the membership's expiry", membership_expires, now
        )
        invitation = sharebook.new_invitation(
            self.fingerprint, addresses, manifest.share_id, permission, ttl, now, relays
        )
        self._book.prune_invitations(now)
        self._book.add_invitation(invitation, membership_expires)
        self._changed()
        self._admin(
            "issue_invitation", manifest.rule.doctype,
            f"share {manifest.name!r}: invitation for one {permission} member, valid until "
            f"{invitation.expires_at} (unix time)",
        )
        return invitation

    def redeem_invitation(
        self,
        share_id: str,
        secret: bytes,
        *,
        joiner_public_key: bytes,
        joiner_name: str,
        joiner_x25519: bytes,
        now: float | None = None,
        joiner_relays: tuple[str, ...] = (),
    ) -> tuple[Manifest, bytes | None]:
        """At the owner: admit the node whose keys are given (its Ed25519 key must be the one
        the link authenticated) for presenting `secret`. Returns the new signed manifest and,
        for an encrypted share, the share keys wrapped to the joiner (else None).

        `InvitationRefused` for an unknown secret, one for another share, an expired one, one
        used by another node (single use), a share not owned here, or a joiner already an
        active member; `InvalidArgument` for malformed keys or name. A refusal uses nothing
        up. The same joiner presenting the same secret again (its answer was lost) gets the
        current manifest again. The joiner's key is pinned as a peer. Audited."""
        label = "anonymous"
        try:
            joiner = sharebook.check_joiner(
                joiner_public_key, joiner_name, joiner_x25519, self.fingerprint
            )
            label = self._peer_label(joiner)
            if not isinstance(share_id, str) or not isinstance(secret, bytes):
                raise InvalidArgument(
                    "an invitation is redeemed with its share id (text) and secret (bytes)"
                )
            now = time.time() if now is None else now
            _, record = self._book.claim_invitation(share_id, secret, joiner, now)
            manifest = self._book.get(share_id)
            if manifest is None or manifest.owner != self.fingerprint:
                raise InvitationRefused(f"share {share_id!r} is not owned by this node")
            if manifest.is_expired(now):
                raise InvitationRefused(f"share {manifest.name!r} has expired; it admits no one")
            if record.membership_expires is not None and now >= record.membership_expires:
                raise InvitationRefused(
                    "the membership this invitation offers has already expired; ask the "
                    "share's owner for a new one"
                )
            if record.used_by is None:
                try:
                    admitted = _manifest.with_member(
                        manifest, joiner, joiner_name, record.permission,  # type: ignore[arg-type]
                        x25519=joiner_x25519, expires=record.membership_expires,
                        relays=tuple(joiner_relays),
                    )
                except _manifest.MalformedManifest as exc:
                    raise InvalidArgument(str(exc)) from None
                except _manifest.MembershipError as exc:
                    raise InvitationRefused(f"{exc}; the invitation stays unused") from None
                admitted = _manifest.sign(admitted, self._identity.sign)
            elif manifest.is_active_member(joiner):
                admitted = manifest
            else:
                raise InvitationRefused(
                    "this invitation was already used, and its member has since been revoked "
                    "or left; ask the share's owner for a new one"
                )
            wrapped = (
                self.wrap_share_key_for(share_id, joiner_x25519, joiner)
                if admitted.encrypted else None
            )
        except (InvitationRefused, InvalidArgument, NotFound) as exc:
            self._audit_record(label, "redeem_invitation", None, None, False, str(exc))
            raise
        if admitted is not manifest:
            record.used_by = joiner
            self._book.put(admitted)
            self._book.record(share_id).grants.pop(joiner.hex(), None)  # its key may differ
            self._book.admit(share_id, joiner, admitted.version)
            self._book.prune_invitations(now)
            if format_node_id(joiner) not in self._state.peers:
                self.add_peer(joiner_public_key, name=joiner_name)
            self._changed()
            reason = (
                f"share {admitted.name!r}: {joiner_name!r} admitted with "
                f"{record.permission} permission, manifest v{admitted.version}"
            )
        else:
            reason = (
                f"share {admitted.name!r}: manifest v{admitted.version} sent again to the "
                "member that redeemed this invitation"
            )
        self._audit_record(label, "redeem_invitation", admitted.rule.doctype, None, True, reason)
        return admitted, wrapped

    def join_share(
        self, invitation: Invitation, manifest: Manifest, wrapped_key: bytes | None
    ) -> Manifest:
        """At the joiner: take the owner's answer to a redeemed `invitation`. The manifest must
        be signed by the owner the invitation names, for its share, newer than any held, and
        list this node as an active member; an encrypted share's keys must come wrapped by
        the owner for this node. Stores the manifest and pins the owner's key. Refusals
        (manifest errors, `InvalidArgument`, `AuthenticationError`) change nothing and are
        audited."""
        if not sharebook.is_invitation(invitation):
            raise InvalidArgument("join_share takes the decoded Invitation (Invitation.decode)")
        share_id = invitation.share_id
        label = self._peer_label(invitation.owner_fingerprint)
        try:
            if invitation.owner_fingerprint == self.fingerprint:
                raise InvalidArgument("this node owns that share; it cannot join it")
            accepted = sharebook.accept(
                self._book.get(share_id), manifest, verify_signature,
                share_id=share_id, owner=invitation.owner_fingerprint,
            )
            if accepted.owner != invitation.owner_fingerprint:  # held here under another owner
                raise _manifest.OwnerChanged(
                    f"share {share_id!r} is held here as owned by "
                    f"{format_node_id(accepted.owner)}, not by {invitation.owner_node_id} as "
                    "the invitation says"
                )
            if not accepted.is_active_member(self.fingerprint):
                raise _manifest.MembershipError(
                    f"manifest v{accepted.version} of share {accepted.name!r} does not list this "
                    "node as an active member: the owner did not admit it"
                )
            self._book.check(accepted)
            if accepted.encrypted and not isinstance(wrapped_key, bytes):
                raise InvalidArgument(
                    f"share {accepted.name!r} is encrypted but its key did not come with it"
                )
            if not accepted.encrypted and wrapped_key is not None:
                raise InvalidArgument(
                    f"share {accepted.name!r} is not encrypted, yet a share key came with it"
                )
        except (_manifest.ManifestError, InvalidArgument) as exc:
            self._audit_record(label, "join_share", None, None, False, str(exc))
            raise
        if accepted.encrypted:
            self.accept_share_key(share_id, wrapped_key, accepted.owner)  # type: ignore[arg-type]
        self._book.put(accepted, left=False)
        self._book.clear_ended(share_id)
        self._end_links(share_id, f"this node joined share {accepted.name!r} again; a link "
                                  "of an earlier membership does not carry over")
        if format_node_id(accepted.owner) not in self._state.peers:
            self.add_peer(accepted.owner_key, name=accepted.members[0].name)
        self._changed()
        permission = accepted.member(self.fingerprint).permission  # type: ignore[union-attr]
        self._audit_record(
            label, "join_share", accepted.rule.doctype, None, True,
            f"joined share {accepted.name!r} ({share_id}) with {permission} permission, "
            f"manifest v{accepted.version}",
        )
        self._share_ended(share_id)  # a membership already expired: its keys are destroyed
        return accepted

    def accept_manifest(
        self,
        manifest: Manifest,
        grants: Mapping[bytes, bytes] | None = None,
        *,
        sender: bytes | str | None = None,
    ) -> tuple[Manifest, bool]:
        """A newer manifest of a share held here, from any peer (`sender`, for the audit).
        Returns (the manifest now held, whether it changed). Unknown share: `NotFound` (a
        node learns shares only by creating or joining them); unsigned, forged, older or
        conflicting: the manifest module's errors. Refusals are audited. If the new version
        revokes or removes this node (or its membership or the share has expired), its
        share keys are destroyed (audited, flushed); the manifest is kept.

        `grants` is what `key_grants` gave on the sending node (the owner, or any member
        forwarding them): {member fingerprint: wrapped keys}. A member takes its own grant
        when it lacks the share's newest key, after checking it was made by the share's
        owner for this node and share; the others' grants are checked against their X25519
        keys in the manifest and kept, to forward. A grant that fails is refused and
        audited (`accept_key_grant`), nothing raised: the manifest itself is still
        accepted."""
        label = self._peer_label(self._fp(sender)) if sender is not None else "peer:unknown"
        current = (
            self._book.get(manifest.share_id)
            if isinstance(manifest, _manifest.Manifest) else None
        )
        try:
            if current is None and isinstance(manifest, _manifest.Manifest):
                raise NotFound(
                    f"share {manifest.share_id!r} is unknown here: a node learns a share only "
                    "by creating or joining it"
                )
            accepted = sharebook.accept(current, manifest, verify_signature)
            if accepted is not current:
                self._book.check(accepted)
        except (_manifest.ManifestError, NotFound, InvalidArgument) as exc:
            self._audit_record(label, "accept_manifest", None, None, False, str(exc))
            raise
        if accepted is current:  # the same manifest again: it may bring a grant still missing
            if grants is not None:
                self._take_grants(accepted, grants, label, False)
            return accepted, False
        share_id, held_version = accepted.share_id, current.version  # type: ignore[union-attr]
        self._book.put(accepted)
        self._changed()
        self._audit_record(
            label, "accept_manifest", accepted.rule.doctype, None, True,
            f"share {accepted.name!r}: manifest v{accepted.version} replaces v{held_version} "
            f"(this node: {self._book.status(share_id, time.time())})",
        )
        self._share_ended(share_id)  # revoked, removed or expired: the keys are destroyed
        ended = self._book.link_refusal(share_id, time.time())
        if ended is not None:
            self._end_links(share_id, ended)
        if grants is not None:
            self._take_grants(accepted, grants, label, True)
        return accepted, True

    def revoke_member(self, share: str, member: str | bytes) -> Manifest:
        """At the owner: the next signed manifest with `member` (node id, fingerprint or
        member name) revoked. It stays listed, so its later writes are refused with a
        reason. `AccessDenied` if not the owner; `MembershipError` for the owner itself or a
        member already revoked."""
        manifest = self._owned(share, "revoke_member", "revoke members of")
        target = sharebook.resolve_member(manifest, member)
        revoked = self._rotated(_manifest.revoke(manifest, target.fingerprint))
        self._book.put(revoked)
        self._changed()
        self._admin(
            "revoke_member", manifest.rule.doctype,
            f"share {manifest.name!r}: member {target.name!r} ({target.node_id}) revoked, "
            f"manifest v{revoked.version}",
        )
        return revoked

    def _rotated(self, successor: Manifest) -> Manifest:
        """The next (unsigned) manifest, signed; for an encrypted share, after making a new
        share key and naming it in the manifest: documents sealed from now on use it, and
        only the remaining members get it (`key_grants`), so a member that was revoked or
        left cannot read them even with a copy of its old state."""
        if successor.encrypted:
            kid = self.create_share_key(successor.share_id)
            successor = _manifest.with_key_id(successor, kid)
            blind = [
                m.name for m in successor.active_members()
                if m.fingerprint != self.fingerprint and m.x25519 is None
            ]
            if blind:
                self._admin(
                    "create_share_key", successor.rule.doctype,
                    f"share {successor.name!r}: member(s) {', '.join(map(repr, blind))} joined "
                    f"before members carried their X25519 key and cannot be granted key {kid}; "
                    "invite them again",
                )
        return _manifest.sign(successor, self._identity.sign)

    def leave_share(self, share: str) -> None:
        """At a member: stop being one. The share's keys are destroyed (audited, flushed at
        once) and the manifest kept, marked left (this node neither sends nor accepts its
        documents any more). The owner learns it from `leave_request`, sent to it, and
        rotates the share's key; the owner itself cannot leave (`MembershipError`). Leaving
        twice does nothing."""
        manifest = self._book.find(share)
        if manifest.owner == self.fingerprint:
            raise _manifest.MembershipError(
                f"the owner cannot leave share {manifest.name!r}; it lives as long as its owner "
                "(revoke its members instead)"
            )
        share_id = manifest.share_id
        if self._book.status(share_id) == "left":
            return
        self._book.set_left(share_id)
        self._end_links(share_id, f"this node left share {manifest.name!r}")
        self._changed()
        self._share_ended(share_id)  # destroys the keys, audited and flushed
        self._admin(
            "leave_share", manifest.rule.doctype, f"left share {manifest.name!r} ({share_id})"
        )

    def forget_share(self, share: str) -> None:
        """At a member whose part in `share` ended (left, revoked, removed, expired): forget
        the share, so it is listed no more. Its keys are destroyed (if not yet); the ids of
        those keys stay known as forgotten, so a copy sealed under one is refused saying so.
        The local copies of its documents stay in the store. An invitation can admit this
        node again later, as a new member. The owner, or a member still active, is refused
        (`MembershipError`)."""
        manifest = self._book.find(share)
        share_id = manifest.share_id
        standing = self._book.status(share_id)
        if standing == "owner":
            raise _manifest.MembershipError(
                f"this node owns share {manifest.name!r}: the owner cannot forget it")
        if standing == "active":
            raise _manifest.MembershipError(
                f"this node is still a member of share {manifest.name!r}: leave it first")
        self._share_ended(share_id)  # the keys go now, if they had not yet
        record = self._book.record(share_id)
        why = (f"share {manifest.name!r} ({share_id}) was forgotten by this node "
               f"after it {record.ended or standing}")
        for kid in record.ended_kids:
            self._state.forgotten_kids[kid] = why
        self._state.share_keys.pop(share_id, None)
        self._end_links(share_id, f"this node forgot share {manifest.name!r}")
        self._book.forget(share_id)
        self._changed()
        self._admin("forget_share", manifest.rule.doctype,
                    f"forgot share {manifest.name!r} ({share_id}): {standing}")

    def leave_request(self, share: str) -> dict[str, Any]:
        """A statement signed by this node asking the owner of `share` to remove it, bound to
        the manifest version held: {"purpose", "share_id", "member", "version", "signature"}.
        Send it to the owner (again later if it was offline: it stays good until this node is
        admitted again). `MembershipError` for the owner or a node no longer listed."""
        manifest = self._book.find(share)
        if manifest.owner == self.fingerprint:
            raise _manifest.MembershipError(
                f"the owner cannot leave share {manifest.name!r}; it lives as long as its owner"
            )
        if manifest.member(self.fingerprint) is None:
            raise _manifest.MembershipError(
                f"this node is no longer listed in share {manifest.name!r}; there is nothing "
                "to leave"
            )
        statement = sharebook.leave_statement(manifest.share_id, self.fingerprint, manifest.version)
        signature = self._identity.sign(statement)
        self._admin(
            "leave_request", manifest.rule.doctype,
            f"share {manifest.name!r}: leave request signed at manifest v{manifest.version}",
        )
        return sharebook.leave_request(
            manifest.share_id, self.fingerprint, manifest.version, signature
        )

    def apply_leave_request(
        self, request: Mapping[str, Any], sender_fingerprint: bytes | str
    ) -> Manifest:
        """At the owner: the next signed manifest without the member that signed `request`
        (see `leave_request`) and sent it (`sender_fingerprint`, from the authenticated link).
        The signature must verify with that member's pinned key. A member already gone gets
        the current manifest back. `AuthenticationError` (not from that member),
        `LeaveRequestRefused` (a replay from before it was admitted again, or a version never
        made), `InvalidArgument` (malformed), `AccessDenied` (not the owner). Audited."""
        label = "anonymous"
        try:
            sender = self._fp(sender_fingerprint)
            label = self._peer_label(sender)
            share_id, member, version, signature = sharebook.parse_leave_request(request)
            if member != sender:
                raise AuthenticationError(
                    "the leave request names another member than the node that sent it"
                )
            manifest = self._book.owned(share_id, "apply leave requests to")
            pinned = self._state.peers.get(format_node_id(member))
            if pinned is None or not verify_signature(
                pinned.public_key, sharebook.leave_statement(share_id, member, version), signature
            ):
                raise AuthenticationError(
                    f"the leave request for share {manifest.name!r} is not signed by the pinned "
                    f"key of {format_node_id(member)}"
                )
            if version > manifest.version:
                raise LeaveRequestRefused(
                    f"the leave request names manifest v{version} of share {manifest.name!r}, "
                    f"which is only at v{manifest.version}"
                )
            if manifest.member(member) is None:
                self._audit_record(
                    label, "apply_leave_request", manifest.rule.doctype, None, True,
                    f"share {manifest.name!r}: {format_node_id(member)} had already left",
                )
                return manifest
            admitted = self._book.admitted_version(share_id, member)
            if version < admitted:
                raise LeaveRequestRefused(
                    f"the leave request was signed at manifest v{version} of share "
                    f"{manifest.name!r}, before the member was admitted again at v{admitted}: "
                    "a replay"
                )
            gone = manifest.member(member).name  # type: ignore[union-attr]
            smaller = _manifest.leave(manifest, member)
        except (
            InvalidArgument, AuthenticationError, AccessDenied, NotFound, LeaveRequestRefused,
            _manifest.ManifestError,
        ) as exc:
            self._audit_record(label, "apply_leave_request", None, None, False, str(exc))
            raise
        smaller = self._rotated(smaller)
        self._book.put(smaller)
        self._book.forget_admission(share_id, member)
        self._changed()
        self._audit_record(
            label, "apply_leave_request", smaller.rule.doctype, None, True,
            f"share {smaller.name!r}: member {gone!r} left, manifest v{smaller.version}",
        )
        return smaller

    # --- shares: decisions for the network and replication layers ---------------------------

    def may_connect(self, fingerprint: bytes | str, *, now: float | None = None) -> bool:
        """May this peer hold a link with this node? Yes for an active member of a share in
        which this node is active too (not audited: asked often); yes while an invitation is
        open, but then only for the join exchange (the caller enforces that: see
        `is_known_member`); otherwise no, audited."""
        fp = self._fp(fingerprint)
        now = time.time() if now is None else now
        if self._book.is_connectable(fp, now):
            return True
        label = self._peer_label(fp)
        if fp != self.fingerprint and self._book.has_open_invitation(now):
            self._audit_record(
                label, "connect", None, None, True,
                "not a member of any share held here; only to redeem an open invitation",
            )
            return True
        self._audit_record(
            label, "connect", None, None, False,
            "not an active, unexpired member of any share in which this node is active, and "
            "no invitation is open",
        )
        return False

    def is_known_member(self, fingerprint: bytes | str, *, now: float | None = None) -> bool:
        """An active member of a share in which this node is active too (may sync); neither
        the share nor either membership expired."""
        return self._book.is_connectable(
            self._fp(fingerprint), time.time() if now is None else now
        )

    def common_shares(
        self, fingerprint: bytes | str, *, now: float | None = None
    ) -> list[Manifest]:
        """The shares in which both this node and the peer are active, unexpired members:
        what to sync with that peer."""
        return self._book.common(self._fp(fingerprint), time.time() if now is None else now)

    def share_in_scope(self, share_id: str, doc_metadata: Mapping[str, Any]) -> bool:
        """Does the document (its doctype and clear fields) fall under the share's rule? A
        tombstone (`_deleted`) does when it carries the share's doctype. Pure and fast (for
        the sender's filter); not audited. False for an unknown share."""
        return self._book.in_scope(share_id, doc_metadata)

    def decide_incoming(
        self,
        share_id: str,
        sender_fingerprint: bytes | str,
        doc_metadata: Mapping[str, Any],
        *,
        existing: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> Decision:
        """At the receiver: may the peer write this document (as received: stored form) into
        share `share_id` here? Allowed only if this token holds the share, this node and the
        sender are active members of the manifest held, the sender has write permission,
        and the document is in scope: its doctype is the share's and it matches the selector
        (a tombstone needs only the doctype: it carries no other field), and for an encrypted
        share it is sealed under one of the share's keys (tombstones excepted). Pass
        `existing`, the metadata of the local winning revision of that document id if there
        is one: a document that exists here outside the share is never overwritten or
        deleted by a member. Neither the share nor the sender's membership (nor, at a member,
        this node's) may have expired at `now` (default: the clock). Every answer is audited
        with the document id."""
        sender = self._fp(sender_fingerprint)
        now = time.time() if now is None else now
        self._share_ended(share_id, now)
        decision = self._book.incoming(share_id, sender, doc_metadata, existing, now)
        doctype = doc_metadata.get("doctype") if isinstance(doc_metadata, Mapping) else None
        doc_id = doc_metadata.get("_id") if isinstance(doc_metadata, Mapping) else None
        self._audit_record(
            self._peer_label(sender), "share-receive",
            doctype if isinstance(doctype, str) else None, doc_id,
            decision.allowed, decision.reason,
        )
        return decision

    def decide_outgoing(
        self, share_id: str, peer_fingerprint: bytes | str, *, now: float | None = None
    ) -> Decision:
        """May this node send share `share_id`'s documents to the peer? Both must be active
        members of the manifest held (this node not having left), neither membership nor the
        share expired at `now` (default: the clock), and this node must have write
        permission (the peer refuses documents from a read-only member). Audited."""
        peer = self._fp(peer_fingerprint)
        now = time.time() if now is None else now
        self._share_ended(share_id, now)
        decision = self._book.outgoing(share_id, peer, now)
        self._audit_record(
            self._peer_label(peer), "share-send", None, None, decision.allowed, decision.reason
        )
        return decision

    def _peer_label(self, fingerprint: bytes) -> str:
        label = self._peer_labels.get(fingerprint)
        if label is None:
            if len(self._peer_labels) >= 4096:
                self._peer_labels.clear()
            label = self._peer_labels[fingerprint] = f"{PEER_KIND}:{format_node_id(fingerprint)}"
        return label

    @staticmethod
    def _fp(value: bytes | str) -> bytes:
        if type(value) is bytes and len(value) == 32:
            return value
        return coerce_fingerprint(value)

    # --- audit -----------------------------------------------------------------------------

    def _audit_record(
        self, principal: str, action: str, doctype: str | None, doc_id: Any,
        allowed: bool, reason: str,
    ) -> None:
        if not isinstance(doc_id, str):
            doc_id = None if doc_id is None else repr(doc_id)
        if self._audit.record(principal, action, doctype, doc_id, allowed, reason) >= MAX_UNFLUSHED:
            self.flush()  # keeps memory bounded between the caller's flushes

    def _admin(self, action: str, doctype: str | None, reason: str) -> None:
        self._audit_record(_ADMIN, action, doctype, None, True, reason)

    def audit_tail(self, n: int) -> list[AuditEntry]:
        """The last `n` audit entries, oldest first."""
        return self._audit.tail(n)

    def audit_search(self, n: int, *, allowed: bool | None = None,
                     principal: str | None = None, since: float | None = None
                     ) -> list[AuditEntry]:
        """The last `n` entries that match (allowed or denied, a principal label such as
        "app:notes", at or after a Unix time), oldest first."""
        return self._audit.search(n, allowed=allowed, principal=principal, since=since)

    def audit_prune(self, before: float) -> dict[str, Any]:
        """Drop the audit log's whole segments older than `before` (Unix time). What stays
        remains verifiable: the sealed state keeps the hash that precedes it. The prune is
        itself an entry. {"segments", "entries", "verifiable_from"}."""
        old = self._audit.meta
        meta, dropped, entries = self._audit.pruned(before)
        self._audit.meta = meta
        self._admin("audit_prune", None,
                    f"pruned {entries} entries ({len(dropped)} segments) older than {before:.0f}; "
                    f"the chain is verifiable from entry {meta.base_seq}")
        self._dirty = True
        try:
            self.flush()  # the new checkpoint is durable before any file goes
        except BaseException:
            self._audit.meta = old
            raise
        self._audit.remove_segments(dropped)
        return {"segments": len(dropped), "entries": entries, "verifiable_from": meta.base_seq}

    def audit_verify(self) -> tuple[bool, int, int | None]:
        """(ok, number of entries, index of the first bad entry or None): re-reads the
        whole log and checks every seal and the hash chain."""
        return self._audit.verify()

    # --- internals -------------------------------------------------------------------------

    def _changed(self, *, rules: bool = False) -> None:
        self._dirty = True
        if rules:
            self._rebuild_rules()
        self._rebuild_subjects()

    def _drop_subject_rules(self, kind: str, subject: str) -> None:
        self._state.rules = [
            r for r in self._state.rules if not (r.subject_kind == kind and r.subject == subject)
        ]

    def _rebuild_rules(self) -> None:
        self._rules = RuleSet(self._state.rules, self._rules)

    def _rebuild_subjects(self) -> None:
        subjects: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        for app in self._state.apps.values():
            subjects[(APP_KIND, app.name)] = ((APP_KIND, app.name),) + tuple(
                (ROLE_KIND, r) for r in app.roles
            )
        for peer in self._state.peers.values():
            subjects[(PEER_KIND, peer.node_id)] = ((PEER_KIND, peer.node_id),) + tuple(
                (ROLE_KIND, r) for r in peer.roles
            )
        self._subjects = subjects


def _grant_fingerprint(value: object) -> bytes:
    """A key grant's recipient: 32 bytes (msgpack) or 64 hex digits (JSON)."""
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) == 32:
        return bytes(value)
    if isinstance(value, str) and len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise InvalidArgument(
        f"a key grant is keyed by a 32-byte member fingerprint, got {value!r:.80}"
    )


__all__ = ["AppInfo", "PeerInfo", "Token", "TokenInfo"]

