"""results.md and its plots from the collected per-day metrics.

Every comparison of two students is paired by seed and by day: from the [seeds, days]
arrays of the two models' progressive metric, ``kdcore.evaluation.stats.paired_bootstrap``
gives the mean difference over the (seed, day) cells and a 95% percentile interval from
2000 replicates that each resample seed indices with replacement *and* days in circular
moving blocks of 7 consecutive days, with the same indices for both models. So the
interval sees seed-to-seed variation (which averaging over seeds first would hide) and
the correlation of neighbouring days (which resampling single days would hide). The
fraction of the teacher–control gap a student recovers (``gap_recovered``) uses the same
replicates. Every difference also lists its per-seed values and how many seeds favour
the student ("k/n better").

The prose is generated from the numbers with one rule: an interval that excludes 0 is a
significant improvement or harm (AUC: higher is better; NE: lower is better), otherwise
no significant difference."""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kdcore.evaluation.stats import fmt_ci, gap_recovered, paired_bootstrap, per_seed_signs

DISCUSSION = "<!-- hand-written discussion below: kept when results.md is regenerated -->"
WALL = "__WALL_TIME__"
HIGHER_BETTER = {"auc": True, "gauc": True, "ne": False}
BLOCK = 7  # days per bootstrap block: about a week of correlated, warm-started days
N_BOOT = 2000


# --- numbers ----------------------------------------------------------------------------

def per_seed(res: dict[str, Any], name: str, metric: str, days: list[str]) -> np.ndarray:
    """[seeds, days] of a model's progressive metric (NaN where undefined)."""
    seeds = res["students"][name]
    return np.array([[_num(seeds[s][d].get(metric)) for d in days] for s in sorted(seeds, key=int)], float)


def _num(x: float | None) -> float:
    return np.nan if x is None else float(x)


def pooled(res: dict[str, Any], name: str, metric: str, days: list[str]) -> np.ndarray:
    """Per-day seed mean: for plots and mean-level tables only, never for intervals."""
    x = per_seed(res, name, metric, days)
    with warnings.catch_warnings():  # a day undefined for every seed stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, 0)


def teacher_series(res: dict[str, Any], metric: str, days: list[str]) -> np.ndarray:
    """[days] of the main teacher's progressive metric (one teacher shared by all seeds)."""
    t = res["teachers"][str(res["_st"]["main_size"])]["metrics"]
    return np.array([_num(t[d].get(metric)) for d in days], float)


def compare(res: dict[str, Any], a: str, b: str, metric: str, days: list[str]) -> dict[str, Any]:
    """a - b, paired by seed and day (seed x moving-block bootstrap)."""
    return paired_bootstrap(per_seed(res, a, metric, days), per_seed(res, b, metric, days),
                            block=BLOCK, n_boot=N_BOOT)


def compare_delta(res: dict[str, Any], a1: str, a0: str, b1: str, b0: str, metric: str,
                  days: list[str]) -> dict[str, Any]:
    """(a1 - a0) - (b1 - b0) per seed and day: does a change hurt mode a less than mode b?"""
    d_a = per_seed(res, a1, metric, days) - per_seed(res, a0, metric, days)
    d_b = per_seed(res, b1, metric, days) - per_seed(res, b0, metric, days)
    return paired_bootstrap(d_a, d_b, block=BLOCK, n_boot=N_BOOT)


def gap(res: dict[str, Any], a: str, metric: str, days: list[str]) -> dict[str, Any]:
    """Fraction of the main teacher's gap over the control that student ``a`` recovers."""
    return gap_recovered(per_seed(res, a, metric, days), per_seed(res, "control", metric, days),
                         teacher_series(res, metric, days), block=BLOCK, n_boot=N_BOOT)


def verdict(r: dict[str, Any], metric: str) -> str:
    if not r["days"] or not np.isfinite(r["lo"]):
        return "n/a"
    good = r["lo"] > 0 if HIGHER_BETTER[metric] else r["hi"] < 0
    bad = r["hi"] < 0 if HIGHER_BETTER[metric] else r["lo"] > 0
    return "significant improvement" if good else ("significant harm" if bad else "no significant difference")


def mean_of(series: dict[str, dict[str, float | None]], metric: str, days: list[str]) -> float:
    v = [series[d][metric] for d in days if series[d][metric] is not None]
    return float(np.mean(v)) if v else float("nan")


def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _ci(r: dict[str, Any], digits: int = 4) -> str:
    return fmt_ci(r, digits)


def _seeds(r: dict[str, Any], metric: str) -> str:
    """Per-seed differences and how many favour the first model, e.g. "+0.0012, -0.0003 (1/2 better)"."""
    vals = ", ".join("n/a" if not np.isfinite(x) else f"{x:+.4f}" for x in r["per_seed"])
    return f"{vals} ({per_seed_signs(r['per_seed'], HIGHER_BETTER[metric])})"


def _cell(r: dict[str, Any], metric: str) -> str:
    """Interval, then the per-seed values and signs on a second line of the table cell."""
    return f"{_ci(r)}<br>seeds: {_seeds(r, metric)}"


def _gap_ci(r: dict[str, Any] | None) -> str:
    if r is None:
        return "—"
    if not r["days"] or not np.isfinite(r["mean"]):
        return "n/a"
    pct = lambda x: "n/a" if not np.isfinite(x) else f"{100 * x:.0f}%"  # noqa: E731
    drop = f", {r['dropped']} of {N_BOOT} replicates dropped (teacher ≈ control)" if r["dropped"] else ""
    return f"{pct(r['mean'])} [{pct(r['lo'])}, {pct(r['hi'])}]{drop}"


def student_for(st: dict[str, Any], mode: str, lag: int | None = None, size: int | None = None) -> str:
    """Name of the student of ``mode`` with labels ``lag`` days old (default: the main
    study's lag, whose students carry the bare mode name) or with the x``size`` teacher."""
    if size is not None and size != st["main_size"]:
        return f"{mode}_x{size}"
    return mode if lag is None or lag == st.get("main_lag", 0) else f"{mode}_lag{lag}"


# --- sections ---------------------------------------------------------------------------

MODE_ROWS = [("aux", "control"), ("direct", "control"), ("aux_adapter", "control"), ("direct_adapter", "control"),
             ("aux", "direct"), ("aux_adapter", "aux"), ("direct_adapter", "direct")]


def _span(res: dict[str, Any], days: list[str]) -> str:
    return f"{len(res['students']['control'])} seeds × {len(days)} days ({days[0]} .. {days[-1]})"


def modes_section(res: dict[str, Any], days: list[str], label: str,
                  plot: str | None) -> tuple[list[str], list[dict]]:
    st = res["_st"]
    have = res["students"]
    lines = [f"Paired by seed and day over {_span(res, days)}, {label}; intervals: 95%, seed × {BLOCK}-day-block "
             f"bootstrap (n = seeds × days). Gap recovered = (student − control) / (teacher − control), the "
             f"fraction of the main teacher's (x{st['main_size']}) gap over the control that the student closes "
             f"(100% = as good as the teacher), with the same bootstrap.", "",
             "| student | vs | ΔAUC [95% CI] | AUC | ΔNE [95% CI] | NE | gap recovered (AUC) | gap recovered (NE) | "
             "ΔAUC per seed | ΔNE per seed |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for a, b in MODE_ROWS:
        if a not in have or b not in have:
            continue  # a mode this dataset does not run
        ra, rn = compare(res, a, b, "auc", days), compare(res, a, b, "ne", days)
        ga, gn = (gap(res, a, "auc", days), gap(res, a, "ne", days)) if b == "control" else (None, None)
        rows.append({"a": a, "b": b, "auc": ra, "ne": rn, "gap_auc": ga, "gap_ne": gn})
        lines.append(f"| {a} | {b} | {_ci(ra)} | {verdict(ra, 'auc')} | {_ci(rn)} | {verdict(rn, 'ne')} | "
                     f"{_gap_ci(ga)} | {_gap_ci(gn)} | {_seeds(ra, 'auc')} | {_seeds(rn, 'ne')} |")
    lines += ["", "Mean progressive metrics (seed-averaged):", "", "| model | AUC | NE |", "|---|---|---|"]
    t = res["teachers"][str(st["main_size"])]
    lines.append(f"| teacher (x{st['main_size']}) | {_f(mean_of(t['metrics'], 'auc', days))} | "
                 f"{_f(mean_of(t['metrics'], 'ne', days))} |")
    for name in ["control", *dict.fromkeys(a for a, _ in MODE_ROWS)]:
        if name in have:
            lines.append(f"| {name} | {_f(np.nanmean(pooled(res, name, 'auc', days)))} | "
                         f"{_f(np.nanmean(pooled(res, name, 'ne', days)))} |")
    lines += ["", "What the numbers show:", ""]
    for r in rows:
        txt = (f"- **{r['a']} vs {r['b']}**: AUC {r['auc']['mean']:+.4f} ({verdict(r['auc'], 'auc')}; "
               f"seeds: {per_seed_signs(r['auc']['per_seed'], True)}), "
               f"NE {r['ne']['mean']:+.4f} ({verdict(r['ne'], 'ne')}; "
               f"seeds: {per_seed_signs(r['ne']['per_seed'], False)})")
        if r["gap_auc"] is not None:
            txt += (f"; recovers {_gap_ci(r['gap_auc'])} of the teacher's AUC gap and {_gap_ci(r['gap_ne'])} "
                    f"of its NE gap")
        lines.append(txt + ".")
    if plot:
        lines += ["", f"![modes]({plot})"]
    return lines, rows


def freshness_section(res: dict[str, Any], days: list[str], label: str,
                      plot: str | None) -> tuple[list[str], list[dict]]:
    st = res["_st"]
    fresh = min(st["lags"])
    lines = [f"Labels for day D come from the teacher trained through D − k (`policies.label_lag_days = k`); "
             f"k = 0: the teacher has already trained on D (in-sample labels, so its label metric is in-sample); "
             f"the main study uses k = {st.get('main_lag', 0)}. {label}; paired by seed and day over "
             f"{_span(res, days)}; each cell: 95% interval, then the per-seed differences and how many seeds "
             f"favour the student.", "",
             "| k | label staleness (days) | teacher-label AUC | teacher-label NE | aux ΔAUC vs control | aux ΔNE | "
             "direct ΔAUC vs control | direct ΔNE |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for k in st["lags"]:
        lab = res["labels"][str(k)]
        stale = np.mean([lab[d]["staleness"] for d in days])
        aux, direct = student_for(st, "aux", k), student_for(st, "direct", k)
        aux0, direct0 = student_for(st, "aux", fresh), student_for(st, "direct", fresh)
        r = {"k": k, "staleness": float(stale), "label_auc": mean_of(lab, "auc", days), "label_ne": mean_of(lab, "ne", days),
             "aux_auc": compare(res, aux, "control", "auc", days), "aux_ne": compare(res, aux, "control", "ne", days),
             "direct_auc": compare(res, direct, "control", "auc", days),
             "direct_ne": compare(res, direct, "control", "ne", days)}
        if k != fresh:
            r["cost_aux_auc"] = compare(res, aux, aux0, "auc", days)
            r["cost_direct_auc"] = compare(res, direct, direct0, "auc", days)
            r["cost_aux_ne"] = compare(res, aux, aux0, "ne", days)
            r["cost_direct_ne"] = compare(res, direct, direct0, "ne", days)
            r["aux_minus_direct_auc"] = compare_delta(res, aux, aux0, direct, direct0, "auc", days)
            r["aux_minus_direct_ne"] = compare_delta(res, aux, aux0, direct, direct0, "ne", days)
        rows.append(r)
        lines.append(f"| {k} | {stale:.1f} | {_f(r['label_auc'])} | {_f(r['label_ne'])} | {_cell(r['aux_auc'], 'auc')} | "
                     f"{_cell(r['aux_ne'], 'ne')} | {_cell(r['direct_auc'], 'auc')} | {_cell(r['direct_ne'], 'ne')} |")
    lines += ["", f"Cost of staleness (student with a k-day-old teacher minus the same mode with k = {fresh}), "
              f"and whether it hurts direct more than auxiliary ((aux_k − aux_{fresh}) − (direct_k − direct_{fresh}); "
              "positive AUC / negative NE = auxiliary is hurt less); “better” counts seeds where the stale "
              "student (or, in the aux − direct columns, auxiliary) comes out ahead:", "",
              "| k | aux ΔAUC | direct ΔAUC | aux − direct (AUC) | aux ΔNE | direct ΔNE | aux − direct (NE) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["k"] == fresh:
            continue
        lines.append(f"| {r['k']} | {_cell(r['cost_aux_auc'], 'auc')} | {_cell(r['cost_direct_auc'], 'auc')} | "
                     f"{_cell(r['aux_minus_direct_auc'], 'auc')} | {_cell(r['cost_aux_ne'], 'ne')} | "
                     f"{_cell(r['cost_direct_ne'], 'ne')} | {_cell(r['aux_minus_direct_ne'], 'ne')} |")
    lines += ["", "What the numbers show:", ""]
    for r in rows:
        txt = (f"- **k = {r['k']}**: teacher labels AUC {_f(r['label_auc'])}, NE {_f(r['label_ne'])}; "
               f"aux vs control AUC {r['aux_auc']['mean']:+.4f} ({verdict(r['aux_auc'], 'auc')}), "
               f"NE {r['aux_ne']['mean']:+.4f} ({verdict(r['aux_ne'], 'ne')}); "
               f"direct vs control AUC {r['direct_auc']['mean']:+.4f} ({verdict(r['direct_auc'], 'auc')}), "
               f"NE {r['direct_ne']['mean']:+.4f} ({verdict(r['direct_ne'], 'ne')})")
        if r["k"] != fresh:
            d = r["aux_minus_direct_auc"]
            claim = ("auxiliary is hurt significantly less than direct" if verdict(d, "auc") == "significant improvement"
                     else "direct is hurt significantly less than auxiliary" if verdict(d, "auc") == "significant harm"
                     else "no significant difference between how much staleness hurts auxiliary and direct")
            txt += f"; on AUC, {claim}"
        lines.append(txt + ".")
    if plot:
        lines += ["", f"![freshness]({plot})"]
    return lines, rows


def size_section(res: dict[str, Any], days: list[str], plot: str | None) -> tuple[list[str], list[dict]]:
    st = res["_st"]
    sp, sf = res["student_params"], res["student_flops"]
    lines = [f"Teachers with embedding and hidden widths m times the student's (m = {', '.join(map(str, st['sizes']))}); "
             f"student: {sp:,} parameters, {sf:,} FLOPs/example (dense layers, aux heads included). Each teacher "
             f"labels its own auxiliary student. Costs are seconds on this shared 2-core machine (noisy). Student "
             f"gains: paired by seed and day over {_span(res, days)}; 95% interval, then per-seed differences.", "",
             "| teacher | params (× student) | FLOPs/example (× student) | train s/day | bootstrap s | inference s/day | "
             "teacher AUC | teacher NE | aux student ΔAUC vs control | ΔNE |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for m in st["sizes"]:
        if str(m) not in res["teachers"]:
            continue
        t = res["teachers"][str(m)]
        s = student_for(st, "aux", size=m)
        r = {"m": m, "params": t["params"], "flops": t["flops_per_example"], "auc": compare(res, s, "control", "auc", days),
             "ne": compare(res, s, "control", "ne", days), "t_auc": mean_of(t["metrics"], "auc", days),
             "t_ne": mean_of(t["metrics"], "ne", days), "train": t["train_seconds_per_day"],
             "inference": t["inference_seconds_per_day"]}
        rows.append(r)
        lines.append(f"| x{m} ({t['name']}) | {t['params']:,} ({t['params'] / sp:.1f}×) | {t['flops_per_example']:,} "
                     f"({t['flops_per_example'] / sf:.1f}×) | {t['train_seconds_per_day']:.3f} | "
                     f"{t['bootstrap_seconds']:.1f} | {_f(t['inference_seconds_per_day'], 3)} | {_f(r['t_auc'])} | "
                     f"{_f(r['t_ne'])} | {_cell(r['auc'], 'auc')} | {_cell(r['ne'], 'ne')} |")
    lines += ["", "What the numbers show:", ""]
    for r in rows:
        lines.append(f"- **x{r['m']}** ({r['params'] / sp:.1f}× params, {r['flops'] / sf:.1f}× FLOPs): teacher AUC "
                     f"{_f(r['t_auc'])}; student gain AUC {r['auc']['mean']:+.4f} ({verdict(r['auc'], 'auc')}; "
                     f"seeds: {per_seed_signs(r['auc']['per_seed'], True)}), "
                     f"NE {r['ne']['mean']:+.4f} ({verdict(r['ne'], 'ne')}; "
                     f"seeds: {per_seed_signs(r['ne']['per_seed'], False)}).")
    best = max(rows, key=lambda r: r["auc"]["mean"] if np.isfinite(r["auc"]["mean"]) else -1)
    lines.append(f"- The largest mean student AUC gain comes from the x{best['m']} teacher.")
    if plot:
        lines += ["", f"![size]({plot})"]
    return lines, rows


def _main_teacher(res: dict[str, Any], models: dict[str, Any]) -> str | None:
    name = res.get("teachers", {}).get(str(res["_st"]["main_size"]), {}).get("name")
    if name in models:
        return name
    return next((n for n, m in models.items() if m.get("role") == "teacher"), None)


def models_table(res: dict[str, Any]) -> list[str]:
    """Every model's serving cost next to the main teacher's: the point of distillation is a
    student far cheaper than its teacher, so the ratio belongs next to every gain."""
    models = res.get("models")
    if not models:
        return []
    ref = _main_teacher(res, models)
    tp = models[ref]["params"] if ref else None
    tf = models[ref]["flops_per_example"] if ref else None
    ratio = lambda x, y: f"{x / y:.3g}×" if y else "n/a"  # noqa: E731
    lines = [f"Models (× teacher: relative to the main teacher `{ref}`):" if ref else "Models:", "",
             "| model | role | params | params × teacher | FLOPs/example | FLOPs × teacher | features |",
             "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        feats = m.get("features")
        lines.append(f"| {name} | {m.get('role', '?')} | {m['params']:,} | {ratio(m['params'], tp)} | "
                     f"{m['flops_per_example']:,} | {ratio(m['flops_per_example'], tf)} | "
                     f"{', '.join(feats) if feats else '—'} |")
    return lines


def loss_share_table(res: dict[str, Any]) -> list[str]:
    """Which task's loss dominates each model's training: a task with a tiny share gets
    little gradient, whatever its declared weight."""
    share = res.get("loss_share")
    if not share:
        return []
    tasks = list(dict.fromkeys(t for per in share.values() for t in per))
    lines = ["Task loss share (each task's weighted loss as a share of the total training loss, averaged over "
             "the evaluated days):", "", f"| model | {' | '.join(tasks)} |", "|---|" + "---|" * len(tasks)]
    for name, per in share.items():
        cells = " | ".join("—" if per.get(t) is None else f"{100 * per[t]:.1f}%" for t in tasks)
        lines.append(f"| {name} | {cells} |")
    return lines


def tuning_table(res: dict[str, Any]) -> list[str]:
    """The control's tuning budget next to the students': a gain over an under-tuned
    control would be no gain at all."""
    tuning = res.get("tuning")
    if not tuning:
        return []
    grids = {n: {(g["lr"], g["batch_size"]) for g in v.get("grid", [])} for n, v in tuning.items()}
    ctrl = grids.get("control")
    where = ""
    if res.get("tuning_days"):
        td = res["tuning_days"]
        where = f" Tuned over {len(td)} day(s) before the evaluated window ({td[0]} .. {td[-1]})."
    lines = [f"Tuning budget: each model picks (learning rate, batch size) from its grid by progressive NE.{where}", "",
             "| model | chosen lr | chosen batch | grid points | NE at chosen | AUC at chosen | same grid as control |",
             "|---|---|---|---|---|---|---|"]
    for name, v in tuning.items():
        ch = v["chosen"]
        at = next((g for g in v.get("grid", []) if g["lr"] == ch["lr"] and g["batch_size"] == ch["batch_size"]), {})
        same = "—" if ctrl is None or name == "control" else ("yes" if grids[name] == ctrl else "**no**")
        lines.append(f"| {name} | {ch['lr']:g} | {ch['batch_size']} | {len(grids[name])} | {_f(at.get('ne'))} | "
                     f"{_f(at.get('auc'))} | {same} |")
    if ctrl is not None:
        others = [n for n in grids if n != "control"]
        ok = all(grids[n] == ctrl for n in others)
        lrs = sorted({lr for lr, _ in ctrl})
        bs = sorted({b for _, b in ctrl})
        lines += ["", f"- The control's grid: lr ∈ {{{', '.join(f'{x:g}' for x in lrs)}}} × batch ∈ "
                  f"{{{', '.join(map(str, bs))}}} ({len(ctrl)} points); "
                  + ("every tuned student got the same grid." if ok else
                     "**not** every tuned student got the same grid: "
                     + ", ".join(n for n in others if grids[n] != ctrl) + ".")]
    return lines


def dataset_tables(res: dict[str, Any], label: str, prefix: str) -> list[str]:
    """Models, tuning budget and task loss share of one dataset (each only if collected)."""
    out: list[str] = []
    for title, lines in (("models", models_table(res)), ("tuning budget", tuning_table(res)),
                         ("task loss share", loss_share_table(res))):
        if lines:
            out += [f"{prefix} {label}: {title}", "", *lines, ""]
    return out


def shared_section(sh: dict[str, Any]) -> list[str]:
    n = len(sh["students"])
    lines = [f"{n} students ({', '.join(sh['students'])}) train on the {sh['days']} evaluated MovieLens days from "
             f"**one** materialized label set (seed-0 root), and again each in its own root with **its own** "
             f"teacher inference (same teacher checkpoints, warm-started from the same parent checkpoint).", "",
             "| student | days with identical checkpoint (version and weight bytes) | own teacher inference s (total) |",
             "|---|---|---|"]
    for name, v in sh["per_student"].items():
        lines.append(f"| {name} | {v['identical_days']} / {sh['days']} | {_f(v['inference_seconds'], 3)} |")
    lines += ["", f"- Identical results: **{'yes' if sh['identical'] else 'NO'}** "
              f"({'every' if sh['identical'] else 'not every'} student checkpoint has the same version and weight bytes).",
              f"- Teacher inference: shared {_f(sh['shared_inference_seconds'], 3)} s in total vs independent "
              f"{_f(sh['independent_inference_seconds'], 3)} s; saved ≈ inference × (N − 1) = "
              f"{_f(sh['saved_seconds'], 3)} s over {sh['days']} days (MovieLens days are ~470 rows, so inference is "
              f"cheap here; the saving scales linearly with rows and with N)."]
    return lines


# --- plots ------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90, metadata={"Software": None})
    _plt().close(fig)


def _err(rs):
    m = np.array([r["mean"] for r in rs])
    return m, np.array([m - np.array([r["lo"] for r in rs]), np.array([r["hi"] for r in rs]) - m])


def plot_modes(rows, title, path: Path) -> None:
    plt = _plt()
    rows = [r for r in rows if r["b"] == "control"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, metric in zip(axes, ("auc", "ne")):
        m, e = _err([r[metric] for r in rows])
        ax.bar(range(len(rows)), m, yerr=np.nan_to_num(e), capsize=4, color="#4c72b0")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(rows)), [r["a"] for r in rows], rotation=15)
        ax.set_title(f"{title}: Δ{metric.upper()} vs control (95% CI)")
    _save(fig, path)


def plot_freshness(rows, title, path: Path) -> None:
    plt = _plt()
    ks = [r["k"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(ks, [r["label_auc"] for r in rows], marker="o", label="AUC")
    axes[0].set_title(f"{title}: teacher-label AUC vs lag k")
    axes[0].set_xlabel("k (days)")
    for ax, metric in zip(axes[1:], ("auc", "ne")):
        for mode, off in (("aux", -0.15), ("direct", 0.15)):
            m, e = _err([r[f"{mode}_{metric}"] for r in rows])
            ax.errorbar(np.array(ks) + off, m, yerr=np.nan_to_num(e), marker="o", capsize=3, label=mode)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("k (days)")
        ax.set_title(f"student Δ{metric.upper()} vs control")
        ax.legend()
    _save(fig, path)


def plot_size(rows, sp, title, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    x = np.array([r["params"] / sp for r in rows])
    for ax, metric in zip(axes, ("auc", "ne")):
        m, e = _err([r[metric] for r in rows])
        ax.errorbar(x, m, yerr=np.nan_to_num(e), marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("teacher params / student params")
        ax.set_title(f"{title}: aux student Δ{metric.upper()} vs control")
    _save(fig, path)


def plot_daily(res, days, title, path: Path, shift: str | None) -> None:
    plt = _plt()
    st = res["_st"]
    k = max(st["lags"])
    x = np.array(days, dtype="datetime64[D]")
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for name in ("control", "aux", "direct", "aux_adapter", f"aux_lag{k}", f"direct_lag{k}"):
        if name in res["students"]:
            axes[0].plot(x, pooled(res, name, "auc", days), label=name, lw=1.1)
    for lag in sorted({0, k}):
        lab = res["labels"][str(lag)]
        axes[0].plot(x, [lab[d]["auc"] if lab[d]["auc"] is not None else np.nan for d in days], "--",
                     label=f"teacher labels k={lag}", lw=1.0)
    axes[0].set_ylabel("progressive AUC")
    axes[0].legend(fontsize=7, ncol=4)
    axes[0].set_title(f"{title}: per-day AUC (seed mean)")
    for name in ("aux", "direct", f"aux_lag{k}", f"direct_lag{k}"):
        if name in res["students"]:
            d = pooled(res, name, "auc", days) - pooled(res, "control", "auc", days)
            w = min(7, len(d))
            roll = np.convolve(np.nan_to_num(d), np.ones(w) / w, mode="same")
            axes[1].plot(x, roll, label=f"{name} − control (7-day mean)")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_ylabel("ΔAUC")
    axes[1].legend(fontsize=7, ncol=2)
    for ax in axes:
        if shift:
            ax.axvline(np.datetime64(shift), color="r", lw=1, ls=":")
        ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    _save(fig, path)


# --- document ---------------------------------------------------------------------------

def _settings_lines(results) -> list[str]:
    s = results["settings"]
    mode = "smoke" if s["smoke"] else "full"
    wall = results["wall_seconds"]
    lines = [f"- Command: `{s['command'] or 'kd experiments'}` ({mode} mode)",
             f"- Wall time: {WALL} for the whole run, report included ({wall:.0f} s before the report)"
             f" (generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
             f"- Seeds: MovieLens {s['seeds']}, synthetic {s.get('synth_seeds', s['seeds'])} (student "
             f"`RankerConfig.seed`; teachers use seed 0, shared by all seeds); evaluated days: MovieLens {s['days']}, "
             f"synthetic {s.get('synth_days', s['days'])}, after {max(s['lags'])} warm-up days of daily training",
             f"- Student (serving-constrained, serving features only): embedding {s['student_embedding']}, hidden "
             f"{s['student_hidden']}, {s.get('student_buckets', s.get('hash_buckets'))} hash buckets, 1 epoch/day, "
             f"lr and batch tuned (below); teachers (every feature, privileged included): embedding "
             f"{s.get('teacher_embedding', s['student_embedding'])} x m, hidden {s.get('teacher_hidden', s['student_hidden'])} "
             f"x m, {s.get('teacher_buckets', '')} buckets, main m = {s['main_size']}, {s['teacher_epochs']} epoch(s)/day, "
             f"lr {s.get('teacher_lr', '')}; bootstrap {s['boot_epochs']} epochs, students distilling from the "
             f"bootstrap teacher (aux heads trained before day one)",
             "- Training is continuous (optimizer state in every checkpoint); tasks are weighted and the regression "
             "task standardized per the dataset spec (docs/recipe.md); labels are out of sample (k = 1) unless a "
             "study says otherwise",
             "- Distillation: aux = auxiliary head on the served task (loss weight 1, soft-label scale 1); direct = "
             "soft weight 0.5, T = 1; adapter = affine ExFM adapter (50 Adam steps)",
             "- Every model is trained by the pipeline's own steps (`pipeline.refresh_teacher`, "
             "`labels.materialize`, `pipeline.find_labels`, `pipeline.train_students`, `training.steps.bootstrap`); "
             "metrics are the progressive metrics the steps store in checkpoint metadata (model through D−1 on D). "
             "The quality gate is not run (every day distils), so that staleness is measured rather than gated.",
             "- Statistics: every comparison is paired by seed and day. "
             f"`kdcore.evaluation.stats.paired_bootstrap` gives the mean difference over the (seed, day) cells and "
             f"a 95% percentile interval from {N_BOOT} replicates, each resampling seeds with replacement and days "
             f"in circular moving blocks of {BLOCK} consecutive days (same indices for both models), so the "
             "interval reflects seed-to-seed variation and day-to-day correlation; n = seeds × days. "
             "`gap_recovered` gives (student − control) / (teacher − control) with the same replicates. "
             "An interval excluding 0 is called significant. ΔAUC > 0 and ΔNE < 0 are improvements; "
             "\"k/n better\" counts the seeds in which the student is better.",
             "- `torch_threads: 1`: with 2 threads on this shared 2-core machine training was ~10× slower "
             "(thread contention)."]
    return lines


def write_report(results: dict[str, Any], out: str) -> dict[str, Any]:
    st = results["settings"]
    out_dir = Path(out)
    plots = out_dir / "results"
    plots.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    doc = ["# Knowledge distillation experiments (issues 6 and 10)", "",
           "Generated by `kd experiments` (kdcore/experiments). All numbers below are produced by the run; the "
           "sentences under each table are generated from them by the rule *interval excludes 0 → significant*.", "",
           "## Setup", "", *_settings_lines(results), ""]
    for res in results["datasets"].values():
        res["_st"] = st
    ml = results["datasets"].get("movielens")
    if ml:
        days = ml["eval"]
        where = (f"MovieLens-100K ({ml['info']['rows_per_day']} rows/day on the evaluated days; bootstrap "
                 f"{ml['boot_days']} days through {ml['boot_through']}, daily training from {ml['daily_from']})")
        doc += [f"Data: {where}. Binary task `{ml['task']}` (rating ≥ 4).", ""]
        doc += dataset_tables(ml, "MovieLens", "###")
        plot_modes_path = "results/modes_movielens.png"
        lines, rows = modes_section(ml, days, f"MovieLens, main teacher (x{st['main_size']}) with labels "
                                                     f"k = {st.get('main_lag', 0)} day(s) old", plot_modes_path)
        plot_modes(rows, "MovieLens", out_dir / plot_modes_path)
        summary["movielens_modes"] = rows
        doc += ["## 1. Modes: auxiliary vs direct vs control, and the student adapter", "", *lines, ""]
        lines, rows = freshness_section(ml, days, "MovieLens", "results/freshness_movielens.png")
        plot_freshness(rows, "MovieLens", out_dir / "results/freshness_movielens.png")
        summary["movielens_freshness"] = rows
        doc += ["## 2. Teacher freshness", "", *lines, ""]
        lines, rows = size_section(ml, days, "results/size_movielens.png")
        plot_size(rows, ml["student_params"], "MovieLens", out_dir / "results/size_movielens.png")
        summary["movielens_size"] = rows
        doc += ["## 3. Teacher size", "", *lines, ""]
        plot_daily(ml, days, "MovieLens", out_dir / "results/daily_movielens.png", None)
        if "shared" in ml:
            doc += ["## 4. Shared labels", "", *shared_section(ml["shared"]), ""]
            summary["shared"] = ml["shared"]
        doc += ["Per-day view:", "", "![daily](results/daily_movielens.png)", ""]
    sy = results["datasets"].get("synth")
    if sy:
        days = sy["eval"]
        shift = sy["shift"]
        pre = [d for d in days if d < shift]
        post = [d for d in days if d >= shift]
        first = post[:14]
        doc += ["## 5. Synthetic stream with a sudden shift", "",
                f"`kdcore.data.synth`, {sy['info']['rows_per_day']} rows/day, sudden shift on **{shift}** "
                f"(flips the effect of latent dims f0..f3 and lifts the click rate): {len(pre)} evaluated days before "
                f"it, {len(post)} on/after it. A teacher trained before the shift is biased after it by construction, "
                f"for k days when it is k days stale.", ""]
        doc += dataset_tables(sy, "synth", "###")
        for label, sel, key in (("all evaluated days", days, "all"), ("the 14 days from the shift on", first, "post"),
                                ("the days before the shift", pre, "pre")):
            if not sel:
                continue
            tag = f"synth_{key}"
            lines, rows = modes_section(sy, sel, f"synth, {label}",
                                        f"results/modes_{tag}.png" if key != "pre" else None)
            if key != "pre":
                plot_modes(rows, f"synth ({key})", out_dir / f"results/modes_{tag}.png")
            summary[f"{tag}_modes"] = rows
            doc += [f"### 5a. Modes — {label}", "", *lines, ""]
            lines, rows = freshness_section(sy, sel, f"synth, {label}",
                                            f"results/freshness_{tag}.png" if key != "pre" else None)
            if key != "pre":
                plot_freshness(rows, f"synth ({key})", out_dir / f"results/freshness_{tag}.png")
            summary[f"{tag}_freshness"] = rows
            doc += [f"### 5b. Teacher freshness — {label}", "", *lines, ""]
        if len(sy["teachers"]) > 1:
            lines, rows = size_section(sy, days, "results/size_synth.png")
            plot_size(rows, sy["student_params"], "synth", out_dir / "results/size_synth.png")
            summary["synth_size"] = rows
            doc += ["### 5c. Teacher size — all evaluated days", "", *lines, ""]
        plot_daily(sy, days, "synth", out_dir / "results/daily_synth.png", shift)
        doc += ["Per-day view (red line: the shift):", "", "![daily](results/daily_synth.png)", ""]
    for res in results["datasets"].values():
        res.pop("_st", None)
    previous = out_dir / "results.md"
    kept = previous.read_text().split(DISCUSSION, 1) if previous.exists() else []
    # the hand-written discussion after the marker survives regeneration
    doc += [DISCUSSION + (kept[1].rstrip() if len(kept) == 2 else "\n\n## Discussion\n\n(none yet)"), ""]
    text = "\n".join(doc) + "\n"
    (out_dir / "results.md").write_text(text)
    return {"path": str(out_dir / "results.md"), "plots": sorted(str(p) for p in plots.glob("*.png")),
            "summary": summary}
