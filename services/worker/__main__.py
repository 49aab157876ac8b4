"""`python -m services.worker ARGS…` is `slotmesh worker ARGS…`."""

import sys

from services.cli.main import main

sys.exit(main(["worker", *sys.argv[1:]]))
