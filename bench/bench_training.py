"""Benchmark (not a test): training at the compute bound, and the memory of a streamed day.

Publishes a synthetic day (`kdcore.data.synth`, default 1,000,000 rows) to a local root
and prints one line per figure, each a ratio of two things measured in the same run
(medians of --repeats, alternated so both see the same machine load), torch on 1 thread:

- student rows/s through the real `fit` (features pre-encoded) and through the daily
  step's streamed path (`open_day` + `fit_day`: read, encode and train window by window)
  vs a bare forward+backward+step loop on pre-built tensors (goal: >= 80%);
- teacher step ms with Adam for_loop / foreach / fused, and sparse (nn.Embedding(sparse=True)
  + SparseAdam on the tables, fused Adam on the rest: lazy moments, other numbers), at the
  teacher's batch and at 512;
- peak RSS (VmHWM of a fresh subprocess) of a student's day step at --rows and at
  --rows/4, streamed in --rss-window rows vs held whole, and the bytes per extra row.

Model shapes are configs/demo.yaml's teacher and student (batch 64, as configured).
Run: .venv/bin/python bench/bench_training.py [--rows N] [--repeats R] [--window W] [--steps S]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from kdcore.data import examples, synth
from kdcore.models.features import FeatureSet
from kdcore.models.inference import set_determinism
from kdcore.models.ranker import MultiTaskRanker, RankerConfig, make_optimizer
from kdcore.sysinfo import peak_rss_mb
from kdcore.training.data import DayStream, load_days, open_day
from kdcore.training.loop import NO_KD, fit, fit_day, model_features, new_model

DAY = dt.date(2026, 1, 1)
SMALL_DAY = dt.date(2026, 1, 2)
TEACHER = {"embedding_dim": 32, "hidden": [128, 64], "hash_buckets": 4096, "lr": 0.001, "batch_size": 64}
STUDENT = {"embedding_dim": 8, "hidden": [32, 16], "hash_buckets": 1024, "lr": 0.003, "batch_size": 64}


def _student_cfg(window: int) -> RankerConfig:
    spec = synth.dataset_spec()
    return RankerConfig.model_validate({**STUDENT, "features": spec.serving_features, "shuffle_window_rows": window})


def _bare_loop(model: MultiTaskRanker, cat: torch.Tensor, num: torch.Tensor, y: dict[str, torch.Tensor],
               batch: int) -> float:
    """Seconds for one pass of forward + loss + backward + step over pre-built, pre-shuffled
    tensors: what training costs with no data handling at all."""
    opt = make_optimizer(model)
    model.train()
    t0 = time.perf_counter()
    for s in range(0, len(cat), batch):
        out = model(cat[s:s + batch], num[s:s + batch])
        loss = F.binary_cross_entropy_with_logits(out.serving["click"], y["click"][s:s + batch]) + \
            0.5 * F.mse_loss(out.serving["watch_time"], y["watch_time"][s:s + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def student_throughput(root: str, rows: int, repeats: int, window: int) -> None:
    spec = synth.dataset_spec()
    cfg = _student_cfg(window)
    whole = load_days(root, spec, [DAY])
    base = new_model(cfg, spec, [], whole, seed=0)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    feats = model_features(base, whole)
    hard = whole.hard
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    cat, num = torch.from_numpy(feats.cat)[perm], torch.from_numpy(feats.num)[perm]
    y = {"click": torch.from_numpy(hard["click"])[perm],
         "watch_time": torch.from_numpy(base.to_model_space("watch_time", hard["watch_time"]))[perm]}

    def fresh() -> MultiTaskRanker:
        m = MultiTaskRanker(cfg, base.n_cat, base.n_num, base.tasks)
        m.load_state_dict(state)
        return m

    times: dict[str, list[float]] = {"bare": [], "fit": [], "stream": []}
    for _ in range(repeats):
        times["bare"].append(_bare_loop(fresh(), cat, num, y, cfg.batch_size))
        t0 = time.perf_counter()
        fit(fresh(), feats, hard, None, NO_KD, seed=0)
        times["fit"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        data = open_day(root, spec, DAY, window)
        fit_day(fresh(), data, None, NO_KD, seed=0)
        times["stream"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    streamed = "streamed" if rows > window else "whole (day <= window)"
    print(f"student rows/s, fit vs bare loop:          {rows / med['fit']:9,.0f} vs {rows / med['bare']:9,.0f}  "
          f"= {med['bare'] / med['fit']:.2f}  (batch {cfg.batch_size}, medians of {repeats})", flush=True)
    print(f"student rows/s, day step ({streamed}) vs bare: {rows / med['stream']:9,.0f} vs "
          f"{rows / med['bare']:9,.0f}  = {med['bare'] / med['stream']:.2f}  (read+encode included, window {window})",
          flush=True)


def _teacher_opts(model: MultiTaskRanker, impl: str) -> list[torch.optim.Optimizer]:
    if impl != "sparse":
        return [torch.optim.Adam(model.parameters(), lr=model.config.lr,
                                 **({"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}))]
    model.embedding.sparse = True
    rest = [p for n, p in model.named_parameters() if n != "embedding.weight"]
    return [torch.optim.SparseAdam([model.embedding.weight], lr=model.config.lr),
            torch.optim.Adam(rest, lr=model.config.lr, fused=True)]


def teacher_steps(root: str, repeats: int, n_steps: int) -> None:
    spec = synth.dataset_spec()
    whole = load_days(root, spec, [DAY])
    impls = ["for_loop", "foreach", "fused", "sparse"]
    for batch in (TEACHER["batch_size"], 512):
        cfg = RankerConfig.model_validate({**TEACHER, "batch_size": batch})
        cols = FeatureSet.of(spec)
        feats = whole.features(cfg.hash_buckets, cols)
        n = min(len(feats), (n_steps + 20) * batch)
        cat, num = torch.from_numpy(feats.cat[:n]), torch.from_numpy(feats.num[:n])
        y = torch.from_numpy(whole.hard["click"][:n])
        per: dict[str, list[float]] = {i: [] for i in impls}
        for _ in range(repeats):
            for impl in impls:
                model = MultiTaskRanker(cfg, len(cols.categorical), len(cols.numeric), list(spec.tasks))
                opts = _teacher_opts(model, impl)
                ts = []
                for s in range(0, n, batch):
                    t0 = time.perf_counter()
                    out = model(cat[s:s + batch], num[s:s + batch])
                    loss = F.binary_cross_entropy_with_logits(out.serving["click"], y[s:s + batch])
                    for o in opts:
                        o.zero_grad(set_to_none=True)
                    loss.backward()
                    for o in opts:
                        o.step()
                    ts.append(time.perf_counter() - t0)
                per[impl].append(statistics.median(ts[20:]) * 1e3)  # after warm-up
        med = {k: statistics.median(v) for k, v in per.items()}
        params = sum(p.numel() for p in model.parameters())
        print(f"teacher step ms, batch {batch:4d} ({params:,} params): " + "  ".join(
            f"{k} {v:.2f}" for k, v in med.items()) + "   vs for_loop: " + "  ".join(
            f"{k} {med['for_loop'] / v:.2f}x" for k, v in med.items() if k != "for_loop")
            + f"   rows/s fused {batch / med['fused'] * 1e3:,.0f}  (medians of {repeats})", flush=True)


def _child(root: str, day: str, window: int | None) -> None:
    """A fresh process: one student day step's data path (open, cold start, train), then
    print its peak RSS; ``day`` "baseline": imports only."""
    if window is None:
        print(json.dumps({"maxrss_mb": peak_rss_mb(), "streamed": False, "rows": 0}))
        return
    set_determinism(1)
    spec = synth.dataset_spec()
    data = open_day(root, spec, dt.date.fromisoformat(day), window)
    model = new_model(_student_cfg(window), spec, [], data, seed=0)
    fit_day(model, data, None, NO_KD, seed=0)
    print(json.dumps({"maxrss_mb": peak_rss_mb(), "streamed": isinstance(data, DayStream), "rows": len(data)}))


def peak_rss(root: str, rows: int, window: int) -> None:
    def run(*args: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", root, *args], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, big = rows // 4, rows
    base = run("baseline")["maxrss_mb"]
    res = {(d, mode): run(d.isoformat(), str(window if mode == "streamed" else rows + 1))
           for d in (SMALL_DAY, DAY) for mode in ("streamed", "whole")}
    assert all(r["streamed"] == (mode == "streamed") for (_, mode), r in res.items())
    s_small, s_big = res[(SMALL_DAY, "streamed")]["maxrss_mb"], res[(DAY, "streamed")]["maxrss_mb"]
    w_small, w_big = res[(SMALL_DAY, "whole")]["maxrss_mb"], res[(DAY, "whole")]["maxrss_mb"]
    print(f"student peak RSS at {big:,} rows: streamed (window {window:,}) {s_big:,.0f} MB vs whole {w_big:,.0f} MB "
          f"= {s_big / w_big:.2f}; above the {base:,.0f} MB of a process that only imports: "
          f"{s_big - base:,.0f} vs {w_big - base:,.0f} MB = {(s_big - base) / (w_big - base):.2f}", flush=True)
    print(f"student peak RSS {small:,} -> {big:,} rows: streamed {s_small:,.0f} -> {s_big:,.0f} MB "
          f"(+{(s_big - s_small) * 2**20 / (big - small):.0f} B/row), whole {w_small:,.0f} -> {w_big:,.0f} MB "
          f"(+{(w_big - w_small) * 2**20 / (big - small):.0f} B/row)", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--window", type=int, default=262_144, help="student shuffle_window_rows")
    ap.add_argument("--rss-window", type=int, default=65_536,
                    help="window of the streamed RSS runs: below --rows/4, so both day sizes stream")
    ap.add_argument("--steps", type=int, default=300, help="teacher steps timed per implementation and repeat")
    ap.add_argument("--only", choices=["student", "teacher", "rss"], action="append",
                    help="run only these figures (repeatable); default all")
    args = ap.parse_args()
    only = set(args.only or ["student", "teacher", "rss"])
    set_determinism(1)
    spec = synth.dataset_spec()
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as root:
        for day, rows in ((DAY, args.rows), (SMALL_DAY, args.rows // 4)):
            if day == SMALL_DAY and "rss" not in only:
                continue
            cfg = synth.SynthConfig(rows_per_day=rows, start_date=day)
            examples.publish_day(root, spec, day, synth.generate_day(cfg, day))
        print(f"{args.rows:,} rows ({Path(root).name}), torch {torch.__version__}, 1 thread", flush=True)
        if "student" in only:
            student_throughput(root, args.rows, args.repeats, args.window)
        if "teacher" in only:
            teacher_steps(root, args.repeats, args.steps)
        if "rss" in only:
            peak_rss(root, args.rows, args.rss_window)


if __name__ == "__main__":
    main()
