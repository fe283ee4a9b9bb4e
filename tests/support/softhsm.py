"""A real SoftHSM2 device token for the tests (made by .ci/softhsm.sh in a temp dir)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pkcs11

from plugshare.token.pkcs11_keystore import DEFAULT_MODULE

REPO = Path(__file__).resolve().parents[2]
HSM_TOKEN_LABEL = "plugshare-test"
HSM_PIN = "1234"
PIN_ENV = "PLUGSHARE_TEST_HSM_PIN"


def make_softhsm(directory: Path) -> Path:
    """Create the token in `directory`, point this process (and its children) at it, and
    return the path of its softhsm2.conf."""
    out = subprocess.run(
        [str(REPO / ".ci" / "softhsm.sh"), str(directory)],
        check=True, capture_output=True, text=True,
    ).stdout
    conf = out.strip().splitlines()[-1].split("=", 1)[1]
    os.environ["SOFTHSM2_CONF"] = conf
    os.environ[PIN_ENV] = HSM_PIN
    lib = pkcs11.lib(DEFAULT_MODULE)
    if not list(lib.get_tokens(token_label=HSM_TOKEN_LABEL)):
        lib.reinitialize()  # the module was loaded earlier with another configuration
    return Path(conf)
