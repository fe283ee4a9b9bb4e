"""Token benchmark (a script, not a test): python bench/token.py [--quick]

Measures, on one core:
  - decisions/s with 100 rules (goal >= 200k/s), with the audit append, and the pure match;
  - the envelope cost per 1 KB document against raw AES-GCM on the same bytes (goal <= 2x);
  - sealed mode (the token decrypts) against release mode (the caller decrypts);
  - PKCS#11 unwraps/s on SoftHSM2, and the cost of one flush per request on each keystore;
  - the token in its own process, as the node uses it: one round trip over its Unix socket
    (goal p50 <= 100 us), a read decided and audited, and one 500-doc replication batch.
"""

from __future__ import annotations

import os.path
import sys

# This file is named like the standard library's `token` module; drop its directory from the
# import path before anything imports `token` (tokenize, inspect...) and finds this script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import binascii  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import msgpack  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plugshare.token.inside import OWNER, Pkcs11Keystore, SoftKeystore, Token, open_doc  # noqa: E402
from plugshare.token.pkcs11_keystore import DEFAULT_MODULE  # noqa: E402


def rate(fn: Callable[[], object], n: int) -> float:
    """Calls per second of `fn`, best of 3 runs of `n` calls."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def per_call_us(fn: Callable[[], object], n: int) -> float:
    return 1e6 / rate(fn, n)


def build_token(directory: Path) -> tuple[Token, object]:
    token, _ = Token.create(directory / "state", SoftKeystore(directory / "ks", None), name="bench")
    app = token.authenticate(token.add_app("bench-app", "doctype-0", "read", roles=["family"]))
    # 100 rules: 20 doctypes x (app, role, peers...), half of them with selectors
    for i in range(99):
        doctype = f"doctype-{i % 20}"
        selector = {"author": {"$in": ["alice", "bob"]}, "year": {"$gte": 2000}} if i % 2 else None
        if i % 3 == 0:
            token.add_rule(doctype, "app", "bench-app", "write", selector)
        elif i % 3 == 1:
            token.add_rule(doctype, "role", "family", "read", selector)
        else:
            token.add_rule(doctype, "peer", bytes([i]) * 32, "read", selector)
    assert len(token.list_rules()) == 100
    token.flush()
    return token, app


def bench_decisions(directory: Path, n: int) -> list[tuple[str, str]]:
    token, app = build_token(directory)
    allowed_doc = {"_id": "d1", "doctype": "doctype-7", "author": "bob", "year": 2020}
    denied_doc = {"_id": "d2", "doctype": "doctype-7", "author": "eve", "year": 2020}
    assert token.decide(app, "read", allowed_doc).allowed
    assert not token.decide(app, "write", denied_doc).allowed
    rows = []
    rows.append(("decide(), allowed, with audit append",
                 f"{rate(lambda: token.decide(app, 'read', allowed_doc), n):,.0f} /s"))
    token.flush()
    rows.append(("decide(), denied after selectors, with audit",
                 f"{rate(lambda: token.decide(app, 'write', denied_doc), n):,.0f} /s"))
    token.flush()
    subjects = token._subjects[("app", "bench-app")]
    rules = token._rules
    rows.append(("rule match only (no audit)",
                 f"{rate(lambda: rules.match(subjects, 1, 'doctype-7', allowed_doc), n):,.0f} /s"))
    start = time.perf_counter()
    for _ in range(n):
        token.decide(app, "read", allowed_doc)
    token.flush()
    total = time.perf_counter() - start
    rows.append((f"{n:,} decisions + one flush sealing their audit", f"{n / total:,.0f} /s"))
    token.close()
    return rows


def bench_envelope(directory: Path, n: int) -> list[tuple[str, str]]:
    token, _ = Token.create(directory / "state", SoftKeystore(directory / "ks", None), name="e")
    token.mark_sensitive("notes")
    doc = {"_id": "note-1", "doctype": "notes", "author": "alice",
           "title": "a note", "text": "x" * 1000, "tags": ["a", "b"], "n": 42}
    body = {k: v for k, v in doc.items() if k not in ("_id", "doctype", "author")}
    plaintext = msgpack.packb(body, use_bin_type=True)
    assert 1000 <= len(plaintext) < 1100, len(plaintext)
    sealed = {**token.encrypt_doc(doc, generation=1), "_rev": "1-" + "ab" * 16}
    key = token.release_doc_key(sealed, OWNER)
    raw = AESGCM(os.urandom(32))
    nonce, aad = os.urandom(12), os.urandom(60)
    raw_ct = raw.encrypt(nonce, plaintext, aad)

    raw_b64 = binascii.b2a_base64(raw_ct, newline=False).decode("ascii")

    raw_enc = per_call_us(lambda: raw.encrypt(nonce, plaintext, aad), n)
    raw_dec = per_call_us(lambda: raw.decrypt(nonce, raw_ct, aad), n)
    # the floor of any ciphertext kept in a JSON document: AES-GCM plus base64
    floor_enc = per_call_us(
        lambda: binascii.b2a_base64(raw.encrypt(nonce, plaintext, aad), newline=False), n)
    floor_dec = per_call_us(lambda: raw.decrypt(nonce, binascii.a2b_base64(raw_b64), aad), n)
    env_enc = per_call_us(lambda: token.encrypt_doc(doc, generation=1), n)
    release = per_call_us(lambda: open_doc(sealed, key), n)
    release_full = per_call_us(
        lambda: open_doc(sealed, token.release_doc_key(sealed, OWNER)), n)
    sealed_mode = per_call_us(lambda: token.decrypt_doc(sealed, OWNER), n)
    token.close()

    def vs(value: float, raw_value: float, floor: float) -> str:
        return f"{value:.2f} us  ({value / raw_value:.1f}x raw, {value / floor:.1f}x raw+base64)"

    return [
        ("raw AESGCM encrypt, 1 KB", f"{raw_enc:.2f} us"),
        ("raw AESGCM encrypt + base64", f"{floor_enc:.2f} us"),
        ("encrypt_doc, 1 KB doc", vs(env_enc, raw_enc, floor_enc)),
        ("raw AESGCM decrypt, 1 KB", f"{raw_dec:.2f} us"),
        ("base64 decode + raw AESGCM decrypt", f"{floor_dec:.2f} us"),
        ("release mode: open_doc with a cached key", vs(release, raw_dec, floor_dec)),
        ("release mode: release_doc_key + open_doc", vs(release_full, raw_dec, floor_dec)),
        ("sealed mode: decrypt_doc (decide + open)", vs(sealed_mode, raw_dec, floor_dec)),
    ]


def bench_flush(token: Token, n: int) -> float:
    """Milliseconds per flush with one new decision (the per-request cost)."""
    start = time.perf_counter()
    for i in range(n):
        token.decide(OWNER, "read", {"doctype": "notes", "_id": str(i)})
        token.flush()
    return (time.perf_counter() - start) / n * 1e3


def bench_pkcs11(directory: Path, n: int) -> list[tuple[str, str]]:
    out = subprocess.run([str(REPO / ".ci" / "softhsm.sh"), str(directory / "hsm")],
                         check=True, capture_output=True, text=True).stdout
    os.environ["SOFTHSM2_CONF"] = out.strip().splitlines()[-1].split("=", 1)[1]
    os.environ["PLUGSHARE_BENCH_PIN"] = "1234"
    ks = Pkcs11Keystore(DEFAULT_MODULE, "plugshare-test", "env:PLUGSHARE_BENCH_PIN", "bench")
    ks.create()
    key, ctx = os.urandom(32), b"plugshare/data-key/v1\x00bench"
    wrapped = ks.wrap(1, key, ctx)
    unwraps = rate(lambda: ks.unwrap(1, wrapped, ctx), n)
    wraps = rate(lambda: ks.wrap(1, key, ctx), n)
    ks.destroy()
    token, _ = Token.create(
        directory / "p11-state",
        Pkcs11Keystore(DEFAULT_MODULE, "plugshare-test", "env:PLUGSHARE_BENCH_PIN", "bench-t"),
        name="p",
    )
    flush_p11 = bench_flush(token, 50)
    token.close()
    soft, _ = Token.create(directory / "soft-state", SoftKeystore(directory / "soft-ks", None),
                           name="s")
    flush_soft = bench_flush(soft, 50)
    soft.close()
    return [
        ("PKCS#11 unwrap (AES-GCM in SoftHSM2)", f"{unwraps:,.0f} /s"),
        ("PKCS#11 wrap (AES-GCM in SoftHSM2)", f"{wraps:,.0f} /s"),
        ("flush after 1 decision, soft keystore", f"{flush_soft:.2f} ms"),
        ("flush after 1 decision, PKCS#11 keystore", f"{flush_p11:.2f} ms"),
    ]


def bench_process(directory: Path, n: int) -> list[tuple[str, str]]:
    """The real token process of a real home, through the client the node uses."""
    import statistics

    import trio

    from plugshare.config import Config, NodeSection
    from plugshare.node.home import Home
    from plugshare.token.client import TokenClient
    from plugshare.token.paths import socket_path
    from plugshare.token.supervisor import TokenProcess

    home = Home(directory)
    home.create(Config(node=NodeSection(name="bench")))
    owner = home.owner_credential()
    rows: list[tuple[str, str]] = []

    async def timed(call, count: int) -> tuple[float, float]:
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - started) * 1e6)
        samples.sort()
        return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]

    async def run() -> None:
        path = socket_path(directory)
        async with TokenProcess(["--home", str(directory)], path).run():
            async with TokenClient.open(path) as client:
                peer = b"\x01" * 32
                p50, p99 = await timed(lambda: client.call("info"), n)
                rows.append(("round trip (info), p50 / p99", f"{p50:.0f} / {p99:.0f} us"))
                doc = {"_id": "d1", "_rev": "1-" + "a" * 32, "doctype": "io.notes",
                       "body": "x" * 1000}
                p50, p99 = await timed(lambda: client.call("doc.read", credential=owner, doc=doc),
                                       max(n // 10, 50))
                rows.append(("doc.read 1 KB (decided, audit flushed), p50 / p99",
                             f"{p50:.0f} / {p99:.0f} us"))
                batch = [{**doc, "_id": f"d{i}", "_revisions": {"start": 1, "ids": ["a" * 32]}}
                         for i in range(500)]
                p50, _ = await timed(lambda: client.call("share.outgoing", share="none",
                                                         peer=peer, docs=batch), 20)
                rows.append(("share.outgoing, 500 docs of 1 KB, refused share, p50",
                             f"{p50 / 1000:.2f} ms ({p50 / 500:.1f} us/doc)"))

    trio.run(run)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    with tempfile.TemporaryDirectory(prefix="plugshare-bench-") as tmp:
        tmp_path = Path(tmp)
        sections = [
            ("decisions (100 rules, one core)", bench_decisions(tmp_path / "d", 200_000 // scale)),
            ("envelope, 1 KB document", bench_envelope(tmp_path / "e", 50_000 // scale)),
            ("keystores", bench_pkcs11(tmp_path / "p", 5_000 // scale)),
            ("the token process (Unix socket)", bench_process(tmp_path / "h", 10_000 // scale)),
        ]
    width = max(len(label) for _, rows in sections for label, _ in rows)
    for title, rows in sections:
        print(f"\n{title}")
        print("-" * (width + 30))
        for label, value in rows:
            print(f"  {label:<{width}}  {value}")


if __name__ == "__main__":
    main()
