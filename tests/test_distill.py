"""Gradient scaling, distillation losses, auxiliary-head isolation and the student adapter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcore.data.spec import Task
from kdcore.distill.adapter import StudentAdapter, fit_adapters
from kdcore.distill.config import AdapterKnobs, AuxKnobs, DirectKnobs, DistillConfig
from kdcore.distill.losses import distillation_loss, hard_loss, soft_loss, soft_target
from kdcore.errors import SpecError
from kdcore.models.ranker import MultiTaskRanker, RankerConfig, RankerOutput
from kdcore.yamlconf import validate

BIN = Task(name="like", kind="binary")
REG = Task(name="rating", kind="regression", min=1, max=5)
TASKS = [BIN, REG]
CFG = RankerConfig(embedding_dim=4, hash_buckets=31, hidden=[8, 6], seed=1)


def _bce(z: float, t: float) -> float:
    s = 1 / (1 + math.exp(-z))
    return -(t * math.log(s) + (1 - t) * math.log(1 - s))


def _batch(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 31, (n, 2), generator=g), torch.randn(n, 3, generator=g)


# --- the auxiliary strength knob ------------------------------------------------------------

def _aux_only_grads(model: MultiTaskRanker, weight: float) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    cat, num = _batch()
    out = model(cat, num)
    (weight * (out.aux["like"].sum() + (out.aux["rating"] ** 2).mean())).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_aux_loss_weight_scales_the_teachers_gradient_into_shared_layers() -> None:
    """loss_weight scales the auxiliary gradient everywhere; under Adam the aux head's own
    update is invariant to that constant, so what the knob changes is the teacher's share
    of the shared layers' gradient (why a separate grad_scale knob was removed)."""
    model = MultiTaskRanker(CFG, 2, 3, TASKS, aux_heads=True)
    g1, g_quarter = (_aux_only_grads(model, w) for w in (1.0, 0.25))
    shared = [n for n in g1 if n.startswith(("shared.", "embedding."))]
    aux = [n for n in g1 if n.startswith("aux_heads.")]
    assert shared and aux
    assert not [n for n in g1 if n.startswith("heads.")]  # serving heads untouched by aux loss
    for n in shared + aux:
        torch.testing.assert_close(g_quarter[n], 0.25 * g1[n], rtol=1e-6, atol=0)


# --- hand-computed losses ----------------------------------------------------------------

def test_hard_and_soft_losses_match_hand_values() -> None:
    z = torch.tensor([0.5, -1.0])
    assert hard_loss("binary", z, torch.tensor([1.0, 0.0])).item() == pytest.approx(
        (_bce(0.5, 1) + _bce(-1.0, 0)) / 2, rel=1e-6)
    assert soft_loss("binary", z, torch.tensor([0.8, 0.3])).item() == pytest.approx(
        (_bce(0.5, 0.8) + _bce(-1.0, 0.3)) / 2, rel=1e-6)
    v = torch.tensor([2.0, 4.5])
    assert hard_loss("regression", v, torch.tensor([3.0, 4.0])).item() == pytest.approx((1 + 0.25) / 2)
    assert soft_loss("regression", v, torch.tensor([2.5, 5.5])).item() == pytest.approx((0.25 + 1) / 2)


def test_soft_target_scaling() -> None:
    p = torch.tensor([0.8, 0.5])
    # logit(0.8) = log 4; halving it gives log 2 -> probability 2/3; 0.5 stays 0.5.
    torch.testing.assert_close(soft_target("binary", p, 0.5), torch.tensor([2 / 3, 0.5]))
    torch.testing.assert_close(soft_target("binary", torch.tensor([0.8]), 2.0), torch.tensor([16 / 17]))
    assert torch.equal(soft_target("binary", p, 1.0), p)
    torch.testing.assert_close(soft_target("regression", torch.tensor([3.0]), 1.5), torch.tensor([4.5]))


def _out(serving_bin: float, serving_reg: float, aux: tuple[float, float] | None = None) -> RankerOutput:
    aux_d = {} if aux is None else {"like": torch.tensor([aux[0]]), "rating": torch.tensor([aux[1]])}
    return RankerOutput(serving={"like": torch.tensor([serving_bin]), "rating": torch.tensor([serving_reg])},
                        aux=aux_d)


HARD = {"like": torch.tensor([1.0]), "rating": torch.tensor([4.0])}
SOFT = {"like": torch.tensor([0.8]), "rating": torch.tensor([3.0])}


def test_none_mode_sums_hard_losses_and_ignores_soft() -> None:
    total, parts = distillation_loss(_out(0.4, 3.5), HARD, None, TASKS, DistillConfig(mode="none"))
    expected = _bce(0.4, 1) + 0.25
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert parts == pytest.approx({"hard/like": _bce(0.4, 1), "hard/rating": 0.25, "task/like": _bce(0.4, 1),
                                   "task/rating": 0.25, "total": expected}, rel=1e-6)


def test_direct_mode_mixing_weight_and_temperature() -> None:
    cfg = DistillConfig(mode="direct", direct=DirectKnobs(soft_weight=0.25, temperature=2.0))
    total, parts = distillation_loss(_out(0.4, 3.5), HARD, SOFT, TASKS, cfg)
    # binary: student logit / 2 against sigmoid(logit(0.8) / 2) = 2/3
    binary = 0.75 * _bce(0.4, 1) + 0.25 * _bce(0.2, 2 / 3)
    regression = 0.75 * 0.25 + 0.25 * 0.25  # (3.5-4)^2 and (3.5-3)^2; no temperature
    assert total.item() == pytest.approx(binary + regression, rel=1e-6)
    assert parts["soft/like"] == pytest.approx(_bce(0.2, 2 / 3), rel=1e-6)


def test_auxiliary_mode_weight_and_soft_label_scale() -> None:
    cfg = DistillConfig(mode="auxiliary", auxiliary=AuxKnobs(loss_weight=0.3, soft_label_scale=0.5))
    total, parts = distillation_loss(_out(0.4, 3.5, aux=(-0.2, 2.0)), HARD, SOFT, TASKS, cfg)
    hard = _bce(0.4, 1) + 0.25
    soft = _bce(-0.2, 2 / 3) + (2.0 - 1.5) ** 2  # scaled targets: 2/3 and 0.5 * 3.0
    assert total.item() == pytest.approx(hard + 0.3 * soft, rel=1e-6)
    assert parts["soft/rating"] == pytest.approx(0.25, rel=1e-6)


def test_missing_soft_labels_or_aux_head_name_the_task() -> None:
    with pytest.raises(ValueError, match="'like'"):
        distillation_loss(_out(0.4, 3.5, aux=(0, 0)), HARD, None, TASKS, DistillConfig())
    with pytest.raises(ValueError, match="'rating'"):
        distillation_loss(_out(0.4, 3.5), HARD, {"like": SOFT["like"]}, TASKS, DistillConfig(mode="direct"))
    with pytest.raises(ValueError, match="auxiliary head for task 'like'"):
        distillation_loss(_out(0.4, 3.5), HARD, SOFT, TASKS, DistillConfig(mode="auxiliary"))


def test_soft_targets_are_detached() -> None:
    teacher = {k: v.clone().requires_grad_(True) for k, v in SOFT.items()}
    out = _out(0.4, 3.5)
    for v in out.serving.values():
        v.requires_grad_(True)
    total, _ = distillation_loss(out, HARD, teacher, TASKS, DistillConfig(mode="direct"))
    total.backward()
    assert all(v.grad is None for v in teacher.values())
    assert all(v.grad is not None for v in out.serving.values())


# --- auxiliary-mode isolation in a real model -------------------------------------------------

def _grads(model: MultiTaskRanker, hard: dict, soft: dict, cfg: DistillConfig) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    cat, num = _batch(seed=2)
    total, _ = distillation_loss(model(cat, num), hard, soft, TASKS, cfg)
    total.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_auxiliary_mode_hard_loss_only_trains_serving_heads_and_soft_only_aux() -> None:
    model = MultiTaskRanker(CFG, 2, 3, TASKS, aux_heads=True)
    g = torch.Generator().manual_seed(5)
    hard = {"like": torch.randint(0, 2, (16,), generator=g).float(), "rating": 1 + 4 * torch.rand(16, generator=g)}
    soft = {"like": torch.rand(16, generator=g), "rating": 1 + 4 * torch.rand(16, generator=g)}
    cfg = DistillConfig(mode="auxiliary")
    base = _grads(model, hard, soft, cfg)
    new_hard = _grads(model, {"like": 1 - hard["like"], "rating": hard["rating"] + 1}, soft, cfg)
    new_soft = _grads(model, hard, {"like": 1 - soft["like"], "rating": soft["rating"] + 1}, cfg)
    for n in base:
        if n.startswith("aux_heads."):
            assert torch.equal(base[n], new_hard[n]), n  # hard labels never reach aux heads
            assert not torch.equal(base[n], new_soft[n]), n
        if n.startswith("heads."):
            assert torch.equal(base[n], new_soft[n]), n  # soft labels never reach serving heads
            assert not torch.equal(base[n], new_hard[n]), n
    # No teacher at all: aux heads get no gradient.
    none = _grads(model, hard, soft, DistillConfig(mode="none"))
    assert all(v is None for n, v in none.items() if n.startswith("aux_heads."))


# --- config ----------------------------------------------------------------------------------

def test_distill_config_validation_names_field() -> None:
    with pytest.raises(SpecError, match="direct.soft_weight"):
        validate(DistillConfig, {"mode": "direct", "direct": {"soft_weight": 1.5}}, "s.yaml")
    with pytest.raises(SpecError, match="auxiliary.soft_label_scale"):
        validate(DistillConfig, {"auxiliary": {"soft_label_scale": 0}}, "s.yaml")
    with pytest.raises(SpecError, match="auxiliary.grad_scal"):
        validate(DistillConfig, {"auxiliary": {"grad_scal": 0.5}}, "s.yaml")
    with pytest.raises(SpecError, match="mode"):
        validate(DistillConfig, {"mode": "hinton"}, "s.yaml")
    assert DistillConfig().mode == "auxiliary"


# --- student adapter ---------------------------------------------------------------------

def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _biased_binary(n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(-1.0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(np.float32)
    teacher = (1 / (1 + np.exp(-(true_logit + 1.5)))).astype(np.float32)
    return teacher, y


@pytest.mark.parametrize("hidden", [0, 8])
def test_adapter_corrects_biased_binary_teacher_deterministically(hidden: int) -> None:
    teacher, y = _biased_binary()
    corrected = StudentAdapter(hidden=hidden, epochs=50, lr=0.05).fit(teacher, y, "binary").transform(teacher)
    assert corrected.dtype == np.float32 and ((corrected > 0) & (corrected < 1)).all()
    assert _log_loss(corrected, y) < _log_loss(teacher, y) - 0.05
    again = StudentAdapter(hidden=hidden, epochs=50, lr=0.05).fit(teacher, y, "binary").transform(teacher)
    np.testing.assert_array_equal(corrected, again)


def test_fit_adapters_regression_clipped_and_disabled_passthrough() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(1, 6, 3000).astype(np.float32)
    teacher_bin, y_bin = _biased_binary(3000)
    soft = {"like": teacher_bin, "rating": (0.6 * y + 2.5).astype(np.float32)}  # shrunk and shifted
    hard = {"like": y_bin, "rating": y}
    out = fit_adapters(soft, hard, TASKS, AdapterKnobs(enabled=True, epochs=200))
    assert np.mean((out["rating"] - y) ** 2) < np.mean((soft["rating"] - y) ** 2) / 2
    assert out["rating"].min() >= 1 and out["rating"].max() <= 5
    assert _log_loss(out["like"], y_bin) < _log_loss(teacher_bin, y_bin)
    assert fit_adapters(soft, hard, TASKS, AdapterKnobs(enabled=False))["rating"] is soft["rating"]
    with pytest.raises(ValueError, match="'rating'"):
        fit_adapters({"like": teacher_bin}, hard, TASKS, AdapterKnobs(enabled=True))


def test_adapter_transform_before_fit_fails() -> None:
    with pytest.raises(RuntimeError, match="before fit"):
        StudentAdapter().transform(np.array([0.5]))
