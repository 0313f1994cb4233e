"""The ``kd`` command line: every daily step of the pipeline, runnable without Airflow.

Each sub-command is a thin shell over a library function; errors raised on purpose
(KDError) are printed as one actionable line and exit with status 2."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import kdcore.commands  # noqa: F401  (registers the sub-commands)
from kdcore.cliparser import build_parser
from kdcore.errors import KDError


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KDError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the last line of defence: still one line naming the file
        where = f"{e.filename}: " if e.filename else ""
        print(f"kd: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
