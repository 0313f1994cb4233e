"""Day steps of continuous training, for the teacher and for students.

A day step for date D: find the parent (newest checkpoint before D, by lineage), evaluate
it on D before it trains (progressive validation), warm-start from it (weights *and*
optimizer state, so Adam and the learning-rate policy continue; cold start when there is
no parent) and train on D, then publish the checkpoint "through D". Re-running a day
whose checkpoint already descends from the same parent with the same config is a no-op.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from typing import Any, Literal

import numpy as np
import torch

from kdcore.config import PipelineConfig, StudentConfig
from kdcore.data.spec import DatasetSpec
from kdcore.data.validate import ensure_valid
from kdcore.distill.adapter import fit_adapters
from kdcore.distill.config import DistillConfig
from kdcore.errors import DataError, SpecError, StorageError
from kdcore.labels.join import load_aligned, load_joined
from kdcore.labels.store import check_labels_for
from kdcore.models import registry
from kdcore.models.inference import predict, set_determinism
from kdcore.models.ranker import MultiTaskRanker, RankerConfig, make_optimizer
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part
from kdcore.training.data import DayData, DayStream, load_days, open_day
from kdcore.training.loop import NO_KD, evaluate, fit_day, model_features, new_model

GateAction = Literal["distill", "hard_labels_only", "skip_students"]
log = logging.getLogger(__name__)


def _seed(cfg: RankerConfig, day: dt.date) -> int:
    return cfg.seed * 1_000_003 + day.toordinal()


def base_generation(cfg: PipelineConfig, name: str, day: dt.date) -> str | None:
    """The generation of the checkpoint folder of (name, day) when a step starts: the step
    publishes only if it is still the same then, so a checkpoint another trainer committed
    meanwhile is never replaced (the later one gets a ConflictError)."""
    return part.manifest_generation(registry.checkpoint_uri(cfg.root, cfg.spec.name, name, day))


def existing_checkpoint(cfg: PipelineConfig, name: str, day: dt.date, parent: registry.Checkpoint | None,
              fingerprint: dict[str, Any]) -> registry.Checkpoint | None:
    try:
        ckpt = registry.find_checkpoint(cfg.root, cfg.spec.name, name, day)
    except StorageError as e:
        if e.transient:  # not "absent": retraining would replace a checkpoint storage did not show
            raise
        return None
    same_parent = ckpt.meta.get("parent") == (parent.version if parent else None)
    return ckpt if same_parent and _same_inputs(ckpt.meta.get("fingerprint"), fingerprint) else None


def _same_inputs(recorded: dict[str, Any] | None, fingerprint: dict[str, Any]) -> bool:
    """Checkpoints published before paths had one form recorded their labels as
    ``/labels/...`` (now ``labels/...``, :func:`kdcore.storage.fs.relative`): the same
    labels, so an upgraded deployment reuses them instead of retraining."""
    if recorded and isinstance(recorded.get("labels"), str) and recorded["labels"].startswith("/"):
        recorded = {**recorded, "labels": recorded["labels"][1:]}
    return recorded == fingerprint


def aux_tasks(cfg: PipelineConfig, distill: DistillConfig) -> list[str]:
    """Tasks that get an auxiliary head: the distilled ones, in auxiliary mode only."""
    if distill.mode != "auxiliary":
        return []
    return distill.distilled_tasks(cfg.spec.served_tasks, [t.name for t in cfg.spec.tasks])


def _warm_or_cold(cfg: PipelineConfig, parent: registry.Checkpoint | None, model_cfg: RankerConfig,
                  aux: list[str], data: DayData | DayStream, day: dt.date
                  ) -> tuple[MultiTaskRanker, torch.optim.Optimizer, int]:
    """(model, optimizer, lifetime steps): the parent's when there is one, else a cold
    start fitted on ``data`` with a fresh optimizer."""
    if parent is not None:
        model = parent.load(cfg.spec)
        # How a model is computed (optimizer implementation, streaming window) may change
        # between days; what it computes may not.
        how = {f: getattr(model_cfg, f) for f in RankerConfig.EXECUTION_FIELDS}
        if model.config.model_copy(update=how) != model_cfg or model.aux_tasks != aux:
            raise StorageError(f"{parent.uri}: parent's model config differs from the pipeline config; "
                               f"start a new model name or bootstrap again")
        model.config = model_cfg
        return model, parent.load_optimizer(model), parent.steps
    model = new_model(model_cfg, cfg.spec, aux, data, _seed(model_cfg, day))
    return model, make_optimizer(model), 0


def train_and_publish(cfg: PipelineConfig, name: str, role: str, model_cfg: RankerConfig, aux: list[str],
                       day: dt.date, data: DayData | DayStream, parent: registry.Checkpoint | None,
                       distill: DistillConfig, soft: dict[str, np.ndarray] | None,
                       extra: dict[str, Any], fingerprint: dict[str, Any], base: str | None,
                       epochs: int | None = None, progressive: bool = True) -> dict[str, Any]:
    """Warm/cold start, progressive evaluation, training, publish. The teacher's
    checkpoint also carries the reference profile of its recent training window, which
    the quality gate compares with the students' day. ``base`` is :func:`base_generation`, read when
    the step started. A day without rows trains and publishes nothing: its checkpoint
    would carry NaN metrics and a copy of its parent under a new date."""
    if len(data) == 0:
        raise DataError(f"0 training rows for {name} on {day}: nothing trained or published")
    start = time.perf_counter()
    model, opt, steps_before = _warm_or_cold(cfg, parent, model_cfg, aux, data, day)
    tag = f"{name} {day}"
    n_days = len(data.days)
    log.info("%s: training %s (%s) on %d rows%s%s; %s; %d epoch(s), batch %d, lr %g (%s), optimizer %s (%s), "
             "distill mode %s", tag, name, role, len(data), f" ({n_days} days)" if n_days > 1 else "",
             f" streamed in windows of {data.window_rows} rows" if isinstance(data, DayStream) else "",
             f"warm start from {parent.version} (lifetime steps {steps_before})" if parent else "cold start",
             epochs or model_cfg.epochs, model_cfg.batch_size, model_cfg.lr, model_cfg.lr_policy.kind,
             model_cfg.optimizer, model_cfg.optimizer_impl, distill.mode)
    metrics = evaluate(model, data) if (progressive and parent is not None) else None
    if metrics:
        log.info("%s: progressive (parent on %s before training): %s", tag, day, _describe_metrics(metrics))
    train = fit_day(model, data, soft, distill, seed=_seed(model_cfg, day), epochs=epochs, optimizer=opt,
                    start_step=steps_before, tag=tag)
    rows_seen = (parent.meta.get("rows_seen", 0) if parent else 0) + len(data)
    meta = {"role": role, "dataset": cfg.spec.name, "parent": parent.version if parent else None,
            "progressive": {"date": day.isoformat(), "metrics": metrics} if metrics else None,
            "train": train, "rows_day": len(data), "rows_seen": rows_seen, "fingerprint": fingerprint,
            "steps_total": train["steps_total"], "features": list(model_cfg.features or cfg.spec.feature_columns),
            "train_seconds": round(time.perf_counter() - start, 3), **extra}
    blobs = None
    if role == "teacher":
        from kdcore.quality.daily import PROFILE, window_profile

        window = max(cfg.gate.profile_window_days, len(data.days))
        blobs = {PROFILE: window_profile(cfg.root, cfg.spec, day, window)}
    ckpt = registry.publish_checkpoint(cfg.root, cfg.spec.name, name, day, model, meta, blobs, optimizer=opt,
                                       expected=base)
    log.info("%s: published %s (parent %s): %d steps today, lifetime steps %d, rows seen %d, %.2f s",
             tag, ckpt.version, meta["parent"] or "none, cold start", train["steps_total"] - steps_before,
             train["steps_total"], rows_seen, time.perf_counter() - start)
    return {"name": name, "version": ckpt.version, "uri": ckpt.uri, "parent": meta["parent"],
            "trained_through": day.isoformat(), "progressive": metrics, "skipped": False}


def _describe_metrics(metrics: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{task} " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
                     for task, m in metrics.items())


def _log_reused(name: str, day: dt.date, ckpt: registry.Checkpoint) -> None:
    log.info("%s %s: %s already trained from the same parent and inputs; reused, nothing trained",
             name, day, ckpt.version)


def _summary(ckpt: registry.Checkpoint, reused: bool = True) -> dict[str, Any]:
    prog = ckpt.meta.get("progressive") or {}
    return {"name": ckpt.meta["name"], "version": ckpt.version, "uri": ckpt.uri, "parent": ckpt.meta.get("parent"),
            "trained_through": ckpt.meta["trained_through"], "progressive": prog.get("metrics"),
            "skipped": False, "reused": reused}


def teacher_step(cfg: PipelineConfig, day: dt.date, force: bool = False) -> dict[str, Any]:
    """Refresh the teacher: progressive evaluation of the teacher through D-1 on D, then
    train it on D. A failure raises, so the last good teacher stays in use."""
    set_determinism(cfg.torch_threads)
    t = cfg.teacher
    base = base_generation(cfg, t.name, day)
    checked = ensure_valid(cfg.root, cfg.spec, day)  # before anything trains on the day
    parent = registry.parent_for(cfg.root, cfg.spec.name, t.name, day)
    registry.check_parent(parent, day)
    # keyed on its inputs: re-published examples retrain the day (and, by lineage, the days after)
    fp = {"model": t.model.model_dump(mode="json"), "examples": checked["examples_sha256"]}
    if not force and (ckpt := existing_checkpoint(cfg, t.name, day, parent, fp)):
        _log_reused(t.name, day, ckpt)
        return _summary(ckpt)
    data = open_day(cfg.root, cfg.spec, day, t.model.shuffle_window_rows)
    return train_and_publish(cfg, t.name, "teacher", t.model, [], day, data, parent, NO_KD, None, {}, fp, base)


def student_step(cfg: PipelineConfig, name: str, day: dt.date, labels_uri: str | None = None,
                 action: GateAction = "distill", force: bool = False) -> dict[str, Any]:
    """Train one student (or control) on D, distilling from the labels at ``labels_uri``
    unless the gate says otherwise. ``skip_students`` publishes nothing for D.

    The labels must be D's, from the examples published now (:func:`check_labels_for`).
    When some examples have no label and ``policies.missing_labels`` is
    ``hard_labels_only``, the student trains on the whole day's hard labels without
    distillation (recorded as ``kd_applied: false`` with the count and the reason): a
    partial join would silently train on fewer rows, or on none."""
    set_determinism(cfg.torch_threads)
    s: StudentConfig = cfg.student(name)
    role = "control" if name in cfg.controls() else "student"
    if action == "skip_students":
        log.info("%s %s: skipped: gate said skip_students (nothing trained or published)", name, day)
        return {"name": name, "skipped": True, "reason": "gate: skip_students", "trained_through": None}
    base = base_generation(cfg, name, day)
    checked = ensure_valid(cfg.root, cfg.spec, day)
    parent = registry.parent_for(cfg.root, cfg.spec.name, name, day)
    registry.check_parent(parent, day)
    use_kd = s.distill.uses_teacher and action == "distill"
    if use_kd and not labels_uri:
        raise StorageError(f"student '{name}' distills but no teacher labels were given for {day}")
    labels_manifest = (check_labels_for(labels_uri, cfg.spec.name, day, checked["examples_sha256"])
                       if use_kd and labels_uri else None)
    fp = {"model": s.model.model_dump(mode="json"), "distill": s.distill.model_dump(mode="json"),
          # relative to the root, so a copied or moved root still recognises its checkpoints
          "labels": sfs.relative(cfg.root, labels_uri) if use_kd else None, "action": action,
          # keyed on the content of its inputs: changed examples or labels retrain the day
          "examples": checked["examples_sha256"],
          "labels_sha256": part.manifest_digest(labels_manifest) if labels_manifest else None}
    if not use_kd:
        log.info("%s %s: %s", name, day, _kd_mode(cfg, s, role, action))
    if not force and (ckpt := existing_checkpoint(cfg, name, day, parent, fp)):
        if use_kd:
            log.info("%s %s: %s (labels %s)", name, day, _kd_mode(cfg, s, role, action), sfs.relative(cfg.root, labels_uri))
        _log_reused(name, day, ckpt)
        return _summary(ckpt)
    data = open_day(cfg.root, cfg.spec, day, s.model.shuffle_window_rows)
    soft, extra = None, {"gate_action": action, "kd_applied": use_kd, "distill_mode": s.distill.mode}
    distill = s.distill if use_kd else NO_KD
    if use_kd:
        assert labels_uri
        if isinstance(data, DayStream):  # labels in example order, read alongside, no id column held
            joined = load_aligned(labels_uri, data.uri, cfg.spec, data.manifest)
        else:
            joined = load_joined(labels_uri, data.example_ids, cfg.spec, day, cfg.policies.missing_labels)
        extra.update(teacher_version=joined.metadata.get("teacher_version"),
                     label_staleness_days=joined.metadata.get("staleness_days"),
                     label_teacher_stale=joined.metadata.get("teacher_stale"),
                     labels_path=sfs.relative(cfg.root, labels_uri), labels_missing=joined.missing)
        if joined.missing:  # the policy allowed it (else load_joined raised): no KD today, every row
            reason = (f"{joined.missing} of {len(data)} examples have no teacher label "
                      f"(policies.missing_labels is 'hard_labels_only')")
            extra.update(kd_applied=False, kd_skipped_reason=reason)
            distill = NO_KD
            log.warning("%s %s: hard labels only: %s in %s; trains on all %d rows of the day without distillation",
                        name, day, reason, sfs.relative(cfg.root, labels_uri), len(data))
        else:
            soft = fit_adapters(joined.soft, data.hard, list(cfg.spec.tasks), s.distill.adapter, seed=s.model.seed)
            staleness, stale = joined.metadata.get("staleness_days"), joined.metadata.get("teacher_stale")
            log.info("%s %s: %s from teacher %s labels (staleness %s day%s%s); labels joined %d rows, missing 0",
                     name, day, _kd_mode(cfg, s, role, action), joined.metadata.get("teacher_version"), staleness,
                     "" if staleness == 1 else "s", ", STALE FALLBACK teacher" if stale else "", len(data))
    return train_and_publish(cfg, name, role, s.model, aux_tasks(cfg, s.distill), day, data, parent, distill,
                              soft, extra, fp, base)


def _kd_mode(cfg: PipelineConfig, s: StudentConfig, role: str, action: GateAction) -> str:
    """What the student does with the teacher today, in words (the log's KD-mode line)."""
    if role == "control":
        return "control: no teacher (control)"
    if not s.distill.uses_teacher:
        return "hard labels only: distill mode 'none' (no teacher)"
    if action == "hard_labels_only":
        return f"hard labels only: gate said hard_labels_only (distill mode '{s.distill.mode}' not applied)"
    tasks = s.distill.distilled_tasks(cfg.spec.served_tasks, [t.name for t in cfg.spec.tasks])
    how = "auxiliary heads" if s.distill.mode == "auxiliary" else f"{s.distill.mode} on the serving heads"
    return f"distilling ({how}, tasks [{', '.join(tasks)}])"


def window_digest(root: str, spec: DatasetSpec, window: list[dt.date]) -> str:
    """The content key of a bootstrap window: every day validated, their examples digests
    chained. A bootstrap checkpoint records it in its fingerprint, so re-published history
    retrains the bootstrap instead of reusing a model of data that no longer exists."""
    return hashlib.sha256("".join(ensure_valid(root, spec, d)["examples_sha256"] for d in window).encode()).hexdigest()


def bootstrap(cfg: PipelineConfig, through: dt.date, days: int | None = None,
              names: list[str] | None = None) -> dict[str, Any]:
    """Train the teacher, then every student (and control) on a window of history in one
    go, publishing cold-start checkpoints through ``through``; the daily loop then
    warm-starts from them.

    Students bootstrap with their own distillation config, from the bootstrapped teacher's
    predictions on the window (kept in memory, not published), so auxiliary heads and
    adapters are trained before the first daily step instead of starting from random
    weights against a fully trained serving head. These labels are in-sample (no older
    teacher exists); the daily loop's labels are out of sample by default. ``names``
    restricts the students bootstrapped (None: all, controls included; []: teacher only)."""
    from kdcore.data.examples import list_days

    set_determinism(cfg.torch_threads)
    # what every model's folder for ``through`` holds now: its publish must find it unchanged
    bases = {m: base_generation(cfg, m, through) for m in [cfg.teacher.name, *(s.name for s in cfg.all_students())]}
    n = cfg.bootstrap.days if days is None else days
    if n < 1:
        raise SpecError(f"bootstrap window: days must be at least 1, got {n}")
    avail = [d for d in list_days(cfg.root, cfg.spec.name) if d <= through]
    window = avail[-n:]
    if not window:
        raise StorageError(f"no example partitions on or before {through} to bootstrap from")
    inputs = window_digest(cfg.root, cfg.spec, window)
    data = load_days(cfg.root, cfg.spec, window)
    span = [window[0].isoformat(), window[-1].isoformat()]
    extra = {"bootstrap": {"from": span[0], "to": span[1], "days": len(window)}}
    t = cfg.teacher
    fp_t = {"model": t.model.model_dump(mode="json"), "bootstrap": span, "examples": inputs}
    out: dict[str, Any] = {}
    teacher = existing_checkpoint(cfg, t.name, through, None, fp_t)
    if teacher is not None:
        out[t.name] = _summary(teacher)
    else:
        out[t.name] = train_and_publish(cfg, t.name, "teacher", t.model, [], through, data, None, NO_KD, None,
                                         extra, fp_t, bases[t.name], epochs=cfg.bootstrap.epochs, progressive=False)
        teacher = registry.find_checkpoint(cfg.root, cfg.spec.name, t.name, through)
    soft: dict[str, np.ndarray] | None = None
    for s in cfg.all_students():
        if names is not None and s.name not in names:
            continue
        role = "control" if s.name in cfg.controls() else "student"
        fp = {"model": s.model.model_dump(mode="json"), "distill": s.distill.model_dump(mode="json"),
              "bootstrap": span, "examples": inputs,
              "teacher": teacher.version if s.distill.uses_teacher else None}
        if (ckpt := existing_checkpoint(cfg, s.name, through, None, fp)):
            out[s.name] = _summary(ckpt)
            continue
        targets = None
        if s.distill.uses_teacher:
            if soft is None:
                tm = teacher.load(cfg.spec)
                soft = predict(tm, model_features(tm, data))
            targets = fit_adapters(soft, data.hard, list(cfg.spec.tasks), s.distill.adapter, seed=s.model.seed)
        info = dict(extra, kd_applied=s.distill.uses_teacher, distill_mode=s.distill.mode,
                    teacher_version=teacher.version if s.distill.uses_teacher else None)
        out[s.name] = train_and_publish(cfg, s.name, role, s.model, aux_tasks(cfg, s.distill), through, data,
                                         None, s.distill if s.distill.uses_teacher else NO_KD, targets, info, fp,
                                         bases[s.name], epochs=cfg.bootstrap.epochs, progressive=False)
    return out
