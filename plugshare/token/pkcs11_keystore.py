"""Master keys inside a PKCS#11 device (tested on SoftHSM2 2.6).

Each master key is an AES-256 secret key generated in the device with CKA_EXTRACTABLE false
and CKA_SENSITIVE true: its value cannot be read out, only used. Wrapping and unwrapping the
token's 32-byte keys is AES-GCM encrypt/decrypt run in the device, with the context as
additional authenticated data. (SoftHSM2 2.6 offers CKM_AES_KEY_WRAP only through
C_WrapKey/C_UnwrapKey, which would keep the unwrapped key in the device too and cost a device
call for every sealed state or document; GCM in the device gives the same protection to the
master key and lets the token cache the data keys it has unwrapped.)

Objects on the device, per `key_label` (so several nodes can share one device token):
  secret keys  label "<key_label>:master", id = master id (4 bytes big-endian)
  data objects label "<key_label>:anchor", value = rollback counter (8 bytes big-endian)
SoftHSM2 does not let a data object's value change, so the anchor advances by creating the
new object first and then destroying the old ones; a reader takes the highest value, which
stays right whatever point a crash interrupts.

PKCS#11 login state is per process and device token, so keystores of one process that use
the same device token share one logged-in session (reference-counted); a later open with a
different PIN is refused as a wrong PIN, as the device would.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import attrs
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import (
    NoSuchToken,
    PinIncorrect,
    PinInvalid,
    PinLenRange,
    PinLocked,
    PKCS11Error,
    UserAlreadyLoggedIn,
)
from pkcs11.mechanisms import GCMParams

from .errors import IntegrityError, KeystoreError, TokenStateError, WrongSecretError
from .keystore import KEY_SIZE, Keystore, read_secret_source

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_PIN_SOURCE = "env:PLUGSHARE_PKCS11_PIN"
_NONCE = 12
_WRAP_AD = b"plugshare/pkcs11-wrap/v1\x00"
_APPLICATION = "plugshare"


@attrs.define
class _SharedSession:
    session: pkcs11.Session
    pin_hash: bytes
    refs: int


_SESSIONS: dict[tuple[str, str], _SharedSession] = {}


def _pin_hash(pin: str) -> bytes:
    return hashlib.sha256(b"plugshare/pin\x00" + pin.encode("utf-8")).digest()


class Pkcs11Keystore(Keystore):
    """Master keys in device token `token_label` of PKCS#11 library `module`, objects named
    after `key_label`; the user PIN is read from `pin_source` (`env:VAR` or `file:PATH`)."""

    kind = "pkcs11"

    def __init__(
        self,
        module: str = DEFAULT_MODULE,
        token_label: str = "plugshare",
        pin_source: str = DEFAULT_PIN_SOURCE,
        key_label: str = "plugshare",
    ):
        self.module = module
        self.token_label = token_label
        self.pin_source = pin_source
        self.key_label = key_label
        self._session_key: tuple[str, str] | None = None
        self._session: pkcs11.Session | None = None
        self._masters: dict[int, pkcs11.SecretKey] = {}

    def describe(self) -> str:
        return (
            f"PKCS#11 keystore (module {self.module}, token {self.token_label!r}, "
            f"keys {self.key_label!r})"
        )

    @property
    def _master_label(self) -> str:
        return f"{self.key_label}:master"

    @property
    def _anchor_label(self) -> str:
        return f"{self.key_label}:anchor"

    # --- session ---------------------------------------------------------------------------

    def _connect(self) -> None:
        if self._session is not None:
            return
        pin = read_secret_source(self.pin_source, "PKCS#11 user PIN")
        try:
            lib = pkcs11.lib(self.module)
        except (PKCS11Error, OSError) as exc:
            raise KeystoreError(f"cannot load PKCS#11 module {self.module}: {exc}") from None
        try:
            device = lib.get_token(token_label=self.token_label)
        except NoSuchToken:
            raise KeystoreError(
                f"no PKCS#11 token labelled {self.token_label!r} in {self.module} "
                "(for SoftHSM2: softhsm2-util --init-token --free --label ...)"
            ) from None
        key = (self.module, f"{device.serial!r}/{self.token_label}")
        shared = _SESSIONS.get(key)
        if shared is not None:
            if not hmac.compare_digest(shared.pin_hash, _pin_hash(pin)):
                raise WrongSecretError(f"wrong PIN for PKCS#11 token {self.token_label!r}")
            shared.refs += 1
        else:
            try:
                session = device.open(user_pin=pin, rw=True)
            except (PinIncorrect, PinInvalid, PinLenRange):
                raise WrongSecretError(
                    f"wrong PIN for PKCS#11 token {self.token_label!r}"
                ) from None
            except PinLocked:
                raise WrongSecretError(
                    f"the PIN of PKCS#11 token {self.token_label!r} is locked"
                ) from None
            except UserAlreadyLoggedIn:
                # Logged in by some other part of this process: reuse its login.
                session = device.open(rw=True)
            except PKCS11Error as exc:
                raise KeystoreError(
                    f"PKCS#11 token {self.token_label!r} refused a session: {exc!r}"
                ) from None
            shared = _SharedSession(session, _pin_hash(pin), 1)
            _SESSIONS[key] = shared
        self._session_key, self._session = key, shared.session

    def close(self) -> None:
        self._masters.clear()
        if self._session is None:
            return
        key, self._session, self._session_key = self._session_key, None, None
        shared = _SESSIONS.get(key)  # type: ignore[arg-type]
        if shared is None:
            return
        shared.refs -= 1
        if shared.refs <= 0:
            del _SESSIONS[key]  # type: ignore[arg-type]
            try:
                shared.session.close()
            except PKCS11Error:
                pass

    def _objects(self, cls: ObjectClass, label: str) -> list:
        assert self._session is not None
        return list(self._session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label}))

    def _load_masters(self) -> None:
        self._masters = {}
        for key in self._objects(ObjectClass.SECRET_KEY, self._master_label):
            (master_id,) = struct.unpack(">I", key[Attribute.ID])
            self._masters[master_id] = key

    # --- lifecycle -------------------------------------------------------------------------

    def create(self) -> int:
        self._connect()
        if self._objects(ObjectClass.SECRET_KEY, self._master_label) or self._objects(
            ObjectClass.DATA, self._anchor_label
        ):
            self.close()
            raise KeystoreError(
                f"PKCS#11 token {self.token_label!r} already holds plugshare keys labelled "
                f"{self.key_label!r}; choose another key label or remove them"
            )
        self._generate_master(1)
        self.advance_anchor(0)
        return 1

    def open(self) -> None:
        self._connect()
        self._load_masters()
        if not self._masters:
            self.close()
            raise KeystoreError(
                f"PKCS#11 token {self.token_label!r} holds no master key labelled "
                f"{self._master_label!r}"
            )

    def destroy(self) -> None:
        self._connect()
        for cls, label in (
            (ObjectClass.SECRET_KEY, self._master_label),
            (ObjectClass.DATA, self._anchor_label),
        ):
            for obj in self._objects(cls, label):
                obj.destroy()
        self.close()

    # --- master keys -----------------------------------------------------------------------

    def _need_session(self) -> pkcs11.Session:
        if self._session is None:
            raise KeystoreError(f"{self.describe()} is not open")
        return self._session

    def _generate_master(self, master_id: int) -> None:
        session = self._need_session()
        try:
            key = session.generate_key(
                KeyType.AES,
                KEY_SIZE * 8,
                id=struct.pack(">I", master_id),
                label=self._master_label,
                store=True,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
                | MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                template={
                    Attribute.EXTRACTABLE: False,
                    Attribute.SENSITIVE: True,
                    Attribute.PRIVATE: True,
                },
            )
        except PKCS11Error as exc:
            raise KeystoreError(f"PKCS#11 token refused to generate a key: {exc!r}") from None
        self._masters[master_id] = key

    def master_key_ids(self) -> list[int]:
        return sorted(self._masters)

    def new_master_key(self) -> int:
        self._need_session()
        master_id = max(self._masters, default=0) + 1
        self._generate_master(master_id)
        return master_id

    def destroy_master_key(self, master_id: int) -> None:
        key = self._masters.pop(master_id, None)
        if key is not None:
            key.destroy()

    def _master(self, master_id: int) -> pkcs11.SecretKey:
        self._need_session()
        try:
            return self._masters[master_id]
        except KeyError:
            raise KeystoreError(f"master key {master_id} is not in {self.describe()}") from None

    def wrap(self, master_id: int, key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        try:
            ct = self._master(master_id).encrypt(
                key, mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(nonce, _WRAP_AD + context, 128),
            )
        except PKCS11Error as exc:
            raise KeystoreError(f"PKCS#11 wrap failed: {exc!r}") from None
        return nonce + ct

    def unwrap(self, master_id: int, wrapped: bytes, context: bytes) -> bytes:
        master = self._master(master_id)
        if len(wrapped) <= _NONCE + 16:
            raise IntegrityError(f"a key wrapped by master key {master_id} is truncated")
        try:
            return master.decrypt(
                wrapped[_NONCE:], mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(wrapped[:_NONCE], _WRAP_AD + context, 128),
            )
        except PKCS11Error:
            # SoftHSM2 reports a failed GCM tag check as a general error.
            raise IntegrityError(
                f"a key wrapped by master key {master_id} fails authentication in the device"
            ) from None

    # --- rollback anchor -------------------------------------------------------------------

    def _anchors(self) -> list[tuple[int, object]]:
        self._need_session()
        out = []
        for obj in self._objects(ObjectClass.DATA, self._anchor_label):
            value = obj[Attribute.VALUE]
            if len(value) == 8:
                out.append((struct.unpack(">Q", value)[0], obj))
        return out

    def read_anchor(self) -> int:
        anchors = self._anchors()
        if not anchors:
            raise TokenStateError(
                f"rollback anchor {self._anchor_label!r} is missing from PKCS#11 token "
                f"{self.token_label!r}"
            )
        return max(value for value, _ in anchors)

    def advance_anchor(self, counter: int) -> None:
        session = self._need_session()
        old = self._anchors()
        if any(value >= counter for value, _ in old) and old:
            return
        session.create_object({
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.LABEL: self._anchor_label,
            Attribute.APPLICATION: _APPLICATION,
            Attribute.VALUE: struct.pack(">Q", counter),
        })
        for _, obj in old:
            obj.destroy()  # type: ignore[attr-defined]
