"""`python -m services.cli ARGS…` is `slotmesh ARGS…` (how the launchers start servers)."""

import sys

from services.cli.main import main

sys.exit(main())
