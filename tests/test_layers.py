"""The layering holds: the import contracts in pyproject.toml (import-linter), checked on the
real package, e.g. no part of the node reaches the token's inside or the node that wires it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RUN = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml'))")


def test_the_import_contracts_are_kept():
    # In a child process: import-linter reads the package's imports from the source tree.
    done = subprocess.run([sys.executable, "-c", _RUN], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
