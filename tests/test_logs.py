"""The task logs a person reads: training says what it trains and how the loss went,
students say whether they distilled (and from what) or why not, labels say what each
shard scored, and the quality gate's log is its decision and check table, not Great
Expectations' registration noise."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdcore.labels import materialize as mat
from kdcore.models import registry
from kdcore.models.checkpoint import model_to_bytes
from kdcore.training import loop, steps
from kdcore.training.data import load_days
from kdcore.training.loop import NO_KD, fit, model_features, new_model
from tests.pipeline_fixtures import KD, kd, kd_base  # noqa: F401  (fixtures)

DS = "movielens"
REPO = Path(__file__).resolve().parents[1]
NUM = r"([0-9.eE+-]+|nan)"


@pytest.fixture
def records():
    """Every record reaching the root logger, whatever logging setup the session has (Airflow's
    keeps records from caplog): a handler on the root, root and kdcore at DEBUG for the test."""
    got: list[logging.LogRecord] = []
    handler = logging.Handler(logging.NOTSET)
    handler.emit = got.append  # type: ignore[method-assign]
    root, kdl = logging.getLogger(), logging.getLogger("kdcore")
    old = root.level, kdl.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    kdl.setLevel(logging.DEBUG)
    try:
        yield got
    finally:
        root.removeHandler(handler)
        root.setLevel(old[0])
        kdl.setLevel(old[1])


def _lines(recs: list[logging.LogRecord], logger: str, needle: str) -> list[str]:
    return [r.getMessage() for r in recs if r.name == logger and needle in r.getMessage()]


def _one(recs: list[logging.LogRecord], logger: str, needle: str) -> str:
    found = _lines(recs, logger, needle)
    assert len(found) == 1, (needle, found, [r.getMessage() for r in recs])
    return found[0]


def _epoch_loss(line: str) -> dict[str, float]:
    """'... loss 0.98 (hard/like 0.58, soft/like 0.6, hard/rating 0.79; share ...)' -> parts."""
    m = re.search(r"loss " + NUM + r"(?: \(([^;)]*))?", line)
    assert m, line
    out = {"total": float(m.group(1))}
    for part in (m.group(2) or "").split(", "):
        if part:
            k, v = part.rsplit(" ", 1)
            out[k] = float(v)
    return out


def _ckpt(k: KD, name: str, day) -> registry.Checkpoint:
    return registry.find_checkpoint(k.cfg.root, DS, name, day)


# ---------------------------------------------------------------- training


def test_teacher_step_logs_start_epochs_and_publish_with_the_trained_numbers(kd: KD, records):
    cfg, B, D = kd.cfg, kd.B, kd.day(1)
    parent = _ckpt(kd, "teacher", B)
    out = steps.teacher_step(cfg, D)
    ckpt = _ckpt(kd, "teacher", D)
    rows = len(load_days(cfg.root, cfg.spec, [D]))
    m = cfg.teacher.model
    tag = f"teacher {D}"

    start = _one(records, "kdcore.training.steps", f"{tag}: training teacher (teacher)")
    assert f" on {rows} rows;" in start
    assert f"warm start from {parent.version} (lifetime steps {parent.steps})" in start
    assert f"{m.epochs} epoch(s), batch {m.batch_size}, lr {m.lr:g}" in start

    epochs = _lines(records, "kdcore.training.loop", f"{tag} epoch ")
    assert len(epochs) == m.epochs, epochs  # a line per epoch, not per step
    train = ckpt.meta["train"]
    logged = _epoch_loss(epochs[-1])
    assert logged["total"] == pytest.approx(train["loss/total"], rel=1e-5)
    for task in ("like", "rating"):
        assert logged[f"hard/{task}"] == pytest.approx(train[f"loss/hard/{task}"], rel=1e-3)
    assert not any(k.startswith("soft/") for k in logged)  # the teacher distils from nobody
    assert f"; {rows} rows in {train['steps_last_epoch']} steps," in epochs[-1]
    assert f"lifetime steps {train['steps_total']}" in epochs[-1]

    done = _one(records, "kdcore.training.steps", f"{tag}: published ")
    assert f"published {out['version']} (parent {parent.version})" in done
    assert f"{train['steps_total'] - parent.steps} steps today, lifetime steps {train['steps_total']}" in done
    assert f"rows seen {ckpt.meta['rows_seen']}" in done
    prog = _one(records, "kdcore.training.steps", f"{tag}: progressive")
    assert f"auc {ckpt.meta['progressive']['metrics']['like']['auc']:.4g}" in prog

    # Re-running the day is a no-op and says so.
    records.clear()
    steps.teacher_step(cfg, D)
    assert _one(records, "kdcore.training.steps", "reused, nothing trained").startswith(f"teacher {D}: {out['version']}")
    assert not _lines(records, "kdcore.training.loop", "epoch")


def test_epoch_and_progress_lines_change_no_number_trained(kd: KD, records, monkeypatch):
    """A line per epoch with that epoch's mean loss; progress lines inside the epoch when it
    runs long (forced here); the weights are the same bytes whether the loop logs or not."""
    cfg, D = kd.cfg, kd.day(1)
    data = load_days(cfg.root, cfg.spec, [D])
    m = cfg.teacher.model

    def train(level: int) -> tuple[bytes, dict]:
        logging.getLogger("kdcore.training.loop").setLevel(level)
        model = new_model(m, cfg.spec, [], data, seed=7)
        out = fit(model, model_features(model, data), data.hard, None, NO_KD, seed=7, epochs=3, tag="probe")
        return model_to_bytes(model), out

    monkeypatch.setattr(loop, "PROGRESS_SECONDS", 0.0)  # every step "takes too long"
    try:
        quiet_bytes, quiet = train(logging.CRITICAL)
        assert not _lines(records, "kdcore.training.loop", "probe")
        loud_bytes, loud = train(logging.DEBUG)
    finally:
        logging.getLogger("kdcore.training.loop").setLevel(logging.NOTSET)
    assert loud_bytes == quiet_bytes and loud == quiet

    epochs = _lines(records, "kdcore.training.loop", "probe epoch ")
    ends = [line for line in epochs if ": loss " in line]
    progress = [line for line in epochs if ": step " in line]
    assert [line.split(":")[0] for line in ends] == [f"probe epoch {e}/3" for e in (1, 2, 3)]
    assert _epoch_loss(ends[-1])["total"] == pytest.approx(loud["loss/total"], rel=1e-5)
    per_epoch = loud["steps_last_epoch"]
    assert len(progress) == 3 * (per_epoch - 1)  # not after the last step: the epoch line says it
    assert f"step 1/{per_epoch}, {m.batch_size} rows," in progress[0]


# ---------------------------------------------------------------- students: KD mode, labels


def test_student_steps_say_how_they_used_the_teacher(kd: KD, records):
    cfg, D = kd.cfg, kd.day(1)
    lab = mat.materialize(cfg, D)
    rows = len(load_days(cfg.root, cfg.spec, [D]))
    teacher = lab["teacher_version"]

    shards = _lines(records, "kdcore.labels.materialize", f"labels {D} shard ")
    assert len(shards) == cfg.labels.shards
    shard_rows = [int(re.search(r"shard \d+/\d+: (\d+) rows", s).group(1)) for s in shards]
    assert sum(shard_rows) == rows == lab["rows"]
    assert all(f"scored by teacher {teacher} " in s and "rows/s" in s for s in shards)
    commit = _one(records, "kdcore.labels.materialize", f"labels {D}: committed")
    assert f"committed {rows} rows across {cfg.labels.shards} shard(s) from teacher {teacher} " \
           f"(staleness {lab['staleness_days']} day(s))" in commit

    served = ", ".join(cfg.spec.served_tasks)
    for name in ("student_aux", "student_direct", "control"):
        steps.student_step(cfg, name, D, lab["uri"])
    aux = _one(records, "kdcore.training.steps", f"student_aux {D}: distilling")
    assert aux == (f"student_aux {D}: distilling (auxiliary heads, tasks [{served}]) from teacher {teacher} labels "
                   f"(staleness 1 day); labels joined {rows} rows, missing 0")
    direct = _one(records, "kdcore.training.steps", f"student_direct {D}: distilling")
    assert direct.startswith(f"student_direct {D}: distilling (direct on the serving heads, tasks [{served}]) "
                             f"from teacher {teacher} labels")
    assert _one(records, "kdcore.training.steps", f"control {D}: control") == f"control {D}: control: no teacher (control)"

    # the KD-mode line agrees with what was trained: soft parts in the loss only when distilling
    for name, distilled in (("student_aux", True), ("student_direct", True), ("control", False)):
        line = _one(records, "kdcore.training.loop", f"{name} {D} epoch 1/")
        logged = _epoch_loss(line)
        ckpt = _ckpt(kd, name, D)
        assert ckpt.meta["kd_applied"] is distilled
        assert logged["total"] == pytest.approx(ckpt.meta["train"]["loss/total"], rel=1e-5)
        assert (f"soft/{cfg.spec.served_tasks[0]}" in logged) is distilled, line
        assert f"on {rows} rows;" in _one(records, "kdcore.training.steps", f"{name} {D}: training {name}")

    records.clear()
    steps.student_step(cfg, "student_aux", D, lab["uri"], action="hard_labels_only")
    assert _one(records, "kdcore.training.steps", f"student_aux {D}: hard labels only") == (
        f"student_aux {D}: hard labels only: gate said hard_labels_only (distill mode 'auxiliary' not applied)")
    assert not _lines(records, "kdcore.training.steps", "distilling")
    assert not any(k.startswith("soft/") for k in _epoch_loss(_one(records, "kdcore.training.loop", "epoch 1/")))

    records.clear()
    out = steps.student_step(cfg, "student_direct", D, lab["uri"], action="skip_students")
    assert out["skipped"]
    assert [r.getMessage() for r in records if r.name.startswith("kdcore")] == [
        f"student_direct {D}: skipped: gate said skip_students (nothing trained or published)"]


# ---------------------------------------------------------------- the quality gate


def test_gate_log_is_the_decision_and_check_table_not_gx_noise(kd: KD, records):
    from kdcore.quality.daily import run_gate

    cfg, D = kd.cfg, kd.day(1)
    lab = mat.materialize(cfg, D)
    gx_logger = logging.getLogger("great_expectations")
    old = gx_logger.level
    gx_logger.setLevel(logging.DEBUG)  # someone asked GX for everything: the gate still keeps it out
    records.clear()
    try:
        out = run_gate(cfg, D, lab["uri"])
        assert gx_logger.level == logging.DEBUG  # restored after validate_day
    finally:
        gx_logger.setLevel(old)

    gx = [f"{r.name} {r.levelname}: {r.getMessage()[:120]}" for r in records
          if r.name.startswith("great_expectations") and r.levelno < logging.WARNING]
    assert gx == []
    shown = [r for r in records if r.levelno >= logging.INFO]
    assert len(shown) < 30, [f"{r.name}: {r.getMessage()[:100]}" for r in shown]

    summary = _one(records, "kdcore.quality.daily", f"{D}: Gate ")
    assert out["summary"] in summary
    table = _one(records, "kdcore.quality.daily", f"{D}: gate checks")
    assert f"teacher {out['teacher_version']}" in table
    rows = table.splitlines()[2:]
    assert len(rows) == len(out["checks"])
    for row, (name, check) in zip(rows, out["checks"].items(), strict=True):
        cells = row.split()
        assert cells[0] == name and cells[1] == check["status"].upper(), row
        value = check["value"]
        assert cells[2] == ("n/a" if value is None else f"{value:.4g}"), row


def test_importing_the_expectations_module_logs_no_gx_registration():
    """A fresh interpreter, logging at INFO like an Airflow task: importing GX through
    kdcore logs nothing; importing GX bare (the control) logs its registration lines."""
    code = """
import logging, sys
n = []
class H(logging.Handler):
    def emit(self, r):
        n.append(r.name)
logging.root.addHandler(H()); logging.root.setLevel(logging.INFO)
logging.captureWarnings(True)
if sys.argv[1] == "kdcore":
    import kdcore.quality.expectations
    assert logging.getLogger("great_expectations").level == logging.NOTSET  # restored
else:
    import great_expectations
print(sum(1 for x in n if x.startswith(("great_expectations", "py.warnings"))))
"""
    counts = {}
    for how in ("kdcore", "bare"):
        proc = subprocess.run([sys.executable, "-c", code, how], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={"GX_ANALYTICS_ENABLED": "false", "PATH": "/usr/bin:/bin",
                                                "HOME": str(Path.home()), "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[how] = int(io.StringIO(proc.stdout).read().split()[-1])
    assert counts["kdcore"] == 0, counts
    assert counts["bare"] > 100, counts  # the noise the test guards against is real
