"""Airflow tasks of the teacher search (``dags/kd_teacher_search.py`` wires them).

Thin shells over ``kdcore.search.run``'s rung-by-rung functions; kdcore (torch, pyarrow)
is imported inside the task bodies only. Tasks pass the run URI and small JSON plans
through XCom; the search state lives in ``<search_root>/search/<run_id>/state.json``.
Every task is idempotent for the same run id (a retried task resumes or re-reads); only a
transient fault is retried (``operators.faults.no_retry``), anything else fails at once.

Params are confined before anything is read (``validate_params``): ``config`` must lie in
the configs folder (``$KD_CONFIG_DIR``, default the repo's ``configs/``), ``root`` at or
under the config's ``search_root`` or ``$KD_STORAGE_ROOT``, ``run_id`` is one path
segment. The ``kd teacher search`` CLI does not confine: its user runs the machine.

The search ends in a human-in-the-loop approval (``TeacherApprovalOperator``, Airflow 3.1+
HITL): it shows the ranked candidates with their gains and 95% intervals and the diff of
the winner's teacher block, and offers ``Promote <candidate>`` for every ranked candidate
plus ``Reject``. Only an approval promotes (``promote_teacher`` calls
``kdcore.search.promote.promote(..., write=True)`` on ``params.promote_config``, confined to
the configs folder) and records who approved; Reject, or no answer before the response
timeout (default option: Reject), writes nothing and the promote task ends skipped."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import TriggerRule, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from operators.faults import no_retry  # only transient faults are retried

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "teacher_search.yaml"  # relative to the configs folder
MAX_RUNGS = 4  # eta=2: enough for up to 8 candidates (8 -> 4 -> 2 -> 1)
TRAIN_TIMEOUT = dt.timedelta(hours=2)
DEFAULT_PROMOTE_CONFIG = "demo.yaml"  # the daily pipeline's config, relative to the configs folder
APPROVAL_TIMEOUT_MINUTES = 24 * 60  # default wait for a human answer; Reject when it passes
MAX_APPROVAL_TIMEOUT_MINUTES = 7 * 24 * 60
REJECT = "Reject"
MAX_OPTIONS = 12  # the winner and the next ranked candidates (plus Reject)


def config_dir() -> Path:
    """The folder params.config must lie in: ``$KD_CONFIG_DIR``, or the repo's configs/."""
    return Path(os.environ.get("KD_CONFIG_DIR") or REPO_ROOT / "configs")


def _config_path(value: str | None) -> str:
    """params.config as a real path inside ``config_dir()`` (kdcore.errors.SpecError naming
    ``params.config`` otherwise; nothing is read). Relative values are taken in the configs
    folder; the repo-relative form ``configs/<file>`` (the CLI's) is accepted too."""
    from kdcore.paths import confine_path

    base = config_dir()
    path = Path(value or DEFAULT_CONFIG)
    if not path.is_absolute():
        path = REPO_ROOT / path if path.parts and path.parts[0] == "configs" else base / path
    return str(confine_path(path, base, "params.config"))


def promote_config_path(value: str | None) -> str:
    """params.promote_config (the pipeline config whose teacher block a promotion rewrites)
    as a real path inside ``config_dir()``: the same rules as params.config (relative to the
    configs folder, ``configs/<file>`` accepted, ``..`` and symlinks resolved before the
    check). SpecError naming ``params.promote_config`` otherwise; nothing is read."""
    from kdcore.paths import confine_path

    base = config_dir()
    path = Path(value or DEFAULT_PROMOTE_CONFIG)
    if not path.is_absolute():
        path = REPO_ROOT / path if path.parts and path.parts[0] == "configs" else base / path
    return str(confine_path(path, base, "params.promote_config"))


def allowed_roots(cfg: Any) -> list[str]:
    """Where params.root may point: the (trusted) config's own search_root, and the
    deployment's ``$KD_STORAGE_ROOT`` when set; any sub-root of these is fine."""
    from kdcore.storage import fs as sfs

    roots = [cfg.root]
    if os.environ.get("KD_STORAGE_ROOT"):
        roots.append(sfs.normalize(os.environ["KD_STORAGE_ROOT"]))
    return roots


def _root(value: str | None, cfg: Any, config: str) -> str | None:
    """params.root confined to ``allowed_roots(cfg)``; relative to the config's folder
    (as search_root in the file is). Returns the canonical URI, or None when not given."""
    from kdcore.paths import confine_uri
    from kdcore.storage import fs as sfs

    if value is None:
        return None
    if isinstance(value, str) and value and not sfs.has_scheme(value) and not os.path.isabs(value):
        value = str(Path(config).parent / value)
    return confine_uri(value, allowed_roots(cfg), "params.root")


def run_id_for(param: str | None, dag_run_id: str) -> str:
    """The search run id: params.run_id, or the DAG run id made path-safe; refused
    (SpecError naming ``params.run_id``) unless it is one safe path segment."""
    from kdcore.paths import safe_name

    if param:
        return safe_name(param, "params.run_id")
    return safe_name(re.sub(r"[^A-Za-z0-9_.-]+", "_", dag_run_id).lstrip(".-")[:80] or "run",
                     "params.run_id (from the DAG run id)")


def validate_params(params: Mapping[str, Any], dag_run_id: str) -> tuple[Any, str]:
    """The validated search config and run id for a run's params. Every path-reaching
    param is confined before it is used: params.config before the file is read (a
    refused file is never opened, so no error quotes it), params.root against the
    file's own roots. Raises kdcore.errors.KDError (SpecError) naming the param."""
    from kdcore.search.config import load_search

    config = _config_path(params.get("config"))
    run_id = run_id_for(params.get("run_id"), dag_run_id)
    root = _root(params.get("root"), load_search(config), config)
    overrides = {"budget.seconds": params.get("budget_seconds"),
                 "window.bootstrap_end": params.get("bootstrap_end"),
                 "window.validation_days": params.get("validation_days"),
                 "proxy_student": params.get("proxy_student"), "search_root": root}
    return load_search(config, overrides), run_id


@task(task_id="setup", retries=1, execution_timeout=dt.timedelta(minutes=30))
def setup(**context: Any) -> str:
    """Validate the search config with the run's params, bootstrap the shared proxy
    student and control; returns the run URI."""
    from kdcore.errors import KDError
    from kdcore.search.run import setup_run

    try:
        cfg, run_id = validate_params(context["params"], context["dag_run"].run_id)
        if context["params"].get("request_approval", True):  # fail fast, not after the search
            target = promote_config_path(context["params"].get("promote_config"))
            if not Path(target).is_file():
                raise KDError(f"params.promote_config: {target} does not exist")
    except KDError as e:
        raise AirflowFailException(str(e)) from None
    with no_retry("search setup"):
        out = setup_run(cfg, run_id)
    log.info("search run %s (resumed: %s)", out["run"], out["resumed"])
    return out["run"]


@task(retries=1, execution_timeout=TRAIN_TIMEOUT)
def plan_rung(run: str, rung: int) -> list[dict[str, Any]]:
    """Plan the rung under the remaining budget and train the shared control; the mapped
    training task expands over the returned list (empty: the search is over)."""
    from kdcore.search.run import plan_and_control

    with no_retry(f"planning rung {rung}"):
        items = plan_and_control(run, rung)
    log.info("rung %d: %d candidates", rung, len(items))
    return items


@task(retries=1, execution_timeout=TRAIN_TIMEOUT, map_index_template="{{ map_label }}")
def train_candidate(run: str, rung: int, cid: str, target: int, allowance: float) -> str:
    """One candidate's rung: teacher bootstrap (rung 0), then daily teacher refresh, labels,
    proxy student, each day started only when it fits the candidate's allowance."""
    from kdcore.search.run import train_candidate as train

    get_current_context()["map_label"] = f"{cid} r{rung}"  # type: ignore[typeddict-unknown-key]
    with no_retry(f"candidate {cid} rung {rung}"):
        return train(run, rung, cid, target, allowance)


@task(retries=1, execution_timeout=dt.timedelta(minutes=10), trigger_rule=TriggerRule.NONE_FAILED)
def close_rung(run: str, rung: int) -> dict[str, Any]:
    """Merge the rung's results, rank by the proxy student's gain, keep the best 1/eta."""
    from kdcore.search.run import close_rung as close

    with no_retry(f"closing rung {rung}"):
        return close(run, rung)


@task(task_id="report", retries=1, execution_timeout=dt.timedelta(minutes=10),
      trigger_rule=TriggerRule.NONE_FAILED)
def report(run: str, **context: Any) -> dict[str, Any]:
    """Ranked Markdown table + gain-vs-cost PNG + result.json (the input of promotion)."""
    from kdcore.search.run import finish_run

    with no_retry("search report"):
        out = finish_run(run, command=f"airflow dag kd_teacher_search run {context['dag_run'].run_id}")
    log.info("teacher search result: %s", out)
    return out


# ---------------------------------------------------------------- approval and promotion


def approval_options(result: Mapping[str, Any]) -> dict[str, str | None]:
    """HITL option label -> candidate id (None for Reject), best first: ``Promote <winner>
    (winner)``, ``Promote <id>`` for the next ranked candidates with scored days, ``Reject``.
    Deterministic in the result, so the resumed task rebuilds the same mapping."""
    from kdcore.search.promote import ranked_ids

    out: dict[str, str | None] = {}
    for cid in ranked_ids(dict(result))[:MAX_OPTIONS]:
        out[f"Promote {cid}" + (" (winner)" if cid == result.get("winner") else "")] = cid
    out[REJECT] = None
    return out


def _cell(x: Any, digits: int = 4) -> str:
    import math

    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def approval_text(result: Mapping[str, Any], config: str, preview: Mapping[str, Any] | None,
                  timeout_minutes: float) -> tuple[str, str]:
    """(subject, Markdown body) of the approval request: the ranked candidates with their
    NE/AUC gains and 95% intervals, what a promotion writes, and the winner's diff."""
    from kdcore.evaluation.stats import fmt_ci

    st = result.get("summary") or {}
    win = result.get("winner")
    rows = {r["id"]: r for r in result.get("ranking") or []}
    wg = rows.get(win, {}).get("ne_gain") or {"days": 0}
    subject = (f"Promote teacher `{win}` from search `{result.get('run_id')}`? "
               f"Student NE gain {fmt_ci(wg)}")
    lines = [f"### Teacher search `{result.get('run_id')}`: promote a teacher into `{Path(config).name}`?", "",
             f"- score: proxy student's progressive NE gain over the control on task `{st.get('task')}` "
             "(control NE - student NE, higher is better; tie-break AUC gain), 95% paired bootstrap "
             "interval over days; the teacher's own NE is shown, never used to rank",
             f"- budget {st.get('budget_seconds')} s ({st.get('budget_kind')}), spent {st.get('spent_seconds')} s; "
             f"{st.get('candidates')} candidates, {len(result.get('rungs') or [])} rungs; stop: {st.get('stop_reason')}",
             "",
             "| rank | candidate | status | rung | KD days | NE gain [95% CI] | AUC gain [95% CI] "
             "| teacher NE (own) | seconds | params | FLOPs/ex |",
             "|---:|---|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in result.get("ranking") or []:
        lines.append(f"| {r['rank']} | `{r['id']}` | {r['status']} | {r['rung']} | {r['ne_gain']['days']} "
                     f"| {fmt_ci(r['ne_gain'])} | {fmt_ci(r['auc_gain'])} | {_cell(r.get('teacher_ne'))} "
                     f"| {r['seconds']:.1f} | {r['params'] or 0:,} | {r['flops_per_example'] or 0:,} |")
    lines.append("")
    if wg.get("days") and wg["lo"] <= 0.0 <= wg["hi"]:
        lines.append(f"**Caution:** the winner's NE-gain interval includes 0: `{win}` is not shown to help "
                     "the student on this evidence.")
    if wg.get("days") and wg["hi"] < 0.0:
        lines.append(f"**Caution:** the winner's NE gain is negative (interval below 0): distillation from "
                     f"`{win}` hurt the proxy student.")
    lines += ["", f"**Promote &lt;candidate&gt;** rewrites only the top-level `teacher:` block of `{config}` "
              "(new teacher name, model of that candidate) and records who approved. Bootstrap the new teacher "
              "(`kd bootstrap`) with the candidate's window before the next daily run.",
              f"**Reject**, or no answer within {timeout_minutes:g} minutes, writes nothing."]
    if preview is not None:
        lines += ["", f"Diff if `{win}` is promoted:", "", "```diff", preview.get("diff", "").rstrip(), "```"]
    uris = result.get("uris") or {}
    if uris:
        lines += ["", f"Report: `{uris.get('markdown')}`; plot: `{uris.get('plot')}`; result: `{uris.get('result')}`"]
    return subject, "\n".join(lines) + "\n"


def _search_result(context: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The search result (result.json) of this DAG run, via the report task's XCom."""
    from kdcore.search.runner import read_json

    out = context["ti"].xcom_pull(task_ids="report")
    if not out or not out.get("result"):
        return None, None
    return read_json(out["result"]), out["result"]


class TeacherApprovalOperator(HITLOperator):
    """Human-in-the-loop approval of the search result. The options are built at run time
    from the result (``approval_options``): ``Promote <candidate>`` per ranked candidate and
    ``Reject`` (also the default taken when the response timeout passes). The task returns
    the decision (``approve`` / ``reject`` / ``timeout``), the candidate (None unless
    approved) and the respondent; it promotes nothing itself."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("subject", "Promote the teacher search winner?")
        kwargs.setdefault("options", [REJECT])  # replaced at run time by the ranked candidates
        kwargs.setdefault("defaults", [REJECT])
        kwargs.setdefault("response_timeout", dt.timedelta(minutes=APPROVAL_TIMEOUT_MINUTES))
        super().__init__(**kwargs)

    def _setup_options(self, result: Mapping[str, Any]) -> dict[str, str | None]:
        opts = approval_options(result)
        self.options, self.defaults, self.multiple = list(opts), [REJECT], False
        return opts

    def execute(self, context: Any) -> Any:
        from kdcore.errors import KDError
        from kdcore.search.promote import promote

        params = context["params"]
        if not params.get("request_approval", True):
            log.info("NOT PROMOTED: approval not requested (params.request_approval=false); nothing is written")
            raise AirflowSkipException("approval not requested")
        result, uri = _search_result(context)
        if not result or not result.get("winner"):
            log.info("NOT PROMOTED: the search has no winner; nothing to approve")
            raise AirflowSkipException("no winner")
        minutes = float(params.get("approval_timeout_minutes") or APPROVAL_TIMEOUT_MINUTES)
        self.response_timeout = dt.timedelta(minutes=min(minutes, MAX_APPROVAL_TIMEOUT_MINUTES))
        try:
            config = promote_config_path(params.get("promote_config"))
            preview = promote(uri, config, write=False)  # also proves the winner's block validates
        except KDError as e:
            raise AirflowFailException(str(e)) from None
        self._setup_options(result)
        self.subject, self.body = approval_text(result, config, preview, minutes)
        log.info("asking for approval: options %s, default %s after %s", self.options, self.defaults,
                 self.response_timeout)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        result, uri = _search_result(context)
        if not result:
            raise AirflowFailException("the search result is gone: cannot resolve the approval")
        opts = self._setup_options(result)
        ret = super().execute_complete(context=context, event=event)
        chosen = ret["chosen_options"][0]
        user = ret.get("responded_by_user")
        timedout = bool(event.get("timedout")) or user is None
        cid = None if timedout else opts.get(chosen)
        decision = "timeout" if timedout else ("reject" if cid is None else "approve")
        at = ret.get("responded_at")
        out = {"decision": decision, "candidate": cid, "chosen_option": chosen,
               "responded_by": dict(user) if user else None,
               "responded_at": at.isoformat() if hasattr(at, "isoformat") else at,
               "result": uri, "winner": result.get("winner"), "search_run_id": result.get("run_id")}
        log.info("approval decision: %s", out)
        return out


@task(task_id="promote", retries=0, execution_timeout=dt.timedelta(minutes=10))
def promote_teacher(decision: Mapping[str, Any] | None, **context: Any) -> dict[str, Any]:
    """Promote the approved candidate: rewrite the teacher block of params.promote_config
    (confined to the configs folder) and record who approved next to the search result.
    Rejected or timed out: nothing is written, the task ends skipped."""
    from kdcore.errors import KDError
    from kdcore.search.promote import promote
    from kdcore.search.runner import write_json
    from kdcore.storage import fs as sfs

    if not decision or decision.get("decision") != "approve" or not decision.get("candidate"):
        why = (decision or {}).get("decision", "no decision")
        who = ((decision or {}).get("responded_by") or {}).get("name")
        msg = (f"NOT PROMOTED: {why}" + (f" by {who}" if who else "")
               + "; the pipeline config is unchanged")
        log.info(msg)
        raise AirflowSkipException(msg)
    user = decision["responded_by"]
    try:
        config = promote_config_path(context["params"].get("promote_config"))
        out = promote(decision["result"], config, write=True, candidate=decision["candidate"],
                      approved_by=user.get("name") or user.get("id"))
    except KDError as e:
        raise AirflowFailException(str(e)) from None
    dag_run_id = context["dag_run"].run_id
    record = {**out, "approved_by": user, "responded_at": decision.get("responded_at"),
              "chosen_option": decision.get("chosen_option"), "dag_run_id": dag_run_id,
              "search_result": decision["result"]}
    run = decision["result"].rsplit("/report/", 1)[0]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", dag_run_id).lstrip(".-")[:100] or "run"
    record["record"] = sfs.join(run, "promotions", f"{safe}.json")
    write_json(record["record"], record)
    log.info("PROMOTED %s into %s (teacher %s, written %s), approved by %s; record %s", out["candidate"],
             out["config"], out["teacher_name"], out["written"], user, record["record"])
    return record
