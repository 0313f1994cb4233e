"""Opt-in promotion of a search winner into a pipeline config: only the top-level
``teacher:`` block of the YAML is rewritten (comments, anchors and every other block are
kept byte for byte), and nothing is written without ``write=True``.

The promoted teacher gets a new name (``<old name>_<candidate>``) unless told otherwise:
a teacher whose model changes cannot warm-start from the old lineage, so the daily
pipeline starts a new one (bootstrap it with ``kd bootstrap``)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from kdcore.errors import SpecError
from kdcore.search.runner import read_json
from kdcore.storage import fs as sfs

_TOP = re.compile(r"^teacher\s*:")


def teacher_block_span(lines: list[str]) -> tuple[int, int] | None:
    """[start, end) line range of the top-level ``teacher:`` block: its key line and the
    indented (or blank) lines after it, up to the next top-level line."""
    for i, line in enumerate(lines):
        if _TOP.match(line):
            end = i + 1
            while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t"):
                end += 1
            while end > i + 1 and not lines[end - 1].strip():  # trailing blank lines stay outside
                end -= 1
            return i, end
    return None


def _flow(obj: Any) -> str:
    return yaml.safe_dump(obj, default_flow_style=True, sort_keys=False, width=10_000).strip()


_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+ -]")


def comment_text(value: object, limit: int = 80) -> str:
    """``value`` made safe inside a one-line YAML comment (a user name from an identity
    provider must not be able to add lines or keys): letters, digits, ``_ . @ + -`` and
    spaces only, at most ``limit`` characters."""
    return _COMMENT_UNSAFE.sub("_", str(value))[:limit].strip() or "_"


def render_teacher(name: str, model: dict[str, Any], source: str, approved_by: str | None = None) -> list[str]:
    note = f"; approved by {comment_text(approved_by)}" if approved_by else ""
    return [f"teacher:  # promoted from teacher search {comment_text(source)}{note}\n", f"  name: {name}\n",
            f"  model: {_flow(model)}\n"]


def load_result(uri: str) -> dict[str, Any]:
    try:
        result = read_json(sfs.normalize(uri))
    except Exception as e:  # noqa: BLE001 - any unreadable result is the same user error
        raise SpecError(f"--search-result {uri}: cannot read the search result ({e})") from None
    if result.get("kind") != "teacher_search_result":
        raise SpecError(f"--search-result {uri}: not a teacher search result")
    if not result.get("teacher"):
        raise SpecError(f"--search-result {uri}: the search has no winner to promote")
    return result


def ranked_ids(result: dict[str, Any]) -> list[str]:
    """Candidates of the result that can be promoted, best first: the winner and every
    ranked candidate with at least one scored (KD) day; the others have no evidence."""
    out = []
    for r in result.get("ranking") or []:
        if r["id"] == result.get("winner") or (r.get("ne_gain") or {}).get("days"):
            out.append(r["id"])
    if result.get("winner") and result["winner"] not in out:
        out.insert(0, result["winner"])
    return out


def choose(result: dict[str, Any], candidate: str | None = None) -> dict[str, Any]:
    """The teacher to promote: the winner (``candidate`` None or the winner's id), or another
    ranked candidate of the same search (its model and window come from the search config
    the result recorded). SpecError when ``candidate`` is not a promotable candidate."""
    win = result["teacher"]
    if candidate is None or candidate == win["candidate"]:
        return dict(win)
    if candidate not in ranked_ids(result):
        raise SpecError(f"candidate {candidate!r} is not a ranked candidate of search {result.get('run_id')!r} "
                        f"(promotable: {ranked_ids(result)})")
    from kdcore.search.config import search_from_dict

    cfg = search_from_dict(result["config"], f"search result {result.get('run_id')} (config)")
    cand = next((c for c in cfg.all_candidates() if c.id == candidate), None)
    if cand is None:
        raise SpecError(f"candidate {candidate!r} is not in the search config of {result.get('run_id')!r}")
    data = cand.model_dump(mode="json")
    return {"candidate": candidate, "model": data["model"], "bootstrap_days": data["bootstrap_days"]}


def promote(result_uri: str, config_path: str | Path, write: bool = False, name: str | None = None,
            candidate: str | None = None, approved_by: str | None = None) -> dict[str, Any]:
    """Diff (and, with ``write``, apply) the teacher block of the winner (or of ``candidate``,
    another ranked candidate of the search). The rewritten file must still load as a
    pipeline config, with every other top-level key unchanged. ``approved_by`` (who approved,
    e.g. the Airflow HITL respondent) goes into the block's comment and the output."""
    from kdcore.config import PipelineConfig, TeacherConfig, load_pipeline
    from kdcore.yamlconf import validate

    result = load_result(result_uri)
    chosen = choose(result, candidate)
    path = Path(config_path)
    text = path.read_text()
    old = yaml.safe_load(text) or {}
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    cand = chosen["candidate"]
    old_name = (old.get("teacher") or {}).get("name", "teacher")
    new_name = name or re.sub(r"[^a-z0-9_]", "_", f"{old_name}_{cand}".lower())[:41]
    model = chosen["model"]
    teacher = validate(TeacherConfig, {"name": new_name, "model": model}, "promoted teacher")
    block = render_teacher(teacher.name, teacher.model.model_dump(mode="json"), result["run_id"],
                           approved_by)
    span = teacher_block_span(lines)
    new_lines = (lines[:span[0]] + block + lines[span[1]:]) if span else lines + block
    new_text = "".join(new_lines)
    new = yaml.safe_load(new_text)
    changed_keys = sorted(k for k in set(old) | set(new) if k != "teacher" and old.get(k) != new.get(k))
    if changed_keys:
        raise SpecError(f"{path}: rewriting the teacher block would change {changed_keys}; refusing")
    validate(PipelineConfig, new, f"{path} (promoted)")
    diff = "".join(difflib.unified_diff(lines, new_lines, fromfile=str(path), tofile=f"{path} (promoted)"))
    out = {"config": str(path), "candidate": cand, "teacher_name": teacher.name, "diff": diff,
           "changed": new_text != text, "written": False,
           "bootstrap_days": chosen.get("bootstrap_days"), "winner": result.get("winner"),
           "run_id": result.get("run_id"), "approved_by": approved_by}
    if write and new_text != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(new_text)
        tmp.replace(path)
        load_pipeline(path)  # still a valid pipeline config (dataset resolves)
        out["written"] = True
    return out
