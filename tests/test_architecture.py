"""The layering described in docs/ARCHITECTURE.md ("Packages and what they may import"): every
import of the library, the front end and the benches, read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_BASE = {"errors"}
_CORE = _BASE | {"configs", "device", "io"}
#: nrrdd_core module or subpackage -> the nrrdd_core modules / subpackages it may import
MAY_IMPORT = {
    "errors": set(),
    "configs": _BASE, "device": _BASE, "io": _BASE,
    "augment": _BASE, "display": _BASE, "cam": _BASE | {"display"}, "dsa": _BASE, "losses": _BASE,
    "data": _CORE,
    "models": _CORE | {"data"},
    "zca": _CORE | {"data"},
    "diagnostics": _CORE | {"data", "models"},
    "labels": _CORE | {"data", "models", "augment", "losses"},
    "unroll": _CORE | {"models", "dsa", "losses"},
    "experts": _CORE | {"data", "models", "dsa", "losses", "zca"},
    "methods": _CORE | {"data", "models", "augment", "cam", "dsa", "losses", "labels", "zca",
                        "experts", "unroll", "diagnostics"},
    "distributed": _CORE | {"data", "models", "experts", "methods"},
    "evaluate": _CORE | {"data", "models", "augment", "dsa", "losses", "labels", "zca",
                         "distributed"},
    "metrics": _CORE | {"data", "models", "cam"},
    "export": _CORE | {"data", "models", "labels"},
    "compare": _CORE | {"data", "models", "methods", "evaluate"},
}
FRONT_END = ("streamlit", "studio", "app_pages")


def _imports(path: Path) -> set[str]:
    """Absolute dotted names imported by ``path`` (imports under ``if TYPE_CHECKING:`` left out)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(REPO).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def _unit(path: Path) -> str:
    """``cam`` for nrrdd_core/cam.py, ``methods`` for nrrdd_core/methods/edf.py."""
    return path.relative_to(REPO / "nrrdd_core").parts[0].removesuffix(".py")


def test_library_layers():
    bad = []
    for path in sorted((REPO / "nrrdd_core").rglob("*.py")):
        unit = _unit(path)
        if unit in ("__init__", "cli", "__main__"):
            continue
        allowed = MAY_IMPORT[unit] | {unit}
        for name in _imports(path):
            top = name.split(".")[0]
            assert top not in FRONT_END, f"{path}: the library imports {name}"
            if top == "nrrdd_core" and name != "nrrdd_core":
                dep = name.split(".")[1]
                if dep not in allowed:
                    bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "imports against the layering of docs/ARCHITECTURE.md:\n" + "\n".join(bad)


def test_every_library_unit_has_a_layer():
    units = {_unit(p) for p in (REPO / "nrrdd_core").glob("*")
             if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file())}
    assert units - {"__init__", "cli", "__main__"} == set(MAY_IMPORT)


def test_front_end_and_benches_point_down():
    """studio never imports the pages; benches and scripts never import the pages."""
    for folder, banned in (("studio", ("app_pages",)), ("bench", ("app_pages",)),
                           ("scripts", ("app_pages",))):
        for path in (REPO / folder).rglob("*.py"):
            for name in _imports(path):
                assert name.split(".")[0] not in banned, f"{path} imports {name}"
