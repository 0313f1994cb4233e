"""Data-quality gate: shift math, profile, label checks, gate policy, GX suite."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydantic import ValidationError

from kdcore.data.spec import DatasetSpec
from kdcore.errors import SpecError
from kdcore.quality.bins import bin_counts, categorical_counts, quantile_edges
from kdcore.quality.gate import GateDecision, GatePolicy, Thresholds, evaluate_gate
from kdcore.quality.labels_check import TeacherLineage, check_labels
from kdcore.quality.profile import Profile, build_profile
from kdcore.quality.shift import compare, js_divergence, psi
from kdcore.yamlconf import validate

N = 20_000
DAY0 = 1_700_006_400  # a UTC midnight, epoch seconds

SPEC = DatasetSpec(
    name="toy", group="user_id", categorical=["user_id", "gender"], numeric=["x0", "x1", "flag"],
    tasks=[{"name": "like", "kind": "binary"}, {"name": "rating", "kind": "regression", "min": 1, "max": 5}],
)


def make_day(seed: int, n: int = N, shift: float = 0.0) -> pa.Table:
    """A day of examples; `shift` moves x0's mean by that many standard deviations.
    Exactly 30% of `like` labels are 1 (so a constant 0.3 teacher is calibrated)."""
    rng = np.random.default_rng(seed)
    like = np.zeros(n, dtype=np.int8)
    like[rng.permutation(n)[: int(0.3 * n)]] = 1
    return pa.table({
        "example_id": pa.array(np.arange(n, dtype=np.int64) + seed * 10_000_000),
        "timestamp": pa.array(DAY0 + rng.integers(0, 86_400, n)),
        "user_id": pa.array(rng.integers(0, 500, n)),
        "gender": pa.array(rng.choice(["F", "M", "X"], n, p=[0.45, 0.5, 0.05])),
        "x0": pa.array(rng.normal(shift, 1.0, n)),
        "x1": pa.array(rng.exponential(2.0, n).astype(np.float32)),
        "flag": pa.array((rng.random(n) < 0.2).astype(np.int8)),
        "like": pa.array(like),
        "rating": pa.array(rng.integers(1, 6, n).astype(np.float32)),
    })


def teacher_labels(day: pa.Table) -> pa.Table:
    """Calibrated, valid teacher labels: like = 0.3 everywhere, rating = the true rating."""
    n = day.num_rows
    return pa.table({"example_id": day.column("example_id"),
                     "like": pa.array(np.full(n, 0.3, dtype=np.float32)),
                     "rating": day.column("rating")})


@pytest.fixture(scope="module")
def ref_day() -> pa.Table:
    return make_day(1)


@pytest.fixture(scope="module")
def profile(ref_day) -> Profile:
    return build_profile(ref_day.to_batches(max_chunksize=6_000), SPEC)


def shift_decision(profile: Profile, day: pa.Table) -> GateDecision:
    return evaluate_gate(compare(profile, day, SPEC),
                         check_labels(teacher_labels(day), day, SPEC, staleness_days=0), GatePolicy())


def check(decision: GateDecision, name: str):
    return next(c for c in decision.checks if c.name == name)


# ------------------------------------------------------------------ shift math


def psi_loop(ref, cur, eps=1e-6):
    ref_total, cur_total = sum(ref), sum(cur)
    total = 0.0
    for r, c in zip(ref, cur):
        p = max(r / ref_total, eps)
        q = max(c / cur_total, eps)
        total += (q - p) * math.log(q / p)
    return total


def js_loop(ref, cur):
    ref_total, cur_total = sum(ref), sum(cur)
    total = 0.0
    for r, c in zip(ref, cur):
        p, q = r / ref_total, c / cur_total
        m = (p + q) / 2
        if p > 0:
            total += 0.5 * p * math.log2(p / m)
        if q > 0:
            total += 0.5 * q * math.log2(q / m)
    return total


def test_psi_and_js_match_the_formulas_on_random_counts():
    rng = np.random.default_rng(7)
    for trial in range(50):
        k = int(rng.integers(2, 30))
        ref = rng.integers(0, 1000, k)
        cur = rng.integers(0, 1000, k)
        if trial % 3 == 0:  # empty bins on either side
            ref[rng.integers(0, k)] = 0
            cur[rng.integers(0, k)] = 0
        ref[0] += 1
        cur[-1] += 1
        assert psi(ref, cur) == pytest.approx(psi_loop(ref.tolist(), cur.tolist()), rel=1e-9, abs=1e-12)
        js = js_divergence(ref, cur)
        assert js == pytest.approx(js_loop(ref.tolist(), cur.tolist()), rel=1e-9, abs=1e-12)
        assert 0.0 <= js <= 1.0
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])


def test_bin_counts_matches_searchsorted_including_edges_nan_and_inf():
    rng = np.random.default_rng(3)
    edges = [-1.0, 0.0, 0.5, 2.0]
    values = np.concatenate([rng.normal(0, 1.5, 1000), edges, [np.nan, np.inf, -np.inf]])
    expected = np.bincount(np.searchsorted(edges, values[~np.isnan(values)], side="left"), minlength=5)
    np.testing.assert_array_equal(bin_counts(values, edges), expected)
    # bins are right-closed: a value equal to an edge falls in the bin ending there
    np.testing.assert_array_equal(bin_counts(np.array([0.0]), edges), [0, 1, 0, 0, 0])
    many = np.sort(rng.normal(size=40))  # the searchsorted fallback path agrees
    np.testing.assert_array_equal(
        bin_counts(values, many),
        np.bincount(np.searchsorted(many, values[~np.isnan(values)]), minlength=41))


def test_categorical_counts_top_other_and_nulls():
    arr = pa.chunked_array([pa.array(["a", "b", None, "z"]), pa.array(["a", "q", None])])
    np.testing.assert_array_equal(categorical_counts(arr, ["a", "b", "c"]), [2, 1, 0, 2])
    ints = pa.array([5, 7, 7, None, 9])  # top values are stored as strings
    np.testing.assert_array_equal(categorical_counts(ints, ["7", "5"]), [2, 1, 1])
    dict_arr = pa.array(["M", "F", "M", None]).dictionary_encode()
    np.testing.assert_array_equal(categorical_counts(dict_arr, ["M"]), [2, 1])


# ------------------------------------------------------------------ profile


def test_profile_json_round_trip_and_edge_cases(ref_day, profile):
    again = Profile.model_validate_json(profile.model_dump_json())
    assert again == profile
    assert profile.row_count == N and profile.n_days == 1
    x0 = profile.numeric["x0"]
    assert len(x0.edges) == 9 and len(x0.counts) == 10 and sum(x0.counts) == N
    assert max(x0.counts) - min(x0.counts) <= 1  # quantile bins are near-equal
    assert profile.numeric["flag"].edges == [0.0, 1.0]  # duplicate edges collapse
    assert profile.categorical["gender"].values == ["M", "F", "X"]
    uid = profile.categorical["user_id"]
    assert len(uid.values) == 50 and sum(uid.counts) + uid.other_count == N
    assert uid.as_counts()["__other__"] == uid.other_count
    assert profile.tasks["like"].mean == pytest.approx(0.3)
    assert quantile_edges(np.full(100, 4.0), 10) == [4.0]  # constant column
    assert quantile_edges(np.array([np.nan, np.nan]), 10) == []


def test_profile_streams_with_a_small_edge_sample(ref_day):
    """Edges from the first rows only; every row is still counted."""
    p = build_profile(ref_day.to_batches(max_chunksize=1_000), SPEC, edge_sample_rows=2_500, n_days=3)
    assert p.edge_sample_rows == 2_500  # whole batches are buffered, then sliced to the sample
    assert sum(p.numeric["x0"].counts) == N and p.row_count == N and p.rows_per_day == N / 3


# ------------------------------------------------------------------ shift + gate


def test_identical_distribution_gives_zero_psi_and_passes(ref_day, profile):
    report = compare(profile, ref_day, SPEC)
    assert all(f.psi == pytest.approx(0.0, abs=1e-12) for f in report.features.values())
    assert all(f.js == pytest.approx(0.0, abs=1e-12) for f in report.features.values())
    same_dist = compare(profile, make_day(2), SPEC)  # a fresh sample of the same distribution
    assert max(f.psi for f in same_dist.features.values()) < 0.02
    decision = shift_decision(profile, make_day(2))
    assert decision.status == "pass" and decision.action == "distill", decision.summary()
    assert "All" in decision.summary()


def test_injected_shift_trips_warn_then_fail(profile):
    # 0.4 std gives PSI ~0.15 on 10 quantile bins (0.5 std gives ~0.24, right at the fail line)
    warn = shift_decision(profile, make_day(3, shift=0.4))
    assert check(warn, "psi").status == "warn" and "x0" in check(warn, "psi").detail
    assert warn.status == "warn" and warn.action == "distill"
    assert "psi" in warn.summary() and "x0" in warn.summary()

    fail = shift_decision(profile, make_day(4, shift=2.0))
    assert check(fail, "psi").status == "fail" and check(fail, "js").status == "fail"
    assert fail.status == "fail" and fail.action == "hard_labels_only"
    assert "x0" in fail.summary()
    skip = evaluate_gate(compare(profile, make_day(4, shift=2.0), SPEC),
                         check_labels(teacher_labels(make_day(4)), make_day(4), SPEC, 0),
                         GatePolicy(on_fail="skip_students"))
    assert skip.action == "skip_students"
    assert GateDecision.model_validate_json(fail.model_dump_json()) == fail


def test_label_drift_and_staleness(profile):
    day = make_day(5)
    like = np.zeros(N, dtype=np.int8)
    like[: int(0.5 * N)] = 1  # label rate 0.3 -> 0.5
    day = day.set_column(day.schema.get_field_index("like"), "like", pa.array(like))
    labels = check_labels(teacher_labels(day), day, SPEC, staleness_days=3)
    decision = evaluate_gate(compare(profile, day, SPEC), labels, GatePolicy())
    drift = check(decision, "label_drift:like")
    assert drift.status == "fail" and drift.value == pytest.approx(0.2)
    assert check(decision, "staleness_days").status == "warn"
    assert check(decision, "calibration:like").status == "fail"  # 0.3 / 0.5 = 0.6


@pytest.mark.parametrize("staleness,expected,stale,status", [
    (2, 1, True, "warn"),  # the refresh failed: the teacher through D-2 stands in
    (1, 1, False, "pass"),  # out of sample, as the policy asks
    (0, 0, False, "pass"),  # in sample
    (1, 0, True, "warn"),
])
def test_teacher_fresh_warns_on_a_stale_teacher(ref_day, profile, staleness, expected, stale, status):
    teacher = TeacherLineage(version="teacher-v7", trained_through="2023-11-12", expected_staleness_days=expected,
                             stale=stale)
    labels = check_labels(teacher_labels(ref_day), ref_day, SPEC, staleness, teacher)
    assert labels.teacher == teacher
    # lenient staleness thresholds: the fallback still warns, it never passes silently
    policy = GatePolicy(staleness_days=Thresholds(warn=10, fail=20))
    decision = evaluate_gate(compare(profile, ref_day, SPEC), labels, policy)
    fresh = check(decision, "teacher_fresh")
    assert check(decision, "staleness_days").status == "pass"
    assert fresh.status == status and fresh.value == staleness and fresh.warn == expected
    assert decision.status == status and decision.action == "distill"
    assert "teacher-v7" in fresh.detail and "trained through 2023-11-12" in fresh.detail
    assert f"{staleness} day(s) stale" in fresh.detail
    assert (f"the label policy expects {expected}" if stale else f"as the label policy expects ({expected})") \
        in fresh.detail
    assert fresh.detail.startswith("FALLBACK:") is stale
    assert ("teacher_fresh" in decision.summary()) is stale
    if stale:
        assert f"teacher_fresh = {staleness} > warn {expected} (FALLBACK: " in decision.summary()


def test_teacher_fresh_needs_the_lineage(ref_day, profile):
    """Without the teacher's lineage (callers that do not know it) there is no such check;
    a fallback under a failing staleness still fails the gate."""
    decision = evaluate_gate(compare(profile, ref_day, SPEC),
                             check_labels(teacher_labels(ref_day), ref_day, SPEC, 0), GatePolicy())
    assert "teacher_fresh" not in {c.name for c in decision.checks}
    teacher = TeacherLineage(version="v", trained_through="2023-11-01", expected_staleness_days=1, stale=True)
    decision = evaluate_gate(compare(profile, ref_day, SPEC),
                             check_labels(teacher_labels(ref_day), ref_day, SPEC, 9, teacher), GatePolicy())
    assert decision.status == "fail" and check(decision, "staleness_days").status == "fail"
    assert check(decision, "teacher_fresh").status == "warn"


# ------------------------------------------------------------------ label checks


def corrupt(labels: pa.Table, column: str, rows: np.ndarray, value: float) -> pa.Table:
    v = labels.column(column).to_numpy().copy()
    v[rows] = value
    return labels.set_column(labels.schema.get_field_index(column), column, pa.array(v))


@pytest.mark.parametrize("case, check_name, bad", [
    ("nan", "invalid_labels:like", 7),
    ("missing", "coverage", 30),  # 30 / 20,000 = 0.0015 > fail 0.001
    ("duplicate", "duplicate_ids", 3),
    ("out_of_range_binary", "invalid_labels:like", 4),
    ("out_of_range_regression", "invalid_labels:rating", 5),
    ("int_dtype", "invalid_labels:like", N),
    ("string_dtype", "invalid_labels:rating", N),
    ("absent_column", "invalid_labels:rating", N),
])
def test_bad_teacher_labels_fail_the_gate_naming_check_and_count(profile, case, check_name, bad):
    day = make_day(2)
    labels = teacher_labels(day)
    rows = np.arange(bad) * 11 if bad < N else None
    if case == "nan":
        labels = corrupt(labels, "like", rows, np.nan)
    elif case == "missing":
        labels = labels.filter(pa.array(~np.isin(np.arange(N), rows)))
    elif case == "duplicate":
        labels = pa.concat_tables([labels, labels.take(rows)])
    elif case == "out_of_range_binary":
        labels = corrupt(labels, "like", rows, 1.5)
    elif case == "out_of_range_regression":
        labels = corrupt(labels, "rating", rows, 7.0)
    elif case == "int_dtype":
        labels = labels.set_column(1, "like", pa.array(np.zeros(N, dtype=np.int64)))
    elif case == "string_dtype":
        labels = labels.set_column(2, "rating", pa.array(["3.0"] * N))
    elif case == "absent_column":
        labels = labels.drop_columns(["rating"])

    decision = evaluate_gate(compare(profile, day, SPEC), check_labels(labels, day, SPEC, 0), GatePolicy())
    result = check(decision, check_name)
    assert decision.status == "fail" and decision.action == "hard_labels_only"
    assert result.status == "fail"
    assert f"{bad} bad rows" in result.detail
    summary = decision.summary()
    assert check_name in summary and f"{bad} bad rows" in summary
    others = [c.name for c in decision.tripped("fail") if c.name != check_name]
    assert not others, f"{case}: unexpected failures {others}"
    if case.endswith("dtype"):
        assert ("'like'" if case == "int_dtype" else "'rating'") in result.detail
        assert "int64" in result.detail or "string" in result.detail


def test_calibration_per_decile_on_a_constructed_case():
    n = 1000
    decile = np.repeat(np.arange(10), 100)
    pred = 0.1 * decile + 0.05 + np.tile(np.linspace(-0.04, 0.04, 100), 10)  # deciles don't overlap
    label = np.zeros(n, dtype=np.int8)
    for d in range(10):  # (5 + 5d) positives out of 100 in decile d: half the predicted rate
        label[d * 100: d * 100 + 5 + 5 * d] = 1
    perm = np.random.default_rng(0).permutation(n)  # row order must not matter
    ids = np.arange(n)
    spec = DatasetSpec(name="cal", group="g", numeric=["x"], tasks=[{"name": "like", "kind": "binary"}])
    examples = pa.table({"example_id": ids[perm], "like": label[perm]})
    labels = pa.table({"example_id": ids[::-1], "like": pa.array(pred[::-1], pa.float32())})
    cal = check_labels(labels, examples, spec, 0).calibration["like"]
    assert cal.count == n
    assert cal.mean_pred == pytest.approx(0.5, abs=1e-6)
    assert cal.label_rate == pytest.approx(0.275)
    assert cal.calibration == pytest.approx(0.5 / 0.275, rel=1e-6)
    assert [d.decile for d in cal.deciles] == list(range(10))
    for d in cal.deciles:
        assert d.count == 100
        assert d.mean_pred == pytest.approx(0.1 * d.decile + 0.05, abs=1e-6)
        assert d.label_rate == pytest.approx((5 + 5 * d.decile) / 100)


def test_regression_bias():
    day = make_day(6, n=1000)
    labels = teacher_labels(day)
    labels = labels.set_column(2, "rating", pc.add(labels.column("rating"), pa.scalar(0.25, pa.float32())))
    bias = check_labels(labels, day, SPEC, 0).bias["rating"]
    assert bias.bias == pytest.approx(0.25) and bias.count == 1000


# ------------------------------------------------------------------ policy


def test_thresholds_validation_names_the_field():
    with pytest.raises(ValidationError) as err:
        GatePolicy.model_validate({"psi": {"warn": 0.3, "fail": 0.1}})
    assert "psi" in str(err.value) and "warn (0.3) must be <= fail (0.1)" in str(err.value)
    with pytest.raises(SpecError, match=r"field 'calibration'"):
        validate(GatePolicy, {"calibration": {"warn": 0.5, "fail": 0.2}}, "pipeline.yaml")
    with pytest.raises(ValidationError, match=r"(?s)\njs\n.*warn \(0.3\) must be <= fail \(0.1\)"):
        GatePolicy(js=Thresholds.model_construct(warn=0.3, fail=0.1))  # instances are re-checked
    with pytest.raises(SpecError, match="field 'psii': Extra inputs"):
        validate(GatePolicy, {"psii": {"warn": 0.1, "fail": 0.2}}, "pipeline.yaml")
    assert GatePolicy().psi == Thresholds(warn=0.1, fail=0.25)


# ------------------------------------------------------------------ great expectations


def test_gx_suite_passes_on_reference_and_fails_on_broken_day(tmp_path, ref_day, profile):
    from kdcore.quality.expectations import build_suite, validate_day

    suite = build_suite(profile, SPEC)
    types = {e.expectation_type for e in suite.expectations}
    assert "expect_column_quantile_values_to_be_between" not in types
    in_set = [e.column for e in suite.expectations if e.expectation_type == "expect_column_values_to_be_in_set"]
    assert in_set == ["gender"]  # user_id is high-cardinality: no value set

    report = compare(profile, ref_day, SPEC)
    ok = validate_day(ref_day, profile, SPEC, report, tmp_path / "ref_docs")
    assert ok.success and ok.unsuccessful == 0 and ok.evaluated == ok.successful > 10, ok.failed_expectations
    assert ok.index_html is not None and ok.index_html.exists()
    assert json.loads(ok.result_json.read_text())["meta"]["kd_shift"]["cur_rows"] == N

    ids = ref_day.column("example_id").to_numpy().astype(float)
    ids[:5] = np.nan
    broken = ref_day.drop_columns(["timestamp"]).set_column(0, "example_id", pa.array(ids, from_pandas=True))
    bad = validate_day(broken, profile, SPEC, None, tmp_path / "bad_docs")
    assert not bad.success and bad.unsuccessful >= 2
    assert "expect_column_to_exist(timestamp)" in bad.failed_expectations
    assert "expect_column_values_to_not_be_null(example_id)" in bad.failed_expectations
    assert (tmp_path / "bad_docs" / "index.html").exists()


# ------------------------------------------------------------------ a day too large to hold


def test_compare_of_a_streamed_day_equals_compare_of_the_whole_table(profile):
    day = make_day(5, shift=0.5)
    whole = compare(profile, day, SPEC)
    streamed = compare(profile, iter(day.to_batches(max_chunksize=3_000)), SPEC)
    assert streamed.cur_rows == whole.cur_rows == day.num_rows
    for name, f in whole.features.items():  # from the same counts: equal, not close
        assert (streamed.features[name].psi, streamed.features[name].js) == (f.psi, f.js), name
    for name, lab in whole.labels.items():  # a mean summed per batch: close
        assert streamed.labels[name].cur_mean == pytest.approx(lab.cur_mean, rel=1e-12)
    with pytest.raises(Exception, match="no rows"):
        compare(profile, iter([]), SPEC)
    with pytest.raises(Exception, match=r"lacks column\(s\) \['x0'\]"):
        compare(profile, iter(day.drop_columns(["x0"]).to_batches(max_chunksize=3_000)), SPEC)


@pytest.mark.parametrize("rows, max_rows, expected", [
    (10, 10, list(range(10))),          # fits: the whole day
    (10, 100, list(range(10))),
    (10, 4, [0, 3, 6, 9]),              # every 3rd row, spread over the day
    (10, 5, [0, 2, 4, 6, 8]),
    (7, 1, [0]),
])
def test_gx_sample_is_evenly_spaced_bounded_and_independent_of_batches(rows, max_rows, expected):
    from kdcore.quality.daily import sample_rows

    table = pa.table({"i": pa.array(np.arange(rows))})
    for chunk in (1, 3, rows):
        got = sample_rows(iter(table.to_batches(max_chunksize=chunk)), rows, max_rows)
        assert got.column("i").to_pylist() == expected, chunk
        assert got.num_rows <= max_rows
