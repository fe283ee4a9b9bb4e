"""`plugshare file put/get/ls` against a real node (issue 13): a 100 MB file goes up and
comes back equal, streamed: neither the command nor the node ever holds it whole."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from tests.node.cluster import cluster  # noqa: F401 (fixture)

MB = 1024 * 1024

# Runs the command line and then reports its own peak memory (VmHWM: of this program only;
# getrusage would also count the parent's memory, inherited through vfork and exec).
_MEASURED = """
import atexit, runpy, sys
def report():
    with open("/proc/self/status") as status:
        peak = next(l.split()[1] for l in status if l.startswith("VmHWM:"))
    sys.stderr.write(f"\\nVmHWM {peak}\\n")
atexit.register(report)
sys.argv = ["plugshare", *sys.argv[1:]]
runpy.run_module("plugshare", run_name="__main__")
"""


def _peak_rss_mb(pid: int | str) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _measured_cli(node, *args: str) -> tuple[dict, float]:
    """(the --json answer, the command's peak memory in MB)."""
    done = subprocess.run([sys.executable, "-c", _MEASURED, "--home", str(node.home),
                           "--json", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    peak = int(done.stderr.rsplit("VmHWM ", 1)[1].split()[0]) / 1024
    return json.loads(done.stdout), peak


def _md5_of(path) -> str:
    md5 = hashlib.md5()
    with path.open("rb") as source:
        while piece := source.read(MB):
            md5.update(piece)
    return md5.hexdigest()


def test_a_100_mb_file_goes_up_and_back_streamed(cluster, tmp_path):
    alice = cluster.add("alice")
    source = tmp_path / "video.mp4"
    with source.open("wb") as out:
        for _ in range(100):
            out.write(os.urandom(MB))
    digest = _md5_of(source)

    put, put_mb = _measured_cli(alice, "file", "put", str(source), "--doctype", "io.videos",
                                "--id", "v1")
    assert put["id"] == "v1" and put["length"] == 100 * MB
    assert put["content_type"] == "video/mp4" and put["name"] == "video.mp4"
    listing = alice.cli_json("file", "ls", "v1")
    assert [a["name"] for a in listing["attachments"]] == ["video.mp4"]
    assert listing["attachments"][0]["length"] == 100 * MB

    back = tmp_path / "back.mp4"
    got, get_mb = _measured_cli(alice, "file", "get", "v1", "video.mp4", "-o", str(back))
    assert got["path"] == str(back)
    assert _md5_of(back) == digest
    assert not (tmp_path / "back.mp4.part").exists()

    # a second file on the same doc, named and typed by the caller
    note = tmp_path / "n.txt"
    note.write_text("hello")
    alice.cli_json("file", "put", str(note), "--doctype", "io.videos", "--id", "v1",
                   "--name", "readme", "--type", "text/markdown")
    names = {a["name"]: a for a in alice.cli_json("file", "ls", "v1")["attachments"]}
    assert sorted(names) == ["readme", "video.mp4"]
    assert names["readme"]["content_type"] == "text/markdown"

    # memory: neither the commands nor the node held the file whole (100 MB)
    node_mb = _peak_rss_mb(alice.pid)
    print(f"peak RSS: put {put_mb:.0f} MB, get {get_mb:.0f} MB, node {node_mb:.0f} MB")
    assert put_mb < 90 and get_mb < 90, (put_mb, get_mb)
    assert node_mb < 140, node_mb

    missing = alice.cli("--json", "file", "get", "v1", "nothing", "-o", str(tmp_path / "x"))
    assert missing.returncode != 0 and json.loads(missing.stdout)["error"] == "not_found"
    assert not (tmp_path / "x").exists()


def test_share_create_takes_the_attachment_caps(cluster, tmp_path):
    alice = cluster.add("alice")
    alice.cli_json("share", "create", "pics", "--doctype", "io.photos",
                   "--max-file-size", "1000", "--file-type", "image/*")
    big = tmp_path / "big.png"
    big.write_bytes(b"b" * 2000)
    done = alice.cli("--json", "file", "put", str(big), "--doctype", "io.photos")
    assert done.returncode != 0 and json.loads(done.stdout)["error"] == "too_large"
    text = tmp_path / "a.txt"
    text.write_text("words")
    done = alice.cli("--json", "file", "put", str(text), "--doctype", "io.photos")
    assert done.returncode != 0 and "text/plain" in json.loads(done.stdout)["reason"]
    small = tmp_path / "small.png"
    small.write_bytes(b"s" * 500)
    assert alice.cli_json("file", "put", str(small), "--doctype", "io.photos")["length"] == 500
