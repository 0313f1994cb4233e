"""Run the KD studies through the daily pipeline's own functions.

Layout under ``<root>/<smoke|full>/<dataset>/``: ``data/`` holds the published examples;
``seed<s>/`` is one storage root per model seed (teachers have a fixed seed, so the
teachers and the labels of ``seed0`` are symlinked into the other seed roots instead of
being retrained); ``shared/<student>/`` are the roots of the shared-labels study, where a
student repeats its days with its own teacher inference.

One storage root holds every study of a seed, each study a group of students with its own
PipelineConfig (distinct model names; the teacher of the size study has its own name):

* ``main``  : teacher (size ``main_size``), the pipeline's default out-of-sample labels
  (lag 1: scored before the day's refresh) — aux, direct, aux_adapter, direct_adapter and
  ``baseline``, the control: same shape, no KD, its own tuned learning rate and batch;
* ``lag<k>``: same teacher, ``policies.label_lag_days = k`` (k = 0 is the named
  ``in_sample`` variant) — aux_lag<k>, direct_lag<k>;
* ``size<m>``: teacher_x<m>, lag 1 — aux_x<m>.

Teachers read every feature, privileged ones included; students read serving features
only, with a far smaller capacity (>= 10x fewer FLOPs per example than the main teacher).

Tuning budget: before any evaluated day, the control, the auxiliary and the direct student
each get the same grid of (learning rate, batch size), run on seed 0 over the warm-up days
(which are never evaluated); each keeps its best by progressive NE. Lag and size students
use their mode's choice. So a gain cannot come from a weak control.

Every model warm-starts from a bootstrap on the days before the daily window (students
with their own distillation config, from the bootstrap teacher's predictions). The daily
window is ``max(lags)`` warm-up days followed by the evaluated days; only the evaluated
days enter the comparisons.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcore import pipeline
from kdcore.config import PipelineConfig
from kdcore.data import examples
from kdcore.errors import LineageError
from kdcore.evaluation.metrics import task_metrics
from kdcore.flow import graph
from kdcore.flow.stage import Run
from kdcore.labels import materialize as mat
from kdcore.labels.join import load_joined
from kdcore.labels.store import labels_uri
from kdcore.models import registry
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part
from kdcore.training import steps
from kdcore.training.data import load_days

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
SPECS = {"movielens": REPO / "configs" / "movielens.yaml", "synth": REPO / "configs" / "synth.yaml"}
ADAPTER = {"enabled": True, "hidden": 0, "epochs": 50, "lr": 0.05}
CONTROL = "baseline"  # the tuned control; reported as "control"
DISTILL: dict[str, dict[str, Any]] = {
    "aux": {"mode": "auxiliary", "auxiliary": {"loss_weight": 1.0, "soft_label_scale": 1.0}},
    "direct": {"mode": "direct", "direct": {"soft_weight": 0.5, "temperature": 1.0}},
    "aux_adapter": {"mode": "auxiliary", "adapter": ADAPTER},
    "direct_adapter": {"mode": "direct", "direct": {"soft_weight": 0.5, "temperature": 1.0}, "adapter": ADAPTER},
}
METRICS = ("auc", "ne", "gauc")


@dataclass
class Settings:
    smoke: bool = False
    seeds: int = 5
    synth_seeds: int = 3
    days: int = 60
    synth_days: int = 30
    root: str = "var/experiments"
    out: str = "docs"
    main_lag: int = 1  # the pipeline's default: out-of-sample labels
    lags: tuple[int, ...] = (0, 1, 3, 7)
    sizes: tuple[int, ...] = (1, 2, 4, 8)
    main_size: int = 4
    student_embedding: int = 8
    student_hidden: tuple[int, ...] = (32, 16)
    student_buckets: int = 1024  # serving-constrained: small tables
    teacher_embedding: int = 8  # times the size multiplier
    teacher_hidden: tuple[int, ...] = (32, 16)  # times the size multiplier
    teacher_buckets: int = 4096
    teacher_epochs: int = 1  # chosen on days before the evaluated window (see docs/results.md)
    teacher_lr: float = 0.001
    teacher_batch: int = 64
    boot_epochs: int = 2
    # the tuning grid each of control, aux and direct gets (same budget for every one)
    tune_lrs: tuple[float, ...] = (0.003, 0.01)
    tune_batches: tuple[int, ...] = (64, 256)
    synth_tune_batches: tuple[int, ...] = (256, 1024)
    synth_teacher_batch: int = 256
    ml_boot_days: int | None = None  # None: every MovieLens day before the daily window
    synth_boot_days: int = 7
    synth_rows: int = 100_000
    synth_users: int = 20_000
    synth_items: int = 5_000
    synth_shift_after: int = 15  # evaluated synth days before the sudden shift
    shared_students: tuple[str, ...] = ("aux", "direct", "aux_adapter")
    datasets: tuple[str, ...] = ("movielens", "synth")
    size_datasets: tuple[str, ...] = ("movielens",)  # the size study on synth would exceed the time budget
    synth_modes: tuple[str, ...] = ("aux", "direct")  # adapters on MovieLens only (time budget)
    ml_tune_days: int = 30  # MovieLens tuning window, just before the daily window (7 warm-up days are too noisy)
    command: str = ""

    @classmethod
    def make(cls, smoke: bool = False, seeds: int | None = None, days: int | None = None,
             root: str = "var/experiments", out: str = "docs", command: str = "") -> Settings:
        if smoke:
            return cls(smoke=True, seeds=seeds or 2, synth_seeds=seeds or 2, days=days or 4, synth_days=days or 4,
                       root=root, out=out, lags=(0, 1, 2), size_datasets=("movielens", "synth"),
                       student_embedding=2, student_hidden=(4,), student_buckets=64, teacher_embedding=2,
                       teacher_hidden=(4,), teacher_buckets=128, teacher_epochs=1, boot_epochs=1,
                       tune_lrs=(0.01,), tune_batches=(64, 256), synth_tune_batches=(64, 256),
                       ml_boot_days=6, ml_tune_days=3, synth_boot_days=3, synth_rows=300, synth_users=300,
                       synth_items=150, synth_shift_after=2, synth_modes=tuple(DISTILL), command=command)
        return cls(seeds=seeds or 5, days=days or 60, root=root, out=out, command=command)

    @property
    def warmup(self) -> int:
        return max(self.lags)

    def seeds_for(self, dataset: str) -> int:
        return self.synth_seeds if dataset == "synth" else self.seeds

    def days_for(self, dataset: str) -> int:
        return self.synth_days if dataset == "synth" else self.days

    def grid(self, dataset: str) -> list[tuple[float, int]]:
        batches = self.synth_tune_batches if dataset == "synth" else self.tune_batches
        return [(lr, b) for lr in self.tune_lrs for b in batches]

    def student_model(self, seed: int, lr: float = 0.003, batch_size: int = 256) -> dict[str, Any]:
        return {"embedding_dim": self.student_embedding, "hidden": list(self.student_hidden),
                "hash_buckets": self.student_buckets, "lr": lr, "batch_size": batch_size, "epochs": 1,
                "seed": seed}

    def teacher_model(self, size: int, dataset: str = "movielens") -> dict[str, Any]:
        return {"embedding_dim": self.teacher_embedding * size, "hidden": [h * size for h in self.teacher_hidden],
                "hash_buckets": self.teacher_buckets, "lr": self.teacher_lr,
                "batch_size": self.synth_teacher_batch if dataset == "synth" else self.teacher_batch,
                "epochs": self.teacher_epochs, "seed": 0}

    def teacher_name(self, size: int) -> str:
        return "teacher" if size == self.main_size else f"teacher_x{size}"


@dataclass
class Dataset:
    name: str
    data_root: str
    boot_through: dt.date
    boot_days: int
    daily: list[dt.date]
    eval: list[dt.date]
    shift: dt.date | None = None
    info: dict[str, Any] = field(default_factory=dict)
    tune: list[dt.date] = field(default_factory=list)  # tuning days before the daily window (none: warm-up)


@dataclass
class Group:
    key: str
    size: int
    lag: int
    students: list[str]


def sizes_for(st: Settings, dataset: str) -> tuple[int, ...]:
    return st.sizes if dataset in st.size_datasets else (st.main_size,)


def groups(st: Settings, dataset: str = "movielens") -> list[Group]:
    modes = list(DISTILL) if dataset != "synth" else list(st.synth_modes)
    out = [Group("main", st.main_size, st.main_lag, [*modes, CONTROL])]
    out += [Group(f"lag{k}", st.main_size, k, [f"aux_lag{k}", f"direct_lag{k}"]) for k in st.lags if k != st.main_lag]
    out += [Group(f"size{m}", m, st.main_lag, [f"aux_x{m}"]) for m in sizes_for(st, dataset) if m != st.main_size]
    return out


def kind_of(name: str) -> str:
    """The tuned kind a model takes its learning rate and batch from."""
    if name == CONTROL:
        return CONTROL
    return "aux" if distill_of(name)["mode"] == "auxiliary" else "direct"


def distill_of(name: str) -> dict[str, Any]:
    if name == CONTROL:
        return {"mode": "none"}
    return DISTILL[name.split("_lag")[0].split("_x")[0]]


def make_cfg(st: Settings, ds: Dataset, root: str, g: Group, seed: int, students: list[str] | None = None,
             tuned: dict[str, dict[str, Any]] | None = None) -> PipelineConfig:
    names = students or g.students
    tuned = tuned or {}

    def model(n: str) -> dict[str, Any]:
        return st.student_model(seed, **tuned.get(kind_of(n), {}))

    cfg = PipelineConfig.model_validate({
        "dataset": str(SPECS[ds.name]), "storage_root": str(Path(root).resolve()),
        "teacher": {"name": st.teacher_name(g.size), "model": st.teacher_model(g.size, ds.name)},
        "students": [{"name": n, "model": model(n), "distill": distill_of(n)} for n in names],
        "policies": {"max_label_staleness_days": 100_000, "label_lag_days": g.lag, "missing_labels": "error",
                     "labels": "in_sample" if g.lag == 0 else "out_of_sample"},
        "labels": {"shards": 1, "batch_rows": 65_536},
        "bootstrap": {"days": ds.boot_days, "epochs": st.boot_epochs},
        "torch_threads": 1,  # 2 threads on the shared 2-core machine are ~10x slower (contention)
    })
    return cfg.resolved()


# --- data -------------------------------------------------------------------------------

def _link(target: str | Path, link: str | Path) -> None:
    link = Path(link)
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(Path(target).resolve(), link)


def prepare_movielens(st: Settings, base: Path) -> Dataset:
    from kdcore.data import movielens
    from kdcore.data.spec import load_spec

    spec = load_spec(SPECS["movielens"])
    data_root = str(base / "data")
    have = set(examples.list_days(data_root, spec.name))
    if len(have) < 213:
        ratings, users, items, src = movielens.load_raw(movielens.fetch_widedeep_copy())
        table = movielens.build_examples(ratings, users, items, src).select(spec.required_columns)
        by_day = examples.split_by_date(table, spec.timestamp)
        all_days = sorted(by_day)
        need = st.days_for("movielens") + st.warmup + (st.ml_boot_days or len(all_days))
        for d in all_days[-need:]:
            if d not in have:
                examples.publish_day(data_root, spec, d, [by_day[d]], {"source": "movielens-100k"})
    days = examples.list_days(data_root, spec.name)
    ev = days[-st.days_for("movielens"):]
    daily = days[-(st.days_for("movielens") + st.warmup):]
    before = days[:len(days) - len(daily)]
    boot_days = st.ml_boot_days or len(before)
    if len(before) < boot_days or not before:
        raise ValueError(f"movielens: {len(before)} days before the daily window, need {boot_days}")
    tune = before[-st.ml_tune_days:] if st.ml_tune_days and len(before) > st.ml_tune_days + 1 else []
    return Dataset("movielens", data_root, before[-1], boot_days, daily, ev, tune=tune,
                   info={"rows_per_day": round(float(np.mean([part.read_manifest(examples.examples_uri(
                       data_root, spec.name, d)).rows or 0 for d in ev])), 1)})


def prepare_synth(st: Settings, base: Path) -> Dataset:
    from kdcore.data import synth

    spec = synth.dataset_spec()
    start = dt.date(2026, 1, 1)
    total = st.synth_boot_days + st.warmup + st.days_for("synth")
    days = [start + dt.timedelta(days=i) for i in range(total)]
    ev = days[-st.days_for("synth"):]
    shift = ev[min(st.synth_shift_after, len(ev) - 1)]
    cfg = synth.SynthConfig(seed=0, rows_per_day=st.synth_rows, n_users=st.synth_users, n_items=st.synth_items,
                            new_items_per_day=max(st.synth_items // 100, 1), start_date=start, shift_date=shift)
    data_root = str(base / "data")
    have = set(examples.list_days(data_root, spec.name))
    for d in days:
        if d not in have:
            examples.publish_day(data_root, spec, d, synth.generate_day(cfg, d),
                                 {"source": "synth", "synth": cfg.model_dump(mode="json")})
    daily = days[st.synth_boot_days:]
    return Dataset("synth", data_root, days[st.synth_boot_days - 1], st.synth_boot_days, daily, ev, shift,
                   info={"rows_per_day": st.synth_rows, "synth": cfg.model_dump(mode="json")})


# --- running ----------------------------------------------------------------------------

class Timings:
    """Teacher inference seconds per label set, persisted so a resumed run keeps them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def add(self, key: str, seconds: float) -> None:
        self.data[key] = seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=0, sort_keys=True))


def label_teacher(cfg: PipelineConfig, day: dt.date) -> str:
    """The teacher version that labels ``day``: the pipeline's choice (newest through
    ``day - label_lag_days``), or, on warm-up days where no daily teacher is that old yet,
    a pin to the oldest (bootstrap) teacher."""
    try:
        return mat.choose_teacher(cfg, day).version
    except LineageError:
        first = min(registry.list_checkpoints(cfg.root, cfg.spec.name, cfg.teacher.name))
        return registry.find_checkpoint(cfg.root, cfg.spec.name, cfg.teacher.name, first).version


def ensure_labels(cfg: PipelineConfig, day: dt.date, timings: Timings) -> str:
    """Materialize the labels the config's students read for ``day`` unless committed."""
    version = label_teacher(cfg, day)
    uri = labels_uri(cfg.root, cfg.spec.name, day, version)
    if not part.is_published(uri):
        t0 = time.perf_counter()
        mat.materialize(cfg, day, version)
        timings.add(f"{cfg.root}|{day}|{version}", time.perf_counter() - t0)
    return uri


def seed_root(base: Path, seed: int) -> Path:
    return base / f"seed{seed}"


def setup_root(st: Settings, ds: Dataset, base: Path, seed: int) -> Path:
    root = seed_root(base, seed)
    _link(Path(ds.data_root) / "examples" / ds.name, root / "examples" / ds.name)
    if seed:
        link_teachers(st, ds, base, root)
    return root


def link_teachers(st: Settings, ds: Dataset, base: Path, root: Path) -> None:
    """Teachers and labels are seed-independent: other roots read seed 0's via symlinks."""
    r0 = seed_root(base, 0)
    _link(Path(ds.data_root) / "examples" / ds.name, root / "examples" / ds.name)
    for m in sizes_for(st, ds.name):
        _link(r0 / "models" / ds.name / st.teacher_name(m), root / "models" / ds.name / st.teacher_name(m))
    _link(r0 / "labels" / ds.name, root / "labels" / ds.name)


def run_teachers(st: Settings, ds: Dataset, base: Path, timings: Timings, progress: bool = True,
                 main_only: bool = False) -> None:
    """Bootstrap and refresh every teacher over the daily window and materialize the
    labels of every study, in seed 0's root, before any student trains."""
    root = setup_root(st, ds, base, 0)
    gs = groups(st, ds.name)[:1] if main_only else groups(st, ds.name)
    cfgs = {g.key: make_cfg(st, ds, str(root), g, 0) for g in gs}
    teacher_cfgs = {g.size: cfgs[g.key] for g in gs if g.lag == st.main_lag}
    for cfg in teacher_cfgs.values():
        steps.bootstrap(cfg, ds.boot_through, names=[])
    it = ds.daily
    if progress:
        from tqdm import tqdm
        it = tqdm(ds.daily, desc=f"{ds.name} teachers", unit="day")
    for day in it:
        for cfg in teacher_cfgs.values():
            pipeline.refresh_teacher(cfg, day)
        for g in gs:
            ensure_labels(cfgs[g.key], day, timings)


def _served(meta: dict[str, Any], task: str, metric: str) -> float | None:
    m = ((meta.get("progressive") or {}).get("metrics") or {}).get(task) or {}
    return m.get(metric) if m.get(metric) is not None and np.isfinite(m[metric]) else None


def tune(st: Settings, ds: Dataset, base: Path, progress: bool = True) -> dict[str, Any]:
    """The same (learning rate, batch size) grid for the control, the auxiliary and the
    direct student, on seed 0 over the warm-up days (never evaluated); each kind keeps the
    point with the best mean progressive NE. Persisted, so a resumed run does not retune."""
    path = base / "tuning.json"
    if path.exists():
        return json.loads(path.read_text())
    main = groups(st, ds.name)[0]
    tbase = base
    tune_days = ds.daily[:st.warmup] if st.warmup else ds.daily[:1]
    if ds.tune:  # a window of its own before the daily one, with its own teacher run
        tbase = base / "tune" / "window"
        tds = Dataset(ds.name, ds.data_root, ds.tune[0] - dt.timedelta(days=1), ds.boot_days, ds.tune, ds.tune)
        link = tbase / "seed0" / "examples" / ds.name
        _link(Path(ds.data_root) / "examples" / ds.name, link)
        run_teachers(st, tds, tbase, Timings(tbase / "timings.json"), progress, main_only=True)
        tune_days = ds.tune
    out: dict[str, Any] = {"days": [d.isoformat() for d in tune_days], "models": {}}
    for kind in (CONTROL, "aux", "direct"):
        grid = []
        for lr, batch in st.grid(ds.name):
            root = base / "tune" / f"{kind}_lr{lr}_b{batch}"
            link_teachers(st, ds, tbase, root)
            cfg = make_cfg(st, ds, str(root), main, 0, students=[kind],
                           tuned={kind: {"lr": lr, "batch_size": batch}})
            task = _binary_task(cfg)
            steps.bootstrap(cfg, tune_days[0] - dt.timedelta(days=1) if ds.tune else ds.boot_through, names=[kind])
            nes, aucs = [], []
            for day in tune_days:
                res = _train_day(cfg, day, [kind])[kind]
                meta = registry.find_checkpoint(cfg.root, ds.name, kind, day).meta
                assert res["version"] == meta["version"]
                nes.append(_served(meta, task, "ne"))
                aucs.append(_served(meta, task, "auc"))
            ok = [x for x in nes if x is not None]
            ok_auc = [x for x in aucs if x is not None]
            grid.append({"lr": lr, "batch_size": batch, "ne": float(np.mean(ok)) if ok else None,
                         "auc": float(np.mean(ok_auc)) if ok_auc else None})
            if progress:
                log.info("tune %s %s lr=%s batch=%s: NE %s", ds.name, kind, lr, batch, grid[-1]["ne"])
        best = min((g for g in grid if g["ne"] is not None), key=lambda g: g["ne"])
        out["models"][kind] = {"chosen": {"lr": best["lr"], "batch_size": best["batch_size"]}, "grid": grid}
    path.write_text(json.dumps(out, indent=1, sort_keys=True))
    return out


def chosen(tuning: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v["chosen"] for k, v in tuning["models"].items()}


def run_seed(st: Settings, ds: Dataset, base: Path, seed: int, timings: Timings, tuning: dict[str, Any],
             progress: bool = True) -> None:
    root = setup_root(st, ds, base, seed)
    gs = groups(st, ds.name)
    cfgs = {g.key: make_cfg(st, ds, str(root), g, seed, tuned=chosen(tuning)) for g in gs}
    for g in gs:
        steps.bootstrap(cfgs[g.key], ds.boot_through, names=g.students)
    it = ds.daily
    if progress:
        from tqdm import tqdm
        it = tqdm(ds.daily, desc=f"{ds.name} seed {seed}", unit="day")
    for day in it:
        for g in gs:
            _train_day(cfgs[g.key], day, g.students)


def _train_day(cfg: PipelineConfig, day: dt.date, students: list[str]) -> dict[str, Any]:
    """The pipeline's own walk of ``day`` for ``students`` only (no gate: the study
    distils every day), from the labels of the study's teacher (:func:`label_teacher`)."""
    run = Run(cfg, day, frozenset({"students"}), tuple(students), label_teacher(cfg, day))
    return graph.walk_day(run)["students"]


def run_shared_labels(st: Settings, ds: Dataset, base: Path, timings: Timings, tuning: dict[str, Any]) -> dict[str, Any]:
    """Study 4: each shared student repeats the evaluated days in its own root with its own
    teacher inference; its checkpoints must equal those trained from the shared label set."""
    r0 = seed_root(base, 0)
    main = groups(st, ds.name)[0]
    tname = st.teacher_name(st.main_size)
    out: dict[str, Any] = {"students": list(st.shared_students), "days": len(ds.eval), "per_student": {}}
    shared_s = [timings.data.get(f"{make_cfg(st, ds, str(r0), main, 0).root}|{d}|"
                                 f"{label_teacher(make_cfg(st, ds, str(r0), main, 0), d)}")
                for d in ds.eval]
    for name in st.shared_students:
        root = base / "shared" / name
        _link(Path(ds.data_root) / "examples" / ds.name, root / "examples" / ds.name)
        _link(r0 / "models" / ds.name / tname, root / "models" / ds.name / tname)
        cfg = make_cfg(st, ds, str(root), main, 0, students=[name], tuned=chosen(tuning))
        src = registry.latest_before(str(r0), ds.name, name, ds.eval[0])
        assert src is not None
        dst = Path(sfs.local_path(registry.checkpoint_uri(cfg.root, ds.name, name, src)))
        if not dst.exists():
            shutil.copytree(sfs.local_path(registry.checkpoint_uri(str(r0), ds.name, name, src)), dst)
        same, inf = 0, []
        for day in ds.eval:
            uri = ensure_labels(cfg, day, timings)
            inf.append(timings.data.get(f"{cfg.root}|{day}|{label_teacher(cfg, day)}"))
            res = pipeline.train_students(cfg, day, uri, "distill", [name])[name]
            ref = registry.find_checkpoint(str(r0), ds.name, name, day)
            mine = registry.find_checkpoint(cfg.root, ds.name, name, day)
            same += int(res["version"] == ref.version and part.read_blob(mine.uri, registry.WEIGHTS)
                        == part.read_blob(ref.uri, registry.WEIGHTS))
        out["per_student"][name] = {"identical_days": same, "inference_seconds": _sum(inf)}
    out["identical"] = all(v["identical_days"] == len(ds.eval) for v in out["per_student"].values())
    out["shared_inference_seconds"] = _sum(shared_s)
    indep = [v["inference_seconds"] for v in out["per_student"].values()]
    out["independent_inference_seconds"] = _sum(indep)
    n = len(st.shared_students)
    per = out["independent_inference_seconds"] / n if out["independent_inference_seconds"] is not None else None
    out["saved_seconds"] = per * (n - 1) if per is not None else None
    return out


def _sum(xs: list[float | None]) -> float | None:
    return float(sum(xs)) if xs and all(x is not None for x in xs) else None


# --- collecting -------------------------------------------------------------------------

def _binary_task(cfg: PipelineConfig) -> str:
    return next(t.name for t in cfg.spec.tasks if t.kind == "binary")


def _pick(m: dict[str, float] | None) -> dict[str, float | None]:
    m = m or {}
    return {k: (float(m[k]) if m.get(k) is not None and np.isfinite(m[k]) else None) for k in METRICS}


def collect(st: Settings, ds: Dataset, base: Path, timings: Timings, tuning: dict[str, Any]) -> dict[str, Any]:
    gs = groups(st, ds.name)
    r0 = seed_root(base, 0)
    cfg0 = make_cfg(st, ds, str(r0), gs[0], 0, tuned=chosen(tuning))
    task = _binary_task(cfg0)
    students: dict[str, dict[str, dict[str, Any]]] = {}
    shares: dict[str, dict[str, list[float]]] = {}
    for seed in range(st.seeds_for(ds.name)):
        root = str(seed_root(base, seed))
        for name in [n for g in gs for n in g.students]:
            key = "control" if name == CONTROL else name
            per = students.setdefault(key, {}).setdefault(str(seed), {})
            for day in ds.eval:
                meta = registry.find_checkpoint(root, ds.name, name, day).meta
                per[day.isoformat()] = _pick(((meta.get("progressive") or {}).get("metrics") or {}).get(task))
                for t, v in ((meta.get("train") or {}).get("loss_share") or {}).items():
                    shares.setdefault(key, {}).setdefault(t, []).append(v)
    teachers: dict[str, Any] = {}
    for m in sizes_for(st, ds.name):
        name = st.teacher_name(m)
        ckpts = [registry.find_checkpoint(str(r0), ds.name, name, d) for d in ds.eval]
        boot = registry.find_checkpoint(str(r0), ds.name, name, ds.boot_through)
        cfg = make_cfg(st, ds, str(r0), next(g for g in gs if g.size == m and g.lag == st.main_lag), 0,
                       tuned=chosen(tuning))
        inf = [timings.data.get(f"{cfg.root}|{d}|{label_teacher(cfg, d)}") for d in ds.eval]
        teachers[str(m)] = {
            "name": name, "params": ckpts[-1].meta["params"], "flops_per_example": ckpts[-1].meta["flops_per_example"],
            "train_seconds_per_day": float(np.mean([c.meta["train_seconds"] for c in ckpts])),
            "bootstrap_seconds": boot.meta["train_seconds"],
            "inference_seconds_per_day": float(np.mean(inf)) if all(x is not None for x in inf) else None,
            "metrics": {d.isoformat(): _pick(c.meta["progressive"]["metrics"][task]) for d, c in zip(ds.eval, ckpts)},
        }
    student_ck = registry.find_checkpoint(str(r0), ds.name, CONTROL, ds.eval[-1]).meta
    models: dict[str, Any] = {}
    for name in [*[st.teacher_name(m) for m in sizes_for(st, ds.name)], CONTROL, *gs[0].students]:
        meta = registry.find_checkpoint(str(r0), ds.name, name, ds.eval[-1]).meta
        models["control" if name == CONTROL else name] = {
            "role": "control" if name == CONTROL else meta["role"], "params": meta.get("serving_params", meta["params"]),
            "flops_per_example": meta.get("serving_flops_per_example", meta["flops_per_example"]),
            "train_params": meta["params"], "features": meta.get("features"),
            "lr": meta["model"]["lr"], "batch_size": meta["model"]["batch_size"]}
    for t in [st.teacher_name(m) for m in sizes_for(st, ds.name)]:
        meta = registry.find_checkpoint(str(r0), ds.name, t, ds.eval[-1]).meta
        for k, v in ((meta.get("train") or {}).get("loss_share") or {}).items():
            shares.setdefault(t, {}).setdefault(k, []).append(v)
    labels: dict[str, Any] = {}
    for g in gs:
        if g.size != st.main_size:
            continue
        cfg = make_cfg(st, ds, str(r0), g, 0, tuned=chosen(tuning))
        per: dict[str, Any] = {}
        for day in ds.eval:
            teacher = registry.find_version(cfg.root, ds.name, cfg.teacher.name, label_teacher(cfg, day))
            data = load_days(cfg.root, cfg.spec, [day])
            joined = load_joined(labels_uri(cfg.root, ds.name, day, teacher.version), data.example_ids, cfg.spec, day)
            m = task_metrics("binary", data.hard[task], joined.soft[task], data.groups)
            per[day.isoformat()] = {**_pick(m), "staleness": (day - teacher.trained_through).days}
        labels[str(g.lag)] = per
    return {"dataset": ds.name, "task": task, "eval": [d.isoformat() for d in ds.eval],
            "shift": ds.shift.isoformat() if ds.shift else None, "boot_through": ds.boot_through.isoformat(),
            "boot_days": ds.boot_days, "daily_from": ds.daily[0].isoformat(), "info": ds.info,
            "student_params": student_ck["params"], "student_flops": student_ck["flops_per_example"],
            "students": students, "teachers": teachers, "labels": labels, "models": models,
            "loss_share": {m: {t: float(np.nanmean(v)) for t, v in per.items()} for m, per in shares.items()},
            "tuning": {("control" if k == CONTROL else k): v for k, v in tuning["models"].items()},
            "tuning_days": tuning["days"], "seeds": st.seeds_for(ds.name)}


def run_experiments(st: Settings, progress: bool = True, only: tuple[str, ...] | None = None,
                    report_only: bool = False) -> dict[str, Any]:
    """Run every study on the datasets (``only`` restricts which run now; the others are
    read from their saved results), then write ``<out>/results.md`` and plots. Datasets
    run in separate processes can so share one report: run each with ``only``, then
    once with ``report_only``."""
    from kdcore.experiments.report import WALL, write_report

    start = time.perf_counter()
    mode = "smoke" if st.smoke else "full"
    results: dict[str, Any] = {"settings": {k: (list(v) if isinstance(v, tuple) else v)
                                            for k, v in st.__dict__.items()}, "datasets": {}}
    walls = []
    for name in st.datasets:
        base = Path(st.root).resolve() / mode / name
        saved = base / "results.json"
        if report_only or (only is not None and name not in only):
            if saved.exists():
                res = json.loads(saved.read_text())
                results["datasets"][name] = res
                walls.append(res.get("wall_seconds", 0.0))
            continue
        t0 = time.perf_counter()
        ds = prepare_movielens(st, base) if name == "movielens" else prepare_synth(st, base)
        timings = Timings(base / "timings.json")
        run_teachers(st, ds, base, timings, progress)
        tuning = tune(st, ds, base, progress)
        for seed in range(st.seeds_for(name)):
            run_seed(st, ds, base, seed, timings, tuning, progress)
        res = collect(st, ds, base, timings, tuning)
        if name == "movielens":
            res["shared"] = run_shared_labels(st, ds, base, timings, tuning)
        res["wall_seconds"] = time.perf_counter() - t0
        walls.append(res["wall_seconds"])
        saved.write_text(json.dumps(res, indent=1, sort_keys=True))
        results["datasets"][name] = res
    if not results["datasets"]:
        raise ValueError(f"no experiment results under {Path(st.root).resolve() / mode}: run the datasets first")
    results["wall_seconds"] = time.perf_counter() - start
    out_json = Path(st.root).resolve() / mode / "results.json"
    out_json.write_text(json.dumps(results, indent=1, sort_keys=True))
    results["report"] = write_report(results, st.out)
    total = sum(walls) if report_only or only else time.perf_counter() - start
    md = Path(results["report"]["path"])
    md.write_text(md.read_text().replace(WALL, f"{total:.0f} s ({total / 60:.1f} min)"))
    results["wall_seconds_total"] = total
    return results
