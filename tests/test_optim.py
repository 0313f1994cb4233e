"""Continuous training: optimizer state and learning-rate policy carried across days.

The key property: training N steps, checkpointing weights + optimizer state to bytes,
restoring them in a fresh object (or a fresh process) and training M more steps gives
bit-identical weights to training N+M steps without interruption, and a fresh
optimizer (the old daily behaviour) does not.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load, save
from torch.nn import functional as F

from kdcore.data.spec import Task
from kdcore.models.checkpoint import model_from_bytes, model_to_bytes
from kdcore.models.optim import (
    LRPolicy,
    global_step,
    load_optimizer_state,
    lr_at,
    make_optimizer,
    optimizer_state_to_bytes,
    set_lr,
)
from kdcore.models.ranker import MultiTaskRanker, RankerConfig

REPO = Path(__file__).resolve().parents[1]
TASKS = [Task(name="click", kind="binary"), Task(name="wt", kind="regression")]
N_CAT, N_NUM, BATCH, BUCKETS = 2, 3, 16, 16
POLICY = LRPolicy(kind="inverse_sqrt", warmup_steps=3, decay_steps=4)
OPTIMIZERS = ["adam", "adagrad"]
N_STEPS, M_STEPS = 7, 6


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    _set_determinism()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _set_determinism() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def _cfg(optimizer: str = "adam", **kw: object) -> RankerConfig:
    return RankerConfig.model_validate(
        {"embedding_dim": 4, "hidden": [8], "hash_buckets": BUCKETS, "optimizer": optimizer, **kw})


def _model(cfg: RankerConfig, aux_heads: bool = False) -> MultiTaskRanker:
    return MultiTaskRanker(cfg, N_CAT, N_NUM, TASKS, aux_heads=aux_heads)


def _optimizer(model: MultiTaskRanker) -> torch.optim.Optimizer:
    return make_optimizer(model, model.config.optimizer, model.config.lr, model.config.optimizer_impl)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of lifetime step ``step``: the same whether or not training was interrupted."""
    g = torch.Generator().manual_seed(10_000 + step)
    cat = torch.randint(0, BUCKETS, (BATCH, N_CAT), generator=g)
    num = torch.randn(BATCH, N_NUM, generator=g)
    click = torch.randint(0, 2, (BATCH,), generator=g).float()
    wt = torch.randn(BATCH, generator=g)
    return cat, num, click, wt


def _task_loss(heads: dict[str, torch.Tensor], click: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(heads["click"], click) + F.mse_loss(heads["wt"], wt)


def _train(model: MultiTaskRanker, opt: torch.optim.Optimizer, start: int, steps: int) -> None:
    """Lifetime steps [start, start + steps): lr from the policy, BCE + MSE on the serving
    heads (and on the auxiliary heads when the model has them)."""
    model.train()
    for step in range(start, start + steps):
        set_lr(opt, lr_at(POLICY, model.config.lr, step))
        cat, num, click, wt = _batch(step)
        out = model(cat, num)
        loss = _task_loss(out.serving, click, wt)
        if out.aux:
            loss = loss + _task_loss(out.aux, click, wt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _restore(weights: bytes, opt_bytes: bytes, opt_meta: dict, cfg: RankerConfig, aux_heads: bool = False,
             strict: bool = True) -> tuple[MultiTaskRanker, torch.optim.Optimizer]:
    model = model_from_bytes(weights, cfg, N_CAT, N_NUM, TASKS, aux_heads=aux_heads, strict=strict)
    opt = _optimizer(model)
    load_optimizer_state(opt, model, opt_bytes, json.loads(json.dumps(opt_meta)), strict=strict)
    return model, opt


def _trained(cfg: RankerConfig, steps: int, aux_heads: bool = False
             ) -> tuple[MultiTaskRanker, torch.optim.Optimizer]:
    model = _model(cfg, aux_heads)
    opt = _optimizer(model)
    _train(model, opt, 0, steps)
    return model, opt


def _assert_same_weights(a: MultiTaskRanker, b: MultiTaskRanker) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert model_to_bytes(a) == model_to_bytes(b)


# --- round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_round_trip_is_bit_exact(name: str) -> None:
    model, opt = _trained(_cfg(name), N_STEPS)
    data, meta = optimizer_state_to_bytes(opt, model)
    assert optimizer_state_to_bytes(opt, model) == (data, meta)  # same state -> same bytes
    assert meta["optimizer"] == name and meta["global_step"] == N_STEPS == global_step(opt)
    assert json.loads(json.dumps(meta)) == meta
    tensors = load(data)
    assert f"step/{'embedding.weight'}" in tensors
    assert ("exp_avg/heads.click.weight" in tensors) == (name == "adam")
    assert ("sum/heads.click.weight" in tensors) == (name == "adagrad")

    model2, opt2 = _restore(model_to_bytes(model), data, meta, _cfg(name))
    assert opt2 is not opt and model2 is not model
    before, after = opt.state_dict(), opt2.state_dict()
    assert after["param_groups"] == before["param_groups"]  # hyperparameters (betas stay a tuple)
    assert after["state"].keys() == before["state"].keys()
    for i, state in before["state"].items():
        assert state.keys() == after["state"][i].keys()
        for k, v in state.items():
            assert after["state"][i][k].dtype == v.dtype and torch.equal(after["state"][i][k], v), (i, k)
    assert optimizer_state_to_bytes(opt2, model2) == (data, meta)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_round_trip_before_any_step(name: str) -> None:
    model = _model(_cfg(name))
    opt = _optimizer(model)
    data, meta = optimizer_state_to_bytes(opt, model)
    assert meta["global_step"] == 0
    model2, opt2 = _restore(model_to_bytes(model), data, meta, _cfg(name))
    assert optimizer_state_to_bytes(opt2, model2) == (data, meta)
    _train(model, opt, 0, 2)
    _train(model2, opt2, 0, 2)
    _assert_same_weights(model, model2)


# --- the key property: continuing is bit-identical to never having stopped --------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_continued_training_equals_uninterrupted(name: str) -> None:
    cfg = _cfg(name)
    straight, straight_opt = _trained(cfg, N_STEPS + M_STEPS)

    day1, day1_opt = _trained(cfg, N_STEPS)
    weights = model_to_bytes(day1)
    opt_bytes, opt_meta = optimizer_state_to_bytes(day1_opt, day1)
    del day1, day1_opt

    day2, day2_opt = _restore(weights, opt_bytes, opt_meta, cfg)
    assert global_step(day2_opt) == N_STEPS
    _train(day2, day2_opt, global_step(day2_opt), M_STEPS)
    _assert_same_weights(day2, straight)
    assert optimizer_state_to_bytes(day2_opt, day2) == optimizer_state_to_bytes(straight_opt, straight)

    # Today's behaviour: same weights, same batches and lr schedule, fresh optimizer.
    fresh = model_from_bytes(weights, cfg, N_CAT, N_NUM, TASKS, aux_heads=False)
    _train(fresh, _optimizer(fresh), N_STEPS, M_STEPS)
    assert model_to_bytes(fresh) != model_to_bytes(straight)
    assert not torch.equal(fresh.heads["click"].weight, straight.heads["click"].weight)


def _child_continue(workdir: str, name: str, steps: int) -> None:
    """Entry point of the second process: load day 1 from files, train, write weights."""
    _set_determinism()
    d = Path(workdir)
    model, opt = _restore((d / "weights.safetensors").read_bytes(), (d / "optimizer.safetensors").read_bytes(),
                          json.loads((d / "optimizer.json").read_text()), _cfg(name))
    _train(model, opt, global_step(opt), steps)
    (d / "continued.safetensors").write_bytes(model_to_bytes(model))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_continued_training_in_another_process_equals_uninterrupted(name: str, tmp_path: Path) -> None:
    cfg = _cfg(name)
    straight, _ = _trained(cfg, N_STEPS + M_STEPS)
    day1, day1_opt = _trained(cfg, N_STEPS)
    opt_bytes, opt_meta = optimizer_state_to_bytes(day1_opt, day1)
    (tmp_path / "weights.safetensors").write_bytes(model_to_bytes(day1))
    (tmp_path / "optimizer.safetensors").write_bytes(opt_bytes)
    (tmp_path / "optimizer.json").write_text(json.dumps(opt_meta))

    code = ("import sys; from tests.test_optim import _child_continue; "
            "_child_continue(sys.argv[1], sys.argv[2], int(sys.argv[3]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), name, str(M_STEPS)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    continued = (tmp_path / "continued.safetensors").read_bytes()
    assert continued == model_to_bytes(straight)
    _assert_same_weights(model_from_bytes(continued, cfg, N_CAT, N_NUM, TASKS, aux_heads=False), straight)


# --- construction ------------------------------------------------------------------------


@pytest.mark.parametrize(("impl", "torch_kw"), [("for_loop", {"foreach": False}), ("auto", {"fused": True}),
                                               ("fused", {"fused": True}), ("foreach", {"foreach": True})])
def test_make_optimizer_matches_plain_torch_adam(impl: str, torch_kw: dict) -> None:
    a, b = _model(_cfg()), _model(_cfg())
    opt_a = make_optimizer(a, "adam", 0.01, impl)  # type: ignore[arg-type]
    opt_b = torch.optim.Adam(b.parameters(), lr=0.01, **torch_kw)
    assert opt_a.state_dict()["param_groups"] == opt_b.state_dict()["param_groups"]
    assert opt_a.param_groups[0]["params"] == list(a.parameters())
    _train(a, opt_a, 0, 4)
    _train(b, opt_b, 0, 4)
    _assert_same_weights(a, b)


def test_make_optimizer_accepts_parameters_and_rejects_unknown_names() -> None:
    model = _model(_cfg())
    assert isinstance(make_optimizer(model.parameters(), "adagrad", 0.1), torch.optim.Adagrad)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer(model, "sgd", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr"):
        make_optimizer(model, "adam", 0.0)


def test_set_lr_applies_to_every_group() -> None:
    model = _model(_cfg())
    opt = make_optimizer([{"params": model.heads.parameters()}, {"params": model.shared.parameters()}],
                         "adam", 0.01)
    set_lr(opt, 0.123)
    assert [g["lr"] for g in opt.param_groups] == [0.123, 0.123]
    with pytest.raises(ValueError):
        set_lr(opt, math.nan)


# --- learning-rate policy ----------------------------------------------------------------


def test_lr_constant() -> None:
    assert [lr_at(LRPolicy(), 0.1, s) for s in (0, 1, 10**6)] == [0.1, 0.1, 0.1]


def test_lr_warmup_is_linear_over_lifetime_steps() -> None:
    p = LRPolicy(warmup_steps=4)
    assert [lr_at(p, 1.0, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # Warmup composes with decay and is not floored by min_lr_ratio.
    q = LRPolicy(kind="exponential", warmup_steps=4, decay_steps=10, min_lr_ratio=0.9)
    assert lr_at(q, 2.0, 0) == 2.0 * 0.25  # below the floor 0.9 * 2.0 while warming up
    assert lr_at(q, 2.0, 3) == pytest.approx(2.0 * 0.9)  # 0.5 ** 0.3 < 0.9: floored
    r = LRPolicy(kind="exponential", warmup_steps=4, decay_steps=10)
    assert lr_at(r, 2.0, 1) == pytest.approx(2.0 * 0.5 * 0.5 ** 0.1)


def test_lr_inverse_sqrt() -> None:
    p = LRPolicy(kind="inverse_sqrt", decay_steps=100)
    assert lr_at(p, 0.1, 0) == lr_at(p, 0.1, 100) == 0.1
    assert lr_at(p, 0.1, 400) == pytest.approx(0.05)
    assert lr_at(p, 0.1, 10_000) == pytest.approx(0.01)
    assert lr_at(p.model_copy(update={"min_lr_ratio": 0.2}), 0.1, 10_000) == pytest.approx(0.02)


def test_lr_exponential() -> None:
    p = LRPolicy(kind="exponential", decay_steps=10)
    assert lr_at(p, 0.1, 0) == 0.1
    assert lr_at(p, 0.1, 10) == pytest.approx(0.05)
    assert lr_at(p, 0.1, 20) == pytest.approx(0.025)
    assert lr_at(LRPolicy(kind="exponential", decay_steps=10, min_lr_ratio=0.3), 0.1, 20) == pytest.approx(0.03)


def test_lr_policy_validation() -> None:
    for bad in ({"warmup_steps": -1}, {"decay_steps": 0}, {"kind": "cosine"}, {"min_lr_ratio": 1.5},
                {"warmup": 3}):
        with pytest.raises(ValidationError):
            LRPolicy.model_validate(bad)
    with pytest.raises(ValueError, match="step"):
        lr_at(LRPolicy(), 0.1, -1)


def test_ranker_config_carries_lr_policy() -> None:
    cfg = RankerConfig.model_validate({"lr_policy": {"kind": "inverse_sqrt", "warmup_steps": 5}})
    assert cfg.lr_policy == LRPolicy(kind="inverse_sqrt", warmup_steps=5)


# --- mismatches --------------------------------------------------------------------------


def test_shape_mismatch_names_the_parameter() -> None:
    model, opt = _trained(_cfg(), 2)
    data, meta = optimizer_state_to_bytes(opt, model)
    other = _model(_cfg(hash_buckets=32))
    with pytest.raises(ValueError, match=r"'embedding\.weight'"):
        load_optimizer_state(_optimizer(other), other, data, meta)
    with pytest.raises(ValueError, match=r"'embedding\.weight'"):
        load_optimizer_state(_optimizer(other), other, data, meta, strict=False)


def test_incomplete_state_and_wrong_optimizer_are_errors() -> None:
    model, opt = _trained(_cfg(), 2)
    data, meta = optimizer_state_to_bytes(opt, model)
    tensors = load(data)
    del tensors["exp_avg_sq/shared.0.bias"]
    with pytest.raises(ValueError, match=r"'shared\.0\.bias' is incomplete"):
        load_optimizer_state(_optimizer(model), model, save(tensors), meta)
    with pytest.raises(ValueError, match="'adam'.*'adagrad'"):
        load_optimizer_state(make_optimizer(model, "adagrad", 0.01), model, data, meta)
    with pytest.raises(ValueError, match="safetensors"):
        load_optimizer_state(_optimizer(model), model, b"not a checkpoint", meta)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_new_aux_heads_start_fresh_with_strict_false(name: str) -> None:
    cfg = _cfg(name)
    model, opt = _trained(cfg, N_STEPS)
    weights = model_to_bytes(model)
    data, meta = optimizer_state_to_bytes(opt, model)

    with pytest.raises(ValueError, match=r"missing \[.*'aux_heads\.click\.weight'"):
        _restore(weights, data, meta, cfg, aux_heads=True, strict=True)

    aux_model, aux_opt = _restore(weights, data, meta, cfg, aux_heads=True, strict=False)
    fresh_model = _model(cfg, aux_heads=True)
    fresh_opt = _optimizer(fresh_model)
    fresh = {n: fresh_opt.state.get(p, {}) for n, p in fresh_model.named_parameters()}
    for n, p in aux_model.named_parameters():
        s = aux_opt.state.get(p, {})
        if n.startswith("aux_heads."):  # fresh state (Adam: none yet; Adagrad: zero sums, step 0)
            assert s.keys() == fresh[n].keys()
            assert all(torch.equal(v, fresh[n][k]) for k, v in s.items())
        else:
            assert torch.equal(s["step"], torch.tensor(float(N_STEPS)))
    assert global_step(aux_opt) == N_STEPS
    _train(aux_model, aux_opt, global_step(aux_opt), 2)
    assert global_step(aux_opt) == N_STEPS + 2
    assert float(aux_opt.state[aux_model.aux_heads["click"].weight]["step"]) == 2  # its own bias correction

    # And back: stored aux entries are dropped when the model no longer has the heads.
    data2, meta2 = optimizer_state_to_bytes(aux_opt, aux_model)
    with pytest.raises(ValueError, match=r"unexpected \[.*'aux_heads\.wt\.bias'"):
        _restore(model_to_bytes(aux_model), data2, meta2, cfg, aux_heads=False, strict=True)
    plain, plain_opt = _restore(model_to_bytes(aux_model), data2, meta2, cfg, aux_heads=False, strict=False)
    stored, kept = load(data2), load(optimizer_state_to_bytes(plain_opt, plain)[0])
    assert set(kept) == {k for k in stored if "/aux_heads." not in k}
    assert all(torch.equal(v, stored[k]) for k, v in kept.items())
    _train(plain, plain_opt, global_step(plain_opt), 1)


# --- implementation (issue 13): fused by default, the same update to float rounding ------

IMPLS = ["for_loop", "foreach", "fused"]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("impl", IMPLS)
def test_every_implementation_round_trips_bit_exactly(name: str, impl: str) -> None:
    cfg = _cfg(name, optimizer_impl=impl)
    straight, _ = _trained(cfg, N_STEPS + M_STEPS)
    day1, opt1 = _trained(cfg, N_STEPS)
    data, meta = optimizer_state_to_bytes(opt1, day1)
    day2, opt2 = _restore(model_to_bytes(day1), data, meta, cfg)
    assert optimizer_state_to_bytes(opt2, day2) == (data, meta)
    _train(day2, opt2, N_STEPS, M_STEPS)
    _assert_same_weights(day2, straight)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_for_loop_checkpoint_warm_starts_a_fused_optimizer(name: str) -> None:
    """Checkpoints written before the option record ``fused: None`` in their
    hyperparameters: restoring must keep the new optimizer's implementation (the state
    tensors are the same), and the continued run stays close to the old path."""
    old_cfg, new_cfg = _cfg(name, optimizer_impl="for_loop"), _cfg(name)
    assert new_cfg.optimizer_impl == "auto"
    day1, opt1 = _trained(old_cfg, N_STEPS)
    data, meta = optimizer_state_to_bytes(opt1, day1)
    assert not meta["param_groups"][0]["hyperparameters"]["fused"]
    meta["param_groups"][0]["hyperparameters"].update(fused=None, foreach=None)  # as written before issue 13
    model, opt = _restore(model_to_bytes(day1), data, meta, new_cfg)
    assert opt.param_groups[0]["fused"] is True
    old, old_opt = _restore(model_to_bytes(day1), data, meta, old_cfg)
    assert not old_opt.param_groups[0]["fused"]
    _train(model, opt, N_STEPS, M_STEPS)
    _train(old, old_opt, N_STEPS, M_STEPS)
    for (k, a), b in zip(model.state_dict().items(), old.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_unknown_implementation_is_refused() -> None:
    with pytest.raises(ValidationError):
        _cfg(optimizer_impl="turbo")
    with pytest.raises(ValueError, match="implementation 'turbo'"):
        make_optimizer(_model(_cfg()), "adam", 0.01, "turbo")  # type: ignore[arg-type]
