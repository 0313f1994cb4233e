"""Student adapter (ExFM): correct a possibly stale or shifted teacher with today's hard labels.

Per task, a tiny model maps the teacher's logit (binary) or value (regression) to a
corrected one: out = a * x + b + mlp(x). It starts as the identity (a=1, b=0, the MLP's
output layer zero), so a short fit can only move the target towards the labels, and
the affine part alone already fixes the common case of a shifted or over-confident
teacher. It is fit full-batch with Adam on the day's hard labels; the student then
distills from the corrected targets, which are plain arrays (gradient stopped).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdcore.data.spec import Task, TaskKind
from kdcore.distill.config import AdapterKnobs

_PROB_EPS = 1e-6


class _Correction(nn.Module):
    def __init__(self, hidden: int, x_mean: float, x_std: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.x_mean, self.x_std = x_mean, x_std
        self.mlp: nn.Module | None = None
        if hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a * x + self.b
        if self.mlp is not None:
            z = ((x - self.x_mean) / self.x_std).unsqueeze(-1)
            out = out + self.mlp(z).squeeze(-1)
        return out


class StudentAdapter:
    """Per-task correction of teacher predictions; deterministic for a given seed and data."""

    def __init__(self, hidden: int = 8, epochs: int = 50, lr: float = 0.05, seed: int = 0) -> None:
        self.hidden, self.epochs, self.lr, self.seed = hidden, epochs, lr, seed
        self.kind: TaskKind | None = None
        self._model: _Correction | None = None

    @staticmethod
    def _inputs(kind: TaskKind, teacher_pred: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(teacher_pred, dtype=np.float64))
        return torch.logit(x, eps=_PROB_EPS) if kind == "binary" else x

    def fit(self, teacher_pred: np.ndarray, hard: np.ndarray, kind: TaskKind) -> StudentAdapter:
        """Fit on rows where both teacher and label are finite (needs at least one)."""
        x = self._inputs(kind, teacher_pred)
        y = torch.as_tensor(np.asarray(hard, dtype=np.float64))
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"teacher_pred and hard must be 1-d of equal length, got {x.shape} and {y.shape}")
        ok = torch.isfinite(x) & torch.isfinite(y)
        if not bool(ok.any()):
            raise ValueError("no rows with finite teacher prediction and label to fit the adapter on")
        x, y = x[ok], y[ok]
        std = float(x.std()) if x.numel() > 1 else 1.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = _Correction(self.hidden, float(x.mean()), std if std > 1e-12 else 1.0)
        loss_fn = F.binary_cross_entropy_with_logits if kind == "binary" else F.mse_loss
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        for _ in range(self.epochs):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        self.kind, self._model = kind, model
        return self

    def transform(self, teacher_pred: np.ndarray) -> np.ndarray:
        """Corrected targets as float32: probabilities for binary, values for regression."""
        if self._model is None or self.kind is None:
            raise RuntimeError("StudentAdapter.transform called before fit")
        with torch.no_grad():
            out = self._model(self._inputs(self.kind, teacher_pred))
            if self.kind == "binary":
                out = torch.sigmoid(out)
        return out.numpy().astype(np.float32)


def fit_adapters(soft: dict[str, np.ndarray], hard: dict[str, np.ndarray], tasks: list[Task],
                 knobs: AdapterKnobs, seed: int = 0) -> dict[str, np.ndarray]:
    """Corrected soft targets by task (the input unchanged when the adapter is disabled).
    Regression targets are clipped to the task's [min, max] when the spec gives one."""
    if not knobs.enabled:
        return dict(soft)
    out: dict[str, np.ndarray] = {}
    for t in tasks:
        for what, labels in (("soft (teacher) labels", soft), ("hard labels", hard)):
            if t.name not in labels:
                raise ValueError(f"adapter: missing {what} for task '{t.name}'")
        adapter = StudentAdapter(knobs.hidden, knobs.epochs, knobs.lr, seed).fit(soft[t.name], hard[t.name], t.kind)
        corrected = adapter.transform(soft[t.name])
        if t.kind == "regression" and (t.min is not None or t.max is not None):
            corrected = np.clip(corrected, t.min, t.max)
        out[t.name] = corrected
    return out
