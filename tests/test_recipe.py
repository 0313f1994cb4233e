"""The training recipe (issue 10): declared task weights and target transforms, privileged
features that never reach a student, null handling per feature, out-of-sample labels by
default, continuous training with the optimizer carried in the checkpoint, bootstrap that
trains auxiliary heads, and distillation knobs that each change the student."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from kdcore.config import PipelineConfig, load_pipeline
from kdcore.data.spec import DatasetSpec, Task
from kdcore.distill.config import DistillConfig
from kdcore.distill.losses import distillation_loss
from kdcore.errors import DataError, SpecError
from kdcore.labels import materialize as mat
from kdcore.models import registry
from kdcore.models.checkpoint import model_to_bytes
from kdcore.models.features import FeatureSet, encode_features
from kdcore.models.ranker import MultiTaskRanker, RankerConfig
from kdcore.training import steps
from kdcore.training.data import load_days
from kdcore.training.loop import NO_KD, fit, model_features
from kdcore.yamlconf import validate
from tests.pipeline_fixtures import TINY, kd, kd_base  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
CFG = RankerConfig(embedding_dim=4, hidden=[8], hash_buckets=32, seed=3)


def _spec(**kw) -> DatasetSpec:
    base = dict(name="t", group="u", categorical=["u", "i"], numeric=["x", "p"],
                tasks=[Task(name="click", kind="binary"),
                       Task(name="wt", kind="regression", min=0, transform=["log1p", "standardize"])])
    base.update(kw)
    return DatasetSpec(**base)


def _batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.randint(1, 32, (n, 2), generator=g)
    num = torch.randn(n, 2, generator=g)
    hard = {"click": (torch.rand(n, generator=g) < 0.3).float(), "wt": torch.randn(n, generator=g)}
    return cat, num, hard


# --- task weights and transforms ---------------------------------------------------------

def _shared_grad(tasks: list[Task]) -> torch.Tensor:
    model = MultiTaskRanker(CFG, 2, 2, tasks)
    cat, num, hard = _batch()
    loss, _ = distillation_loss(model(cat, num), hard, None, tasks, NO_KD)
    loss.backward()
    return model.shared[0].weight.grad.clone()


def test_task_weights_change_the_gradient_mix_as_declared() -> None:
    click, wt = Task(name="click", kind="binary"), Task(name="wt", kind="regression")
    g_click = _shared_grad([click, wt.model_copy(update={"loss_weight": 0.0})])
    g_both = _shared_grad([click, wt])
    g_wt2 = _shared_grad([click, wt.model_copy(update={"loss_weight": 2.0})])
    g_wt = g_both - g_click
    assert g_wt.abs().sum() > 0
    torch.testing.assert_close(g_wt2, g_click + 2.0 * g_wt, rtol=1e-5, atol=1e-7)


def test_loss_parts_report_each_tasks_weighted_share() -> None:
    tasks = [Task(name="click", kind="binary"), Task(name="wt", kind="regression", loss_weight=0.25)]
    model = MultiTaskRanker(CFG, 2, 2, tasks)
    cat, num, hard = _batch()
    loss, parts = distillation_loss(model(cat, num), hard, None, tasks, NO_KD)
    assert parts["task/wt"] == pytest.approx(0.25 * parts["hard/wt"], rel=1e-6)
    assert parts["task/click"] + parts["task/wt"] == pytest.approx(parts["total"], rel=1e-6)


def test_standardize_and_log1p_targets_round_trip_and_start_near_unit_scale() -> None:
    spec = _spec()
    model = MultiTaskRanker(CFG, 2, 2, list(spec.tasks))
    y = np.random.default_rng(0).exponential(700.0, 5000).astype(np.float32)  # seconds: scale ~700
    model.fit_targets({"click": np.zeros(5000, np.float32), "wt": y})
    z = model.to_model_space("wt", y)
    assert abs(float(z.mean())) < 1e-4 and float(z.std()) == pytest.approx(1.0, abs=1e-3)
    back = model.to_task_units("wt", torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(back, y, rtol=1e-4)
    with pytest.raises(ValueError, match="regression tasks only"):
        Task(name="c", kind="binary", transform=["standardize"])
    with pytest.raises(ValueError, match="log1p needs a declared min"):
        Task(name="r", kind="regression", transform=["log1p"])


def test_a_task_in_seconds_no_longer_dominates_the_loss() -> None:
    """Issue 10: the watch-time MSE (~720) was ~1500x the click BCE; standardized it is ~1."""
    tasks_raw = [Task(name="click", kind="binary"), Task(name="wt", kind="regression", min=0)]
    tasks_std = [tasks_raw[0], Task(name="wt", kind="regression", min=0, transform=["log1p", "standardize"])]
    n = 512
    rng = np.random.default_rng(1)
    cat = rng.integers(1, 32, (n, 2))
    num = rng.standard_normal((n, 2)).astype(np.float32)
    hard = {"click": (rng.random(n) < 0.2).astype(np.float32), "wt": rng.exponential(30.0, n).astype(np.float32)}
    shares = {}
    for key, tasks in (("raw", tasks_raw), ("std", tasks_std)):
        model = MultiTaskRanker(CFG, 2, 2, tasks)
        model.fit_normalizer(num)
        model.fit_targets(hard)
        from kdcore.models.features import Features

        out = fit(model, Features(cat=cat, num=num), hard, None, NO_KD, seed=0, epochs=1)
        shares[key] = out["loss_share"]["wt"]
    assert shares["raw"] > 0.95
    assert 0.2 < shares["std"] < 0.8


# --- privileged features and null handling -----------------------------------------------

def test_privileged_features_are_the_teachers_only(tmp_path: Path) -> None:
    cfg = load_pipeline(TINY)
    spec = cfg.spec
    assert spec.privileged and set(spec.privileged) <= set(spec.feature_columns)
    assert cfg.teacher.model.features == spec.feature_columns
    for s in cfg.all_students():
        assert s.model.features == spec.serving_features
        assert not set(s.model.features) & set(spec.privileged)
    text = TINY.read_text().replace("model: &student {embedding_dim: 4,",
                                    "model: &student {features: [user_id, item_id, age], embedding_dim: 4,")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("../../configs/movielens.yaml", str(REPO / "configs" / "movielens.yaml")))
    with pytest.raises(SpecError, match="student 'student_aux': feature 'age' is privileged"):
        load_pipeline(bad)


def test_a_student_model_never_reads_a_privileged_column(kd) -> None:  # noqa: F811
    day = kd.day(1)
    mat.materialize(kd.cfg, day)
    out = steps.student_step(kd.cfg, "student_aux", day, steps_labels(kd.cfg, day))
    meta = registry.find_checkpoint(kd.cfg.root, "movielens", "student_aux", day).meta
    assert out["version"] == meta["version"]
    assert not set(meta["features"]) & set(kd.cfg.spec.privileged)
    data = load_days(kd.cfg.root, kd.cfg.spec, [day])
    # the student still predicts when every privileged column is garbage: it never reads them
    model = registry.find_checkpoint(kd.cfg.root, "movielens", "student_aux", day).load(kd.cfg.spec)
    before = model.predict(*map(torch.from_numpy, _cols(model_features(model, data))))
    scrambled = data.table
    for c in kd.cfg.spec.privileged:
        col = scrambled.column(c)
        scrambled = scrambled.set_column(scrambled.schema.get_field_index(c), c, col.take(
            pa.array(np.random.default_rng(0).permutation(len(col)))))
    feats = encode_features(scrambled, kd.cfg.spec, model.config.hash_buckets,
                            FeatureSet.of(kd.cfg.spec, model.config.features))
    after = model.predict(*map(torch.from_numpy, _cols(feats)))
    for k in before:
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0)
    teacher = mat.choose_teacher(kd.cfg, day).load(kd.cfg.spec)
    assert teacher.n_num > model.n_num and teacher.n_cat > model.n_cat


def steps_labels(cfg: PipelineConfig, day: dt.date) -> str:
    from kdcore import pipeline

    return pipeline.find_labels(cfg, day)


def _cols(f):
    return f.cat, f.num


def test_null_handling_is_declared_per_feature() -> None:
    t = pa.table({"u": [1, 2, 3, 4], "i": [5, 6, 7, 8], "x": [1.0, None, 3.0, float("nan")],
                  "p": [10.0, None, 30.0, 40.0], "click": [0, 1, 0, 1], "wt": [1.0, 2.0, 3.0, 4.0]})
    spec = _spec(nulls={"p": "zero"})
    f = encode_features(t, spec, 32)
    assert np.isnan(f.num[1, 0]) and np.isnan(f.num[3, 0])  # mean (default): the model imputes
    assert f.num[1, 1] == 0.0  # zero: the raw value 0
    model = MultiTaskRanker(CFG, 2, 2, list(spec.tasks))
    model.fit_normalizer(f.num)
    assert float(model.num_mean[0]) == pytest.approx(2.0)  # nulls ignored when fitting
    cat, num = torch.from_numpy(f.cat), torch.from_numpy(f.num)
    z = model._shared(cat, num)
    assert torch.isfinite(z).all()
    # a null x is exactly the mean x: same output as feeding the mean
    num_mean = num.clone()
    num_mean[1, 0] = model.num_mean[0].float()
    torch.testing.assert_close(model._shared(cat[1:2], num[1:2]), model._shared(cat[1:2], num_mean[1:2]))
    with pytest.raises(DataError, match="column 'x'.*2 null/NaN.*nulls.x"):
        encode_features(t, _spec(nulls={"x": "error"}), 32)
    with pytest.raises(ValueError, match="'u' is not a numeric feature"):
        _spec(nulls={"u": "zero"})


# --- label policy ------------------------------------------------------------------------

def test_labels_are_out_of_sample_by_default(kd) -> None:  # noqa: F811
    day = kd.day(1)
    steps.teacher_step(kd.cfg, day)  # the teacher through D exists ...
    chosen = mat.choose_teacher(kd.cfg, day)
    assert chosen.trained_through == kd.B < day  # ... but D is labelled by the one through D-1
    ins = kd.cfg.model_copy(update={"policies": kd.cfg.policies.model_copy(
        update={"labels": "in_sample", "label_lag_days": 0})})
    assert mat.choose_teacher(ins, day).trained_through == day
    with pytest.raises(SpecError, match="label_lag_days 0 labels D with a teacher trained on D"):
        validate(PipelineConfig, {"dataset": "x", "storage_root": "y", "students": [{"name": "a"}],
                                  "policies": {"label_lag_days": 0}}, "cfg.yaml")


# --- continuous training -----------------------------------------------------------------

def test_day_steps_continue_the_optimizer_bit_for_bit(kd) -> None:  # noqa: F811
    """Two daily steps through checkpoints == one model and one optimizer trained on both
    days in memory; a fresh optimizer on day 2 (the old recipe) is not."""
    d1, d2 = kd.day(1), kd.day(2)
    steps.teacher_step(kd.cfg, d1)
    steps.teacher_step(kd.cfg, d2)
    stored = part_bytes(kd.cfg, d2)

    assert _in_memory(kd, [d1, d2]) == stored

    c1 = registry.find_checkpoint(kd.cfg.root, "movielens", "teacher", d1)
    fresh = c1.load(kd.cfg.spec)
    data = load_days(kd.cfg.root, kd.cfg.spec, [d2])
    fit(fresh, model_features(fresh, data), data.hard, None, NO_KD, seed=steps._seed(fresh.config, d2))
    assert model_to_bytes(fresh) != stored


def _in_memory(kd, days: list[dt.date]) -> bytes:  # noqa: F811
    """The bootstrap teacher trained on ``days`` by one model and one optimizer, in memory."""
    parent = registry.find_checkpoint(kd.cfg.root, "movielens", "teacher", kd.B)
    model = parent.load(kd.cfg.spec)
    opt, step = parent.load_optimizer(model), parent.steps
    for day in days:
        data = load_days(kd.cfg.root, kd.cfg.spec, [day])
        step = fit(model, model_features(model, data), data.hard, None, NO_KD,
                   seed=steps._seed(model.config, day), optimizer=opt, start_step=step)["steps_total"]
    return model_to_bytes(model)


def part_bytes(cfg: PipelineConfig, day: dt.date) -> bytes:
    from kdcore.storage import partition as part

    return part.read_blob(registry.checkpoint_uri(cfg.root, "movielens", "teacher", day), registry.WEIGHTS)


def test_two_processes_equal_one(kd, tmp_path: Path) -> None:  # noqa: F811
    """Day D in this process, day D+1 in a fresh interpreter, equals the in-memory run."""
    d1, d2 = kd.day(1), kd.day(2)
    steps.teacher_step(kd.cfg, d1)
    script = textwrap.dedent(f"""
        import datetime as dt, os
        from kdcore.config import load_pipeline
        from kdcore.training import steps
        os.environ["KD_STORAGE_ROOT"] = {str(kd.root)!r}
        cfg = load_pipeline({str(TINY)!r})
        steps.teacher_step(cfg, dt.date.fromisoformat({d2.isoformat()!r}))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=300)
    stored = part_bytes(kd.cfg, d2)
    meta = registry.find_checkpoint(kd.cfg.root, "movielens", "teacher", d2).meta
    assert meta["optimizer"] and meta["steps_total"] > registry.find_checkpoint(
        kd.cfg.root, "movielens", "teacher", d1).meta["steps_total"]
    assert _in_memory(kd, [d1, d2]) == stored


# --- bootstrap and knobs -----------------------------------------------------------------

def test_bootstrap_trains_the_auxiliary_heads(kd) -> None:  # noqa: F811
    ck = registry.find_checkpoint(kd.cfg.root, "movielens", "student_aux", kd.B)
    assert ck.meta["kd_applied"] is True and ck.meta["aux_tasks"] == kd.cfg.spec.served_tasks
    model = ck.load(kd.cfg.spec)
    init = MultiTaskRanker(model.config, model.n_cat, model.n_num, model.tasks, aux_heads=model.aux_tasks)
    trained, fresh = model.aux_heads.state_dict(), init.aux_heads.state_dict()
    assert trained.keys() == fresh.keys()
    for k in trained:
        assert not torch.equal(trained[k], fresh[k]), k
    assert "rating" not in model.aux_heads  # unserved: not distilled, so no head nothing trains
    ctrl = registry.find_checkpoint(kd.cfg.root, "movielens", "control", kd.B)
    assert ctrl.meta["kd_applied"] is False


def _train_aux(knobs: dict) -> bytes:
    tasks = [Task(name="click", kind="binary"), Task(name="wt", kind="regression", served=False)]
    model = MultiTaskRanker(CFG, 2, 2, tasks, aux_heads=["click"])
    rng = np.random.default_rng(0)
    n = 400
    from kdcore.models.features import Features

    feats = Features(cat=rng.integers(1, 32, (n, 2)), num=rng.standard_normal((n, 2)).astype(np.float32))
    hard = {"click": (rng.random(n) < 0.3).astype(np.float32), "wt": rng.standard_normal(n).astype(np.float32)}
    soft = {"click": rng.random(n).astype(np.float32), "wt": rng.standard_normal(n).astype(np.float32)}
    model.fit_normalizer(feats.num)
    cfg = DistillConfig.model_validate({"mode": "auxiliary", "auxiliary": knobs})
    fit(model, feats, hard, soft, cfg, seed=0, epochs=2)
    return model_to_bytes(model)


def test_each_auxiliary_knob_changes_the_student() -> None:
    base = _train_aux({})
    assert _train_aux({"loss_weight": 0.1}) != base
    assert _train_aux({"soft_label_scale": 0.5}) != base
    assert _train_aux({}) == base  # deterministic, so the differences above are the knobs
    with pytest.raises(ValueError, match="grad_scale was removed: under Adam it is the same knob as loss_weight"):
        DistillConfig.model_validate({"mode": "auxiliary", "auxiliary": {"grad_scale": 0.1}})


def test_served_size_excludes_auxiliary_heads() -> None:
    from kdcore.models.ranker import export_serving

    model = MultiTaskRanker(CFG, 2, 2, [Task(name="click", kind="binary")], aux_heads=True)
    served = export_serving(model)
    assert model.param_count(serving=True) == served.param_count() < model.param_count()
    assert model.flops_per_example(serving=True) == served.flops_per_example() < model.flops_per_example()
