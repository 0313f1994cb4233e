"""Gradient scaling: identity on the way forward, gradient times `scale` on the way back.

Auxiliary heads read the shared layers through this, so the strength with which the
teacher's labels shape the shared representation is a knob (ExFM's auxiliary gradient
scale) independent of the auxiliary head's own learning: 0 trains the head on a frozen
view of the representation, 1 is plain multi-task learning.
"""

from __future__ import annotations

from typing import Any

import torch


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Return x unchanged; gradients flowing back through the result are multiplied by scale."""
    return _GradScale.apply(x, float(scale))
