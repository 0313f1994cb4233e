"""The code's structure, checked: no module reaches into another module's private names
(``mod._name`` where ``mod`` is one of the project's own modules), so every caller goes
through the contract the callee publishes."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OWN = ("kdcore", "operators", "plugins", "dags", "kd_ui")


def private_uses(paths: list[Path], root: Path = REPO) -> list[str]:
    hits = []
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        own: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                own |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith(OWN)}
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(OWN)):
                own |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in own
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                hits.append(f"{path.relative_to(root)}:{node.lineno}: {node.value.id}.{node.attr}")
    return hits


def test_no_module_uses_another_modules_private_names():
    paths = sorted(p for d in ("kdcore", "operators", "plugins", "dags") for p in (REPO / d).rglob("*.py"))
    assert len(paths) > 50
    assert private_uses(paths) == []


def test_the_check_sees_a_private_use(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("from kdcore.training import steps\nsteps._seed(None, None)\nx = steps.seed\n")
    assert private_uses([bad], tmp_path) == ["probe.py:2: steps._seed"]
