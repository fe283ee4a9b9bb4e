"""Master keys in files, wrapped by a passphrase-derived key (or, unattended, a key file).

Files in the keystore directory (all mode 0600):
  keystore.json    format, protection, scrypt parameters and salt, the wrapped master keys
  keystore.key     unattended mode only: the 32 random bytes that wrap the master keys
  keystore.anchor  the rollback anchor, sealed under a key derived from the wrapping key:
                   two slots (at bytes 0 and 4096, so that rewriting one never rewrites the
                   other's page), each `nonce | AES-GCM(counter u64)`, rewritten in place in
                   turn (pwrite + fdatasync); the higher authentic value is the anchor, so a
                   slot torn by a crash leaves the one before. A file of one record (the
                   format before, replaced by rename) is read as slot 0.

With a passphrase the key-encryption key is scrypt(passphrase, salt, n=2^17, r=8, p=1)
(about 128 MiB and a fraction of a second per unlock). Unattended mode is weaker: whoever
reads `keystore.key` unwraps everything; it only keeps the keys off the database and out of
backups that leave that file behind.

What an attacker who can write these files can do: replace `keystore.anchor` and
`token.state` (and the audit segments) together with older copies of all of them. Each copy
is authentic, so the rollback goes unnoticed; only an anchor the attacker cannot write (the
PKCS#11 keystore's device) stops that. Replacing one without the other is detected (damaging the anchor slot holding the higher
value lowers the anchor by one flush: with the state alone, that opens nothing older).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import (
    IntegrityError,
    InvalidArgument,
    KeystoreError,
    TokenStateError,
    WrongSecretError,
)
from .files import atomic_write, open_in_place, read_file, write_in_place
from .keystore import KEY_SIZE, Keystore

FORMAT = "plugshare-soft-keystore/1"
KEYSTORE_FILE = "keystore.json"
KEY_FILE = "keystore.key"
ANCHOR_FILE = "keystore.anchor"
PASSPHRASE_ENV = "PLUGSHARE_PASSPHRASE"

DEFAULT_SCRYPT_N = 1 << 17
SCRYPT_R = 8
SCRYPT_P = 1
MIN_SCRYPT_N = 1 << 10  # below this a passphrase is barely stretched at all

_MASTER_AD = b"plugshare/soft-master/v1\x00"
_WRAP_AD = b"plugshare/soft-wrap/v1\x00"
_ANCHOR_AD = b"plugshare/soft-anchor/v1\x00"
_NONCE = 12
_ANCHOR_RECORD = _NONCE + 8 + 16  # nonce | sealed u64 | tag
ANCHOR_SLOTS = (0, 4096)  # offsets: one page apart


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _derive(kek: bytes, info: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), KEY_SIZE, salt=None, info=info).derive(kek))


class SoftKeystore(Keystore):
    """Master keys in `directory`, protected by `passphrase` (None: unattended key file)."""

    kind = "soft"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        passphrase: str | None = None,
        *,
        scrypt_n: int = DEFAULT_SCRYPT_N,
    ):
        if passphrase is not None and not passphrase:
            raise InvalidArgument("an empty passphrase protects nothing; give one or use None")
        if scrypt_n < MIN_SCRYPT_N or scrypt_n & (scrypt_n - 1):
            raise InvalidArgument(f"scrypt n must be a power of two >= {MIN_SCRYPT_N}")
        self.directory = Path(directory)
        self._passphrase = passphrase
        self._scrypt_n = scrypt_n
        self._doc: dict | None = None  # parsed keystore.json
        self._masters: dict[int, AESGCM] = {}
        self._kek_aead: AESGCM | None = None
        self._anchor_aead: AESGCM | None = None
        self._anchor_fd: int | None = None
        self._anchor_values: list[int | None] | None = None  # per slot (None: not authentic)

    @classmethod
    def from_environment(cls, directory: str | os.PathLike[str]) -> SoftKeystore:
        """Passphrase from $PLUGSHARE_PASSPHRASE if set, else unattended."""
        return cls(directory, os.environ.get(PASSPHRASE_ENV) or None)

    @property
    def unattended(self) -> bool:
        if self._doc is not None:
            return self._doc["protection"] == "unattended"
        return self._passphrase is None

    def describe(self) -> str:
        mode = "unattended key file" if self.unattended else "passphrase"
        return f"soft keystore in {self.directory} ({mode})"

    # --- lifecycle -------------------------------------------------------------------------

    def _paths(self) -> tuple[Path, Path, Path]:
        d = self.directory
        return d / KEYSTORE_FILE, d / KEY_FILE, d / ANCHOR_FILE

    def create(self) -> int:
        ks_path, key_path, _ = self._paths()
        if any(p.exists() for p in self._paths()):
            raise KeystoreError(f"{self.directory} already holds a keystore; refusing to replace it")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc: dict = {"format": FORMAT, "masters": {}}
        if self._passphrase is None:
            doc["protection"] = "unattended"
            kek = os.urandom(KEY_SIZE)
            atomic_write(key_path, kek)
        else:
            doc["protection"] = "passphrase"
            salt = os.urandom(16)
            doc["scrypt"] = {"n": self._scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)}
            kek = self._stretch(self._passphrase, doc["scrypt"])
        self._unlock(doc, kek)
        self._add_master(1)
        self.advance_anchor(0)
        return 1

    def open(self) -> None:
        ks_path, key_path, _ = self._paths()
        raw = read_file(ks_path, "keystore file", KeystoreError)
        try:
            doc = json.loads(raw)
            if doc.get("format") != FORMAT:
                raise KeystoreError(f"{ks_path} is not a {FORMAT} file")
            protection = doc["protection"]
            masters = {int(k): _unb64(v) for k, v in doc["masters"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KeystoreError(f"keystore file {ks_path} is damaged (not the expected JSON)") from None
        if protection == "unattended":
            kek = read_file(key_path, "unattended key file", KeystoreError)
            if len(kek) != KEY_SIZE:
                raise KeystoreError(f"unattended key file {key_path} is damaged")
        elif protection == "passphrase":
            if self._passphrase is None:
                raise KeystoreError(
                    f"keystore {ks_path} is protected by a passphrase; give it "
                    f"(set {PASSPHRASE_ENV} or answer the prompt)"
                )
            kek = self._stretch(self._passphrase, doc.get("scrypt"))
        else:
            raise KeystoreError(f"keystore file {ks_path}: unknown protection {protection!r}")
        self._unlock(doc, kek)
        for master_id, wrapped in sorted(masters.items()):
            try:
                key = self._kek_aead.decrypt(wrapped[:_NONCE], wrapped[_NONCE:],  # type: ignore[union-attr]
                                             _MASTER_AD + struct.pack(">I", master_id))
            except InvalidTag:
                self.close()
                if protection == "passphrase":
                    raise WrongSecretError(
                        f"wrong passphrase for keystore {ks_path} (or the file was altered)"
                    ) from None
                raise KeystoreError(
                    f"master key {master_id} in {ks_path} does not unwrap with {key_path}: "
                    "one of the two files was altered or replaced"
                ) from None
            self._masters[master_id] = AESGCM(key)
        if not self._masters:
            raise KeystoreError(f"keystore file {ks_path} holds no master key")

    def _stretch(self, passphrase: str, params: dict | None) -> bytes:
        try:
            n, r, p, salt = params["n"], params["r"], params["p"], _unb64(params["salt"])  # type: ignore[index]
            kdf = Scrypt(salt=salt, length=KEY_SIZE, n=n, r=r, p=p)
        except (TypeError, KeyError, ValueError):
            raise KeystoreError(f"keystore in {self.directory}: bad scrypt parameters") from None
        return kdf.derive(passphrase.encode("utf-8"))

    def _unlock(self, doc: dict, kek: bytes) -> None:
        self._doc = doc
        self._kek_aead = AESGCM(kek)
        self._anchor_aead = _derive(kek, _ANCHOR_AD)

    def close(self) -> None:
        self._masters.clear()
        self._kek_aead = self._anchor_aead = None
        self._anchor_values = None
        if self._anchor_fd is not None:
            os.close(self._anchor_fd)
            self._anchor_fd = None

    def destroy(self) -> None:
        self.close()
        for path in self._paths():
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def _need_open(self) -> AESGCM:
        if self._kek_aead is None or self._doc is None:
            raise KeystoreError(f"{self.describe()} is not open")
        return self._kek_aead

    # --- master keys -----------------------------------------------------------------------

    def master_key_ids(self) -> list[int]:
        return sorted(self._masters)

    def _add_master(self, master_id: int) -> None:
        kek = self._need_open()
        key = os.urandom(KEY_SIZE)
        nonce = os.urandom(_NONCE)
        wrapped = nonce + kek.encrypt(nonce, key, _MASTER_AD + struct.pack(">I", master_id))
        doc = dict(self._doc)  # type: ignore[arg-type]
        doc["masters"] = {**doc["masters"], str(master_id): _b64(wrapped)}
        self._save(doc)
        self._masters[master_id] = AESGCM(key)

    def new_master_key(self) -> int:
        self._need_open()
        master_id = max(self._masters, default=0) + 1
        self._add_master(master_id)
        return master_id

    def destroy_master_key(self, master_id: int) -> None:
        self._need_open()
        doc = dict(self._doc)  # type: ignore[arg-type]
        doc["masters"] = {k: v for k, v in doc["masters"].items() if int(k) != master_id}
        self._save(doc)
        self._masters.pop(master_id, None)

    def _save(self, doc: dict) -> None:
        atomic_write(self.directory / KEYSTORE_FILE, json.dumps(doc, indent=1).encode("utf-8"))
        self._doc = doc

    def _master(self, master_id: int) -> AESGCM:
        self._need_open()
        try:
            return self._masters[master_id]
        except KeyError:
            raise KeystoreError(
                f"master key {master_id} is not in {self.describe()} (keystore file replaced?)"
            ) from None

    def wrap(self, master_id: int, key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._master(master_id).encrypt(nonce, key, _WRAP_AD + context)

    def unwrap(self, master_id: int, wrapped: bytes, context: bytes) -> bytes:
        master = self._master(master_id)
        try:
            return master.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _WRAP_AD + context)
        except (InvalidTag, ValueError):
            raise IntegrityError(
                f"a key wrapped by master key {master_id} fails authentication"
            ) from None

    # --- rollback anchor -------------------------------------------------------------------

    def read_anchor(self) -> int:
        path = self.directory / ANCHOR_FILE
        values = self._read_anchor_slots(read_file(path, "rollback anchor", TokenStateError))
        if all(v is None for v in values):
            raise TokenStateError(f"rollback anchor {path} fails authentication")
        return max(v for v in values if v is not None)

    def _read_anchor_slots(self, blob: bytes) -> list[int | None]:
        aead = self._need_anchor()
        values: list[int | None] = []
        for offset in ANCHOR_SLOTS:
            record = blob[offset : offset + _ANCHOR_RECORD]
            try:
                plain = aead.decrypt(record[:_NONCE], record[_NONCE:], _ANCHOR_AD)
                values.append(struct.unpack(">Q", plain)[0])
            except (InvalidTag, ValueError, struct.error):
                values.append(None)
        self._anchor_values = values
        return values

    def advance_anchor(self, counter: int) -> None:
        """Rewrite, in place, the slot not holding the highest value (never the one a torn
        write would leave the anchor without)."""
        aead = self._need_anchor()
        path = self.directory / ANCHOR_FILE
        if self._anchor_fd is None:
            created = not path.exists()
            self._anchor_fd = open_in_place(path)
            if created:  # both slots' bytes exist from the start: no size change later
                write_in_place(self._anchor_fd, bytes(ANCHOR_SLOTS[-1] + _ANCHOR_RECORD), 0)
                self._anchor_values = [None, None]
        if self._anchor_values is None:
            self._read_anchor_slots(os.pread(self._anchor_fd, ANCHOR_SLOTS[-1] + _ANCHOR_RECORD, 0))
        values = self._anchor_values
        assert values is not None
        if any(v is not None and v >= counter for v in values):
            return
        slot = min(range(len(values)), key=lambda i: -1 if values[i] is None else values[i])
        nonce = os.urandom(_NONCE)
        record = nonce + aead.encrypt(nonce, struct.pack(">Q", counter), _ANCHOR_AD)
        values[slot] = None  # until the write is known durable
        write_in_place(self._anchor_fd, record, ANCHOR_SLOTS[slot])
        values[slot] = counter

    def _need_anchor(self) -> AESGCM:
        self._need_open()
        assert self._anchor_aead is not None
        return self._anchor_aead
