"""Declarative distillation settings: the loss a student trains with is fully described
here (mode plus knobs), so a run's config says exactly what was done and the training
loop has a single code path (`distillation_loss`) rather than per-mode branches."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdcore.yamlconf import Strict

DistillMode = Literal["none", "direct", "auxiliary"]


class DirectKnobs(Strict):
    """Direct distillation: one head per task trained on a mix of hard and soft targets."""

    soft_weight: float = Field(0.5, ge=0.0, le=1.0,
                               description="weight of the soft loss; the hard loss gets 1 - soft_weight")
    temperature: float = Field(1.0, gt=0.0,
                               description="binary tasks: teacher and student logits are divided by it")


class AuxKnobs(Strict):
    """Auxiliary distillation: a teacher-only head next to each hard-label serving head."""

    loss_weight: float = Field(1.0, ge=0.0, description="weight of the auxiliary (soft) loss")
    soft_label_scale: float = Field(1.0, gt=0.0,
                                    description="binary: teacher logit multiplier; regression: value multiplier")
    grad_scale: float = Field(1.0, ge=0.0,
                              description="scale of the gradient aux heads send into the shared layers")


class AdapterKnobs(Strict):
    """Student adapter (ExFM): maps teacher predictions to ones calibrated on fresh hard
    labels before the student distills from them. Ignored when mode is 'none'."""

    enabled: bool = False
    hidden: int = Field(8, ge=0, description="hidden units of the correction MLP; 0 = affine only")
    epochs: int = Field(50, ge=1, description="full-batch Adam steps")
    lr: float = Field(0.05, gt=0.0)


class DistillConfig(Strict):
    mode: DistillMode = "auxiliary"
    direct: DirectKnobs = Field(default_factory=DirectKnobs)
    auxiliary: AuxKnobs = Field(default_factory=AuxKnobs)
    adapter: AdapterKnobs = Field(default_factory=AdapterKnobs)

    @property
    def uses_teacher(self) -> bool:
        """Whether this config needs teacher labels at all."""
        return self.mode != "none"
