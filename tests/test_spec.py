"""Dataset spec validation: errors name the file and the field."""

from __future__ import annotations

import pytest

from kdcore.data.spec import DatasetSpec, load_spec
from kdcore.errors import SpecError

HEAD = "name: x\nexample_id: id\ntimestamp: ts\n"
BODY = "group: u\nnumeric: [a]\ntasks: [{name: y, kind: binary}]\n"


def _write(tmp_path, text):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_movielens_spec_loads():
    spec = load_spec("configs/movielens.yaml")
    assert spec.group == "user_id"
    assert [t.kind for t in spec.tasks] == ["binary", "regression"]
    assert (spec.example_id, spec.timestamp, spec.timestamp_unit, spec.date) == ("example_id", "timestamp", None, None)


@pytest.mark.parametrize("text,needle", [
    (HEAD + "group: u\nnumeric: [a]\n", "field 'tasks'"),
    (HEAD + "group: u\nnumeric: [a]\ntasks: [{name: y, kind: ordinal}]\n", "field 'tasks.0.kind'"),
    (HEAD + BODY + "colour: red\n", "field 'colour'"),
    (HEAD + "group: u\nnumeric: [a, a2]\ncategorical: [a]\ntasks: [{name: y, kind: binary}]\n",
     "column 'a' is used as both categorical and numeric"),
    (HEAD + "group: u\ntasks: [{name: y, kind: binary}]\n", "at least one categorical or numeric"),
    ("- just a list\n", "expected a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
    # the id and time columns must be named: no silent default
    ("name: x\ntimestamp: ts\n" + BODY, "field 'example_id': Value error, required key 'example_id' is missing"),
    ("name: x\nexample_id: id\n" + BODY, "field 'timestamp': Value error, required key 'timestamp' is missing"),
    ("name: x\nexample_id: id\ntimestamp:\n" + BODY, "required key 'timestamp' is missing"),
    # '.' and '..' would put examples, labels and quality in one folder
    (HEAD.replace("name: x", "name: '..'") + BODY, "field 'name': Value error, dataset name '..' must not start"),
    (HEAD.replace("name: x", "name: '.'") + BODY, "dataset name '.' must not start with '.'"),
    (HEAD.replace("name: x", "name: .hidden") + BODY, "dataset name '.hidden' must not start"),
    (HEAD.replace("name: x", "name: a/b") + BODY, "field 'name': String should match pattern"),
    # time and date declarations
    (HEAD + "timestamp_unit: sec\n" + BODY, "field 'timestamp_unit': Input should be 's', 'ms', 'us', 'ns' or 'iso'"),
    (HEAD + "date: {column: ds, unit: day}\n" + BODY, "field 'date.unit': Input should be"),
    (HEAD + "date: {unit: date}\n" + BODY, "field 'date.column': Field required"),
    (HEAD + "date: {column: ds, format: x}\n" + BODY, "field 'date.format': Extra inputs"),
    (HEAD + "date: {column: ''}\n" + BODY, "field 'date.column'"),
    (HEAD + "date: {column: ts}\n" + BODY, "field 'date': Value error, column 'ts' is the timestamp column"),
])
def test_bad_spec_names_file_and_field(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert str(p) in str(e.value)
    assert needle in str(e.value)


def test_names_with_dots_inside_are_fine(tmp_path):
    assert load_spec(_write(tmp_path, HEAD.replace("name: x", "name: shop.v2-eu_1") + BODY)).name == "shop.v2-eu_1"


def test_date_declaration_defaults(tmp_path):
    spec = load_spec(_write(tmp_path, HEAD + "timestamp_unit: ms\ndate: {column: ds}\n" + BODY))
    assert (spec.timestamp_unit, spec.date.column, spec.date.unit) == ("ms", "ds", "date")
    assert "ds" not in spec.required_columns  # read by ingest, not part of the contract


def test_specs_built_in_code_keep_the_defaults():
    spec = DatasetSpec(name="x", group="u", numeric=["a"], tasks=[{"name": "y", "kind": "binary"}])
    assert (spec.example_id, spec.timestamp) == ("example_id", "timestamp")
    with pytest.raises(ValueError, match="must not start with '.'"):
        DatasetSpec(name="..", group="u", numeric=["a"], tasks=[{"name": "y", "kind": "binary"}])


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read config file"):
        load_spec(tmp_path / "nope.yaml")
