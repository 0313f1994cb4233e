"""Dataset spec validation: errors name the file and the field."""

from __future__ import annotations

import pytest

from kdcore.data.spec import load_spec
from kdcore.errors import SpecError


def _write(tmp_path, text):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_movielens_spec_loads():
    spec = load_spec("configs/movielens.yaml")
    assert spec.group == "user_id"
    assert [t.kind for t in spec.tasks] == ["binary", "regression"]


@pytest.mark.parametrize("text,needle", [
    ("name: x\ngroup: u\nnumeric: [a]\n", "field 'tasks'"),
    ("name: x\ngroup: u\nnumeric: [a]\ntasks: [{name: y, kind: ordinal}]\n", "field 'tasks.0.kind'"),
    ("name: x\ngroup: u\nnumeric: [a]\ntasks: [{name: y, kind: binary}]\ncolour: red\n", "field 'colour'"),
    ("name: x\ngroup: u\nnumeric: [a, a2]\ncategorical: [a]\ntasks: [{name: y, kind: binary}]\n",
     "column 'a' is used as both categorical and numeric"),
    ("name: x\ngroup: u\ntasks: [{name: y, kind: binary}]\n", "at least one categorical or numeric"),
    ("- just a list\n", "expected a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_bad_spec_names_file_and_field(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert str(p) in str(e.value)
    assert needle in str(e.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read config file"):
        load_spec(tmp_path / "nope.yaml")
