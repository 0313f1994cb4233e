"""Optimizers that survive the day boundary: construction, learning-rate policy and
state serialization for continuous training.

Models are trained day by day, each day warm-starting from yesterday's checkpoint. If
the optimizer were rebuilt every morning, Adam's moment estimates and bias-correction
step count (or Adagrad's accumulated squared gradients) would reset daily: the first
steps of each day would take oversized, badly scaled updates and a learning-rate
schedule would restart from its warmup. So the optimizer state travels with the
weights, and the learning rate is a pure function of the model's *lifetime* step count.

The state is stored as safetensors (tensors only, so loading cannot run code, unlike
pickle) keyed by parameter *name*, not by torch's positional ids: a model whose
parameter set changes (e.g. auxiliary heads added or removed by a change of
distillation mode) can still be matched tensor by tensor, and a mismatch can be
reported by name. Restoring is exact: training N steps, saving, loading in another
process and training M more gives bit-identical weights to training N+M at once.

It lives beside the model because both ends of a checkpoint need it: the ranker's config
names the optimizer and builds it, the registry stores and restores its state. It imports
nothing else of ``kdcore.models`` (the ranker imports it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from kdcore.yamlconf import Strict

__all__ = [
    "LRPolicy",
    "OptimizerImpl",
    "OptimizerName",
    "global_step",
    "load_optimizer_state",
    "lr_at",
    "make_optimizer",
    "optimizer_state_to_bytes",
    "set_lr",
]

OptimizerName = Literal["adam", "adagrad"]
# How the update is computed, not what it computes: "fused" (one kernel over all
# parameters), "foreach" (multi-tensor ops), "for_loop" (one tensor at a time, torch's
# CPU default and what every checkpoint before issue 13 was trained with); "auto" is
# fused. The three agree to float rounding, not bitwise (see docs/performance.md).
OptimizerImpl = Literal["auto", "fused", "foreach", "for_loop"]
_IMPL_KEYS = ("foreach", "fused")  # group entries that say how, not what: never restored

_FORMAT = 1
_TYPES: dict[str, type[torch.optim.Optimizer]] = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}
_STEP = "step"  # the only scalar (non parameter-shaped) state entry of Adam and Adagrad


class LRPolicy(Strict):
    """Learning rate as a function of the model's lifetime optimizer step count.

    The step count is the model's, not the day's: it is carried in the checkpoint, so
    warmup happens once when the model is born (not every morning) and decay keeps
    going across days as if training had never stopped.

    - constant: the base lr (after warmup).
    - inverse_sqrt: ``lr * sqrt(decay_steps / max(step, decay_steps))``: flat for the
      first decay_steps steps, then decays like 1/sqrt(step).
    - exponential: ``lr * 0.5 ** (step / decay_steps)``: halves every decay_steps.

    The decayed rate never falls below ``min_lr_ratio * lr``, so a model trained for
    years keeps adapting to new days instead of freezing.
    """

    kind: Literal["constant", "inverse_sqrt", "exponential"] = "constant"
    warmup_steps: int = Field(0, ge=0, description=(
        "linear warmup from 0 over the model's first steps ever (its whole life, not per day)"))
    decay_steps: int = Field(1000, gt=0, description="decay time scale in steps (inverse_sqrt, exponential)")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="floor of the decayed lr, as a fraction of lr")


def lr_at(policy: LRPolicy, base_lr: float, step: int) -> float:
    """The learning rate for the update taken after ``step`` lifetime steps (0 = the
    model's very first update).

    Warmup is ``(step + 1) / warmup_steps`` of the rate: a line from 0 that reaches the
    full rate at the warmup_steps-th update, so no update is wasted at lr 0. The floor
    ``min_lr_ratio`` bounds the decay only; warmup still ramps from 0.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not (math.isfinite(base_lr) and base_lr >= 0.0):
        raise ValueError(f"base_lr must be finite and >= 0, got {base_lr}")
    if policy.kind == "constant":
        decay = 1.0
    elif policy.kind == "inverse_sqrt":
        decay = math.sqrt(policy.decay_steps / max(step, policy.decay_steps))
    else:  # exponential
        decay = 0.5 ** (step / policy.decay_steps)
    decay = max(decay, policy.min_lr_ratio)
    warmup = min(1.0, (step + 1) / policy.warmup_steps) if policy.warmup_steps > 0 else 1.0
    return base_lr * warmup * decay


def impl_kwargs(impl: OptimizerImpl) -> dict[str, bool]:
    """torch keyword arguments selecting the implementation ``impl``.

    On CPU, torch's default is the for_loop path: every parameter updated by its own
    chain of small ops, which on the hashed embedding tables (most of a model's
    parameters) costs more than the forward and backward passes together. Fused Adam and
    Adagrad run one kernel over all of them; it is the default ("auto")."""
    if impl in ("auto", "fused"):
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "for_loop":
        return {"foreach": False}
    raise ValueError(f"unknown optimizer implementation '{impl}'; expected auto, fused, foreach or for_loop")


def make_optimizer(params_or_model: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                   name: OptimizerName, lr: float, impl: OptimizerImpl = "auto") -> torch.optim.Optimizer:
    """Adam or Adagrad with torch's defaults apart from ``lr`` and the implementation.

    Hyperparameter defaults are kept on purpose: with ``impl="for_loop"`` this is
    numerically exactly ``torch.optim.Adam(model.parameters(), lr=lr)`` on CPU, the
    optimizer the models were trained with before, so old and new runs compare; the
    default fused path computes the same update to float rounding. The parameter order
    is ``model.parameters()``'s order.
    """
    if name not in _TYPES:
        raise ValueError(f"unknown optimizer '{name}'; expected one of {sorted(_TYPES)}")
    if not (math.isfinite(lr) and lr > 0.0):
        raise ValueError(f"lr must be finite and > 0, got {lr}")
    params = params_or_model.parameters() if isinstance(params_or_model, nn.Module) else params_or_model
    return _TYPES[name](list(params), lr=lr, **impl_kwargs(impl))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (the policy drives it per step)."""
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"lr must be finite and >= 0, got {lr}")
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = float(lr)


def global_step(opt: torch.optim.Optimizer) -> int:
    """Updates taken so far by the most-trained parameter (torch counts per parameter; a
    parameter that never received a gradient has no count). 0 for a fresh optimizer."""
    steps = [int(float(s[_STEP])) for s in opt.state.values() if _STEP in s]
    return max(steps, default=0)


def _optimizer_name(opt: torch.optim.Optimizer) -> str:
    for name, cls in _TYPES.items():
        if type(opt) is cls:
            return name
    raise TypeError(f"unsupported optimizer {type(opt).__name__}; expected one of "
                    f"{[c.__name__ for c in _TYPES.values()]}")


def _param_names(opt: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """Names (from model.named_parameters()) of the optimizer's parameters, per group."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for gi, group in enumerate(opt.param_groups):
        names = []
        for pi, p in enumerate(group["params"]):
            if id(p) not in by_id:
                raise ValueError(f"optimizer parameter {pi} of group {gi} (shape {tuple(p.shape)}) "
                                 f"is not a parameter of the model")
            names.append(by_id[id(p)])
        groups.append(names)
    return groups


def _json_value(key: str, value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(key, v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"optimizer hyperparameter '{key}' = {value!r} ({type(value).__name__}) is not JSON-serializable")


def optimizer_state_to_bytes(opt: torch.optim.Optimizer, model: nn.Module) -> tuple[bytes, dict[str, Any]]:
    """(safetensors bytes, JSON-able metadata) of the optimizer's full state.

    Tensors are keyed ``"<state key>/<parameter name>"`` (``exp_avg/embedding.weight``,
    ``step/heads.click.weight``; torch keeps the step count as a tensor) so they can be
    matched by name when the model changes. The metadata holds the optimizer name, each
    group's hyperparameters and parameter names (in optimizer order), the state keys
    every parameter with state has, and the global step. Deterministic: the same state
    always gives the same bytes (so a digest identifies it); never pickled.
    """
    name = _optimizer_name(opt)
    groups = _param_names(opt, model)
    tensors: dict[str, torch.Tensor] = {}
    state_keys: set[str] = set()
    for group, names in zip(opt.param_groups, groups, strict=True):
        for p, pname in zip(group["params"], names, strict=True):
            for key, value in opt.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state '{key}' of parameter '{pname}' is a "
                                    f"{type(value).__name__}, not a tensor")
                state_keys.add(key)
                tensors[f"{key}/{pname}"] = value.detach().cpu().contiguous().clone()
    meta_groups = []
    for group, names in zip(opt.param_groups, groups, strict=True):
        hyper = {k: _json_value(k, v) for k, v in sorted(group.items()) if k not in ("params", "param_names")}
        meta_groups.append({"hyperparameters": hyper, "param_names": names})
    meta = {"format": _FORMAT, "optimizer": name, "param_groups": meta_groups,
            "state_keys": sorted(state_keys), "global_step": global_step(opt)}
    json.dumps(meta, allow_nan=False)  # fail here, not when the checkpoint metadata is written
    return save(dict(sorted(tensors.items()))), meta


def _require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"optimizer state metadata is missing '{key}'")
    return meta[key]


def load_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module, data: bytes, meta: dict[str, Any], *,
                         strict: bool = True) -> None:
    """Restore state saved by :func:`optimizer_state_to_bytes` into ``opt`` (built over
    ``model``'s parameters, e.g. by :func:`make_optimizer`), so that continuing training
    is bit-identical to never having stopped. Stored hyperparameters replace the
    optimizer's (as torch's own ``load_state_dict`` does), except the implementation
    flags (``foreach``, ``fused``): those say how to compute, belong to the optimizer
    being built (its model's config), and a checkpoint written by another implementation
    (every checkpoint before fused became the default) must not switch it back.

    Raises ValueError, naming the parameter, when a stored tensor does not fit the model
    (shape, dtype, incomplete state) or the optimizer kind differs. With strict=False,
    parameters the stored state lacks (e.g. newly added auxiliary heads) keep their
    fresh state and stored entries for parameters the model no longer has are dropped;
    with strict=True either is an error.
    """
    name = _optimizer_name(opt)
    if _require(meta, "format") != _FORMAT:
        raise ValueError(f"unsupported optimizer state format {meta['format']!r}; expected {_FORMAT}")
    stored_name = _require(meta, "optimizer")
    if stored_name != name:
        raise ValueError(f"stored optimizer state is for '{stored_name}', the optimizer is '{name}'")
    stored_groups = _require(meta, "param_groups")
    state_keys = set(_require(meta, "state_keys"))
    if len(stored_groups) != len(opt.param_groups):
        raise ValueError(f"stored optimizer state has {len(stored_groups)} parameter groups, "
                         f"the optimizer has {len(opt.param_groups)}")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"not a valid safetensors optimizer state: {e}") from None

    stored: dict[str, dict[str, torch.Tensor]] = {
        n: {} for g in stored_groups for n in _require(g, "param_names")}
    for key, value in tensors.items():
        skey, sep, pname = key.partition("/")
        if not sep or pname not in stored or skey not in state_keys:
            raise ValueError(f"stored optimizer tensor '{key}' is not described by the metadata")
        stored[pname][skey] = value

    groups = _param_names(opt, model)
    current = {n for names in groups for n in names}
    missing = sorted(current - set(stored))
    unexpected = sorted(set(stored) - current)
    if strict and (missing or unexpected):
        raise ValueError(f"optimizer state does not match the model's parameters: missing {missing}, "
                         f"unexpected {unexpected}")

    base = opt.state_dict()  # keeps the fresh state of parameters not restored (Adagrad's is eager)
    new_state = dict(base["state"])
    index = 0
    for group, names in zip(opt.param_groups, groups, strict=True):
        for p, pname in zip(group["params"], names, strict=True):
            entry = stored.get(pname)
            if entry:  # an empty entry: the parameter never had state (no gradient yet)
                _check_entry(pname, entry, state_keys, p)
                new_state[index] = {k: entry[k] for k in sorted(entry)}
            elif entry is not None:
                new_state.pop(index, None)
            index += 1

    new_groups = []
    for group, saved in zip(base["param_groups"], stored_groups, strict=True):
        hyper = _require(saved, "hyperparameters")
        restored = dict(group)
        for k, v in hyper.items():
            if k in restored and k not in ("params", "param_names", *_IMPL_KEYS):
                restored[k] = tuple(v) if isinstance(restored[k], tuple) and isinstance(v, list) else v
        new_groups.append(restored)
    opt.load_state_dict({"state": new_state, "param_groups": new_groups})


def _check_entry(pname: str, entry: dict[str, torch.Tensor], state_keys: set[str], p: torch.Tensor) -> None:
    if set(entry) != state_keys:
        raise ValueError(f"optimizer state of parameter '{pname}' is incomplete: has {sorted(entry)}, "
                         f"expected {sorted(state_keys)}")
    for key, value in entry.items():
        if key == _STEP:
            if value.numel() != 1:
                raise ValueError(f"optimizer state '{key}' of parameter '{pname}' should be a scalar, "
                                 f"got shape {tuple(value.shape)}")
        elif value.shape != p.shape or value.dtype != p.dtype:
            raise ValueError(f"optimizer state '{key}' of parameter '{pname}' does not fit the model: stored "
                             f"{value.dtype}{tuple(value.shape)}, parameter {p.dtype}{tuple(p.shape)}")
