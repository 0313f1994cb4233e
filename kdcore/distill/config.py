"""Declarative distillation settings: the loss a student trains with is fully described
here (mode plus knobs), so a run's config says exactly what was done and the training
loop has a single code path (`distillation_loss`) rather than per-mode branches."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kdcore.yamlconf import Strict

DistillMode = Literal["none", "direct", "auxiliary"]


class DirectKnobs(Strict):
    """Direct distillation: one head per task trained on a mix of hard and soft targets."""

    soft_weight: float = Field(0.5, ge=0.0, le=1.0,
                               description="weight of the soft loss; the hard loss gets 1 - soft_weight")
    temperature: float = Field(1.0, gt=0.0,
                               description="binary tasks: teacher and student logits are divided by it")


class AuxKnobs(Strict):
    """Auxiliary distillation: a teacher-only head next to each hard-label serving head.

    One strength knob, not two. ExFM names both a loss weight and a scale of the gradient
    the auxiliary head sends into the shared layers, but under Adam (our optimizer) the
    auxiliary head's own update is invariant to a constant loss factor, so both knobs only
    scale the teacher's share of the shared layers' gradient: 0.1 of either gave
    bit-identical students. `loss_weight` is that share; `soft_label_scale` changes the
    targets themselves and so means something else."""

    loss_weight: float = Field(1.0, gt=0.0, description=(
        "strength of the teacher's signal in the shared layers, relative to the hard loss"))
    soft_label_scale: float = Field(1.0, gt=0.0,
                                    description="binary: teacher logit multiplier; regression: value multiplier")

    @model_validator(mode="before")
    @classmethod
    def _removed_grad_scale(cls, data: Any) -> Any:
        if isinstance(data, dict) and "grad_scale" in data:
            raise ValueError("grad_scale was removed: under Adam it is the same knob as loss_weight "
                             "(identical students); set loss_weight instead")
        return data


class AdapterKnobs(Strict):
    """Student adapter (ExFM): maps teacher predictions to ones calibrated on fresh hard
    labels before the student distills from them. Ignored when mode is 'none'."""

    enabled: bool = False
    hidden: int = Field(8, ge=0, description="hidden units of the correction MLP; 0 = affine only")
    epochs: int = Field(50, ge=1, description="full-batch Adam steps")
    lr: float = Field(0.05, gt=0.0)


class DistillConfig(Strict):
    mode: DistillMode = "auxiliary"
    tasks: list[str] | None = Field(None, description=(
        "tasks distilled from the teacher; default: the dataset's served tasks (an unserved "
        "regression task trains on its hard labels only)"))
    direct: DirectKnobs = Field(default_factory=DirectKnobs)
    auxiliary: AuxKnobs = Field(default_factory=AuxKnobs)
    adapter: AdapterKnobs = Field(default_factory=AdapterKnobs)

    @property
    def uses_teacher(self) -> bool:
        """Whether this config needs teacher labels at all."""
        return self.mode != "none"

    def distilled_tasks(self, served: list[str], all_tasks: list[str]) -> list[str]:
        """Names of the tasks that learn from the teacher (empty in mode 'none')."""
        if self.mode == "none":
            return []
        if self.tasks is None:
            return list(served)
        unknown = [t for t in self.tasks if t not in all_tasks]
        if unknown:
            raise ValueError(f"distill.tasks names unknown tasks {unknown}; tasks are {all_tasks}")
        return list(self.tasks)
