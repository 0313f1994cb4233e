"""The real trainer behind the search: per candidate, a programmatic PipelineConfig whose
storage root is ``<run>/cand=<id>/`` (its teacher, labels and proxy student live there),
with the needed example partitions copied from the examples root. The proxy student and
the control are bootstrapped once in ``<run>/base/`` (they do not depend on the teacher)
and the student's bootstrap checkpoint is copied into every candidate, so all candidates
start from the same student; the control runs once, in ``base``, for everyone.

Each day of a candidate reuses the pipeline's own steps: teacher refresh
(``steps.teacher_step``), label materialization (``labels.materialize``), then the proxy
student (``steps.student_step``) distilling from those labels; its progressive metrics
before training are what the search scores."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

from kdcore.config import LabelsConfig, PipelineConfig, StudentConfig, TeacherConfig
from kdcore.data import examples
from kdcore.errors import SpecError
from kdcore.search.config import Candidate, SearchConfig
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part

log = logging.getLogger(__name__)
STUDENT = "student"
TEACHER = "teacher"


class CandidatePipeline(PipelineConfig):
    """A PipelineConfig whose root is exactly ``storage_root`` (KD_STORAGE_ROOT, which
    the daily pipeline honours, must not collapse every candidate onto one root)."""

    @property
    def root(self) -> str:  # type: ignore[override]
        return sfs.normalize(self.storage_root)


def copy_partition(src: str, dst: str) -> bool:
    """Copy a published partition (files first, manifest last). False if already there."""
    if part.is_published(dst):
        return False
    manifest = part.read_manifest(src)  # only the files it lists (never stray temp files)
    for entry in manifest.files:
        sfs.write_bytes_atomic(sfs.join(dst, entry.path), sfs.read_bytes(sfs.join(src, entry.path)))
    sfs.write_bytes_atomic(part.manifest_uri(dst), sfs.read_bytes(part.manifest_uri(src)))
    return True


def run_uri(cfg: SearchConfig, run_id: str) -> str:
    return sfs.join(cfg.root, "search", run_id)


class PipelineTrainer:
    """Implements ``schedule.Trainer`` with the real pipeline steps."""

    def __init__(self, cfg: SearchConfig, run_id: str) -> None:
        self.cfg = cfg
        self.run = run_uri(cfg, run_id)
        self.spec = cfg.spec
        self.task = cfg.primary_task()
        self.cands: dict[str, Candidate] = {c.id: c for c in cfg.all_candidates()}
        avail = examples.list_days(cfg.examples_uri, self.spec.name)
        end = cfg.window.bootstrap_end
        self.history = [d for d in avail if d <= end]
        self.validation = [d for d in avail if d > end][:cfg.window.validation_days]
        if not self.history:
            raise SpecError(f"field 'window.bootstrap_end': no example partitions on or before {end} "
                            f"under {cfg.examples_uri}")
        if len(self.validation) < 2:
            raise SpecError(f"field 'window.validation_days': need at least 2 example partitions after "
                            f"{end}, found {len(self.validation)}")
        self._rows: dict[dt.date, int] = {}

    # ---------------------------------------------------------------- configs
    def _clock(self) -> float:
        return time.process_time() if self.cfg.budget.kind == "cpu" else time.perf_counter()

    def pipeline(self, cid: str | None) -> CandidatePipeline:
        proxy = self.cfg.proxy_student
        model = self.cands[cid].model if cid else proxy.model  # base root: the teacher is never trained
        root = sfs.join(self.run, f"cand={cid}" if cid else "base")
        return CandidatePipeline(dataset=self.cfg.dataset_path, storage_root=root,
                                 teacher=TeacherConfig(name=TEACHER, model=model),
                                 students=[StudentConfig(name=STUDENT, model=proxy.model, distill=proxy.distill)],
                                 labels=LabelsConfig(shards=1), torch_threads=self.cfg.torch_threads).resolved()

    def validation_days(self) -> list[dt.date]:
        return list(self.validation)

    def _day_rows(self, day: dt.date) -> int:
        if day not in self._rows:
            m = part.read_manifest(examples.examples_uri(self.cfg.examples_uri, self.spec.name, day))
            self._rows[day] = m.rows or 0
        return self._rows[day]

    def model_cost(self, cid: str) -> dict[str, int]:
        from kdcore.models.features import FeatureSet
        from kdcore.models.ranker import MultiTaskRanker

        model = self.pipeline(cid).teacher.model
        cols = FeatureSet.of(self.spec, model.features)
        m = MultiTaskRanker(model, len(cols.categorical), len(cols.numeric), list(self.spec.tasks))
        return {"params": m.param_count(), "flops_per_example": m.flops_per_example()}

    def work(self, cid: str, kind: str) -> float:
        c = self.cands[cid]
        flops = self.model_cost(cid)["flops_per_example"]
        if kind == "bootstrap":
            rows = sum(self._day_rows(d) for d in self.history[-c.bootstrap_days:])
            return 3.0 * flops * rows * c.bootstrap_epochs
        rows = sum(self._day_rows(d) for d in self.validation) / len(self.validation)
        return flops * rows * (3.0 * c.model.epochs + 2.0)  # train + progressive eval + labels

    # ---------------------------------------------------------------- units
    def _copy_examples(self, root: str, days: list[dt.date]) -> None:
        for d in days:
            copy_partition(examples.examples_uri(self.cfg.examples_uri, self.spec.name, d),
                           examples.examples_uri(root, self.spec.name, d))

    def prepare(self) -> float:
        """Base root: examples of the validation days; student and control bootstrapped
        once on the student's window (hard labels only, as the pipeline does)."""
        from kdcore.models.inference import set_determinism
        from kdcore.training import steps
        from kdcore.training.data import load_days
        from kdcore.training.loop import NO_KD

        t0 = self._clock()
        cfg = self.pipeline(None)
        self._copy_examples(cfg.root, self.validation)
        set_determinism(cfg.torch_threads)
        window = self.history[-self.cfg.proxy_student.bootstrap_days:]
        data = load_days(self.cfg.examples_uri, self.spec, window)
        through = self.history[-1]
        inputs = steps.window_digest(self.cfg.examples_uri, self.spec, window)  # keyed on content, as bootstrap is
        for s in cfg.all_students():
            fp = {"model": s.model.model_dump(mode="json"), "bootstrap": [window[0].isoformat(), window[-1].isoformat()],
                  "examples": inputs}
            base = steps.base_generation(cfg, s.name, through)  # before the check: a publish builds on what it saw
            if steps.existing_checkpoint(cfg, s.name, through, None, fp):
                continue
            extra = {"bootstrap": {"from": window[0].isoformat(), "to": window[-1].isoformat(), "days": len(window)}}
            steps.train_and_publish(cfg, s.name, "control" if s.name in cfg.controls() else "student", s.model,
                                     steps.aux_tasks(cfg, s.distill), through, data, None, NO_KD, None, extra, fp,
                                     base, epochs=1, progressive=False)
        return round(self._clock() - t0, 4)

    def control_day(self, day: dt.date) -> tuple[float, dict[str, float]]:
        from kdcore.training import steps

        t0 = self._clock()
        cfg = self.pipeline(None)
        out = steps.student_step(cfg, cfg.control_of(STUDENT), day, None, "distill")
        return round(self._clock() - t0, 4), self._pick(out.get("progressive"))

    def bootstrap(self, cid: str) -> float:
        """Copy the student's bootstrap checkpoint and the validation examples into the
        candidate's root, then train its teacher on its own window."""
        from kdcore.models import registry
        from kdcore.models.inference import set_determinism
        from kdcore.training import steps
        from kdcore.training.data import load_days
        from kdcore.training.loop import NO_KD

        t0 = self._clock()
        c, cfg, base = self.cands[cid], self.pipeline(cid), self.pipeline(None)
        through = self.history[-1]
        window = self.history[-c.bootstrap_days:]
        # the teacher's checkpoint carries a profile of its training window, read from its root
        self._copy_examples(cfg.root, [*window, *self.validation])
        copy_partition(registry.checkpoint_uri(base.root, self.spec.name, STUDENT, through),
                       registry.checkpoint_uri(cfg.root, self.spec.name, STUDENT, through))
        set_determinism(cfg.torch_threads)
        fp = {"model": cfg.teacher.model.model_dump(mode="json"),
              "bootstrap": [window[0].isoformat(), window[-1].isoformat()],
              "examples": steps.window_digest(self.cfg.examples_uri, self.spec, window)}
        base_gen = steps.base_generation(cfg, TEACHER, through)
        if not steps.existing_checkpoint(cfg, TEACHER, through, None, fp):
            data = load_days(self.cfg.examples_uri, self.spec, window)
            extra = {"bootstrap": {"from": window[0].isoformat(), "to": window[-1].isoformat(), "days": len(window)}}
            steps.train_and_publish(cfg, TEACHER, "teacher", cfg.teacher.model, [], through, data, None, NO_KD, None,
                                     extra, fp, base_gen, epochs=c.bootstrap_epochs, progressive=False)
        return round(self._clock() - t0, 4)

    def day(self, cid: str, day: dt.date) -> tuple[float, dict[str, Any]]:
        from kdcore.labels import materialize as mat
        from kdcore.training import steps

        t0 = self._clock()
        cfg = self.pipeline(cid)
        teacher = steps.teacher_step(cfg, day)
        labels = mat.materialize(cfg, day)  # the pipeline's label policy: out of sample by default
        student = steps.student_step(cfg, STUDENT, day, labels["uri"], "distill")
        return round(self._clock() - t0, 4), {"student": self._pick(student.get("progressive")),
                                               "teacher": self._pick(teacher.get("progressive")),
                                               "teacher_version": teacher["version"]}

    def _pick(self, metrics: dict[str, Any] | None) -> dict[str, float]:
        m = (metrics or {}).get(self.task) or {}
        return {k: float(m[k]) for k in ("ne", "auc", "logloss", "calibration") if k in m and m[k] is not None}


def write_json(uri: str, obj: Any) -> None:
    sfs.write_bytes_atomic(uri, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(sfs.read_bytes(uri))
