"""The ``kd`` command line: every daily step of the pipeline, runnable without Airflow.

Each sub-command is a thin shell over a library function; errors raised on purpose
(KDError) are printed as one actionable line and exit with status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kdcore.errors import KDError

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
        return int(args.handler(args) or 0)
    except KDError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the last line of defence: still one line naming the file
        where = f"{e.filename}: " if e.filename else ""
        print(f"kd: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def default_root() -> str:
    return str(Path("var") / "kd")


if __name__ == "__main__":
    # `python -m kdcore.cli`: sub-commands register on the imported module, not on __main__
    from kdcore.cli import main as _main

    sys.exit(_main())
