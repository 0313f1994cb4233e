"""Run a whole search in this process (the ``kd teacher search`` path) and build the
result the report and the promotion read. The DAG composes the same pieces rung by rung."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from kdcore.search import report, schedule
from kdcore.search.config import SearchConfig
from kdcore.search.runner import PipelineTrainer, read_json, run_uri, write_json
from kdcore.storage import fs as sfs


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")


def init_state(cfg: SearchConfig, trainer: PipelineTrainer) -> schedule.SearchState:
    ids = [c.id for c in cfg.all_candidates()]
    state = schedule.new_state(trainer, ids, cfg.budget.seconds, cfg.eta, cfg.min_days_per_rung)
    for cid in ids:
        cost = trainer.model_cost(cid)
        state.candidates[cid].params = cost["params"]
        state.candidates[cid].flops_per_example = cost["flops_per_example"]
    return state


def state_uri(run: str) -> str:
    return sfs.join(run, "state.json")


def save_state(run: str, state: schedule.SearchState) -> str:
    write_json(state_uri(run), state.to_json())
    return state_uri(run)


def load_state(run: str) -> schedule.SearchState:
    return schedule.SearchState.from_json(read_json(state_uri(run)))


def build_result(cfg: SearchConfig, run_id: str, state: schedule.SearchState, wall: float,
                 command: str | None = None) -> dict[str, Any]:
    cands = {c.id: c.model_dump(mode="json") for c in cfg.all_candidates()}
    ranking = report.rows(state, cands)
    winner = next((r["id"] for r in ranking if r["status"] == "winner"), None)
    return {"kind": "teacher_search_result", "run_id": run_id, "winner": winner,
            "teacher": ({"model": cands[winner]["model"], "bootstrap_days": cands[winner]["bootstrap_days"],
                         "candidate": winner} if winner else None),
            "ranking": ranking, "rungs": state.rungs, "config": cfg.resolved(), "command": command,
            "summary": {"budget_seconds": state.budget_seconds, "budget_kind": cfg.budget.kind,
                        "spent_seconds": round(state.spent, 2), "prepare_seconds": round(state.prepare_seconds, 2),
                        "wall_seconds": round(wall, 2), "candidates": len(cands), "eta": state.eta,
                        "stop_reason": state.stop_reason, "task": cfg.primary_task(),
                        "validation_days": state.validation_days}}


def run_search(cfg: SearchConfig, run_id: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Successive halving over the config's candidates; writes state, result, Markdown and
    PNG under ``<search_root>/search/<run_id>/`` and returns the result (with its URIs)."""
    t0 = time.perf_counter()
    run_id = run_id or new_run_id()
    run = run_uri(cfg, run_id)
    trainer = PipelineTrainer(cfg, run_id)
    state = init_state(cfg, trainer)
    write_json(sfs.join(run, "config.json"), cfg.resolved())
    state = schedule.successive_halving(trainer, list(state.candidates), cfg.budget.seconds, cfg.eta,
                                        cfg.min_days_per_rung, state=state)
    save_state(run, state)
    result = build_result(cfg, run_id, state, time.perf_counter() - t0, command)
    result["uris"] = report.write(run, result)
    return result


# ---------------------------------------------------------------- rung by rung (the DAG's path)
# Each function takes and returns JSON-able values (URIs), reading and writing
# <run>/state.json, so each can run in its own process (Airflow task).

def _cfg_of(run: str) -> SearchConfig:
    from kdcore.search.config import search_from_dict

    return search_from_dict(read_json(sfs.join(run, "config.json")), sfs.join(run, "config.json"))


def _run_id(run: str) -> str:
    return run.rstrip("/").rsplit("/", 1)[-1]


def setup_run(cfg: SearchConfig, run_id: str) -> dict[str, Any]:
    """Write the resolved config, bootstrap the shared student/control, save the state.
    Idempotent: an existing state of the same run is kept (a retried task resumes)."""
    run = run_uri(cfg, run_id)
    if sfs.exists(state_uri(run)):
        return {"run": run, "resumed": True}
    write_json(sfs.join(run, "config.json"), cfg.resolved())
    trainer = PipelineTrainer(cfg, run_id)
    state = init_state(cfg, trainer)
    state.prepare_seconds = trainer.prepare()
    state.spent += state.prepare_seconds
    state.rungs = []
    save_state(run, state)
    write_json(sfs.join(run, "started.json"), {"wall_start": time.time()})
    return {"run": run, "resumed": False}


def plan_and_control(run: str, rung: int) -> list[dict[str, Any]]:
    """Plan ``rung`` from the state, train the shared control through its days, save the
    plan; returns one kwargs dict per candidate for the mapped training task."""
    state = load_state(run)
    if len(state.rungs) > rung:  # already closed (task retried after close)
        return []
    plan = schedule.plan_rung(state, rung)
    if plan["candidates"]:
        trainer = PipelineTrainer(_cfg_of(run), _run_id(run))
        plan["control_spent"] = schedule.run_control(state, trainer, plan["target_days"], plan["control_allowance"])
    else:
        state.stop_reason = state.stop_reason or plan["reason"]
        state.done = True
    save_state(run, state)
    write_json(sfs.join(run, f"rung={rung}", "plan.json"), plan)
    return [{"run": run, "rung": rung, "cid": c["id"], "target": plan["target_days"], "allowance": c["allowance"]}
            for c in plan["candidates"]]


def train_candidate(run: str, rung: int, cid: str, target: int, allowance: float) -> str:
    """One candidate's share of a rung (its own process); writes and returns the URI of
    its updated state. Reads the shared state, never writes it."""
    state = load_state(run)
    trainer = PipelineTrainer(_cfg_of(run), _run_id(run))
    c = schedule.run_candidate(state, trainer, cid, rung, target, allowance)
    uri = sfs.join(run, f"rung={rung}", f"cand={cid}.json")
    write_json(uri, {"candidate": schedule.asdict(c), "spent": c.extra["spent_last_rung"]})
    return uri


def close_rung(run: str, rung: int) -> dict[str, Any]:
    """Merge the candidates' results of ``rung`` into the state, rank, halve."""
    state = load_state(run)
    if len(state.rungs) > rung:
        return state.rungs[rung]
    try:
        plan = read_json(sfs.join(run, f"rung={rung}", "plan.json"))
    except Exception:  # noqa: BLE001 - no plan: nothing ran
        return {"rung": rung, "skipped": True}
    if not plan["candidates"]:
        return {"rung": rung, "skipped": True, "reason": plan.get("reason")}
    spent = plan.get("control_spent", 0.0)
    for item in plan["candidates"]:
        uri = sfs.join(run, f"rung={rung}", f"cand={item['id']}.json")
        got = read_json(uri)
        state.candidates[item["id"]] = schedule.CandidateState(**got["candidate"])
        spent += got["spent"]
    out = schedule.close_rung(state, plan, spent)
    save_state(run, state)
    return {"rung": rung, "survivors": out, "spent_total": state.spent}


def finish_run(run: str, command: str | None = None) -> dict[str, Any]:
    state = load_state(run)
    schedule.finish(state)
    save_state(run, state)
    try:
        wall = time.time() - read_json(sfs.join(run, "started.json"))["wall_start"]
    except Exception:  # noqa: BLE001
        wall = float("nan")
    cfg = _cfg_of(run)
    result = build_result(cfg, _run_id(run), state, wall, command)
    result["uris"] = report.write(run, result)
    return {"winner": result["winner"], **result["uris"]}
