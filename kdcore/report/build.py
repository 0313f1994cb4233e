"""The report: per-day metrics of teacher, students and control, the KD gain of each
student against its control (paired by day, bootstrap 95% interval), the gate's shift
figures and the teacher that labelled each day (with the days labelled by a stale,
fallback teacher), as CSV + Markdown + PNG plots published under
``<root>/reports/<dataset>/``."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from kdcore.config import PipelineConfig
from kdcore.evaluation.stats import fmt_ci, paired_diff
from kdcore.report.collect import gate_rows, metric_rows, model_rows, not_trained
from kdcore.storage import fs as sfs
from kdcore.storage import partition as part

GAIN_METRICS = {"binary": ["auc", "gauc", "ne", "calibration"], "regression": ["rmse"]}


def _csv(rows: list[dict[str, Any]]) -> bytes:
    if not rows:
        return b""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def _series(rows, model: str, task: str, metric: str) -> dict[str, float]:
    return {r["date"]: (r.get(metric) if r.get(metric) is not None else np.nan)
            for r in rows if r["model"] == model and r["task"] == task}


def kd_gains(cfg: PipelineConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for s in cfg.students:
        control = cfg.control_of(s.name)
        for t in cfg.spec.tasks:
            for metric in GAIN_METRICS[t.kind]:
                a, b = _series(rows, s.name, t.name, metric), _series(rows, control, t.name, metric)
                days = sorted(set(a) & set(b))
                r = paired_diff(np.array([a[d] for d in days], float), np.array([b[d] for d in days], float))
                out.append({"student": s.name, "mode": s.distill.mode + ("+adapter" if s.distill.adapter.enabled else ""),
                            "control": control, "task": t.name, "metric": metric, **r})
    return out


def _plot(cfg: PipelineConfig, rows, gates) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    models = sorted({r["model"] for r in rows})
    for t in cfg.spec.tasks:
        metrics = ["auc", "ne"] if t.kind == "binary" else ["rmse"]
        fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 3.2 * len(metrics)), squeeze=False)
        for ax, metric in zip(axes[:, 0], metrics):
            for m in models:
                ser = _series(rows, m, t.name, metric)
                if ser:
                    days = sorted(ser)
                    ax.plot(np.array(days, dtype="datetime64[D]"), [ser[d] for d in days], label=m,
                            lw=2.0 if m == cfg.teacher.name else 1.2)
            ax.set_ylabel(f"{t.name} {metric}")
            ax.grid(alpha=0.3)
        axes[0, 0].set_title(f"{cfg.spec.name}: progressive {t.name} metrics per day")
        if models:
            axes[0, 0].legend(fontsize=8, ncol=3)
        fig.autofmt_xdate()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
        plt.close(fig)
        out[f"metrics_{t.name}.png"] = buf.getvalue()
    keys = sorted({k for g in gates for k in g})
    shift_cols = [k for k in keys if k.split(":")[0] in ("psi", "js", "label_drift", "calibration", "staleness_days")]
    if gates and shift_cols:
        fig, axes = plt.subplots(len(shift_cols), 1, figsize=(10, 2.4 * len(shift_cols)), squeeze=False)
        days = np.array([g["date"] for g in gates], dtype="datetime64[D]")
        for ax, col in zip(axes[:, 0], shift_cols):
            ax.plot(days, [g.get(col, np.nan) if g.get(col) is not None else np.nan for g in gates], marker=".")
            ax.set_ylabel(col)
            ax.grid(alpha=0.3)
        axes[0, 0].set_title(f"{cfg.spec.name}: teacher/student window shift per day")
        fig.autofmt_xdate()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
        plt.close(fig)
        out["shift.png"] = buf.getvalue()
    return out


def _models_md(cfg: PipelineConfig, models: list[dict[str, Any]]) -> list[str]:
    if not models:
        return []
    teacher = next((m for m in models if m["role"] == "teacher"), None)
    tasks = [t.name for t in cfg.spec.tasks]
    lines = ["## Models", "", "Served size and cost per example (auxiliary heads are not served); features read "
             "(privileged = teacher-only); recipe; each task's share of the training loss on the last day.", "",
             "| model | role | params | FLOPs/example | vs teacher | features (privileged) | lr | batch | steps | "
             + " | ".join(f"loss share {t}" for t in tasks) + " |", "|---" * (9 + len(tasks)) + "|"]
    for m in models:
        ratio = (f"1/{teacher['flops_per_example'] / m['flops_per_example']:.0f}"
                 if teacher and m["flops_per_example"] and m is not teacher else "—")
        shares = " | ".join(f"{m[f'loss_share:{t}']:.0%}" if m.get(f"loss_share:{t}") is not None else ""
                            for t in tasks)
        lines.append(f"| {m['model']} | {m['role']} | {m['params']:,} | {m['flops_per_example']:,} | {ratio} | "
                     f"{m['features']} ({m['privileged']}) | {m['lr']} | {m['batch_size']} | {m['steps_total']} | "
                     f"{shares} |")
    return lines + [""]


def _days(v: Any) -> str:
    """Staleness is a whole number of days (a gate check stores it as a float)."""
    return "" if v is None else str(int(v))


def _fallback(stale: bool | None) -> str:
    return "" if stale is None else ("**yes (stale)**" if stale else "no")


def stale_days(rows: list[dict[str, Any]], gates: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per date labelled by a stale (fallback) teacher: the teacher and the staleness, as
    the gate recorded them, else as a distilling student's checkpoint did."""
    out: dict[str, dict[str, Any]] = {}
    for g in gates:
        if g.get("teacher_stale"):
            out[g["date"]] = {"teacher": g.get("teacher_version"), "staleness": g.get("staleness_days"),
                              "expected": g.get("expected_staleness_days"), "gate": g.get("status")}
    for r in rows:
        if r.get("teacher_stale") and r["date"] not in out:
            out[r["date"]] = {"teacher": r.get("label_teacher"), "staleness": r.get("staleness"),
                              "expected": None, "gate": None}
    return dict(sorted(out.items()))


def _stale_md(cfg: PipelineConfig, rows, gates) -> list[str]:
    stale = stale_days(rows, gates)
    lag = cfg.policies.label_lag_days
    lines = ["", "## Labels from a stale teacher", ""]
    if not stale:
        return lines + [f"None: every day was labelled by a teacher as fresh as the label policy asks for "
                        f"({lag} day(s) of lag)."]
    lines.append(f"{len(stale)} day(s) labelled by a fallback teacher, staler than the label policy's {lag} day(s) "
                 f"of lag (the teacher refresh failed or was skipped, or a version was pinned):")
    lines.append("")
    for day, s in stale.items():
        expected = s["expected"] if s["expected"] is not None else lag
        gate = f"; gate {s['gate']}" if s["gate"] else ""
        lines.append(f"- {day}: teacher {s['teacher'] or 'unknown'}, {_days(s['staleness']) or '?'} day(s) stale "
                     f"(expected {expected}){gate}")
    return lines


def _not_trained_md(partial: dict[str, list[str]] | None) -> list[str]:
    lines = ["", "## Models not trained", ""]
    if not partial:
        return lines + ["None: on every day some model was trained, every model was trained."]
    lines += [f"{len(partial)} day(s) on which some models were not trained (a partial run: a subset of students "
              "or stages, or a failed task). Their lineage skips the day: the next day warm-starts from the "
              "newest checkpoint before it.", ""]
    lines += [f"- {day}: not trained: {', '.join(models)}" for day, models in partial.items()]
    return lines


def _markdown(cfg: PipelineConfig, rows, gains, gates, models: list[dict[str, Any]] | None = None,
              partial: dict[str, list[str]] | None = None) -> str:
    lines = [f"# KD report: {cfg.spec.name}", "", *_models_md(cfg, models or [])]
    days = sorted({r["date"] for r in rows})
    if not days:
        tail = (_stale_md(cfg, rows, gates) if gates else []) + (_not_trained_md(partial) if partial else [])
        return "\n".join(lines + ["No progressive metrics yet: run at least one day after bootstrap.", *tail])
    lines += [f"Progressive validation over {len(days)} days ({days[0]} .. {days[-1]}).", "",
              "## KD gain against the control (student - control, mean over days, 95% bootstrap interval)", "",
              "Higher AUC/GAUC is better; lower NE and RMSE are better.", "",
              "| student | mode | task | metric | gain [95% CI] |", "|---|---|---|---|---|"]
    for g in gains:
        lines.append(f"| {g['student']} | {g['mode']} | {g['task']} | {g['metric']} | {fmt_ci(g)} |")
    lines += ["", "## Mean progressive metrics per model", "", "| model | role | task | days | auc | gauc | ne | calibration | rmse |",
              "|---|---|---|---|---|---|---|---|---|"]
    for model in sorted({r["model"] for r in rows}):
        for t in cfg.spec.tasks:
            sel = [r for r in rows if r["model"] == model and r["task"] == t.name]
            if not sel:
                continue

            def mean(k, sel=sel):
                v = [r[k] for r in sel if r.get(k) is not None]
                return f"{np.mean(v):.4f}" if v else ""
            lines.append(f"| {model} | {sel[0]['role']} | {t.name} | {len(sel)} | {mean('auc')} | {mean('gauc')} | "
                         f"{mean('ne')} | {mean('calibration')} | {mean('rmse')} |")
    if gates:
        lines += ["", "## Gate per day", "", "Teacher: the teacher that labelled the day; fallback: labels from a "
                  "teacher staler than the label policy asks for (its refresh failed or was skipped, or a version "
                  "was pinned). Staleness in whole days.", "",
                  "| date | status | action | teacher | fallback | max PSI | max JS | staleness (days) |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in gates:
            def f(k, g=g):
                v = g.get(k)
                return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
            lines.append(f"| {g['date']} | {g['status']} | {g['action']} | {g.get('teacher_version') or ''} | "
                         f"{_fallback(g.get('teacher_stale'))} | {f('psi')} | {f('js')} | "
                         f"{_days(g.get('staleness_days'))} |")
    lines += _stale_md(cfg, rows, gates)
    lines += _not_trained_md(partial)
    lines += ["", "## Per day", "", "| date | model | task | auc | gauc | ne | calibration | rmse |", "|---|---|---|---|---|---|---|---|"]
    per_day = []
    for r in rows:
        def f(k, r=r):
            v = r.get(k)
            return f"{v:.4f}" if isinstance(v, float) else ""
        per_day.append(((r["date"], r["model"]), f"| {r['date']} | {r['model']} | {r['task']} | {f('auc')} | "
                                                 f"{f('gauc')} | {f('ne')} | {f('calibration')} | {f('rmse')} |"))
    for day, missing in (partial or {}).items():  # a partial run's gap, in place
        per_day += [((day, model), f"| {day} | {model} | — | not trained | | | | |") for model in missing]
    lines += [line for _, line in sorted(per_day, key=lambda x: x[0])]
    return "\n".join(lines) + "\n"


def build_report(cfg: PipelineConfig, out: str | None = None) -> dict[str, Any]:
    rows, gates, models = metric_rows(cfg), gate_rows(cfg), model_rows(cfg)
    partial = not_trained(cfg)
    gains = kd_gains(cfg, rows)
    md = _markdown(cfg, rows, gains, gates, models, partial)
    blobs = {"report.md": md.encode(), "metrics.csv": _csv(rows), "kd_gain.csv": _csv(gains),
             "models.csv": _csv(models),
             "gate.csv": _csv(gates), **_plot(cfg, rows, gates)}
    uri = out or sfs.join(cfg.root, "reports", cfg.spec.name)
    part.publish_blobs(uri, blobs, {"kind": "report", "days": len({r['date'] for r in rows})})
    return {"uri": uri, "markdown": md, "gains": gains, "files": sorted(blobs),
            "stale_teacher_days": list(stale_days(rows, gates)), "not_trained_days": partial}
