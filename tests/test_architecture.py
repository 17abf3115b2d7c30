"""The folder tree is the architecture: each part of seeds_tf imports only the parts below it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "seeds_tf"

# Each part and the parts it may import. The face (api.py, cli.py, service/) is on top and may use
# everything; core is the ground floor and uses nothing of seeds_tf but the package's version.
BELOW = {
    "core": set(),
    "hosting": {"core"},
    "data": {"core"},
    "classifier": {"core", "data"},
    "prediction": {"core", "data", "classifier"},
    "learning": {"core", "hosting", "data", "classifier", "prediction"},
    "face": {"core", "hosting", "data", "classifier", "prediction", "learning", "service"},
}
BELOW["service"] = BELOW["face"] - {"service"}


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else "face"


def _imported_parts(path: Path) -> set[tuple[int, str]]:
    """(line, part) for every import of a seeds_tf part in the module, lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seeds_tf"):
            names = node.module.split(".")[1:2] or [alias.name for alias in node.names]
            found |= {(node.lineno, name) for name in names}
        elif isinstance(node, ast.Import):
            found |= {
                (node.lineno, alias.name.split(".")[1])
                for alias in node.names
                if alias.name.startswith("seeds_tf.")
            }
    faces = {"api", "cli"}
    return {(line, "face" if name in faces else name) for line, name in found if name != "__version__"}


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_known_part():
    assert {_part(path) for path in MODULES} == set(BELOW)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_point_down(path):
    part = _part(path)
    upward = [
        f"line {line}: {part} imports {target}"
        for line, target in sorted(_imported_parts(path))
        if target != part and target not in BELOW[part]
    ]
    assert upward == [], f"{path.relative_to(PACKAGE)} imports a part above it"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule itself: a data module that imports training is caught."""
    module = tmp_path / "module.py"
    module.write_text("def f():\n    from seeds_tf.learning import training\n")
    assert _imported_parts(module) == {(2, "learning")}
    assert "learning" not in BELOW["data"]


PLAIN = ("core", "hosting", "data/images.py", "data/sources.py", "data/splits.py", "data/datasets.py")
"""Modules that the DEEPaaS server process and the CLI load before any model: no TensorFlow or
Keras at import, which would cost seconds and hundreds of MiB where no model runs."""


@pytest.mark.parametrize("prefix", PLAIN)
def test_plain_modules_do_not_import_tensorflow(prefix):
    modules = [path for path in MODULES if str(path.relative_to(PACKAGE)).startswith(prefix)]
    assert modules
    heavy = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path in modules
        for node in ast.parse(path.read_text()).body  # module level only: lazy imports are the point
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            name.split(".")[0] in {"tensorflow", "keras"}
            for name in (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
        )
    ]
    assert heavy == []
