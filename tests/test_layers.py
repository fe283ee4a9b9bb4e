"""The layering holds: the import contracts in pyproject.toml (import-linter), checked on the
real package, e.g. no part of the node reaches the token's inside or the node that wires it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_are_kept():
    command = shutil.which("lint-imports") or None
    args = [command] if command else [sys.executable, "-m", "importlinter.cli"]
    done = subprocess.run(args + ["--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
