"""`python -m plugshare.token --home DIR`: the token process (see service.py)."""

import sys

from plugshare.token.service import main

sys.exit(main())
