"""The stage contract. A stage is a function of (config, date, typed input references)
returning a typed output reference, in the spirit of TFX's driver / executor / publisher:
``resolve`` finds the inputs the upstream stages did not hand over (a run that selects
only some stages reads what an earlier run committed), and ``compute`` decides reuse from
a fingerprint of the inputs' content, computes and publishes; a reused result says
``reused``. Each caller (``kd run``, the DAG's tasks) walks the same stages and hands
each one the outputs of the stages it declares as inputs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdcore.config import PipelineConfig


@dataclass(frozen=True)
class Run:
    """What one walk over a day fixes for every stage (the DAG's plan, ``kd run``'s
    arguments): the stages selected, the students, a teacher pin, ``force``."""

    cfg: PipelineConfig
    day: dt.date
    stages: frozenset[str]
    students: tuple[str, ...] | None = None
    teacher_version: str | None = None
    force: bool = False


@dataclass(frozen=True)
class Stage:
    """One step of the day. ``inputs`` name the stages whose outputs it takes; ``optional``:
    a stage the user may leave out (``validate`` always runs); ``wanted``: whether a run
    needs it (default: selected, or not optional); ``fallback``: what a failure is called
    when it leaves the day going on with what is already there (the last good teacher);
    ``per_day``: False for a stage built once after the last day of a walk (the report)."""

    name: str
    label: str
    inputs: tuple[str, ...]
    compute: Callable[[Run, dict[str, Any]], Any]
    resolve: Callable[[Run, dict[str, Any]], dict[str, Any]] = field(default=lambda run, given: given)
    optional: bool = True
    wanted: Callable[[Run], bool] | None = None
    fallback: str | None = None
    per_day: bool = True

    def is_wanted(self, run: Run) -> bool:
        if self.wanted is not None:
            return self.wanted(run)
        return not self.optional or self.name in run.stages


def run_stage(stage: Stage, run: Run, given: dict[str, Any]) -> Any:
    """resolve the inputs (those not handed over are looked up), then compute (which finds
    an existing result by its inputs' fingerprint, or computes and publishes)."""
    inputs = stage.resolve(run, {k: given.get(k) for k in stage.inputs})
    return stage.compute(run, inputs)
