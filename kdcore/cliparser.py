"""How ``kd``'s sub-commands are declared and turned into one argparse parser.

A module of its own below both ends: the sub-commands (``kdcore.commands``) register
through :func:`command` and :func:`arg`, and the command line (``kdcore.cli``) builds
the parser from what registered, so neither imports the other in a circle."""

from __future__ import annotations

import argparse
from collections.abc import Callable

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


def build_parser(description: str) -> argparse.ArgumentParser:
    """``kd``'s parser over every registered sub-command (groups made from their paths)."""
    parser = argparse.ArgumentParser(prog="kd", description=description)
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
