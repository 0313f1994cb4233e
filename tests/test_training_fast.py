"""Training at the compute bound (issue 13): the fused optimizer default against the old
for_loop path, and students that stream a day larger than their shuffle window."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pipeline_fixtures)
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kdcore.config import PipelineConfig
from kdcore.data import examples
from kdcore.data.spec import Task
from kdcore.distill.config import DistillConfig
from kdcore.errors import DataError, StorageError
from kdcore.labels import materialize as mat
from kdcore.labels.join import load_aligned, load_joined
from kdcore.models import registry
from kdcore.models.checkpoint import model_to_bytes
from kdcore.models.features import Features
from kdcore.models.ranker import MultiTaskRanker, RankerConfig
from kdcore.storage import partition as part
from kdcore.training import steps
from kdcore.training.data import DayData, DayStream, load_days, open_day
from kdcore.training.loop import NO_KD, evaluate, fit, model_features, new_model
from tests.pipeline_fixtures import KD, kd, kd_base  # noqa: F401  (fixtures)

TASKS = [Task(name="click", kind="binary"),
         Task(name="wt", kind="regression", min=0, transform=["log1p", "standardize"])]
N_CAT, N_NUM = 3, 4


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _data(n: int = 4000, seed: int = 0) -> tuple[Features, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feats = Features(cat=rng.integers(0, 256, (n, N_CAT)), num=rng.standard_normal((n, N_NUM)).astype(np.float32))
    hard = {"click": (rng.random(n) < 0.3).astype(np.float32), "wt": rng.exponential(30, n).astype(np.float32)}
    return feats, hard


def _train(optimizer: str = "adam", distill: DistillConfig = NO_KD, **kw: object) -> MultiTaskRanker:
    cfg = RankerConfig.model_validate({"embedding_dim": 8, "hidden": [32, 16], "hash_buckets": 256, "batch_size": 64,
                                       "lr": 0.003, "epochs": 2, "optimizer": optimizer, **kw})
    feats, hard = _data()
    model = MultiTaskRanker(cfg, N_CAT, N_NUM, TASKS)
    model.fit_normalizer(feats.num)
    model.fit_targets(hard)
    fit(model, feats, hard, None, distill, seed=7)
    return model


# --- optimizer implementation ------------------------------------------------------------

# Fused Adam/Adagrad compute the same update as the for_loop path in another order of
# float32 operations (e.g. Adam's bias-corrected step size folded into one kernel), so each
# step differs by about one rounding (~1e-7 relative) and 126 steps drift by at most
# ~3e-7 absolute (measured). The tolerance leaves ~30x headroom; a real difference in the
# update (an lr 1% off, checked below) is far outside it.
RTOL, ATOL = 1e-4, 1e-5


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_fused_default_matches_the_old_for_loop_path(optimizer: str) -> None:
    old = _train(optimizer, optimizer_impl="for_loop")
    new = _train(optimizer)  # the default: auto = fused
    assert new.config.optimizer_impl == "auto"
    assert model_to_bytes(new) != model_to_bytes(old)  # not bitwise: the check below is not vacuous
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=name)
    off = _train(optimizer, optimizer_impl="for_loop", lr=0.003 * 1.01)
    assert any(not torch.allclose(a, b, rtol=RTOL, atol=ATOL)
               for a, b in zip(off.state_dict().values(), old.state_dict().values()))


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_foreach_equals_for_loop_bitwise_on_cpu(optimizer: str) -> None:
    assert model_to_bytes(_train(optimizer, optimizer_impl="foreach")) == \
        model_to_bytes(_train(optimizer, optimizer_impl="for_loop"))


def test_fused_default_is_deterministic() -> None:
    assert model_to_bytes(_train()) == model_to_bytes(_train())


# --- students stream a day larger than their shuffle window ------------------------------


def _stream_cfg(kd: KD, window: int, name: str = "streamer") -> PipelineConfig:
    """The pipeline config plus a student like student_aux that streams in ``window`` rows
    (a new model name: nothing bootstrapped, so its first day is a cold start)."""
    s = kd.cfg.student("student_aux")
    streamer = s.model_copy(update={"name": name, "model": s.model.model_copy(
        update={"shuffle_window_rows": window})})
    return kd.cfg.model_copy(update={"students": [*kd.cfg.students, streamer]})


def _rows(kd: KD, day: dt.date) -> int:
    return int(part.read_manifest(examples.examples_uri(kd.cfg.root, "movielens", day)).rows or 0)


def _spy_open_day(monkeypatch: pytest.MonkeyPatch) -> list[DayData | DayStream]:
    opened: list[DayData | DayStream] = []

    def spy(*a: object, **kw: object) -> DayData | DayStream:
        opened.append(data := open_day(*a, **kw))  # type: ignore[arg-type]
        return data

    monkeypatch.setattr(steps, "open_day", spy)
    return opened


def test_a_day_within_the_window_trains_exactly_as_the_whole_day(kd: KD, monkeypatch: pytest.MonkeyPatch):
    """The default window holds a MovieLens day: the student step is byte for byte the
    whole-day recipe (one permutation of all rows from the day's seed)."""
    cfg, D = kd.cfg, kd.day(1)
    opened = _spy_open_day(monkeypatch)
    labels = mat.materialize(cfg, D)["uri"]
    steps.student_step(cfg, "student_aux", D, labels)
    assert len(opened) == 1 and isinstance(opened[0], DayData)
    stored = part.read_blob(registry.checkpoint_uri(cfg.root, "movielens", "student_aux", D), registry.WEIGHTS)

    s = cfg.student("student_aux")
    parent = registry.find_checkpoint(cfg.root, "movielens", "student_aux", kd.B)
    model = parent.load(cfg.spec)
    data = load_days(cfg.root, cfg.spec, [D])
    joined = load_joined(labels, data.example_ids, cfg.spec, D)
    fit(model, model_features(model, data), data.hard, joined.soft, s.distill, seed=steps._seed(s.model, D),
        optimizer=parent.load_optimizer(model), start_step=parent.steps)
    assert model_to_bytes(model) == stored


def test_a_day_larger_than_the_window_streams_and_publishes_deterministically(kd: KD,
                                                                              monkeypatch: pytest.MonkeyPatch):
    d1, d2 = kd.day(1), kd.day(2)
    rows = min(_rows(kd, d1), _rows(kd, d2))
    window = max(rows // 3, 1)
    cfg = _stream_cfg(kd, window)
    opened = _spy_open_day(monkeypatch)
    for day in (d1, d2):
        labels = mat.materialize(cfg, day)["uri"]
        first = steps.student_step(cfg, "streamer", day, labels)
        blobs = {b: part.read_blob(first["uri"], b) for b in (registry.WEIGHTS, registry.OPTIMIZER)}
        again = steps.student_step(cfg, "streamer", day, labels, force=True)
        assert again["version"] == first["version"] and again["progressive"] == first["progressive"]
        assert {b: part.read_blob(again["uri"], b) for b in blobs} == blobs
    streams = [d for d in opened if isinstance(d, DayStream)]
    assert len(streams) == len(opened) == 4
    n1, n2 = (-(-_rows(kd, d) // window) for d in (d1, d2))
    # day 1 cold: one pass over the numeric columns (normalizer) + one epoch;
    # day 2 warm: one progressive-evaluation pass + one epoch; never the day whole
    assert [s.windows_read for s in streams] == [2 * n1, 2 * n1, 2 * n2, 2 * n2]
    ck = registry.find_checkpoint(cfg.root, "movielens", "streamer", d2)
    assert ck.meta["rows_day"] == _rows(kd, d2) and ck.meta["progressive"]["date"] == d2.isoformat()
    assert ck.meta["kd_applied"] is True and ck.meta["labels_missing"] == 0
    # a different window is a different shuffle: the setting is live
    other = _stream_cfg(kd, window + 1, name="streamer2")
    out = steps.student_step(other, "streamer2", d1, mat.materialize(cfg, d1)["uri"])
    assert part.read_blob(out["uri"], registry.WEIGHTS) != part.read_blob(
        registry.checkpoint_uri(cfg.root, "movielens", "streamer", d1), registry.WEIGHTS)


def test_streamed_evaluation_and_normalizer_match_the_whole_day(kd: KD):
    cfg, D = kd.cfg, kd.day(1)
    whole = load_days(cfg.root, cfg.spec, [D])
    stream = open_day(cfg.root, cfg.spec, D, max(len(whole) // 4, 1))
    assert isinstance(stream, DayStream) and len(stream) == len(whole)
    for k, v in whole.hard.items():
        np.testing.assert_array_equal(stream.hard[k], v)
    np.testing.assert_array_equal(stream.groups, whole.groups)
    model = registry.find_checkpoint(cfg.root, "movielens", "student_aux", kd.B).load(cfg.spec)
    got, want = evaluate(model, stream), evaluate(model, whole)
    for task in want:
        assert got[task] == pytest.approx(want[task], rel=1e-6, nan_ok=True), task
    s = cfg.student("student_aux").model
    a = new_model(s, cfg.spec, [], whole, seed=1)
    b = new_model(s, cfg.spec, [], stream, seed=1)
    np.testing.assert_allclose(b.num_mean.numpy(), a.num_mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.num_std.numpy(), a.num_std.numpy(), rtol=1e-9)


def test_streamed_normalizer_handles_nulls_and_unseen_columns():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1000, 3)) * [1, 100, 1] + [0, 5, 0]
    x[rng.random(1000) < 0.2, 0] = np.nan
    x[:, 2] = np.nan  # never seen: mean 0, std 1
    x[7, 1] = np.inf
    a, b = MultiTaskRanker(RankerConfig(), 1, 3, TASKS), MultiTaskRanker(RankerConfig(), 1, 3, TASKS)
    a.fit_normalizer(x)
    b.fit_normalizer_streamed([x[:1], x[1:333], x[333:334], x[334:]])
    np.testing.assert_allclose(b.num_mean.numpy(), a.num_mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.num_std.numpy(), a.num_std.numpy(), rtol=1e-12)
    assert float(b.num_std[2]) == 1.0 and float(b.num_mean[2]) == 0.0
    with pytest.raises(ValueError, match="zero rows"):
        b.fit_normalizer_streamed([])


def test_streamed_labels_must_follow_the_example_rows(kd: KD):
    cfg, d1, d2 = kd.cfg, kd.day(1), kd.day(2)
    labels = mat.materialize(cfg, d1)["uri"]
    ex1, ex2 = (examples.examples_uri(cfg.root, "movielens", d) for d in (d1, d2))
    joined = load_aligned(labels, ex1, cfg.spec, batch_rows=37)  # batch and file boundaries differ
    data = load_days(cfg.root, cfg.spec, [d1])
    by_id = load_joined(labels, data.example_ids, cfg.spec, d1)
    for k, v in by_id.soft.items():
        np.testing.assert_array_equal(joined.soft[k], v)
    assert joined.missing == 0 and joined.metadata == by_id.metadata
    with pytest.raises(DataError) as e:
        load_aligned(labels, ex2, cfg.spec)
    assert labels in str(e.value) and ex2 in str(e.value)


def test_execution_fields_may_change_between_days_but_the_model_may_not(kd: KD):
    """optimizer_impl and shuffle_window_rows say how a day is trained: a warm start keeps
    its lineage when they change (and trains with the new ones); a change of what the
    model is (here its lr) still refuses the parent."""
    cfg, D = kd.cfg, kd.day(1)
    model = cfg.student("student_aux").model

    def with_model(m: RankerConfig) -> PipelineConfig:
        return cfg.model_copy(update={"students": [x.model_copy(update={"model": m}) if x.name == "student_aux"
                                                   else x for x in cfg.students]})

    changed = with_model(model.model_copy(update={"optimizer_impl": "for_loop", "shuffle_window_rows": 100}))
    labels = mat.materialize(changed, D)["uri"]
    out = steps.student_step(changed, "student_aux", D, labels)
    ck = registry.find_checkpoint(cfg.root, "movielens", "student_aux", D)
    assert ck.meta["parent"] == registry.find_checkpoint(cfg.root, "movielens", "student_aux", kd.B).version
    assert ck.meta["model"]["optimizer_impl"] == "for_loop" and ck.meta["model"]["shuffle_window_rows"] == 100
    assert out["trained_through"] == D.isoformat()

    refused = with_model(model.model_copy(update={"lr": model.lr * 2}))
    with pytest.raises(StorageError, match="parent's model config differs"):
        steps.student_step(refused, "student_aux", kd.day(2), mat.materialize(cfg, kd.day(2))["uri"])
