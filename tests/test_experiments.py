"""`kd experiments --smoke`: every study end to end on tiny models, plus the paired stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdcore.experiments import Settings, run_experiments
from kdcore.experiments.report import compare, compare_delta, verdict


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("experiments")
    st = Settings.make(smoke=True, root=str(tmp / "root"), out=str(tmp / "docs"), command="kd experiments --smoke")
    return run_experiments(st, progress=False), tmp / "docs"


def test_smoke_writes_every_study_and_every_compared_mode(smoke):
    res, docs = smoke
    md = (docs / "results.md").read_text()
    for heading in ("## 1. Modes", "## 2. Teacher freshness", "## 3. Teacher size", "## 4. Shared labels",
                    "## 5. Synthetic stream with a sudden shift", "### 5a. Modes", "### 5b. Teacher freshness"):
        assert heading in md, heading
    for a, b in (("aux", "control"), ("direct", "control"), ("aux_adapter", "control"),
                 ("direct_adapter", "control"), ("aux", "direct")):
        assert md.count(f"| {a} | {b} | ") >= 3, (a, b)  # MovieLens + synth (all days, post-shift)
    for k in (0, 1, 2):
        assert f"\n| {k} | " in md  # a freshness row per lag
    for m in (1, 2, 4, 8):
        assert f"| x{m} (" in md
    assert "__WALL_TIME__" not in md and "Wall time:" in md and "kd experiments --smoke" in md
    plots = {p.name for p in (docs / "results").glob("*.png")}
    assert {"modes_movielens.png", "freshness_movielens.png", "size_movielens.png", "modes_synth_post.png",
            "freshness_synth_post.png"} <= plots
    for name in plots:
        assert f"results/{name}" in md or name.startswith(("size_synth", "daily_")), name


def test_shared_labels_give_identical_students(smoke):
    res, _ = smoke
    sh = res["datasets"]["movielens"]["shared"]
    assert sh["identical"] is True
    assert all(v["identical_days"] == sh["days"] > 0 for v in sh["per_student"].values())
    assert sh["saved_seconds"] is not None and sh["saved_seconds"] >= 0


def test_staleness_is_what_the_lag_asked_for(smoke):
    res, _ = smoke
    for ds in res["datasets"].values():
        for k, per_day in ds["labels"].items():
            stale = [v["staleness"] for v in per_day.values()]
            assert min(stale) == int(k), (ds["dataset"], k, stale)  # more only where a data day is missing


def _res(values: dict[str, np.ndarray], metric: str = "auc") -> dict:
    """A collected-results dict with per-seed per-day series: values[name] is [seeds, days]."""
    days = [f"2026-01-{i + 1:02d}" for i in range(next(iter(values.values())).shape[1])]
    return {"students": {name: {str(s): {d: {metric: float(x[s, i])} for i, d in enumerate(days)}
                                for s in range(x.shape[0])} for name, x in values.items()}}, days


def test_paired_stats_on_a_constructed_case():
    rng = np.random.default_rng(0)
    base = 0.7 + 0.02 * rng.standard_normal((3, 60))  # day-to-day variation dwarfs the effect...
    noise = 0.001 * rng.standard_normal((3, 60))
    res, days = _res({"control": base, "better": base + 0.005 + noise, "same": base + noise})
    better = compare(res, "better", "control", "auc", days)
    assert better["days"] == 60
    assert better["mean"] == pytest.approx(0.005 + noise.mean(0).mean(), abs=1e-9)  # seeds pooled per day
    assert better["lo"] > 0 and verdict(better, "auc") == "significant improvement"  # ...but pairing removes it
    assert verdict(better, "ne") == "significant harm"  # higher NE is worse
    assert len(better["per_seed"]) == 3 and all(abs(x - 0.005) < 0.001 for x in better["per_seed"])
    same = compare(res, "same", "control", "auc", days)
    assert same["lo"] < 0 < same["hi"] and verdict(same, "auc") == "no significant difference"
    worse = compare(res, "control", "better", "auc", days)
    assert verdict(worse, "auc") == "significant harm"
    # (better - control) - (same - control) = 0.005 per day
    assert compare_delta(res, "better", "control", "same", "control", "auc", days)["mean"] == pytest.approx(0.005, abs=1e-3)


def test_missing_days_are_dropped_from_the_pairing():
    x = np.full((1, 10), 0.6)
    y = np.full((1, 10), 0.5)
    x[0, 3] = np.nan
    res, days = _res({"a": x, "control": y})
    r = compare(res, "a", "control", "auc", days)
    assert r["days"] == 9 and r["mean"] == pytest.approx(0.1)
