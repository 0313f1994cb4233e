"""Running a model: deterministic, batched inference.

Below both of its users: the teacher labelling a day (``kdcore.labels``) and the
training loop evaluating a student (``kdcore.training``), so labels never import the
training package.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcore.models.features import Features
from kdcore.models.ranker import MultiTaskRanker


def set_determinism(threads: int) -> None:
    """Same inputs, same bytes: fixed thread count and deterministic kernels."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


@torch.inference_mode()
def predict(model: MultiTaskRanker, features: Features, batch_rows: int = 65_536) -> dict[str, np.ndarray]:
    """Predictions per task (float32), ``batch_rows`` rows at a time so memory stays flat."""
    model.eval()
    outs: dict[str, list[np.ndarray]] = {t.name: [] for t in model.tasks}
    for start in range(0, len(features), batch_rows):
        cat = torch.from_numpy(features.cat[start:start + batch_rows])
        num = torch.from_numpy(features.num[start:start + batch_rows])
        for name, pred in model.predict(cat, num).items():
            outs[name].append(pred.numpy())
    return {k: (np.concatenate(v) if v else np.zeros(0, np.float32)).astype(np.float32) for k, v in outs.items()}
