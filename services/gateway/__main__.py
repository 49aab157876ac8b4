"""`python -m services.gateway ARGS…` is `slotmesh gateway ARGS…` without the rest of the
command line, whose benchmark commands import torch where it is installed (8 s of a
gateway's start on a loaded machine, 1 s without): what `slotmesh up` starts."""

import argparse
import logging
import sys

from services.gateway.command import DESCRIPTION, add_gateway_flags
from worker.vocab.errors import SlotmeshError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway",
                                     description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_gateway_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SlotmeshError as e:
        print(f"slotmesh gateway: error: {e}", file=sys.stderr)
        return 2


sys.exit(main())
