"""Model weights <-> bytes (safetensors). Storage and lineage live elsewhere.

safetensors holds tensors only, so loading a checkpoint cannot run code (unlike pickle),
and the same weights always serialize to the same bytes, so a checkpoint's digest
identifies its weights. The architecture is not stored: the caller rebuilds it from
the run's config and the weights must match it exactly.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from kdcore.data.spec import Task
from kdcore.models.ranker import MultiTaskRanker, RankerConfig

_AUX_PREFIX = "aux_heads."


def model_to_bytes(model: MultiTaskRanker) -> bytes:
    """Every persistent tensor of the state dict (weights and normalizer buffers)."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return save(state)


def model_from_bytes(data: bytes, config: RankerConfig, n_cat: int, n_num: int, tasks: list[Task],
                     aux_heads: bool, *, strict: bool = True) -> MultiTaskRanker:
    """Rebuild the model and load the weights; raises ValueError when they do not fit it.

    strict=False tolerates a difference in auxiliary heads only (a warm start that
    switches distillation mode): stored aux heads are dropped, missing ones keep their
    fresh initialization. Every other tensor must still match by name and shape.
    """
    try:
        state = load(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"not a valid safetensors checkpoint: {e}") from None
    model = MultiTaskRanker(config, n_cat, n_num, tasks, aux_heads=aux_heads)
    expected = model.state_dict()
    if not strict:
        state = {k: v for k, v in state.items() if not k.startswith(_AUX_PREFIX) or k in expected}
        for k, v in expected.items():
            if k.startswith(_AUX_PREFIX) and k not in state:
                state[k] = v
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model config: missing {missing}, unexpected {unexpected}")
    wrong = [f"{k}: stored {state[k].dtype}{tuple(state[k].shape)}, model {v.dtype}{tuple(v.shape)}"
             for k, v in expected.items() if state[k].shape != v.shape or state[k].dtype != v.dtype]
    if wrong:
        raise ValueError(f"checkpoint tensors do not match the model config: {'; '.join(wrong)}")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model
