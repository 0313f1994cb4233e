"""The inner loop shared by teacher and students: seeded minibatch training with a
declarative distillation loss, and progressive evaluation (batched inference is
:mod:`kdcore.models.inference`, which the labels use too).

A day held whole (:class:`DayData`) is shuffled whole; a day larger than the model's
``shuffle_window_rows`` (:class:`DayStream`) is trained window by window, each window
shuffled on its own with a seed derived from the day's seed, the epoch and the window
index, so memory is flat in the day's size and the run is still deterministic."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from kdcore.data.spec import DatasetSpec
from kdcore.distill.config import DistillConfig
from kdcore.distill.losses import distillation_loss
from kdcore.errors import KDError
from kdcore.evaluation.metrics import task_metrics
from kdcore.models.features import Features, FeatureSet
from kdcore.models.inference import predict
from kdcore.models.optim import lr_at, set_lr
from kdcore.models.ranker import MultiTaskRanker, RankerConfig, make_optimizer
from kdcore.training.data import DayData, DayStream

log = logging.getLogger(__name__)
NO_KD = DistillConfig(mode="none")
PROGRESS_SECONDS = 10.0  # a progress line at most this often inside a long epoch


class TrainingDiverged(KDError):
    """Loss or weights became non-finite; the checkpoint must not be published."""


def new_model(cfg: RankerConfig, spec: DatasetSpec, aux_heads: bool | list[str], data: DayData | DayStream,
              seed: int) -> MultiTaskRanker:
    """A cold-started model; numeric normalization and target standardization are fitted
    on its first day's (or bootstrap window's) data (a streamed day: one pass over its
    numeric columns only)."""
    torch.manual_seed(seed)
    cols = FeatureSet.of(spec, cfg.features)
    model = MultiTaskRanker(cfg, len(cols.categorical), len(cols.numeric), list(spec.tasks), aux_heads=aux_heads)
    if isinstance(data, DayStream):
        numeric = FeatureSet((), cols.numeric)
        model.fit_normalizer_streamed(f.num for _, f in data.feature_windows(cfg.hash_buckets, numeric))
    else:
        model.fit_normalizer(data.features(cfg.hash_buckets, cols).num)
    model.fit_targets(data.hard)
    return model


def model_features(model: MultiTaskRanker, data: DayData) -> Features:
    return data.features(model.config.hash_buckets, FeatureSet.of(data.spec, model.config.features))


def evaluate(model: MultiTaskRanker, data: DayData | DayStream) -> dict[str, dict[str, float]]:
    """Metrics per task of ``model`` on ``data`` (progressive when the model has not seen
    it). A streamed day is predicted window by window: only predictions and labels (a few
    numbers per row) are accumulated, never the features."""
    if isinstance(data, DayStream):
        cols = FeatureSet.of(data.spec, model.config.features)
        parts = [predict(model, f) for _, f in data.feature_windows(model.config.hash_buckets, cols)]
        preds = {t.name: np.concatenate([p[t.name] for p in parts]) for t in model.tasks}
    else:
        preds = predict(model, model_features(model, data))
    hard, groups = data.hard, data.groups
    return {t.name: task_metrics(t.kind, hard[t.name], preds[t.name], groups) for t in data.spec.tasks}


def _model_space(model: MultiTaskRanker, labels: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Targets in the space each head trains in (regression transforms applied)."""
    kinds = {t.name: t.kind for t in model.tasks}
    return {k: torch.from_numpy(np.ascontiguousarray(
        model.to_model_space(k, v) if kinds.get(k) == "regression" else v, np.float32)) for k, v in labels.items()}


# (cat, num, first row of the window in the day, permutation of the window's rows)
Window = tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]


def fit(model: MultiTaskRanker, features: Features, hard: dict[str, np.ndarray],
        soft: dict[str, np.ndarray] | None, distill: DistillConfig, seed: int,
        epochs: int | None = None, optimizer: torch.optim.Optimizer | None = None,
        start_step: int = 0, tag: str = "fit") -> dict[str, Any]:
    """Train in place on rows held whole; returns mean loss parts of the last epoch and the
    model's step count.

    Continuous training passes the optimizer restored from the parent checkpoint and the
    parent's lifetime step count, so Adam's moments and the learning-rate policy carry on
    from yesterday instead of restarting every day. Seeded shuffling: one permutation of
    all rows per epoch.

    Logs (INFO, prefixed by ``tag``) one line per epoch with the mean loss and its parts,
    rows/s and elapsed time, and a progress line at most every ``PROGRESS_SECONDS`` inside
    a long epoch. Logging reads the loss parts the loop computes anyway: it changes no
    number trained."""
    n = len(features)
    gen = torch.Generator().manual_seed(seed)
    cat_all, num_all = torch.from_numpy(features.cat), torch.from_numpy(features.num)

    def windows(epoch: int) -> Iterator[Window]:
        yield cat_all, num_all, 0, torch.randperm(n, generator=gen)

    return _fit(model, n, windows, hard, soft, distill, epochs, optimizer, start_step, tag)


def window_seed(seed: int, epoch: int, window: int) -> int:
    """The shuffle seed of one window of a streamed day: derived from the day's seed (model
    seed and date), the epoch and the window index, so each window gets its own order and
    a re-run gets the same one."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{window}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def fit_stream(model: MultiTaskRanker, data: DayStream, soft: dict[str, np.ndarray] | None,
               distill: DistillConfig, seed: int, epochs: int | None = None,
               optimizer: torch.optim.Optimizer | None = None, start_step: int = 0,
               tag: str = "fit") -> dict[str, Any]:
    """:func:`fit` on a day too large to hold: each epoch reads the day window by window
    (published order), shuffles each window with :func:`window_seed` and trains on it;
    labels (``data.hard``, ``soft``: whole-day arrays, small) are sliced to the window.
    Rows mix within a window, not across windows."""
    cols = FeatureSet.of(data.spec, model.config.features)

    def windows(epoch: int) -> Iterator[Window]:
        for k, (offset, f) in enumerate(data.feature_windows(model.config.hash_buckets, cols)):
            gen = torch.Generator().manual_seed(window_seed(seed, epoch, k))
            yield torch.from_numpy(f.cat), torch.from_numpy(f.num), offset, torch.randperm(len(f), generator=gen)

    return _fit(model, len(data), windows, data.hard, soft, distill, epochs, optimizer, start_step, tag)


def fit_day(model: MultiTaskRanker, data: DayData | DayStream, soft: dict[str, np.ndarray] | None,
            distill: DistillConfig, seed: int, **kw: Any) -> dict[str, Any]:
    """:func:`fit` for a day held whole, :func:`fit_stream` for a streamed one."""
    if isinstance(data, DayStream):
        return fit_stream(model, data, soft, distill, seed, **kw)
    return fit(model, model_features(model, data), data.hard, soft, distill, seed, **kw)


def _fit(model: MultiTaskRanker, n: int, windows: Callable[[int], Iterator[Window]], hard: dict[str, np.ndarray],
         soft: dict[str, np.ndarray] | None, distill: DistillConfig, epochs: int | None,
         optimizer: torch.optim.Optimizer | None, start_step: int, tag: str) -> dict[str, Any]:
    """The training loop over the windows of each epoch (one window: the whole day)."""
    cfg = model.config
    model.train()
    opt = optimizer if optimizer is not None else make_optimizer(model)
    hard_t = _model_space(model, hard)
    soft_t = _model_space(model, soft) if soft else None
    totals: dict[str, float] = {}
    steps, step = 0, start_step
    n_epochs = epochs or cfg.epochs
    steps_per_epoch = -(-n // cfg.batch_size)
    t_fit = time.perf_counter()
    for epoch in range(n_epochs):
        totals, steps = {}, 0
        t_epoch = t_progress = time.perf_counter()
        for cat_w, num_w, offset, perm in windows(epoch):
            # Gather the window in shuffled order once, so each step takes contiguous slices
            # (the same values as indexing per step: the same numbers, fewer small ops).
            m = len(perm)
            rows = perm + offset if offset else perm  # the window's rows in the day's label arrays
            cat_p, num_p = cat_w[perm], num_w[perm]
            hard_p = {k: v[rows] for k, v in hard_t.items()}
            soft_p = {k: v[rows] for k, v in soft_t.items()} if soft_t else None
            for start in range(0, m, cfg.batch_size):
                b = slice(start, start + cfg.batch_size)
                set_lr(opt, lr_at(cfg.lr_policy, cfg.lr, step))
                out = model(cat_p[b], num_p[b])
                loss, parts = distillation_loss(out, {k: v[b] for k, v in hard_p.items()},
                                                {k: v[b] for k, v in soft_p.items()} if soft_p else None,
                                                list(model.tasks), distill)
                if not math.isfinite(parts["total"]):  # the loss as a float, already computed
                    raise TrainingDiverged(f"{tag}: non-finite training loss at step {steps} of epoch {epoch + 1} ({parts}); "
                                           f"nothing published: look for extreme feature or label values in the day, or "
                                           f"lower the learning rate")
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
                    done = offset + min(start + cfg.batch_size, m)
                    log.info("%s epoch %d/%d: step %d/%d, %d rows, %.0f rows/s, mean loss so far %.6g, %.1f s",
                             tag, epoch + 1, n_epochs, steps, steps_per_epoch, done,
                             done / max(now - t_epoch, 1e-9), totals["total"] / steps, now - t_epoch)
        if log.isEnabledFor(logging.INFO):
            now = time.perf_counter()
            log.info("%s epoch %d/%d: loss %s; %d rows in %d steps, %.0f rows/s, epoch %.2f s, elapsed %.2f s, "
                     "lr %.4g, lifetime steps %d", tag, epoch + 1, n_epochs, describe_loss(totals, steps), n, steps,
                     n / max(now - t_epoch, 1e-9), now - t_epoch, now - t_fit, opt.param_groups[0]["lr"], step)
    for p in model.parameters():
        if not torch.isfinite(p).all():
            raise TrainingDiverged(f"{tag}: non-finite weights after training; nothing published")
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
