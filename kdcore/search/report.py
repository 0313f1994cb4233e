"""The ranked report of a search: ``result.json`` (what promotion reads), a Markdown
table and a PNG (student NE gain vs teacher cost, with 95% intervals), written to
``<run>/report/``."""

from __future__ import annotations

import io
import math
from typing import Any

from kdcore.evaluation.stats import fmt_ci
from kdcore.search import schedule
from kdcore.search.schedule import SearchState
from kdcore.storage import fs as sfs


def _f(x: Any, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def rows(state: SearchState, candidates: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for pos, cid in enumerate(schedule.final_ranking(state), 1):
        c = state.candidates[cid]
        g = schedule.gains(state, c)
        cand = candidates[cid]
        m = cand["model"]
        out.append({"rank": pos, "id": cid, "status": c.status, "rung": c.rung, "days": c.days_done,
                    "kd_days": g["days"], "embedding_dim": m["embedding_dim"], "hidden": m["hidden"],
                    "epochs": m["epochs"], "bootstrap_days": cand["bootstrap_days"],
                    "ne_gain": g["ne_gain"], "auc_gain": g["auc_gain"], "student_ne": g["student_ne"],
                    "control_ne": g["control_ne"], "teacher_ne": g["teacher_ne"], "teacher_auc": g["teacher_auc"],
                    "seconds": round(c.seconds, 2), "params": c.params, "flops_per_example": c.flops_per_example})
    return out


def markdown(result: dict[str, Any]) -> str:
    st = result["summary"]
    lines = [f"# Teacher search `{result['run_id']}`", "",
             f"- budget: {st['budget_seconds']:.0f} s ({st['budget_kind']}); spent {st['spent_seconds']:.1f} s "
             f"(prepare {st['prepare_seconds']:.1f} s); wall {st['wall_seconds']:.1f} s",
             f"- candidates: {st['candidates']}; rungs run: {len(result['rungs'])}; eta {st['eta']}; "
             f"stop: {st['stop_reason']}",
             f"- score: proxy student's progressive NE gain over the control on task `{st['task']}` "
             f"(control NE - student NE, higher is better; tie-break AUC gain); 95% paired bootstrap over days",
             f"- winner: `{result['winner']}`" if result.get("winner") else "- winner: none", "",
             "| rank | candidate | status | rung | days | emb | hidden | ep/day | boot days | NE gain [95% CI] "
             "| AUC gain | student NE | teacher NE (own) | teacher AUC (own) | seconds | params | FLOPs/ex |",
             "|---:|---|---|---:|---:|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["ranking"]:
        lines.append(
            f"| {r['rank']} | `{r['id']}` | {r['status']} | {r['rung']} | {r['days']} | {r['embedding_dim']} "
            f"| {r['hidden']} | {r['epochs']} | {r['bootstrap_days']} | {fmt_ci(r['ne_gain'])} "
            f"| {fmt_ci(r['auc_gain'])} | {_f(r['student_ne'])} | {_f(r['teacher_ne'])} | {_f(r['teacher_auc'])} "
            f"| {r['seconds']:.1f} | {r['params'] or 0:,} | {r['flops_per_example'] or 0:,} |")
    lines += ["", "Rungs:", ""]
    for r in result["rungs"]:
        lines.append(f"- rung {r['rung']}: {len(r['ran'])} candidates x {r['target_days']} days, estimated "
                     f"{r['estimate']:.1f} s, spent {r['spent']:.1f} s (total {r['spent_total']:.1f} s); "
                     f"survivors {r['survivors']}" + (f"; {r['note']}" if r.get("note") else ""))
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xkey, xlabel in ((axes[0], "flops_per_example", "teacher inference FLOPs / example"),
                             (axes[1], "seconds", "search seconds spent on the candidate")):
        for r in result["ranking"]:
            g = r["ne_gain"]
            if not g["days"]:
                continue
            x = max(r[xkey] or 1, 1)
            err = [[g["mean"] - g["lo"]], [g["hi"] - g["mean"]]]
            color = "tab:green" if r["status"] == "winner" else ("tab:blue" if r["rung"] > 0 else "tab:gray")
            ax.errorbar([x], [g["mean"]], yerr=err, fmt="o", color=color, capsize=3)
            ax.annotate(f"{r['id']} (r{r['rung']})", (x, g["mean"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("student NE gain vs control (95% CI)")
    fig.suptitle(f"teacher search {result['run_id']}: gain vs cost (green = winner, blue = reached rung >= 1)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write(run: str, result: dict[str, Any]) -> dict[str, str]:
    from kdcore.search.runner import write_json

    out = sfs.join(run, "report")
    uris = {"result": sfs.join(out, "result.json"), "markdown": sfs.join(out, "report.md"),
            "plot": sfs.join(out, "gain_vs_cost.png")}
    result = {**result, "uris": uris}
    sfs.write_bytes_atomic(uris["plot"], plot(result))
    sfs.write_bytes_atomic(uris["markdown"], markdown(result).encode())
    write_json(uris["result"], result)
    return uris
