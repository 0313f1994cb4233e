"""docs/results.md from a synthetic results dict: the seed x day intervals, gap recovered,
per-seed signs and the models / tuning / loss-share tables, checked against direct calls
of the stats functions (no training: the runner is not involved)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from kdcore.evaluation.stats import fmt_ci, gap_recovered, paired_bootstrap, per_seed_signs
from kdcore.experiments.report import DISCUSSION, tuning_table, write_report

SEEDS, N_DAYS = 3, 10
DAYS = [f"2026-03-{i + 1:02d}" for i in range(N_DAYS)]
LAGS, MAIN_LAG, SIZES, MAIN_SIZE = [0, 1, 2], 1, [2, 4], 4
# true AUC offsets over the control; NE moves the other way (lower is better)
OFFSETS = {"control": 0.0, "aux": 0.010, "direct": 0.006, "aux_adapter": 0.009, "direct_adapter": 0.004,
           "aux_lag0": 0.012, "direct_lag0": 0.008, "aux_lag2": 0.007, "direct_lag2": 0.002, "aux_x2": 0.005}
GRID = [{"lr": lr, "batch_size": b, "ne": 0.9 + lr, "auc": 0.7 - lr} for lr in (0.003, 0.01) for b in (64, 256)]


def _series(rng: np.random.Generator, base: float) -> dict[str, dict[str, float]]:
    """A teacher's (or its labels') per-day metrics, ``base`` above the control's level."""
    return {d: {"auc": 0.70 + base + 0.002 * rng.standard_normal(), "ne": 0.90 - base + 0.002 * rng.standard_normal(),
                "gauc": None} for d in DAYS}


def make_results() -> dict:
    rng = np.random.default_rng(0)
    day_effect = 0.02 * rng.standard_normal(N_DAYS)
    students = {}
    for name, off in OFFSETS.items():
        students[name] = {}
        for s in range(SEEDS):
            seed_effect = 0.003 * rng.standard_normal()
            students[name][str(s)] = {
                d: {"auc": 0.70 + off + day_effect[i] + seed_effect + 0.001 * rng.standard_normal(),
                    "ne": 0.90 - off - day_effect[i] - seed_effect + 0.001 * rng.standard_normal(), "gauc": None}
                for i, d in enumerate(DAYS)}
    students["aux"]["1"][DAYS[3]]["auc"] = None  # an undefined cell
    teachers = {str(m): {"name": "teacher" if m == MAIN_SIZE else f"teacher_x{m}", "params": 1000 * m * m,
                         "flops_per_example": 2000 * m * m, "train_seconds_per_day": 0.5 * m, "bootstrap_seconds": 3.0,
                         "inference_seconds_per_day": 0.01 * m, "metrics": _series(rng, 0.02 + 0.005 * m)}
                for m in SIZES}
    labels = {str(k): {d: {**_series(rng, 0.03)[d], "staleness": max(k, 0)} for d in DAYS} for k in LAGS}
    models = {"teacher": {"role": "teacher", "params": 16000, "flops_per_example": 32000, "features": ["user", "item", "hist"]},
              "teacher_x2": {"role": "teacher", "params": 4000, "flops_per_example": 8000, "features": ["user", "item"]},
              "control": {"role": "control", "params": 500, "flops_per_example": 800, "features": ["user", "item"]},
              "aux": {"role": "student", "params": 520, "flops_per_example": 820, "features": ["user", "item"]}}
    ml = {"dataset": "movielens", "task": "click", "eval": DAYS, "shift": None, "boot_through": "2026-02-20",
          "boot_days": 6, "daily_from": "2026-02-27", "info": {"rows_per_day": 470}, "student_params": 500,
          "student_flops": 800, "students": students, "teachers": teachers, "labels": labels, "models": models,
          "loss_share": {"aux": {"click": 0.7, "click_soft": 0.3}, "control": {"click": 1.0}},
          "tuning": {"control": {"chosen": {"lr": 0.003, "batch_size": 64}, "grid": GRID},
                     "aux": {"chosen": {"lr": 0.01, "batch_size": 256}, "grid": GRID},
                     "direct": {"chosen": {"lr": 0.003, "batch_size": 256}, "grid": GRID}},
          "tuning_days": ["2026-02-27", "2026-02-28"], "seeds": SEEDS}
    settings = {"smoke": True, "command": "kd experiments --smoke", "seeds": SEEDS, "days": N_DAYS, "lags": LAGS,
                "main_lag": MAIN_LAG, "sizes": SIZES, "main_size": MAIN_SIZE, "student_embedding": 2,
                "student_hidden": [4], "student_buckets": 64, "teacher_epochs": 1, "boot_epochs": 1}
    return {"settings": settings, "wall_seconds": 12.0, "datasets": {"movielens": ml}}


def grid_of(res: dict, name: str, metric: str) -> np.ndarray:
    seeds = res["students"][name]
    return np.array([[np.nan if seeds[s][d][metric] is None else seeds[s][d][metric] for d in DAYS]
                     for s in sorted(seeds, key=int)])


def teacher_of(res: dict, metric: str) -> np.ndarray:
    return np.array([res["teachers"][str(MAIN_SIZE)]["metrics"][d][metric] for d in DAYS])


def pct(r: dict) -> str:
    return f"{100 * r['mean']:.0f}% [{100 * r['lo']:.0f}%, {100 * r['hi']:.0f}%]"


def seeds_txt(r: dict, higher_better: bool) -> str:
    return (", ".join(f"{x:+.4f}" for x in r["per_seed"]) + f" ({per_seed_signs(r['per_seed'], higher_better)})")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    results = make_results()
    out = tmp_path_factory.mktemp("docs")
    rep = write_report(copy.deepcopy(results), str(out))
    return results["datasets"]["movielens"], (out / "results.md").read_text(), rep


def _row(md: str, start: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(start))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_modes_rows_use_the_seed_day_bootstrap_gap_and_signs(report):
    ml, md, rep = report
    header = _row(md, "| student | vs |")
    assert header[6:10] == ["gap recovered (AUC)", "gap recovered (NE)", "ΔAUC per seed", "ΔNE per seed"]
    for a in ("aux", "direct", "aux_adapter", "direct_adapter"):
        auc = paired_bootstrap(grid_of(ml, a, "auc"), grid_of(ml, "control", "auc"))
        ne = paired_bootstrap(grid_of(ml, a, "ne"), grid_of(ml, "control", "ne"))
        g_auc = gap_recovered(grid_of(ml, a, "auc"), grid_of(ml, "control", "auc"), teacher_of(ml, "auc"))
        g_ne = gap_recovered(grid_of(ml, a, "ne"), grid_of(ml, "control", "ne"), teacher_of(ml, "ne"))
        row = _row(md, f"| {a} | control |")
        assert row[2] == fmt_ci(auc) and row[4] == fmt_ci(ne)
        assert f"(n={SEEDS}×{N_DAYS})" in row[2]  # aux has one undefined cell, still on all 10 days
        assert row[6] == pct(g_auc) and row[7] == pct(g_ne)
        assert row[8] == seeds_txt(auc, True) and row[9] == seeds_txt(ne, False)
        assert re.search(r"\(\d/3 better\)$", row[8])
    for a, b in (("aux", "direct"), ("aux_adapter", "aux"), ("direct_adapter", "direct")):
        row = _row(md, f"| {a} | {b} |")
        assert row[6] == row[7] == "—"
        r = paired_bootstrap(grid_of(ml, a, "auc"), grid_of(ml, b, "auc"))
        assert row[2] == fmt_ci(r)
    summary = {(r["a"], r["b"]): r for r in rep["summary"]["movielens_modes"]}
    direct = paired_bootstrap(grid_of(ml, "direct", "auc"), grid_of(ml, "control", "auc"))
    assert summary[("direct", "control")]["auc"] == direct
    assert summary[("aux", "direct")]["gap_auc"] is None


def test_the_undefined_cell_is_left_out(report):
    ml, md, _ = report
    r = paired_bootstrap(grid_of(ml, "aux", "auc"), grid_of(ml, "control", "auc"))
    assert np.isnan(grid_of(ml, "aux", "auc")).sum() == 1 and np.isfinite(r["mean"]) and r["days"] == N_DAYS
    assert _row(md, "| aux | control |")[2] == fmt_ci(r)


def test_freshness_and_size_tables_show_intervals_and_per_seed_signs(report):
    ml, md, rep = report
    for k in LAGS:
        aux = "aux" if k == MAIN_LAG else f"aux_lag{k}"
        r = paired_bootstrap(grid_of(ml, aux, "auc"), grid_of(ml, "control", "auc"))
        row = _row(md, f"| {k} | {k:.1f} |")
        assert row[4] == f"{fmt_ci(r)}<br>seeds: {seeds_txt(r, True)}"
    # cost of staleness: against the k = 0 student of the same mode
    cost = paired_bootstrap(grid_of(ml, "direct_lag2", "ne"), grid_of(ml, "direct_lag0", "ne"))
    fr = {r["k"]: r for r in rep["summary"]["movielens_freshness"]}
    assert fr[2]["cost_direct_ne"] == cost and "cost_aux_auc" not in fr[0]
    delta = paired_bootstrap(grid_of(ml, "aux", "auc") - grid_of(ml, "aux_lag0", "auc"),
                             grid_of(ml, "direct", "auc") - grid_of(ml, "direct_lag0", "auc"))
    assert fr[1]["aux_minus_direct_auc"] == delta
    assert any(x.startswith("| 2 | ") and f"{fmt_ci(cost)}<br>seeds: {seeds_txt(cost, False)}" in x
               for x in md.splitlines())
    size = paired_bootstrap(grid_of(ml, "aux_x2", "auc"), grid_of(ml, "control", "auc"))
    row = _row(md, "| x2 (teacher_x2) |")
    assert row[8] == f"{fmt_ci(size)}<br>seeds: {seeds_txt(size, True)}"
    assert _row(md, "| x4 (teacher) |")[8].startswith(fmt_ci(paired_bootstrap(grid_of(ml, "aux", "auc"),
                                                                              grid_of(ml, "control", "auc"))))


def test_models_loss_share_and_tuning_tables(report):
    _, md, _ = report
    for heading in ("### MovieLens: models", "### MovieLens: tuning budget", "### MovieLens: task loss share"):
        assert heading in md, heading
    assert _row(md, "| control | control |") == ["control", "control", "500", "0.0312×", "800", "0.025×",
                                                 "user, item"]
    assert _row(md, "| teacher | teacher |")[3] == "1×"
    assert _row(md, "| teacher_x2 | teacher |")[3] == "0.25×"
    assert "| model | click | click_soft |" in md
    assert _row(md, "| aux | 70.0% |") == ["aux", "70.0%", "30.0%"]
    assert _row(md, "| control | 100.0% |") == ["control", "100.0%", "—"]
    assert _row(md, "| control | 0.003 | 64 |") == ["control", "0.003", "64", "4", "0.9030", "0.6970", "—"]
    assert _row(md, "| aux | 0.01 | 256 |")[-1] == "yes"
    assert "(4 points); every tuned student got the same grid." in md


def test_setup_and_docstring_say_how_intervals_are_computed(report):
    import kdcore.experiments.report as report_module

    _, md, _ = report
    assert "moving blocks of 7 consecutive days" in md and "paired_bootstrap" in md
    assert "paired_diff" not in md
    doc = report_module.__doc__
    assert "seed" in doc and "moving blocks" in doc and "paired" in doc
    assert md.count(DISCUSSION) == 1


def test_optional_tables_are_skipped_when_absent(tmp_path):
    results = make_results()
    for key in ("models", "loss_share", "tuning", "tuning_days"):
        del results["datasets"]["movielens"][key]
    md = (tmp_path / "results.md")
    write_report(results, str(tmp_path))
    text = md.read_text()
    assert "## 1. Modes" in text and "gap recovered (AUC)" in text
    for heading in (": models", ": tuning budget", ": task loss share"):
        assert heading not in text


def test_tuning_table_flags_a_control_with_a_smaller_grid():
    ml = make_results()["datasets"]["movielens"]
    ml["tuning"]["control"]["grid"] = GRID[:2]
    lines = tuning_table(ml)
    assert any(x.startswith("| aux |") and x.endswith("| **no** |") for x in lines)
    assert any("**not** every tuned student got the same grid: aux, direct." in x for x in lines)
