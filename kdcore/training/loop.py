"""The inner loop shared by teacher and students: seeded minibatch training with a
declarative distillation loss, batched inference, and progressive evaluation."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch

from kdcore.data.spec import DatasetSpec
from kdcore.distill.config import DistillConfig
from kdcore.distill.losses import distillation_loss
from kdcore.errors import KDError
from kdcore.evaluation.metrics import task_metrics
from kdcore.models.features import Features, FeatureSet
from kdcore.models.ranker import MultiTaskRanker, RankerConfig, make_optimizer
from kdcore.training.data import DayData
from kdcore.training.optim import lr_at, set_lr

log = logging.getLogger(__name__)
NO_KD = DistillConfig(mode="none")
PROGRESS_SECONDS = 10.0  # a progress line at most this often inside a long epoch


class TrainingDiverged(KDError):
    """Loss or weights became non-finite; the checkpoint must not be published."""


def set_determinism(threads: int) -> None:
    """Same inputs, same bytes: fixed thread count and deterministic kernels."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def new_model(cfg: RankerConfig, spec: DatasetSpec, aux_heads: bool | list[str], data: DayData,
              seed: int) -> MultiTaskRanker:
    """A cold-started model; numeric normalization and target standardization are fitted
    on its first day's (or bootstrap window's) data."""
    torch.manual_seed(seed)
    cols = FeatureSet.of(spec, cfg.features)
    model = MultiTaskRanker(cfg, len(cols.categorical), len(cols.numeric), list(spec.tasks), aux_heads=aux_heads)
    model.fit_normalizer(data.features(cfg.hash_buckets, cols).num)
    model.fit_targets(data.hard)
    return model


def model_features(model: MultiTaskRanker, data: DayData) -> Features:
    return data.features(model.config.hash_buckets, FeatureSet.of(data.spec, model.config.features))


@torch.inference_mode()
def predict(model: MultiTaskRanker, features: Features, batch_rows: int = 65_536) -> dict[str, np.ndarray]:
    model.eval()
    outs: dict[str, list[np.ndarray]] = {t.name: [] for t in model.tasks}
    for start in range(0, len(features), batch_rows):
        cat = torch.from_numpy(features.cat[start:start + batch_rows])
        num = torch.from_numpy(features.num[start:start + batch_rows])
        for name, pred in model.predict(cat, num).items():
            outs[name].append(pred.numpy())
    return {k: (np.concatenate(v) if v else np.zeros(0, np.float32)).astype(np.float32) for k, v in outs.items()}


def evaluate(model: MultiTaskRanker, data: DayData) -> dict[str, dict[str, float]]:
    """Metrics per task of ``model`` on ``data`` (progressive when the model has not seen it)."""
    preds = predict(model, model_features(model, data))
    hard, groups = data.hard, data.groups
    return {t.name: task_metrics(t.kind, hard[t.name], preds[t.name], groups) for t in data.spec.tasks}


def _model_space(model: MultiTaskRanker, labels: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Targets in the space each head trains in (regression transforms applied)."""
    kinds = {t.name: t.kind for t in model.tasks}
    return {k: torch.from_numpy(np.ascontiguousarray(
        model.to_model_space(k, v) if kinds.get(k) == "regression" else v, np.float32)) for k, v in labels.items()}


def fit(model: MultiTaskRanker, features: Features, hard: dict[str, np.ndarray],
        soft: dict[str, np.ndarray] | None, distill: DistillConfig, seed: int,
        epochs: int | None = None, optimizer: torch.optim.Optimizer | None = None,
        start_step: int = 0, tag: str = "fit") -> dict[str, Any]:
    """Train in place; returns mean loss parts of the last epoch and the model's step count.

    Continuous training passes the optimizer restored from the parent checkpoint and the
    parent's lifetime step count, so Adam's moments and the learning-rate policy carry on
    from yesterday instead of restarting every day. Seeded shuffling.

    Logs (INFO, prefixed by ``tag``) one line per epoch with the mean loss and its parts,
    rows/s and elapsed time, and a progress line at most every ``PROGRESS_SECONDS`` inside
    a long epoch. Logging reads the loss parts the loop computes anyway: it changes no
    number trained."""
    cfg = model.config
    model.train()
    opt = optimizer if optimizer is not None else make_optimizer(model)
    n = len(features)
    gen = torch.Generator().manual_seed(seed)
    cat_all, num_all = torch.from_numpy(features.cat), torch.from_numpy(features.num)
    hard_t = _model_space(model, hard)
    soft_t = _model_space(model, soft) if soft else None
    totals: dict[str, float] = {}
    steps, step = 0, start_step
    n_epochs = epochs or cfg.epochs
    steps_per_epoch = -(-n // cfg.batch_size)
    t_fit = time.perf_counter()
    for epoch in range(n_epochs):
        perm = torch.randperm(n, generator=gen)
        totals, steps = {}, 0
        t_epoch = t_progress = time.perf_counter()
        for start in range(0, n, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            set_lr(opt, lr_at(cfg.lr_policy, cfg.lr, step))
            out = model(cat_all[idx], num_all[idx])
            loss, parts = distillation_loss(out, {k: v[idx] for k, v in hard_t.items()},
                                            {k: v[idx] for k, v in soft_t.items()} if soft_t else None,
                                            list(model.tasks), distill)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"non-finite training loss at step {steps}: {parts}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
            steps += 1
            step += 1
            if log.isEnabledFor(logging.INFO) and steps < steps_per_epoch \
                    and (now := time.perf_counter()) - t_progress >= PROGRESS_SECONDS:
                t_progress = now
                log.info("%s epoch %d/%d: step %d/%d, %d rows, %.0f rows/s, mean loss so far %.6g, %.1f s",
                         tag, epoch + 1, n_epochs, steps, steps_per_epoch, min(start + cfg.batch_size, n),
                         min(start + cfg.batch_size, n) / max(now - t_epoch, 1e-9), totals["total"] / steps,
                         now - t_epoch)
        if log.isEnabledFor(logging.INFO):
            now = time.perf_counter()
            log.info("%s epoch %d/%d: loss %s; %d rows in %d steps, %.0f rows/s, epoch %.2f s, elapsed %.2f s, "
                     "lr %.4g, lifetime steps %d", tag, epoch + 1, n_epochs, describe_loss(totals, steps), n, steps,
                     n / max(now - t_epoch, 1e-9), now - t_epoch, now - t_fit, opt.param_groups[0]["lr"], step)
    for p in model.parameters():
        if not torch.isfinite(p).all():
            raise TrainingDiverged("non-finite weights after training")
    task_sum = sum(v for k, v in totals.items() if k.startswith("task/"))
    share = {k.removeprefix("task/"): (v / task_sum if task_sum > 0 else math.nan)
             for k, v in totals.items() if k.startswith("task/")}
    return {"steps_last_epoch": steps, "rows": n, "steps_total": step, "lr_last": opt.param_groups[0]["lr"],
            "loss_share": share, **{f"loss/{k}": (v / steps if steps else math.nan) for k, v in totals.items()}}


def describe_loss(totals: dict[str, float], steps: int) -> str:
    """'0.8123 (hard/like 0.61, soft/like 0.55, hard/rating 0.91; share like 41%, rating 59%)':
    the mean total loss of an epoch, its parts and each task's share of the task losses."""
    if not steps or "total" not in totals:
        return "n/a (no steps)"
    mean = {k: v / steps for k, v in totals.items()}
    parts = ", ".join(f"{k} {v:.4g}" for k, v in mean.items() if k.startswith(("hard/", "soft/")))
    task_sum = sum(v for k, v in totals.items() if k.startswith("task/"))
    share = ", ".join(f"{k.removeprefix('task/')} {100 * v / task_sum:.0f}%"
                      for k, v in totals.items() if k.startswith("task/")) if task_sum > 0 else ""
    detail = "; ".join(x for x in (parts, f"share {share}" if share else "") if x)
    return f"{mean['total']:.6g}" + (f" ({detail})" if detail else "")
