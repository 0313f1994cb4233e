"""The ``kd`` command line: every daily step of the pipeline, runnable without Airflow.

Each sub-command is a thin shell over a library function; errors raised on purpose
(KDError) are printed as one actionable line and exit with status 2.

A transient fault (``kdcore.errors.is_transient``: storage said try again, or another
writer committed first) runs the whole command again, up to ``$KD_RETRIES`` times
(default 2: three attempts, waiting 1 s, then 2 s, doubling), each retry one line on
stderr. Re-running a command is safe because every step is idempotent (docs/integrity.md):
what the failed attempt published is reused, what it did not is redone. A fault that
persists ends like any other: its one line, exit 2. Nothing else is ever retried."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import kdcore.commands  # noqa: F401  (registers the sub-commands)
from kdcore.cliparser import build_parser
from kdcore.errors import KDError, SpecError, is_transient


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    try:
        retries = retries_from_env()
    except KDError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        return 2
    attempt = 0
    while True:
        try:
            return int(args.handler(args) or 0)
        except (KDError, OSError) as e:
            if is_transient(e) and attempt < retries:
                attempt += 1
                delay = RETRY_DELAY_S * 2 ** (attempt - 1)
                print(f"kd: retry {attempt}/{retries} in {delay:g} s after a transient fault: {_line(e)}",
                      file=sys.stderr, flush=True)
                time.sleep(delay)
                continue
            print(f"kd: error: {_line(e)}", file=sys.stderr)
            return 2


RETRY_DELAY_S = 1.0
DEFAULT_RETRIES = 2


def retries_from_env() -> int:
    """``$KD_RETRIES``: how many times a transient fault re-runs the command (0: never)."""
    raw = os.environ.get("KD_RETRIES", "").strip()
    if not raw:
        return DEFAULT_RETRIES
    if not (raw.isascii() and raw.isdigit()):
        raise SpecError(f"KD_RETRIES must be a whole number of retries (0 or more), got {raw!r}")
    return int(raw)


def _line(e: KDError | OSError) -> str:
    """The one line an error prints as: a KDError's message; an OSError (the last line of
    defence) names its file."""
    if isinstance(e, KDError):
        return str(e)
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


if __name__ == "__main__":
    sys.exit(main())
