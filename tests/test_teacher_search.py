"""Teacher search (issue 7): successive halving under a budget, ranking by the proxy
student's gain, config validation, promotion, the real search on MovieLens and the DAG."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdcore.errors import SpecError
from kdcore.search import schedule
from kdcore.search.config import load_search, search_from_dict

REPO = Path(__file__).resolve().parents[1]
START = dt.date(2020, 1, 1)


class FakeTrainer:
    """Deterministic costs and scores: no torch. ``cost[c] = (bootstrap_s, day_s)``;
    the student's NE on a KD day is control NE - gain[c]; the teacher's own NE is teacher_ne[c]."""

    def __init__(self, cost, gain, teacher_ne=None, days=16):
        self.cost, self.gain, self.teacher_ne = cost, gain, teacher_ne or {}
        self.days = [START + dt.timedelta(days=i) for i in range(days)]
        self.calls: list[tuple] = []
        self.spent = 0.0

    def validation_days(self):
        return self.days

    def work(self, cand, kind):
        return self.cost[cand][0 if kind == "bootstrap" else 1] * 1e9  # proportional to the real cost

    def prepare(self):
        self.spent += 1.0
        return 1.0

    def control_day(self, day):
        self.spent += 0.1
        self.calls.append(("control", day))
        return 0.1, {"ne": 0.9, "auc": 0.7}

    def bootstrap(self, cand):
        self.calls.append(("bootstrap", cand))
        self.spent += self.cost[cand][0]
        return self.cost[cand][0]

    def day(self, cand, day):
        self.calls.append(("day", cand, day))
        self.spent += self.cost[cand][1]
        i = (day - START).days
        noise = 0.001 * ((i * 7919 + hash(cand) % 13) % 5 - 2)
        return self.cost[cand][1], {"student": {"ne": 0.9 - self.gain[cand] + noise, "auc": 0.7 + self.gain[cand]},
                                    "teacher": {"ne": self.teacher_ne.get(cand, 0.8), "auc": 0.75}}


COST = {"a": (2.0, 1.0), "b": (4.0, 2.0), "c": (8.0, 4.0), "d": (3.0, 1.5), "e": (6.0, 3.0), "f": (1.0, 0.5)}
GAIN = {"a": 0.01, "b": 0.03, "c": 0.05, "d": 0.02, "e": 0.04, "f": 0.00}


def test_halving_runs_to_one_winner_with_a_large_budget():
    tr = FakeTrainer(COST, GAIN)
    st = schedule.successive_halving(tr, list(COST), budget=10_000, eta=2, min_days=2)
    assert [len(r["ran"]) for r in st.rungs] == [6, 3, 2]
    assert [r["target_days"] for r in st.rungs] == [2, 4, 8]
    assert st.candidates["c"].status == "winner"
    # survivors continue warm: every (candidate, day) is trained once, in date order, after one bootstrap
    for cid in COST:
        days = [c[2] for c in tr.calls if c[0] == "day" and c[1] == cid]
        assert days == sorted(set(days)) == tr.days[:len(days)]
        assert sum(1 for c in tr.calls if c == ("bootstrap", cid)) == 1
    assert schedule.final_ranking(st)[:3] == ["c", "e", "b"]


@pytest.mark.parametrize("fraction", [0.15, 0.35, 0.55, 0.75, 0.9, 0.99])
def test_halving_never_exceeds_the_budget(fraction):
    full = schedule.successive_halving(FakeTrainer(COST, GAIN), list(COST), budget=10_000).spent
    budget = fraction * full
    tr = FakeTrainer(COST, GAIN)
    st = schedule.successive_halving(tr, list(COST), budget=budget, eta=2, min_days=2)
    assert tr.spent == pytest.approx(st.spent)  # every second the trainer spent is accounted
    assert st.spent <= budget + 1e-9, st.rungs
    assert st.spent < full
    limited = ("budget" in (st.stop_reason or "") or any("shortened" in (r["note"] or "") for r in st.rungs)
               or any(c.status.endswith("budget") for c in st.candidates.values()))
    assert limited, (st.stop_reason, st.rungs)


def test_rung_is_shortened_or_not_started_when_it_does_not_fit():
    tr = FakeTrainer(COST, GAIN)
    full = schedule.successive_halving(FakeTrainer(COST, GAIN), list(COST), budget=10_000)
    need_two_rungs = full.rungs[0]["spent_total"] + full.rungs[1]["spent"]
    st = schedule.successive_halving(tr, list(COST), budget=need_two_rungs - 5.0)
    assert st.spent <= need_two_rungs - 5.0
    assert len(st.rungs) == 2 and st.rungs[1]["target_days"] < 4  # shortened, not overrun
    assert "shortened" in st.rungs[1]["note"]
    st2 = schedule.successive_halving(FakeTrainer(COST, GAIN), list(COST), budget=full.rungs[0]["spent_total"] + 1.0)
    assert len(st2.rungs) == 1 and "budget" in st2.stop_reason


def test_candidate_never_starts_a_unit_beyond_its_allowance():
    tr = FakeTrainer(COST, GAIN)
    st = schedule.new_state(tr, ["c"], 100.0, 2, 2)
    st.candidates["c"].bootstrapped, st.candidates["c"].boot_seconds = True, 8.0
    st.candidates["c"].days = [{"date": tr.days[0].isoformat(), "seconds": 4.0, "student": {}, "teacher": {}}]
    c = schedule.run_candidate(st, tr, "c", 0, target=4, allowance=9.0)  # 2 days of 4 s fit, a third does not
    assert c.days_done == 3 and c.status == "stopped_budget"
    assert sum(1 for x in tr.calls if x[0] == "day") == 2
    c2 = schedule.run_candidate(schedule.new_state(tr, ["b"], 100.0, 2, 2), tr, "b", 0, 2, allowance=1.0)
    assert c2.status == "stopped_budget" and not any(x == ("bootstrap", "b") for x in tr.calls)


def test_ranking_follows_the_student_gain_not_the_teacher_metric():
    # "big" is the better teacher by its own NE, but its student gains less than with "small"
    cost = {"big": (4.0, 2.0), "small": (1.0, 0.5), "mid": (2.0, 1.0)}
    gain = {"big": 0.005, "small": 0.03, "mid": 0.01}
    teacher_ne = {"big": 0.60, "small": 0.85, "mid": 0.70}
    st = schedule.successive_halving(FakeTrainer(cost, gain, teacher_ne), list(cost), budget=1000)
    assert st.rungs[0]["ranked"] == ["small", "mid", "big"]
    assert st.candidates["small"].status == "winner"
    g_big, g_small = (schedule.gains(st, st.candidates[c]) for c in ("big", "small"))
    assert g_big["teacher_ne"] < g_small["teacher_ne"] and g_small["ne_gain"]["mean"] > g_big["ne_gain"]["mean"]


def test_ties_on_ne_gain_break_on_auc_gain():
    st = schedule.new_state(FakeTrainer(COST, GAIN), ["a", "b"], 10, 2, 2)
    for i in range(3):
        day = (START + dt.timedelta(days=i)).isoformat()
        st.control[day] = {"ne": 0.9, "auc": 0.70}
        st.candidates["a"].days.append({"date": day, "seconds": 1, "student": {"ne": 0.89, "auc": 0.71}})
        st.candidates["b"].days.append({"date": day, "seconds": 1, "student": {"ne": 0.89, "auc": 0.72}})
    assert schedule.rank(st, ["a", "b"]) == ["b", "a"]


# ------------------------------------------------------------------ config validation

def _base_cfg(**over):
    data = {"dataset": str(REPO / "configs/movielens.yaml"), "examples_root": "/tmp/x", "search_root": "/tmp/y",
            "budget": {"seconds": 60}, "window": {"bootstrap_end": "1997-10-10", "validation_days": 4},
            "candidates": [{"id": "t1", "model": {"embedding_dim": 4, "hidden": [8]}}]}
    for k, v in over.items():
        node, *rest = k.split(".")
        if rest:
            data[node] = {**data.get(node, {}), rest[0]: v}
        else:
            data[k] = v
    return data


@pytest.mark.parametrize("override, field", [
    ({"budget.seconds": -1}, "budget.seconds"),
    ({"window.bootstrap_end": "not-a-date"}, "window.bootstrap_end"),
    ({"eta": 1}, "eta"),
    ({"candidates": [{"id": "T!", "model": {}}]}, "candidates.0.id"),
    ({"candidates": [{"id": "t1", "model": {"hidden": [8, -1]}}]}, "candidates.0.model.hidden"),
    ({"candidates": [{"id": "t1", "model": {}, "bootstrap_days": 0}]}, "candidates.0.bootstrap_days"),
    ({"proxy_student": {"distill": {"mode": "none"}}}, "proxy_student"),
    ({"budget": {"seconds": 5, "kind": "gpu"}}, "budget.kind"),
    ({"typo_key": 1}, "typo_key"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(SpecError) as e:
        search_from_dict(_base_cfg(**override))
    assert f"field '{field}" in str(e.value)


def test_duplicate_ids_and_grid_expansion():
    with pytest.raises(SpecError, match="repeated"):
        search_from_dict(_base_cfg(candidates=[{"id": "t1", "model": {}}, {"id": "t1", "model": {}}]))
    cfg = search_from_dict(_base_cfg(candidates=[], grid={"embedding_dim": [4, 8], "hidden": [[8], [16, 8]],
                                                          "bootstrap_days": [5, 10]}))
    cands = cfg.all_candidates()
    assert len(cands) == 8 and len({c.id for c in cands}) == 8
    assert {(c.model.embedding_dim, tuple(c.model.hidden), c.bootstrap_days) for c in cands} == {
        (e, h, b) for e in (4, 8) for h in ((8,), (16, 8)) for b in (5, 10)}
    with pytest.raises(SpecError, match="grid"):
        search_from_dict(_base_cfg(candidates=[], grid={"embedding_dim": [1, 2, 3], "max_candidates": 2}))


def test_shipped_config_loads_with_six_or_more_candidates():
    cfg = load_search(REPO / "configs/teacher_search.yaml", {"budget.seconds": 123})
    assert len(cfg.all_candidates()) >= 6 and cfg.budget.seconds == 123 and cfg.primary_task() == "like"
    with pytest.raises(SpecError, match="field 'budget.seconds'"):
        load_search(REPO / "configs/teacher_search.yaml", {"budget.seconds": -5})


# ------------------------------------------------------------------ promotion

def _fake_result(tmp_path: Path) -> Path:
    res = {"kind": "teacher_search_result", "run_id": "r1", "winner": "t8x",
           "teacher": {"candidate": "t8x", "bootstrap_days": 60,
                       "model": {"embedding_dim": 16, "hidden": [128, 64], "hash_buckets": 4096, "epochs": 1}}}
    p = tmp_path / "result.json"
    p.write_text(json.dumps(res))
    return p


def test_promote_does_nothing_without_write_and_only_the_teacher_block_with_it(tmp_path):
    from kdcore.config import load_pipeline
    from kdcore.search.promote import promote

    cfg_path = tmp_path / "pipe.yaml"
    original = (REPO / "configs/demo.yaml").read_text().replace("dataset: movielens.yaml",
                                                                f"dataset: {REPO / 'configs/movielens.yaml'}")
    cfg_path.write_text(original)
    res = _fake_result(tmp_path)
    out = promote(str(res), cfg_path)
    assert not out["written"] and cfg_path.read_text() == original
    assert "+  name: teacher_t8x" in out["diff"] and "-teacher:" in out["diff"]
    # through the command line, without --write: nothing changes either
    from kdcore.cli import main
    assert main(["teacher", "promote", "--search-result", str(res), "--config", str(cfg_path)]) == 0
    assert cfg_path.read_text() == original
    assert main(["teacher", "promote", "--search-result", str(res), "--config", str(cfg_path), "--write"]) == 0
    new = cfg_path.read_text()
    old_lines, new_lines = original.splitlines(), new.splitlines()
    start = next(i for i, line in enumerate(old_lines) if line.startswith("teacher:"))
    assert old_lines[:start] == new_lines[:start]
    assert old_lines[start + 3:] == new_lines[start + 3:]  # everything after the block, comments and anchors included
    cfg = load_pipeline(cfg_path)
    assert cfg.teacher.name == "teacher_t8x" and cfg.teacher.model.hidden == [128, 64]
    before = yaml.safe_load(original)
    after = yaml.safe_load(new)
    assert {k: v for k, v in before.items() if k != "teacher"} == {k: v for k, v in after.items() if k != "teacher"}


def test_promote_refuses_a_result_without_winner(tmp_path):
    from kdcore.search.promote import promote

    p = tmp_path / "r.json"
    p.write_text(json.dumps({"kind": "teacher_search_result", "run_id": "x", "teacher": None}))
    with pytest.raises(SpecError, match="no winner"):
        promote(str(p), REPO / "configs/demo.yaml", write=True)


# ------------------------------------------------------------------ real runs on MovieLens

TINY_MODEL = {"hash_buckets": 512, "batch_size": 512, "lr": 0.005, "epochs": 1}


@pytest.fixture(scope="module")
def ml_examples(tmp_path_factory) -> Path:
    from kdcore.data import movielens

    root = tmp_path_factory.mktemp("ml_examples")
    movielens.publish(str(root), movielens.fetch_widedeep_copy())
    return root


def _tiny_search(examples_root: Path, search_root: Path, budget: float = 400.0) -> dict:
    return {"dataset": str(REPO / "configs/movielens.yaml"), "examples_root": str(examples_root),
            "search_root": str(search_root), "budget": {"seconds": budget},
            "window": {"bootstrap_end": "1997-09-29", "validation_days": 4},
            "proxy_student": {"model": {"embedding_dim": 4, "hidden": [8], **TINY_MODEL}, "bootstrap_days": 5},
            "min_days_per_rung": 2, "eta": 2, "torch_threads": 1,
            "candidates": [
                {"id": "t1x", "model": {"embedding_dim": 4, "hidden": [8], **TINY_MODEL}, "bootstrap_days": 5},
                {"id": "t4x", "model": {"embedding_dim": 8, "hidden": [32, 16], **TINY_MODEL}, "bootstrap_days": 5},
                {"id": "t4x_long", "model": {"embedding_dim": 8, "hidden": [32, 16], **TINY_MODEL},
                 "bootstrap_days": 9}]}


def test_real_search_on_movielens_end_to_end(ml_examples, tmp_path):
    from kdcore.models import registry
    from kdcore.search.run import load_state, run_search
    from kdcore.storage import fs as sfs

    cfg = search_from_dict(_tiny_search(ml_examples, tmp_path / "s"))
    result = run_search(cfg, "e2e")
    assert [len(r["ran"]) for r in result["rungs"]] == [3, 2]  # 3 candidates, 2 rungs, then one remains
    assert [r["target_days"] for r in result["rungs"]] == [2, 4]
    assert result["summary"]["spent_seconds"] <= 400
    ranking = result["ranking"]
    assert ranking[0]["status"] == "winner" and result["winner"] == ranking[0]["id"]
    for r in ranking:
        assert r["params"] > 0 and r["flops_per_example"] > 0 and r["seconds"] > 0
        assert r["ne_gain"]["days"] == r["days"] - 1 and r["days"] in (2, 4)
    # rung-0 order is the proxy student's NE gain over the control
    st = load_state(result["uris"]["result"].rsplit("/report/", 1)[0])
    r0 = st.rungs[0]["ranked"]
    gains0 = [schedule.gains(st, st.candidates[c], upto=2)["ne_gain"]["mean"] for c in r0]
    assert gains0 == sorted(gains0, reverse=True)
    # survivors continued warm: the winner's teacher lineage is one chain from its bootstrap
    run = result["uris"]["result"].rsplit("/report/", 1)[0]
    win = result["winner"]
    last = dt.date.fromisoformat(st.validation_days[st.candidates[win].days_done - 1])
    chain = registry.lineage(sfs.join(run, f"cand={win}"), "movielens", "teacher", last)
    assert len(chain) == st.candidates[win].days_done + 1 and chain[-1].meta.get("bootstrap")
    for key in ("markdown", "plot", "result"):
        assert sfs.exists(result["uris"][key])
    assert sfs.read_bytes(result["uris"]["plot"])[:4] == b"\x89PNG"
    md = sfs.read_bytes(result["uris"]["markdown"]).decode()
    assert f"`{win}` | winner" in md


def test_kd_teacher_search_dag_runs_on_small_data(ml_examples, tmp_path):
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(_tiny_search(ml_examples, tmp_path / "s")))
    home = tmp_path / "airflow"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__UNIT_TEST_MODE="False",
               PYTHONPATH=str(REPO), KD_STORAGE_ROOT=str(tmp_path / "must_not_be_used"),
               KD_CONFIG_DIR=str(tmp_path))
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    # `dags test` never resolves a human-in-the-loop task (it waits for input from an API
    # server): search only here; the approval path runs under a real scheduler in
    # tests/test_hitl_promotion.py
    conf = {"config": str(cfg_path), "budget_seconds": 300, "validation_days": 4, "run_id": "dagrun",
            "request_approval": False}
    proc = subprocess.run([airflow, "dags", "test", "kd_teacher_search", "2024-01-02", "-c", json.dumps(conf)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "s/search/dagrun/report/result.json").read_text())
    assert [len(r["ran"]) for r in result["rungs"]] == [3, 2]
    assert result["winner"] and result["summary"]["spent_seconds"] <= 300
    assert not (tmp_path / "must_not_be_used").exists()
    # invalid params are refused before anything runs
    bad = subprocess.run([airflow, "dags", "test", "kd_teacher_search", "2024-01-03", "-c",
                          json.dumps({"budget_seconds": -1})], env=env, capture_output=True, text=True,
                         timeout=300, cwd=str(REPO))
    assert bad.returncode != 0


def test_search_reuse_follows_the_examples_it_trained_on(ml_examples, tmp_path):
    """The search keys its bootstrap checkpoints on the content of their window, like the
    pipeline's bootstrap: a re-run reuses them, a re-published history day retrains them."""
    import shutil

    from kdcore.data import examples
    from kdcore.models import registry
    from kdcore.search.runner import PipelineTrainer
    from kdcore.storage import partition as part

    root = tmp_path / "examples"
    shutil.copytree(ml_examples, root)
    cfg = search_from_dict(_tiny_search(root, tmp_path / "s"))
    trainer = PipelineTrainer(cfg, "reuse")
    through = trainer.history[-1]

    def versions() -> dict[str, str]:
        trainer.prepare()
        trainer.bootstrap("t1x")
        return {"student": registry.find_checkpoint(trainer.pipeline(None).root, "movielens", "student", through).version,
                "teacher": registry.find_checkpoint(trainer.pipeline("t1x").root, "movielens", "teacher", through).version}

    first = versions()
    assert versions() == first  # same inputs: reused, nothing retrained
    day_uri = examples.examples_uri(str(root), "movielens", through)
    table = part.read_table(day_uri)
    part.publish_table(day_uri, table.slice(0, table.num_rows - 1))  # the history's last day re-published
    second = versions()
    assert second["student"] != first["student"] and second["teacher"] != first["teacher"]
