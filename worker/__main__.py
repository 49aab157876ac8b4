"""`python -m worker ARGS…` is `slotmesh worker ARGS…`."""

import sys

from services.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
