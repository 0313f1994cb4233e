"""The multi-task ranker used for teacher and students alike (they differ only in config).

Hashed categorical embeddings and normalized numeric features feed a shared MLP; each
task has a serving head and, for auxiliary distillation, an auxiliary head on the shared
layers (only for the distilled tasks, so no head exists that nothing trains). Only serving
heads are ever served: `export_serving` drops the auxiliary ones.

Capacity is declared per model (embedding width, hash buckets, hidden sizes, features),
so a teacher can be much bigger than a serving-constrained student and read privileged
features the student never sees. Regression heads work in a declared target space
(log1p, standardize): the statistics are buffers, so they travel with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from kdcore.data.spec import Task
from kdcore.models.features import Features
from kdcore.models.optim import LRPolicy, OptimizerImpl
from kdcore.models.optim import make_optimizer as _make_optimizer
from kdcore.yamlconf import Strict

_EMBEDDING_INIT_STD = 0.05
_MIN_STD = 1e-6


class RankerConfig(Strict):
    embedding_dim: int = Field(16, gt=0)
    hash_buckets: int = Field(50_000, ge=2, description="embedding rows per categorical feature (0 = null)")
    hidden: list[int] = Field(default_factory=lambda: [64, 32], description="shared MLP layer widths")
    head_hidden: int = Field(0, ge=0, description="hidden units per head; 0 = linear heads")
    features: list[str] | None = Field(None, description=(
        "feature columns this model reads; default: all features for a teacher, the serving "
        "(non-privileged) features for a student"))
    optimizer: Literal["adam", "adagrad"] = "adam"
    optimizer_impl: OptimizerImpl = Field("auto", description=(
        "how the optimizer update is computed: auto (= fused), fused, foreach or for_loop (torch's CPU "
        "default, one tensor at a time, what checkpoints before this option were trained with); the same "
        "update to float rounding, fused several times faster on the embedding tables"))
    lr: float = Field(0.01, gt=0.0)
    lr_policy: LRPolicy = Field(default_factory=LRPolicy, description=(
        "learning rate over the model's lifetime step count (carried across days in the checkpoint)"))
    batch_size: int = Field(512, gt=0, description=(
        "rows per optimizer step: per-step overhead dominates small batches on CPU, so larger batches "
        "give more rows/s (a different recipe: lr and results change with it)"))
    epochs: int = Field(1, gt=0)
    seed: int = Field(0, ge=0)
    shuffle_window_rows: int = Field(262_144, gt=0, description=(
        "a day with more rows than this is streamed in windows of this many rows, each shuffled on its own "
        "(peak memory flat in the day's size); a day no larger is shuffled whole, exactly as before"))

    # Fields that say how the model is trained, not what it is: a warm start may change them.
    EXECUTION_FIELDS: ClassVar[tuple[str, ...]] = ("optimizer_impl", "shuffle_window_rows")

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, hidden: list[int]) -> list[int]:
        for i, width in enumerate(hidden):
            if width <= 0:
                raise ValueError(f"hidden[{i}] must be a positive layer width, got {width}")
        return hidden


@dataclass
class RankerOutput:
    """Raw head outputs by task: logits for binary tasks, values for regression."""

    serving: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


def _head(in_dim: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(in_dim, 1)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class MultiTaskRanker(nn.Module):
    """Weights are a pure function of (config, n_cat, n_num, tasks): construction seeds a
    forked RNG with config.seed, so identically configured models are bit-identical and
    the global torch RNG is left untouched. Auxiliary heads are built last, so a model
    with and without them has the same serving weights at initialization."""

    def __init__(self, config: RankerConfig, n_cat: int, n_num: int, tasks: list[Task],
                 aux_heads: bool | Sequence[str] = False) -> None:
        super().__init__()
        if n_cat < 0 or n_num < 0 or n_cat + n_num == 0:
            raise ValueError(f"need at least one feature, got n_cat={n_cat}, n_num={n_num}")
        if not tasks:
            raise ValueError("need at least one task")
        self.config = config
        self.n_cat = n_cat
        self.n_num = n_num
        self.tasks = list(tasks)
        names = [t.name for t in self.tasks]
        self.aux_tasks = list(names if aux_heads is True else (aux_heads or []))
        unknown = [a for a in self.aux_tasks if a not in names]
        if unknown:
            raise ValueError(f"auxiliary heads for unknown tasks {unknown}; tasks are {names}")
        self.has_aux = bool(self.aux_tasks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self._build()

    def _build(self) -> None:
        cfg = self.config
        # One table for all categorical features; feature j owns rows [j*B, (j+1)*B).
        self.embedding = nn.Embedding(max(self.n_cat * cfg.hash_buckets, 1), cfg.embedding_dim)
        nn.init.normal_(self.embedding.weight, std=_EMBEDDING_INIT_STD)
        self.register_buffer("cat_offsets", torch.arange(self.n_cat, dtype=torch.int64) * cfg.hash_buckets,
                             persistent=False)
        self.register_buffer("num_mean", torch.zeros(self.n_num))
        self.register_buffer("num_std", torch.ones(self.n_num))
        self.register_buffer("target_mean", torch.zeros(len(self.tasks)))
        self.register_buffer("target_std", torch.ones(len(self.tasks)))
        layers: list[nn.Module] = []
        width = self.n_cat * cfg.embedding_dim + self.n_num
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.shared = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({t.name: _head(width, cfg.head_hidden) for t in self.tasks})
        self.aux_heads = nn.ModuleDict({t.name: _head(width, cfg.head_hidden) for t in self.tasks
                                        if t.name in self.aux_tasks})

    def fit_normalizer(self, num: np.ndarray) -> None:
        """Set numeric mean/std from cold-start data (nulls ignored). Called once: warm starts
        keep the stored statistics so the meaning of the inputs does not shift under the weights."""
        num = np.asarray(num, dtype=np.float64)
        if num.ndim != 2 or num.shape[1] != self.n_num:
            raise ValueError(f"expected numeric features of shape [N, {self.n_num}], got {num.shape}")
        if num.shape[0] == 0:
            raise ValueError("cannot fit the normalizer on zero rows")
        finite = np.where(np.isfinite(num), num, np.nan)
        seen = np.isfinite(finite).any(axis=0)
        mean = np.zeros(self.n_num)
        std = np.ones(self.n_num)
        if seen.any():
            mean[seen] = np.nanmean(finite[:, seen], axis=0)
            std[seen] = np.nanstd(finite[:, seen], axis=0)
        self._set_normalizer(mean, std)

    def fit_normalizer_streamed(self, chunks: Iterable[np.ndarray]) -> None:
        """:meth:`fit_normalizer` over the rows of ``chunks`` taken together, one chunk in
        memory at a time (a day too large to hold): per-chunk count, mean and squared
        deviations merged exactly (Chan et al.), so the result equals the whole-array
        statistics to float64 rounding."""
        count, mean, m2 = np.zeros(self.n_num), np.zeros(self.n_num), np.zeros(self.n_num)
        rows = 0
        for chunk in chunks:
            x = np.asarray(chunk, dtype=np.float64)
            if x.ndim != 2 or x.shape[1] != self.n_num:
                raise ValueError(f"expected numeric features of shape [N, {self.n_num}], got {x.shape}")
            rows += x.shape[0]
            ok = np.isfinite(x)
            c = ok.sum(axis=0).astype(np.float64)
            s = np.where(ok, x, 0.0).sum(axis=0)
            m = np.divide(s, c, out=np.zeros(self.n_num), where=c > 0)
            q = np.where(ok, (x - m) ** 2, 0.0).sum(axis=0)
            total = count + c
            delta = m - mean
            w = np.divide(c, total, out=np.zeros(self.n_num), where=total > 0)
            mean = mean + delta * w
            m2 = m2 + q + delta ** 2 * count * w
            count = total
        if rows == 0:
            raise ValueError("cannot fit the normalizer on zero rows")
        std = np.sqrt(np.divide(m2, count, out=np.ones(self.n_num), where=count > 0))
        self._set_normalizer(np.where(count > 0, mean, 0.0), std)

    def _set_normalizer(self, mean: np.ndarray, std: np.ndarray) -> None:
        std = np.where(std < _MIN_STD, 1.0, std)
        self.num_mean.copy_(torch.from_numpy(mean))
        self.num_std.copy_(torch.from_numpy(std))

    def fit_targets(self, hard: dict[str, np.ndarray]) -> None:
        """Fit the `standardize` statistics of regression targets on cold-start labels, so
        each task's loss starts near unit scale whatever its units (a watch time in
        seconds must not outweigh a click by its scale)."""
        for i, t in enumerate(self.tasks):
            if "standardize" not in t.transform:
                continue
            y = self._pre_standardize(t, np.asarray(hard[t.name], np.float64))
            y = y[np.isfinite(y)]
            if y.size == 0:
                raise ValueError(f"cannot standardize task '{t.name}': no finite labels")
            std = float(y.std())
            self.target_mean[i] = float(y.mean())
            self.target_std[i] = std if std >= _MIN_STD else 1.0

    @staticmethod
    def _pre_standardize(t: Task, y: np.ndarray) -> np.ndarray:
        return np.log1p(np.maximum(y, 0.0)) if "log1p" in t.transform else y

    def to_model_space(self, task: str, y: np.ndarray) -> np.ndarray:
        """A target in the task's units -> the space its head is trained in (float32)."""
        i, t = self._task(task)
        y = np.asarray(y, np.float64)
        if t.transform:
            y = self._pre_standardize(t, y)
            if "standardize" in t.transform:
                y = (y - float(self.target_mean[i])) / float(self.target_std[i])
        return y.astype(np.float32)

    def to_task_units(self, task: str, v: torch.Tensor) -> torch.Tensor:
        """A regression head's raw output -> the task's units (inverse of to_model_space)."""
        i, t = self._task(task)
        if "standardize" in t.transform:
            v = v * self.target_std[i] + self.target_mean[i]
        if "log1p" in t.transform:
            v = torch.expm1(v)
        return v

    def _task(self, name: str) -> tuple[int, Task]:
        for i, t in enumerate(self.tasks):
            if t.name == name:
                return i, t
        raise KeyError(f"model has no task '{name}'")

    def _shared(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        if cat.ndim != 2 or cat.shape[1] != self.n_cat or num.ndim != 2 or num.shape[1] != self.n_num:
            raise ValueError(f"expected cat [B, {self.n_cat}] and num [B, {self.n_num}], "
                             f"got {tuple(cat.shape)} and {tuple(num.shape)}")
        parts = []
        if self.n_cat:
            emb = self.embedding(cat + self.cat_offsets)
            parts.append(emb.reshape(cat.shape[0], -1))
        if self.n_num:
            z = (num.to(self.num_mean.dtype) - self.num_mean) / self.num_std
            parts.append(torch.nan_to_num(z, nan=0.0, posinf=torch.inf, neginf=-torch.inf))  # null -> mean
        return self.shared(torch.cat(parts, dim=1))

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> RankerOutput:
        h = self._shared(cat, num)
        serving = {name: head(h).squeeze(-1) for name, head in self.heads.items()}
        aux = {name: head(h).squeeze(-1) for name, head in self.aux_heads.items()}
        return RankerOutput(serving=serving, aux=aux)

    @torch.no_grad()
    def predict(self, cat: torch.Tensor, num: torch.Tensor) -> dict[str, torch.Tensor]:
        """Serving predictions: probabilities for binary tasks, values for regression."""
        h = self._shared(cat, num)
        out = {}
        for t in self.tasks:
            raw = self.heads[t.name](h).squeeze(-1)
            out[t.name] = torch.sigmoid(raw) if t.kind == "binary" else self.to_task_units(t.name, raw)
        return out

    def param_count(self, serving: bool = False) -> int:
        """All parameters, auxiliary heads included; ``serving``: only what is served."""
        return sum(p.numel() for n, p in self.named_parameters() if not (serving and n.startswith("aux_heads.")))

    def flops_per_example(self, serving: bool = False) -> int:
        """Approximate FLOPs (2 x multiply-adds) of every dense layer present, auxiliary
        heads included unless ``serving``; embedding lookups and activations are not counted."""
        return sum(2 * m.in_features * m.out_features for n, m in self.named_modules()
                   if isinstance(m, nn.Linear) and not (serving and n.startswith("aux_heads.")))


def as_tensors(features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """(cat, num) tensors for forward/predict; shares memory with the numpy arrays."""
    return torch.from_numpy(features.cat), torch.from_numpy(features.num)


def make_optimizer(model: MultiTaskRanker) -> torch.optim.Optimizer:
    """The optimizer named by model.config (so teacher and students are built the same way)."""
    return _make_optimizer(model, model.config.optimizer, model.config.lr, model.config.optimizer_impl)


def export_serving(model: MultiTaskRanker) -> MultiTaskRanker:
    """A copy without auxiliary heads whose serving predictions equal the original's."""
    serving = MultiTaskRanker(model.config, model.n_cat, model.n_num, model.tasks, aux_heads=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("aux_heads.")}
    serving.load_state_dict(state, strict=True)
    return serving.train(model.training)
