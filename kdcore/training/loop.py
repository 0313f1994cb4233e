"""The inner loop shared by teacher and students: seeded minibatch training with a
declarative distillation loss, batched inference, and progressive evaluation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from kdcore.data.spec import DatasetSpec
from kdcore.distill.config import DistillConfig
from kdcore.distill.losses import distillation_loss
from kdcore.errors import KDError
from kdcore.evaluation.metrics import task_metrics
from kdcore.models.features import Features
from kdcore.models.ranker import MultiTaskRanker, RankerConfig, make_optimizer
from kdcore.training.data import DayData

NO_KD = DistillConfig(mode="none")


class TrainingDiverged(KDError):
    """Loss or weights became non-finite; the checkpoint must not be published."""


def set_determinism(threads: int) -> None:
    """Same inputs, same bytes: fixed thread count and deterministic kernels."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def new_model(cfg: RankerConfig, spec: DatasetSpec, aux_heads: bool, num: np.ndarray, seed: int) -> MultiTaskRanker:
    """A cold-started model; numeric normalization is fitted on its first day's data."""
    torch.manual_seed(seed)
    model = MultiTaskRanker(cfg, len(spec.categorical), len(spec.numeric), list(spec.tasks), aux_heads=aux_heads)
    model.fit_normalizer(num)
    return model


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
    preds = predict(model, data.features(model.config.hash_buckets))
    hard, groups = data.hard, data.groups
    return {t.name: task_metrics(t.kind, hard[t.name], preds[t.name], groups) for t in data.spec.tasks}


def fit(model: MultiTaskRanker, features: Features, hard: dict[str, np.ndarray],
        soft: dict[str, np.ndarray] | None, distill: DistillConfig, seed: int,
        epochs: int | None = None) -> dict[str, Any]:
    """Train in place; returns mean loss parts of the last epoch. Seeded shuffling."""
    cfg = model.config
    model.train()
    opt = make_optimizer(model)
    n = len(features)
    gen = torch.Generator().manual_seed(seed)
    cat_all, num_all = torch.from_numpy(features.cat), torch.from_numpy(features.num)
    hard_t = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in hard.items()}
    soft_t = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in soft.items()} if soft else None
    grad_scale = distill.auxiliary.grad_scale if distill.mode == "auxiliary" else 1.0
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(epochs or cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        totals, steps = {}, 0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            out = model(cat_all[idx], num_all[idx], aux_grad_scale=grad_scale)
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
    for p in model.parameters():
        if not torch.isfinite(p).all():
            raise TrainingDiverged("non-finite weights after training")
    return {"steps_last_epoch": steps, "rows": n,
            **{f"loss/{k}": (v / steps if steps else math.nan) for k, v in totals.items()}}
