"""Seed x moving-block paired bootstrap: known cases where a wrong interval would show."""

from __future__ import annotations

import time

import numpy as np
import pytest

from kdcore.evaluation.stats import (
    gap_recovered,
    moving_block_days,
    paired_bootstrap,
    paired_diff,
    per_seed_signs,
)


def test_constant_difference_has_a_degenerate_interval():
    rng = np.random.default_rng(0)
    b = 0.7 + 0.05 * rng.standard_normal((5, 30))
    r = paired_bootstrap(b + 0.01, b)
    assert r["mean"] == pytest.approx(0.01) and r["lo"] == pytest.approx(0.01) and r["hi"] == pytest.approx(0.01)
    assert r["seeds"] == 5 and r["days"] == 30 and r["block"] == 7
    assert r["per_seed"] == pytest.approx([0.01] * 5)


def test_seed_only_variation_gives_a_wide_interval_where_seed_averaging_gives_none():
    # seed 0 is +1 better every day, seed 1 is 1 worse every day: the sign depends on the seed
    d = np.vstack([np.ones(40), -np.ones(40)])
    b = np.zeros((2, 40))
    old = paired_diff(np.mean(d, 0), np.mean(b, 0))  # seed-averaged, days only: blind to it
    assert old["lo"] == old["hi"] == 0
    r = paired_bootstrap(d, b)
    assert r["mean"] == pytest.approx(0)
    assert r["lo"] < 0 < r["hi"]
    assert r["hi"] - r["lo"] >= 1.0  # replicates of seeds (0,0) / (1,1) give +1 / -1
    assert r["per_seed"] == pytest.approx([1.0, -1.0])


def test_day_level_iid_noise_is_covered_at_about_the_nominal_rate():
    rng = np.random.default_rng(123)
    true = 0.002
    covered = 0
    for i in range(200):
        day_noise = 0.01 * rng.standard_normal(60)  # shared by every seed: days are the only noise
        a = np.tile(true + day_noise, (3, 1))
        r = paired_bootstrap(a, np.zeros((3, 60)), n_boot=1000, seed=i)
        covered += r["lo"] <= true <= r["hi"]
    assert 0.88 <= covered / 200 <= 0.99


def test_gap_recovered_half_way_is_exactly_one_half():
    rng = np.random.default_rng(1)
    control = 0.70 + 0.02 * rng.standard_normal((4, 25))
    teacher = 0.75 + 0.02 * rng.standard_normal(25)  # [days]: one teacher shared by every seed
    student = control + 0.5 * (teacher - control)
    r = gap_recovered(student, control, teacher)
    assert r["mean"] == pytest.approx(0.5)
    assert r["lo"] == pytest.approx(0.5, abs=1e-9) and r["hi"] == pytest.approx(0.5, abs=1e-9)
    assert r["per_seed"] == pytest.approx([0.5] * 4) and r["dropped"] == 0
    # NE-like (lower is better): the teacher below the control, same fraction
    r_ne = gap_recovered(-student, -control, np.tile(-teacher, (4, 1)))
    assert r_ne["mean"] == pytest.approx(0.5) and r_ne["hi"] - r_ne["lo"] < 1e-9


def test_gap_recovered_drops_replicates_without_a_gap():
    control = np.zeros((2, 10))
    teacher = np.vstack([np.ones(10), np.zeros(10)])  # only seed 0 has a teacher-control gap
    student = np.vstack([0.25 * np.ones(10), np.zeros(10)])
    r = gap_recovered(student, control, teacher, n_boot=2000)
    assert r["mean"] == pytest.approx(0.25)
    assert 300 < r["dropped"] < 700  # replicates drawing seed 1 twice: p = 1/4
    assert r["lo"] == pytest.approx(0.25) and r["hi"] == pytest.approx(0.25)
    assert r["per_seed"][0] == pytest.approx(0.25) and np.isnan(r["per_seed"][1])


def test_moving_blocks_keep_consecutive_days_together():
    rng = np.random.default_rng(0)
    n_days, block = 20, 6
    idx = moving_block_days(rng, n_days, block, 500)
    assert idx.shape == (500, n_days) and idx.min() >= 0 and idx.max() < n_days
    for j in range(n_days - 1):
        if (j + 1) % block:  # within a block: the next day, wrapping around the end
            assert np.all(idx[:, j + 1] == (idx[:, j] + 1) % n_days)
    starts = idx[:, ::block]
    assert len(np.unique(starts)) == n_days  # every day can start a block (circular)
    assert np.any(idx[:, block] != (idx[:, block - 1] + 1) % n_days)  # blocks are drawn independently
    # block longer than the series: one block, i.e. a circular shift of all days
    short = moving_block_days(rng, 5, 7, 50)
    assert all(sorted(row) == list(range(5)) for row in short)


def test_deterministic_given_the_seed():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 30)), rng.standard_normal((5, 30))
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7)["lo"] != paired_bootstrap(a, b, seed=8)["lo"]
    t = rng.standard_normal(30) + 3
    assert gap_recovered(a, b, t, seed=3) == gap_recovered(a, b, t, seed=3)


def test_nan_cells_are_ignored():
    b = np.zeros((3, 12))
    a = np.full((3, 12), 0.1)
    a[0, 4] = np.nan  # one cell undefined
    a[:, 7] = np.nan  # one day undefined for every seed
    b[2, 2] = np.nan
    with np.errstate(all="raise"):
        r = paired_bootstrap(a, b)
    assert r["mean"] == pytest.approx(0.1) and r["lo"] == pytest.approx(0.1) and r["hi"] == pytest.approx(0.1)
    assert r["days"] == 11 and r["seeds"] == 3 and r["per_seed"] == pytest.approx([0.1] * 3)
    # a seed with no usable cell: not counted, its per-seed value is NaN
    a[1] = np.nan
    r = paired_bootstrap(a, b)
    assert r["seeds"] == 2 and np.isnan(r["per_seed"][1]) and r["mean"] == pytest.approx(0.1)
    assert np.isnan(paired_bootstrap(np.full((2, 3), np.nan), np.zeros((2, 3)))["mean"])


def test_fast_enough_for_10_seeds_60_days():
    rng = np.random.default_rng(3)
    a, b, t = rng.standard_normal((10, 60)), rng.standard_normal((10, 60)), rng.standard_normal(60) + 2
    start = time.perf_counter()
    paired_bootstrap(a, b, n_boot=2000)
    gap_recovered(a, b, t, n_boot=2000)
    assert time.perf_counter() - start < 1.0


def test_per_seed_signs():
    assert per_seed_signs([0.1, 0.2, -0.1, 0.3, 0.0], higher_better=True) == "3/5 better"
    assert per_seed_signs([0.1, 0.2, -0.1, 0.3, 0.0], higher_better=False) == "1/5 better"  # NE: lower is better
    assert per_seed_signs([-0.01] * 5, higher_better=False) == "5/5 better"
    assert per_seed_signs([0.1, float("nan")], higher_better=True) == "1/1 better"
