"""The distillation loss, driven entirely by DistillConfig and the tasks' declared weights.

Per task t with weight w_t (Task.loss_weight), summed over tasks; tasks not distilled
(DistillConfig.tasks, default the served ones) always use the `none` form. Regression
targets arrive already in the head's space (Task.transform), teacher values included.
Modes:
  none:      hard(serving, y)
  direct:    (1 - w) * hard(serving, y) + w * soft(serving / T, sigmoid(logit(p) / T))   binary
             (1 - w) * hard(serving, y) + w * soft(serving, teacher_value)               regression
             (w = direct.soft_weight, T = direct.temperature; no T^2 factor on the soft term,
             and temperature does not apply to regression)
  auxiliary: hard(serving, y) + loss_weight * soft(aux, soft_target(teacher, soft_label_scale))
             The serving head only ever sees the hard label and the auxiliary head only the
             teacher's, so teacher bias reaches the served logit only through the shared
             layers, with strength loss_weight.

hard is BCE-with-logits (binary) or MSE (regression); soft is BCE-with-logits against a
soft probability (binary) or MSE (regression). Soft targets are always detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.data.spec import Task, TaskKind
from kdcore.distill.config import DistillConfig
from kdcore.models.ranker import RankerOutput

_PROB_EPS = 1e-6


def hard_loss(kind: TaskKind, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss of raw outputs (logits / values) against hard labels."""
    y = y.to(out.dtype)
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(out, y)
    return F.mse_loss(out, y)


def soft_loss(kind: TaskKind, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss of raw outputs against soft targets (probabilities / values), which are detached."""
    target = target.detach().to(out.dtype)
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(out, target)
    return F.mse_loss(out, target)


def soft_target(kind: TaskKind, teacher_pred: torch.Tensor, scale: float) -> torch.Tensor:
    """Teacher prediction -> soft target, detached.

    binary: sigmoid(scale * logit(p)) with p clipped to [1e-6, 1 - 1e-6] (scale 1 returns p
    as is); scale < 1 softens the target towards 0.5, > 1 sharpens it.
    regression: scale * value.
    """
    teacher_pred = teacher_pred.detach()
    if scale == 1.0:
        return teacher_pred
    if kind == "binary":
        return torch.sigmoid(torch.logit(teacher_pred, eps=_PROB_EPS) * scale)
    return teacher_pred * scale


def _require(labels: dict[str, torch.Tensor] | None, task: str, what: str) -> torch.Tensor:
    if labels is None or task not in labels:
        raise ValueError(f"missing {what} for task '{task}'")
    return labels[task]


def distillation_loss(output: RankerOutput, hard: dict[str, torch.Tensor],
                      soft: dict[str, torch.Tensor] | None, tasks: list[Task],
                      cfg: DistillConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss to backpropagate and its parts for logging: unweighted 'hard/<task>' and
    'soft/<task>', each task's weighted contribution 'task/<task>' (its share of 'total'
    is what the report shows), and 'total'. `soft` holds teacher predictions
    (probabilities for binary, head-space values for regression), possibly corrected by
    the student adapter; it may be None when no task is distilled."""
    # Per step, so no tensor op that changes nothing: a weight of 1.0 is not multiplied in,
    # the sum starts at the first term rather than a zero, and each logged part is the value
    # of a tensor the loss already holds (the same values, bit for bit, as the long form).
    total: torch.Tensor | None = None
    parts: dict[str, float] = {}
    distilled = cfg.distilled_tasks([t.name for t in tasks if t.served], [t.name for t in tasks])
    for t in tasks:
        serving = output.serving[t.name]
        y = _require(hard, t.name, "hard labels")
        h = hard_loss(t.kind, serving, y)
        parts[f"hard/{t.name}"] = h.item()
        if t.name not in distilled:
            task_loss = h
            s = None
        else:
            teacher = _require(soft, t.name, "soft (teacher) labels")
            if cfg.mode == "direct":
                w = cfg.direct.soft_weight
                if t.kind == "binary":
                    temp = cfg.direct.temperature
                    s = soft_loss(t.kind, serving / temp, soft_target(t.kind, teacher, 1.0 / temp))
                else:
                    s = soft_loss(t.kind, serving, soft_target(t.kind, teacher, 1.0))
                task_loss = (1.0 - w) * h + w * s
            else:
                if t.name not in output.aux:
                    raise ValueError(f"auxiliary mode needs an auxiliary head for task '{t.name}': "
                                     "build the model with aux_heads=True")
                target = soft_target(t.kind, teacher, cfg.auxiliary.soft_label_scale)
                s = soft_loss(t.kind, output.aux[t.name], target)
                task_loss = h + cfg.auxiliary.loss_weight * s
        weighted = task_loss if t.loss_weight == 1.0 else t.loss_weight * task_loss
        total = weighted if total is None else total + weighted
        parts[f"task/{t.name}"] = weighted.item()
        if s is not None:
            parts[f"soft/{t.name}"] = s.item()
    if total is None:
        raise ValueError("distillation_loss needs at least one task")
    parts["total"] = total.item()
    return total, parts
