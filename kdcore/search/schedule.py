"""Successive halving under a work budget, independent of how a candidate is trained.

The scheduler only talks to a ``Trainer`` (the real one trains teachers, labels and a
proxy student; tests inject a fake one), so the budget logic is the same everywhere:

* rung k gives every surviving candidate ``min_days_per_rung * eta**k`` validation days
  in total (survivors continue warm from their checkpoints: only the new days run);
* before a rung starts, its cost is estimated from the measured seconds of each
  candidate (a FLOP-scaled prior until a candidate has been measured); a rung that does
  not fit the remaining budget is shortened, or not started;
* inside a rung each candidate gets an allowance (its share of the remaining budget) and
  never starts a unit (bootstrap or one day) whose estimate would exceed it;
* candidates are ranked by the proxy student's progressive gain over the control
  (NE gain = control NE - student NE, tie-break AUC gain), never by the teacher's own
  metrics; the best ceil(n/eta) (at most n-1) continue.

All state is JSON-able (``SearchState.to_json``), so an Airflow DAG can run one rung's
candidates as mapped tasks in separate processes and merge the results.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from kdcore.evaluation.stats import paired_diff

CONTROL = "control"
DEFAULT_FLOPS_PER_SECOND = 2.0e8  # conservative prior before anything was measured
DEFAULT_OVERHEAD_SECONDS = 1.0


class Trainer(Protocol):
    """What the scheduler needs from a training backend. Every method returns the work
    seconds it measured (wall or CPU, as the budget says)."""

    def validation_days(self) -> list[dt.date]: ...

    def work(self, cand: str, kind: str) -> float:
        """Relative work of a unit (FLOP-like), for estimates before a measurement."""
        ...

    def prepare(self) -> float: ...

    def control_day(self, day: dt.date) -> tuple[float, dict[str, float]]: ...

    def bootstrap(self, cand: str) -> float: ...

    def day(self, cand: str, day: dt.date) -> tuple[float, dict[str, Any]]:
        """Teacher refresh + labels + proxy student for ``day``; returns (seconds,
        {"student": {"ne", "auc"}, "teacher": {"ne", "auc"}})."""
        ...


@dataclass
class CandidateState:
    id: str
    status: str = "active"  # active | dropped | stopped_budget | skipped_budget | winner
    bootstrapped: bool = False
    days: list[dict[str, Any]] = field(default_factory=list)  # per validation day: date, student, teacher, seconds
    seconds: float = 0.0
    boot_seconds: float | None = None
    rung: int = -1  # last rung the candidate took part in
    dropped_at: int | None = None
    params: int | None = None
    flops_per_example: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def days_done(self) -> int:
        return len(self.days)

    @property
    def day_seconds(self) -> list[float]:
        return [d["seconds"] for d in self.days]


@dataclass
class SearchState:
    budget_seconds: float
    eta: int
    min_days_per_rung: int
    validation_days: list[str]
    candidates: dict[str, CandidateState]
    control: dict[str, dict[str, float]] = field(default_factory=dict)  # date -> metrics
    control_seconds: list[float] = field(default_factory=list)
    spent: float = 0.0
    prepare_seconds: float = 0.0
    rungs: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    stop_reason: str | None = None
    work: dict[str, dict[str, float]] = field(default_factory=dict)  # cand -> kind -> work units

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = {k: asdict(v) for k, v in self.candidates.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SearchState:
        d = dict(d)
        d["candidates"] = {k: CandidateState(**v) for k, v in d["candidates"].items()}
        return cls(**d)

    @property
    def remaining(self) -> float:
        return self.budget_seconds - self.spent


class CostModel:
    """Seconds of a unit: the candidate's own measurements when it has any (the slowest of
    its last three days); otherwise its work scaled from the nearest smaller measured
    candidate; otherwise a conservative FLOP prior."""

    def __init__(self, state: SearchState) -> None:
        self.state = state

    def _observed(self, kind: str) -> dict[str, float]:
        out = {}
        for cid, c in self.state.candidates.items():
            if kind == "bootstrap" and c.boot_seconds is not None:
                out[cid] = c.boot_seconds
            elif kind == "day" and c.days:
                out[cid] = max(c.day_seconds[-3:])  # recent, pessimistic
        return out

    def estimate(self, cid: str, kind: str) -> float:
        if cid == CONTROL:
            secs = self.state.control_seconds
            return max(secs[-3:]) if secs else DEFAULT_OVERHEAD_SECONDS
        obs = self._observed(kind)
        if cid in obs:
            return obs[cid]
        work = self.state.work.get(cid, {}).get(kind, 0.0)
        if obs:
            # Scale linearly from the largest measured candidate with no more work (an upper
            # bound: fixed overheads do not grow with work); with none, the cheapest measured
            # candidate's seconds scaled the same way.
            sized = sorted((self.state.work[o][kind], s) for o, s in obs.items())
            below = [(w, s) for w, s in sized if w <= work]
            w0, s0 = below[-1] if below else sized[0]
            return s0 * max(work / max(w0, 1e-9), 1.0) if below else max(s0 * work / max(w0, 1e-9), s0)
        return DEFAULT_OVERHEAD_SECONDS + work / DEFAULT_FLOPS_PER_SECOND

    def candidate_rung(self, c: CandidateState, target: int) -> float:
        boot = 0.0 if c.bootstrapped else self.estimate(c.id, "bootstrap")
        return boot + max(target - c.days_done, 0) * self.estimate(c.id, "day")


# ---------------------------------------------------------------- gains and ranking

def gains(state: SearchState, c: CandidateState, upto: int | None = None) -> dict[str, Any]:
    """The proxy student's progressive gain over the control on the candidate's days
    (the first validation day is left out: both start from the same bootstrap, so its
    gain is zero by construction). Paired bootstrap intervals over days."""
    days = c.days[1:upto] if upto else c.days[1:]
    ctrl = [state.control.get(d["date"], {}) for d in days]
    nan = math.nan
    ne_c = [x.get("ne", nan) for x in ctrl]
    ne_s = [d["student"].get("ne", nan) for d in days]
    auc_c = [x.get("auc", nan) for x in ctrl]
    auc_s = [d["student"].get("auc", nan) for d in days]
    t_ne = [d.get("teacher", {}).get("ne", nan) for d in days]
    t_auc = [d.get("teacher", {}).get("auc", nan) for d in days]
    mean = lambda xs: (sum(x for x in xs if math.isfinite(x)) / max(sum(1 for x in xs if math.isfinite(x)), 1)  # noqa: E731
                       if any(math.isfinite(x) for x in xs) else nan)
    return {"ne_gain": paired_diff(ne_c, ne_s), "auc_gain": paired_diff(auc_s, auc_c),
            "student_ne": mean(ne_s), "control_ne": mean(ne_c),
            "teacher_ne": mean(t_ne), "teacher_auc": mean(t_auc), "days": len(days)}


def _key(g: dict[str, Any]) -> tuple[float, float]:
    ne, auc = g["ne_gain"]["mean"], g["auc_gain"]["mean"]
    return (-ne if math.isfinite(ne) else math.inf, -auc if math.isfinite(auc) else math.inf)


def rank(state: SearchState, ids: list[str]) -> list[str]:
    """Best first: by NE gain of the student over the control, then AUC gain."""
    return sorted(ids, key=lambda i: (_key(gains(state, state.candidates[i])), i))


def final_ranking(state: SearchState) -> list[str]:
    """Candidates that went further rank first (their gain is measured on more days);
    within a rung, by student gain."""
    ids = [i for i, c in state.candidates.items() if c.days_done]
    ids.sort(key=lambda i: (-state.candidates[i].rung,
                            state.candidates[i].status in ("stopped_budget",),
                            _key(gains(state, state.candidates[i])), i))
    return ids + [i for i, c in state.candidates.items() if not c.days_done]


# ---------------------------------------------------------------- planning

def target_days(state: SearchState, rung: int) -> int:
    return min(state.min_days_per_rung * state.eta ** rung, len(state.validation_days))


def plan_rung(state: SearchState, rung: int) -> dict[str, Any]:
    """Which candidates run in ``rung``, for how many days in total, and each one's
    allowance; ``{"candidates": []}`` with a reason when the search is over."""
    cost = CostModel(state)
    active = [i for i, c in state.candidates.items() if c.status == "active"]
    stop = None
    if state.done:
        stop = state.stop_reason or "done"
    elif not active:
        stop = "no active candidates"
    elif rung > 0 and len(active) <= 1:
        stop = "one candidate remains"
    target = target_days(state, rung)
    done_max = max((state.candidates[i].days_done for i in active), default=0)
    if stop is None and rung > 0 and target <= done_max:
        stop = "validation window exhausted"
    plan: dict[str, Any] = {"rung": rung, "target_days": 0, "candidates": [], "control_allowance": 0.0,
                            "estimate": 0.0, "remaining": state.remaining, "reason": stop}
    if stop:
        return plan
    lowest = max(2, done_max + 1) if rung == 0 else done_max + 1
    ctrl_done = len(state.control)

    def estimate(t: int, ids: list[str]) -> tuple[float, dict[str, float]]:
        per = {i: cost.candidate_rung(state.candidates[i], t) for i in ids}
        ctrl = max(t - ctrl_done, 0) * cost.estimate(CONTROL, "day")
        return ctrl + sum(per.values()), {**per, CONTROL: ctrl}

    chosen, ids = None, list(active)
    for t in range(target, lowest - 1, -1):
        total, per = estimate(t, ids)
        if total <= state.remaining:
            chosen = t
            break
    note = None
    if chosen is None and rung == 0:
        # Nothing measured yet (estimates are priors): start the shortest rung 0 anyway; every
        # unit is still checked against the budget before it starts, so the search stops
        # early rather than overrunning.
        chosen = min(lowest, target)
        note = (f"rung 0 estimate {estimate(chosen, ids)[0]:.1f} s (prior) exceeds the remaining "
                f"{state.remaining:.1f} s; units are checked against the budget as they run")
    if chosen is None:
        plan["reason"] = (f"budget: rung {rung} needs an estimated {estimate(lowest, ids)[0]:.1f} s, "
                          f"{state.remaining:.1f} s remain")
        return plan
    total, per = estimate(chosen, ids)
    scale = state.remaining / total if total > 0 else 1.0  # spread the slack proportionally
    plan.update(target_days=chosen, estimate=round(total, 3), control_allowance=per[CONTROL] * scale,
                candidates=[{"id": i, "allowance": per[i] * scale} for i in ids],
                reason=note or (None if chosen == target else f"shortened from {target} to {chosen} days by the budget"))
    return plan


# ---------------------------------------------------------------- execution

def run_control(state: SearchState, trainer: Trainer, target: int, allowance: float) -> float:
    """Train the control through ``target`` validation days (shared by every candidate)."""
    cost, spent = CostModel(state), 0.0
    for day in state.validation_days[len(state.control):target]:
        if spent + cost.estimate(CONTROL, "day") > allowance:
            break
        secs, metrics = trainer.control_day(dt.date.fromisoformat(day))
        state.control[day] = metrics
        state.control_seconds.append(secs)
        spent += secs
    return spent


def run_candidate(state: SearchState, trainer: Trainer, cid: str, rung: int, target: int,
                  allowance: float) -> CandidateState:
    """One candidate's share of a rung: bootstrap if needed, then its next days, each
    unit started only when its estimate fits the allowance. Mutates and returns the
    candidate's state (the caller adds ``seconds spent`` to the budget)."""
    cost, c = CostModel(state), state.candidates[cid]
    spent = 0.0
    c.rung = rung
    if not c.bootstrapped:
        if cost.estimate(cid, "bootstrap") > allowance:
            c.status = "stopped_budget"
            c.extra["spent_last_rung"] = 0.0
            return c
        secs = trainer.bootstrap(cid)
        c.bootstrapped, c.boot_seconds = True, secs
        spent += secs
    for day in state.validation_days[c.days_done:target]:
        if spent + cost.estimate(cid, "day") > allowance:
            c.status = "stopped_budget"
            break
        secs, metrics = trainer.day(cid, dt.date.fromisoformat(day))
        c.days.append({"date": day, "seconds": secs, **metrics})
        spent += secs
    c.seconds += spent
    c.extra["spent_last_rung"] = spent
    return c


def close_rung(state: SearchState, plan: dict[str, Any], spent: float) -> list[str]:
    """Account the rung's spending, rank the candidates that ran, keep the best
    ceil(n/eta) (at most n - 1). Returns the survivors."""
    state.spent += spent
    ids = [c["id"] for c in plan["candidates"]]
    complete = [i for i in ids if state.candidates[i].status == "active"]
    ranked = rank(state, complete)
    keep = min(max(len(ranked) - 1, 1), math.ceil(len(ranked) / state.eta)) if len(ranked) > 1 else len(ranked)
    survivors = ranked[:keep]
    for i in ranked[keep:]:
        state.candidates[i].status = "dropped"
        state.candidates[i].dropped_at = plan["rung"]
    state.rungs.append({"rung": plan["rung"], "target_days": plan["target_days"], "ran": ids,
                        "ranked": ranked, "survivors": survivors, "estimate": plan["estimate"],
                        "spent": round(spent, 3), "spent_total": round(state.spent, 3),
                        "note": plan.get("reason")})
    if len(survivors) <= 1:
        state.done, state.stop_reason = True, "one candidate remains"
    return survivors


def finish(state: SearchState) -> list[str]:
    ranking = final_ranking(state)
    if not state.stop_reason:
        state.stop_reason = "done"
    state.done = True
    if ranking and state.candidates[ranking[0]].days_done:
        state.candidates[ranking[0]].status = "winner"
    return ranking


def new_state(trainer: Trainer, ids: list[str], budget: float, eta: int, min_days: int) -> SearchState:
    return SearchState(budget_seconds=budget, eta=eta, min_days_per_rung=min_days,
                       validation_days=[d.isoformat() for d in trainer.validation_days()],
                       candidates={i: CandidateState(id=i) for i in ids},
                       work={i: {"bootstrap": trainer.work(i, "bootstrap"), "day": trainer.work(i, "day")}
                             for i in ids})


def successive_halving(trainer: Trainer, ids: list[str], budget: float, eta: int = 2, min_days: int = 2,
                       max_rungs: int = 16, state: SearchState | None = None) -> SearchState:
    """The whole search in this process (the library and CLI path)."""
    state = state or new_state(trainer, ids, budget, eta, min_days)
    if not state.prepare_seconds:
        state.prepare_seconds = trainer.prepare()
        state.spent += state.prepare_seconds
    for rung in range(len(state.rungs), max_rungs):
        plan = plan_rung(state, rung)
        if not plan["candidates"]:
            state.stop_reason = state.stop_reason or plan["reason"]
            break
        # In one process the candidates run one after another, so each unit is checked against
        # what actually remains of the budget (the DAG's parallel tasks use the plan's allowances).
        spent = run_control(state, trainer, plan["target_days"], state.remaining)
        for item in plan["candidates"]:
            c = run_candidate(state, trainer, item["id"], rung, plan["target_days"], state.remaining - spent)
            spent += c.extra["spent_last_rung"]
        close_rung(state, plan, spent)
        if state.done:
            break
    finish(state)
    return state
