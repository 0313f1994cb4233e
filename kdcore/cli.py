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

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kdcore.errors import KDError, SpecError, is_transient

Handler = Callable[[argparse.Namespace], int | None]
_COMMANDS: list[tuple[tuple[str, ...], str, Callable[[argparse.ArgumentParser], None], Handler]] = []


def command(*path: str, help: str):
    """Register a sub-command: ``@command("data", "movielens", help=...)``."""
    def deco(fn):
        def add_args(p: argparse.ArgumentParser) -> None:
            for args, kwargs in getattr(fn, "_args", []):
                p.add_argument(*args, **kwargs)
        _COMMANDS.append((path, help, add_args, fn))
        return fn
    return deco


def arg(*args, **kwargs):
    def deco(fn):
        fn._args = [(args, kwargs), *getattr(fn, "_args", [])]
        return fn
    return deco


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd", description=__doc__.splitlines()[0])
    subs: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="cmd", required=True)}
    groups: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for path, help_text, add_args, fn in _COMMANDS:
        for i in range(1, len(path)):
            prefix = path[:i]
            if prefix not in groups:
                groups[prefix] = subs[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                subs[prefix] = groups[prefix].add_subparsers(dest="sub_" + "_".join(prefix), required=True)
        p = subs[path[:-1]].add_parser(path[-1], help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(handler=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import kdcore.commands  # noqa: F401  (registers the sub-commands)

    args = build_parser().parse_args(argv)
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


def default_root() -> str:
    return str(Path("var") / "kd")


if __name__ == "__main__":
    # `python -m kdcore.cli`: sub-commands register on the imported module, not on __main__
    from kdcore.cli import main as _main

    sys.exit(_main())
