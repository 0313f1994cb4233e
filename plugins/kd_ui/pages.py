"""Server-rendered HTML of the KD view (no JavaScript). Figures are printed the way
report.md prints them (4 decimals, gains as ``mean [lo, hi] (n=days)``), and every
figure cell carries ``data-kd`` (what it is) and ``data-value`` (the full number), so a
browser test can compare what is shown with the stored report.

Every value printed is escaped with ``_e`` (text and quoted attributes alike: names,
dates, versions, check details come from stored records and configs), URL segments with
``quote``; the app serves these pages under a CSP that allows no script
(kd_ui.safe_html.PAGE_CSP), so an escape missed here still runs nothing."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

METRICS = ("auc", "gauc", "ne", "calibration", "rmse")
CSS = """body{font-family:system-ui,sans-serif;margin:16px;color:#1a202c}table{border-collapse:collapse;margin:8px 0 18px}
td,th{border:1px solid #cbd5e0;padding:3px 8px;font-size:13px;text-align:left}th{background:#edf2f7}
.pass{color:#276749}.warn{color:#b7791f}.fail,.stale{color:#c53030;font-weight:bold}.muted{color:#718096}
img{max-width:100%;border:1px solid #e2e8f0}h1{font-size:20px}h2{font-size:16px;margin-top:22px}"""


def _e(v: Any) -> str:
    return escape("" if v is None else str(v))


def f4(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def fmt_gain(g: dict[str, Any]) -> str:
    if not g.get("days"):
        return "n/a"
    return f"{g['mean']:+.4f} [{g['lo']:+.4f}, {g['hi']:+.4f}] (n={g['days']})"


def _cell(key: str, value: Any, text: str | None = None, cls: str = "") -> str:
    text = f4(value) if text is None else text
    attr = f' class="{cls}"' if cls else ""
    return f'<td{attr} data-kd="{_e(key)}" data-value="{_e(value)}">{_e(text)}</td>'


def _page(title: str, body: list[str], base: str) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + _e(title) + "</title><style>" + CSS
            + "</style></head><body>" + f"<p class='muted'><a href='{_e(base)}/'>KD dashboard</a></p>"
            + "\n".join(body) + "</body></html>")


def _status(s: Any) -> str:
    return f'<span class="{_e(s)}">{_e(s)}</span>'


def dashboard(d: dict[str, Any], base: str) -> str:
    href = _e(base)  # the app's mount path, as an attribute value
    dates = d["dates"]
    b = [f"<h1>KD dashboard: {_e(d['dataset'])}</h1>",
         f"<p class='muted'>storage root {_e(d['root'])}; published report "
         f"<a href='{href}/artifacts/report/report.md'>report.md</a>; "
         + (f"progressive validation over {len(dates)} days ({_e(dates[0])} .. {_e(dates[-1])})" if dates
            else "no progressive metrics yet") + "</p>"]
    b += ["<h2>KD gain against the control</h2><p class='muted'>student - control, mean over days, 95% bootstrap "
          "interval; higher AUC/GAUC is better, lower NE and RMSE are better.</p>",
          "<table id='gains'><tr><th>student</th><th>mode</th><th>control</th><th>task</th><th>metric</th>"
          "<th>gain [95% CI]</th></tr>"]
    for g in d["gains"]:
        key = f"gain:{g['student']}:{g['task']}:{g['metric']}"
        b.append(f"<tr><td>{_e(g['student'])}</td><td>{_e(g['mode'])}</td><td>{_e(g['control'])}</td>"
                 f"<td>{_e(g['task'])}</td><td>{_e(g['metric'])}</td>{_cell(key, g.get('mean'), fmt_gain(g))}</tr>")
    b.append("</table>")
    b += ["<h2>Teacher vs students vs control (mean progressive metrics)</h2>",
          "<table id='means'><tr><th>model</th><th>role</th><th>task</th><th>days</th>"
          + "".join(f"<th>{m}</th>" for m in METRICS) + "</tr>"]
    for r in d["means"]:
        b.append(f"<tr><td>{_e(r['model'])}</td><td>{_e(r['role'])}</td><td>{_e(r['task'])}</td><td>{_e(r['days'])}</td>"
                 + "".join(_cell(f"mean:{r['model']}:{r['task']}:{m}", r.get(m)) for m in METRICS) + "</tr>")
    b.append("</table>")
    b += ["<h2>Gate per day</h2><table id='gates'><tr><th>date</th><th>status</th><th>action</th><th>teacher</th>"
          "<th>fallback (stale)</th><th>staleness (days)</th><th>max PSI</th><th>max JS</th><th>calibration</th>"
          "<th>label drift</th><th>Data Docs</th></tr>"]
    for g in d["gates"]:
        day = g["date"]
        cal = {k: v for k, v in g.items() if k.startswith("calibration:")}
        drift = {k: v for k, v in g.items() if k.startswith("label_drift:")}
        b.append(f"<tr><td><a href='{href}/day/{_e(day)}'>{_e(day)}</a></td>"
                 f"<td data-kd='gate:{_e(day)}:status'>{_status(g['status'])}</td><td>{_e(g['action'])}</td>"
                 f"<td>{_e(g['teacher_version'])}</td>"
                 f"<td class='{'stale' if g.get('teacher_stale') else ''}'>{'yes' if g.get('teacher_stale') else 'no'}</td>"
                 f"<td>{_e(g.get('staleness_days'))}</td>"
                 + _cell(f"gate:{day}:psi", g.get("psi")) + _cell(f"gate:{day}:js", g.get("js"))
                 + "<td>" + ", ".join(f"{_e(k.split(':', 1)[1])} {f4(v)}" for k, v in cal.items()) + "</td>"
                 + "<td>" + ", ".join(f"{_e(k.split(':', 1)[1])} {f4(v)}" for k, v in drift.items()) + "</td>"
                 + f"<td><a href='{href}/day/{_e(day)}#docs'>docs</a></td></tr>")
    b.append("</table>")
    b += ["<h2>Label lineage</h2><table id='lineage'><tr><th>date</th><th>labelled by teacher</th>"
          "<th>teacher trained through</th><th>staleness (days)</th><th>stale</th><th>consumed by</th></tr>"]
    for r in d["lineage"]:
        b.append(f"<tr><td>{_e(r['date'])}</td><td data-kd='lineage:{_e(r['date'])}:teacher'>{_e(r['teacher_version'])}</td>"
                 f"<td>{_e(r.get('teacher_trained_through'))}</td><td>{_e(r.get('staleness_days'))}</td>"
                 f"<td class='{'stale' if r.get('teacher_stale') else ''}'>{'yes' if r.get('teacher_stale') else 'no'}</td>"
                 f"<td data-kd='lineage:{_e(r['date'])}:students'>{_e(', '.join(r['students']))}</td></tr>")
    b.append("</table>")
    b.append("<h2>Plots</h2>")
    for p in d["plots"]:
        b.append(f"<p><a href='{href}/artifacts/report/{quote(p)}'>{_e(p)}</a><br>"
                 f"<img alt='{_e(p)}' src='{href}/artifacts/report/{quote(p)}'></p>")
    return _page(f"KD dashboard: {d['dataset']}", b, base)


def day(v: dict[str, Any], base: str) -> str:
    href = _e(base)  # the app's mount path, as an attribute value
    day_s = v["date"]
    t = v["teacher"]
    title = f"KD: {v['dataset']} {day_s}" + (f" (run {v['run_id']})" if v.get("run_id") else "")
    b = [f"<h1>{_e(title)}</h1>",
         "<table id='summary'><tr><th>partition date</th>" + f"<td data-kd='date'>{_e(day_s)}</td></tr>"]
    if v.get("run_id"):
        b.append(f"<tr><th>DAG run</th><td>{_e(v['dag_id'])} / {_e(v['run_id'])}</td></tr>")
    stale = t.get("teacher_stale")
    b += [f"<tr><th>labelling teacher</th><td data-kd='teacher:version'>{_e(t.get('teacher_version'))}</td></tr>",
          f"<tr><th>teacher trained through</th><td>{_e(t.get('teacher_trained_through'))}</td></tr>",
          f"<tr><th>staleness (days)</th><td data-kd='teacher:staleness'>{_e(t.get('staleness_days'))}</td></tr>",
          f"<tr><th>expected staleness (days)</th><td>{_e(t.get('expected_staleness_days'))}</td></tr>",
          f"<tr><th>teacher_stale (fallback)</th><td data-kd='teacher:stale' class='{'stale' if stale else ''}'>"
          f"{_e(stale)}</td></tr>",
          f"<tr><th>teacher refreshed on this date</th><td>{_e(t.get('refreshed_version') or '—')}</td></tr></table>"]
    g = v.get("gate")
    b.append("<h2>Quality gate</h2>")
    if not g:
        b.append("<p class='muted'>No gate record for this date.</p>")
    else:
        b += [f"<p>Decision: <b data-kd='gate:status'>{_status(g.get('status'))}</b>, action "
              f"<b data-kd='gate:action'>{_e(g.get('action'))}</b>. {_e(g.get('summary'))}</p>",
              "<table id='checks'><tr><th>check</th><th>value</th><th>warn</th><th>fail</th><th>status</th>"
              "<th>detail</th></tr>"]
        for c in g.get("checks", []):
            b.append(f"<tr><td>{_e(c['name'])}</td>{_cell('check:' + c['name'], c.get('value'))}"
                     f"<td>{f4(c.get('warn'))}</td><td>{f4(c.get('fail'))}</td><td>{_status(c.get('status'))}</td>"
                     f"<td>{_e(c.get('detail'))}</td></tr>")
        b.append("</table><h2 id='docs'>Data Docs</h2><ul>")
        for p in g.get("data_docs", []):
            b.append(f"<li><a href='{href}/artifacts/quality/{_e(day_s)}/{quote(p)}'>{_e(p)}</a></li>")
        b.append("</ul>")
    b += ["<h2>Students against their control (progressive metrics on this date)</h2>",
          "<table id='students'><tr><th>student</th><th>mode</th><th>task</th><th>metric</th><th>student</th>"
          "<th>control</th><th>student - control</th><th>KD applied</th><th>labels from</th></tr>"]
    for s in v["students"]:
        for task, m in s["metrics"].items():
            for k in METRICS:
                if m.get(k) is None:
                    continue
                cm = s["control_metrics"].get(task, {}).get(k)
                key = f"{s['student']}:{task}:{k}"
                b.append(f"<tr><td>{_e(s['student'])}</td><td>{_e(s['mode'])}</td><td>{_e(task)}</td><td>{k}</td>"
                         + _cell("student:" + key, m.get(k)) + _cell("control:" + key, cm)
                         + _cell("delta:" + key, s["delta"].get(task, {}).get(k),
                                 f"{s['delta'][task][k]:+.4f}" if k in s["delta"].get(task, {}) else "")
                         + f"<td>{_e(s['kd_applied'])}</td><td>{_e(s['label_teacher'])}</td></tr>")
        if not s["metrics"]:
            b.append(f"<tr><td>{_e(s['student'])}</td><td colspan='8' class='muted'>no checkpoint with progressive "
                     f"metrics on this date</td></tr>")
    b.append("</table>")
    if t.get("progressive"):
        b.append("<h2>Teacher (progressive metrics on this date)</h2><table id='teacher'><tr><th>task</th>"
                 + "".join(f"<th>{m}</th>" for m in METRICS) + "</tr>")
        for task, m in t["progressive"].items():
            b.append(f"<tr><td>{_e(task)}</td>" + "".join(_cell(f"teacher:{task}:{k}", m.get(k)) for k in METRICS)
                     + "</tr>")
        b.append("</table>")
    return _page(title, b, base)
