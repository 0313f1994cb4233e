"""Values that reach paths are confined: kdcore.paths' helpers (``..`` and symlink escapes,
foreign schemes, gs:// prefixes), the teacher search DAG's params (config, root, run_id)
and the names used as path segments (teacher, students, controls, candidates). Every
refusal names the parameter or field at fault."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kdcore.errors import SpecError
from kdcore.paths import confine_path, confine_uri, is_safe_name, safe_name

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-token-do-not-log"


# ------------------------------------------------------------------ safe_name


@pytest.mark.parametrize("bad", [".", "..", "a/b", "../x", "x/..", "/abs", "", "-x", ".hidden", "a\\b",
                                 "a b", "x" * 200, None, 3])
def test_safe_name_refuses_non_segments(bad):
    assert not is_safe_name(bad)
    with pytest.raises(SpecError, match="field 'teacher.name'"):
        safe_name(bad, "field 'teacher.name'")


def test_safe_name_accepts_segments():
    for good in ("t1x", "student_aux", "a.b-c", "_x", "2024-01-02", "manual__2024-01-02T00_00"):
        assert safe_name(good, "params.run_id") == good
    with pytest.raises(SpecError, match=r"params\.run_id: '\.\.'"):
        safe_name("..", "params.run_id")


# ------------------------------------------------------------------ confine_path


@pytest.fixture
def tree(tmp_path):
    """allowed/ (with a file and an escaping symlink) next to outside/ (with a secret)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.yaml").write_text("a: 1\n")
    (outside / "secret.yaml").write_text(f"token: [{SECRET}\n")  # invalid YAML quoting the secret
    (allowed / "link.yaml").symlink_to(outside / "secret.yaml")
    (allowed / "linkdir").symlink_to(outside, target_is_directory=True)
    return allowed, outside


def test_confine_path_refuses_dotdot_escape(tree):
    allowed, _ = tree
    with pytest.raises(SpecError, match=r"^params\.config: .*outside the allowed folder") as e:
        confine_path(allowed / ".." / "outside" / "secret.yaml", allowed, "params.config")
    assert str(allowed.resolve()) in str(e.value)
    assert confine_path(allowed / "sub" / ".." / "ok.yaml", allowed, "params.config") == (allowed / "ok.yaml").resolve()


def test_confine_path_refuses_symlink_escape(tree):
    allowed, _ = tree
    for p in (allowed / "link.yaml", allowed / "linkdir" / "secret.yaml"):
        with pytest.raises(SpecError, match=r"^params\.config: .*outside the allowed folder"):
            confine_path(p, allowed, "params.config")


def test_confine_path_refuses_absolute_outside_and_prefix_sibling(tree, tmp_path):
    allowed, _ = tree
    sibling = tmp_path / "allowed_evil"  # shares the prefix 'allowed' but is not under it
    sibling.mkdir()
    for p in ("/etc/passwd", sibling / "x.yaml", "bad\0path"):
        with pytest.raises(SpecError, match=r"^params\.config: "):
            confine_path(p, allowed, "params.config")


def test_confine_path_through_a_symlinked_allowed_dir(tree, tmp_path):
    allowed, _ = tree
    alias = tmp_path / "alias"
    alias.symlink_to(allowed, target_is_directory=True)
    assert confine_path(alias / "ok.yaml", alias, "params.config") == (allowed / "ok.yaml").resolve()
    with pytest.raises(SpecError, match=r"^params\.config: "):
        confine_path(alias / "link.yaml", alias, "params.config")


# ------------------------------------------------------------------ confine_uri


def test_confine_uri_refuses_file_etc_passwd(tmp_path):
    root = str(tmp_path / "store")
    for bad in ("file:///etc/passwd", "/etc", "file:///etc", "file:///"):
        with pytest.raises(SpecError, match=r"^params\.root: .*outside the allowed storage root") as e:
            confine_uri(bad, [root], "params.root")
        assert bad in str(e.value) and str(tmp_path / "store") in str(e.value)


def test_confine_uri_refuses_dotdot_and_symlink_escapes(tmp_path):
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    (store / "escape").symlink_to(outside, target_is_directory=True)
    for bad in (f"{store}/../outside", f"file://{store}/a/../../outside", f"{store}/escape",
                f"{store}/escape/sub", f"{store}_evil"):
        with pytest.raises(SpecError, match=r"^params\.root: .*outside the allowed storage root"):
            confine_uri(bad, [str(store)], "params.root")


def test_confine_uri_accepts_sub_roots(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    assert confine_uri(str(store), [str(store)], "params.root") == f"file://{store.resolve()}"
    assert confine_uri(f"{store}/search/x/", [f"file://{store}"], "params.root") == f"file://{store.resolve()}/search/x"
    assert confine_uri(f"file://{store}/a/../b", [str(store)], "params.root") == f"file://{store.resolve()}/b"
    assert confine_uri("gs://bkt/kd/sub", ["gs://bkt/kd/"], "params.root") == "gs://bkt/kd/sub"
    with pytest.raises(SpecError, match=r"^params\.root: "):
        confine_uri("gs://bkt/kd/sub", [str(store)], "params.root")  # scheme mismatch


def test_confine_uri_gs_prefix_escapes(tmp_path):
    roots = ["gs://bkt/kd", str(tmp_path)]
    for bad in ("gs://bkt/kd-evil", "gs://bkt/kdx/sub", "gs://bkt", "gs://other/kd", "gs://bkt/kd/../etc",
                "gs://bkt/kd/./x", "gs://bkt/kd/%2E%2E/etc", "gs:///kd", "s3://bkt/kd", "GS://bkt/kd/x"):
        with pytest.raises(SpecError, match=r"^params\.root: ") as e:
            confine_uri(bad, roots, "params.root")
        assert bad in str(e.value)


def test_confine_uri_without_roots_refuses(tmp_path):
    with pytest.raises(SpecError, match=r"^params\.root: .*no allowed storage root"):
        confine_uri(str(tmp_path), [], "params.root")
    with pytest.raises(SpecError, match=r"^params\.root: "):
        confine_uri("", [str(tmp_path)], "params.root")


# ------------------------------------------------------------------ the teacher search DAG's params


@pytest.fixture
def search_env(tmp_path, monkeypatch):
    """A configs folder (KD_CONFIG_DIR) with a valid search config whose search_root is
    tmp/store, a deployment root tmp/deploy (KD_STORAGE_ROOT), and an outside folder."""
    configs, store, deploy, outside = (tmp_path / n for n in ("configs", "store", "deploy", "outside"))
    for d in (configs, store, deploy, outside):
        d.mkdir()
    data = {"dataset": str(REPO / "configs/movielens.yaml"), "examples_root": str(store),
            "search_root": "../store", "budget": {"seconds": 10},
            "window": {"bootstrap_end": "1997-09-29", "validation_days": 4},
            "candidates": [{"id": "t1x", "model": {"embedding_dim": 4, "hidden": [8]}}]}
    (configs / "search.yaml").write_text(yaml.safe_dump(data))
    (outside / "search.yaml").write_text(yaml.safe_dump(data))
    (outside / "broken.yaml").write_text(f"token: [{SECRET}\n")
    (configs / "escape.yaml").symlink_to(outside / "broken.yaml")
    monkeypatch.setenv("KD_CONFIG_DIR", str(configs))
    monkeypatch.setenv("KD_STORAGE_ROOT", str(deploy))
    return {"configs": configs, "store": store, "deploy": deploy, "outside": outside}


def _validate(params):
    from operators.teacher_search import validate_params

    return validate_params(params, "manual__2024-01-02T00:00:00+00:00")


def test_search_config_param_confined_to_the_configs_folder(search_env):
    cfg, run_id = _validate({"config": "search.yaml"})
    assert cfg.root == f"file://{search_env['store'].resolve()}" and run_id == "manual__2024-01-02T00_00_00_00_00"
    outside = search_env["outside"]
    for bad in (str(outside / "search.yaml"), "../outside/search.yaml", "/etc/passwd", "escape.yaml",
                str(outside / "broken.yaml"), "configs/teacher_search.yaml"):  # repo configs/ is not KD_CONFIG_DIR
        with pytest.raises(SpecError, match=r"^params\.config: .*outside the allowed folder") as e:
            _validate({"config": bad})
        assert str(search_env["configs"].resolve()) in str(e.value)


def test_refused_config_is_never_quoted(search_env):
    """A file outside the folder is refused before it is read: its (invalid YAML)
    content, which a YAML error would quote, never reaches the message."""
    for bad in (str(search_env["outside"] / "broken.yaml"), "escape.yaml"):
        with pytest.raises(SpecError, match=r"^params\.config: ") as e:
            _validate({"config": bad})
        assert SECRET not in str(e.value)


def test_search_config_param_default_and_repo_form(monkeypatch):
    monkeypatch.delenv("KD_CONFIG_DIR", raising=False)
    from operators.teacher_search import _config_path

    expected = str((REPO / "configs/teacher_search.yaml").resolve())
    assert _config_path(None) == _config_path("teacher_search.yaml") == _config_path("configs/teacher_search.yaml") == expected
    with pytest.raises(SpecError, match=r"^params\.config: "):
        _config_path("configs/../pyproject.toml")


def test_search_root_param_confined(search_env):
    store, deploy = search_env["store"].resolve(), search_env["deploy"].resolve()
    cfg, _ = _validate({"config": "search.yaml", "root": str(store / "sub")})
    assert cfg.root == f"file://{store}/sub"
    cfg, _ = _validate({"config": "search.yaml", "root": "../store/sub2"})  # relative: to the config's folder
    assert cfg.root == f"file://{store}/sub2"
    cfg, _ = _validate({"config": "search.yaml", "root": f"file://{deploy}/search_runs"})  # under KD_STORAGE_ROOT
    assert cfg.root == f"file://{deploy}/search_runs"
    for bad in ("file:///etc/passwd", "file:///etc", "/etc", "../outside", f"{store}/../outside",
                "gs://bkt/kd", "s3://bkt/kd", f"{store}_evil"):
        with pytest.raises(SpecError, match=r"^params\.root: ") as e:
            _validate({"config": "search.yaml", "root": bad})
        assert bad in str(e.value)


def test_search_root_param_without_kd_storage_root(search_env, monkeypatch):
    monkeypatch.delenv("KD_STORAGE_ROOT")
    with pytest.raises(SpecError, match=r"^params\.root: .*outside the allowed storage root") as e:
        _validate({"config": "search.yaml", "root": str(search_env["deploy"])})
    assert str(search_env["store"].resolve()) in str(e.value)


def test_search_run_id_is_one_path_segment(search_env):
    from operators.teacher_search import run_id_for

    # ids derived from the DAG run id are made safe, not refused
    assert run_id_for(None, "../../etc") == "_.._etc" and run_id_for(None, "..") == "run"
    for bad in ("..", ".", "a/b", "../x", "-x"):
        with pytest.raises(SpecError, match=r"^params\.run_id: "):
            _validate({"config": "search.yaml", "run_id": bad})


# ------------------------------------------------------------------ names used as path segments


def _pipeline(**over):
    data = {"dataset": str(REPO / "configs/movielens.yaml"), "storage_root": "/tmp/x",
            "students": [{"name": "student_aux"}]}
    data.update(over)
    return data


@pytest.mark.parametrize("bad", [".", "..", "a/b", "../x", "Teacher", "x.y"])
def test_model_names_are_safe_segments(bad):
    from kdcore.config import PipelineConfig
    from kdcore.search.config import search_from_dict
    from kdcore.yamlconf import validate

    with pytest.raises(SpecError, match=r"field 'teacher\.name'"):
        validate(PipelineConfig, _pipeline(teacher={"name": bad}), "pipeline.yaml")
    with pytest.raises(SpecError, match=r"field 'students\.0\.name'"):
        validate(PipelineConfig, _pipeline(students=[{"name": bad}]), "pipeline.yaml")
    search = {"dataset": str(REPO / "configs/movielens.yaml"), "examples_root": "/tmp/x", "search_root": "/tmp/y",
              "budget": {"seconds": 1}, "window": {"bootstrap_end": "1998-01-01"},
              "candidates": [{"id": bad, "model": {}}]}
    with pytest.raises(SpecError, match=r"field 'candidates\.0\.id'"):
        search_from_dict(search)


def test_names_stay_safe_even_if_the_pattern_is_loosened():
    """The safe-segment check stands behind the name patterns: a subclass that drops
    the pattern still refuses '.', '..' and '/', naming the field."""
    from pydantic import Field

    from kdcore.config import StudentConfig, TeacherConfig
    from kdcore.search.config import Candidate
    from kdcore.yamlconf import validate

    class LooseTeacher(TeacherConfig):
        name: str = Field("teacher")

    class LooseStudent(StudentConfig):
        name: str

    class LooseCandidate(Candidate):
        id: str

    for bad in (".", "..", "a/b"):
        with pytest.raises(SpecError, match="field 'name'"):
            validate(LooseTeacher, {"name": bad}, "t")
        with pytest.raises(SpecError, match="field 'name'"):
            validate(LooseStudent, {"name": bad}, "s")
        with pytest.raises(SpecError, match="field 'id'"):
            validate(LooseCandidate, {"id": bad, "model": {}}, "c")
    assert validate(LooseTeacher, {"name": "Teacher.v2"}, "t").name == "Teacher.v2"


def test_control_names_are_safe_segments():
    from kdcore.config import PipelineConfig
    from kdcore.yamlconf import validate

    cfg = validate(PipelineConfig, _pipeline(students=[{"name": "a", "model": {"embedding_dim": 4}},
                                                        {"name": "b", "model": {"embedding_dim": 8}}]), "p")
    assert [safe_name(n, f"control '{n}'") for n in cfg.controls()] == ["control_0", "control_1"]
    with pytest.raises(SpecError, match=r"field 'students'.*control"):
        validate(PipelineConfig, _pipeline(students=[{"name": "control"}]), "p")


def test_helpers_never_touch_the_filesystem(tmp_path):
    """Confinement resolves but does not create or read: a missing sub-root is fine."""
    root = tmp_path / "store"
    assert confine_uri(str(root / "new" / "sub"), [str(root)], "params.root").endswith("/store/new/sub")
    assert not root.exists()
    with pytest.raises(SpecError, match=r"^params\.root: "):
        confine_uri(str(tmp_path / "elsewhere"), [str(root)], "params.root")
    assert os.listdir(tmp_path) == []
