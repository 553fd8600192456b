"""Packaging: a non-editable ``pip install .`` from a copy of the repository, in a fresh virtual
environment that sees only the declared dependencies, gives a working ``nrrdd`` (help, a distill
with the shipped teacher, ``nrrdd ui --help``) and a working app; pyproject.toml lists every
package folder; the shipped teacher's metadata matches it; no import guard turns a deleted
module into a silent skip."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
#: Not copied into the temporary source tree (build outputs, caches, the checkout's venv).
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "__pycache__",
                                     "*.egg-info", ".pytest_cache", ".ruff_cache", "test-results",
                                     ".cache", "out", "cache", "screenshots")


def _dist_closure(requirements: list[str]) -> set[str]:
    """Names of the installed distributions that ``requirements`` need, transitively (markers
    evaluated for this interpreter and the extras asked for)."""
    seen: set[tuple[str, str]] = set()  # (distribution, extra or "")
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, parent_extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": parent_extra}):
            continue
        dist = md.distribution(req.name)
        name = dist.metadata["Name"].lower().replace("_", "-")
        for extra in ("", *sorted(req.extras)):
            if (name, extra) not in seen:
                seen.add((name, extra))
                todo.extend((Requirement(r), extra) for r in dist.requires or [])
    return {name for name, _ in seen}


def _link_dists(names: set[str], view: Path) -> None:
    """Symlink the top-level files and folders of the installed distributions ``names`` into
    ``view`` (a site folder holding these packages only)."""
    view.mkdir(exist_ok=True)
    for name in sorted(names):
        dist = md.distribution(name)
        site = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in tops:
            if (site / top).exists() and not (view / top).exists():
                (view / top).symlink_to(site / top)


def _run(venv: Path, *args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_pip_install_from_a_copy_in_a_fresh_venv(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE, symlinks=True)
    # The fresh venv sees only the declared runtime dependencies (and pip/setuptools to build),
    # linked from this environment: nothing is downloaded.
    view = tmp_path / "site"
    _link_dists(_dist_closure(PYPROJECT["project"]["dependencies"] + ["pip", "setuptools"]), view)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_declared_deps.pth").write_text(f"{view}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(NRRDD_CACHE=str(tmp_path / "cache"), OMP_WAIT_POLICY="PASSIVE",
               PIP_DISABLE_PIP_VERSION_CHECK="1", NRRDD_STUDIO_TINY="1")
    work = tmp_path / "work"  # not the checkout: nothing importable from the current folder
    work.mkdir()

    r = _run(venv, "python", "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation",
             str(src), cwd=work, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(venv, "python", "-c", "import nrrdd_core, studio.__main__ as m; "
             "print(nrrdd_core.__file__); print(m.app_script())", cwd=work, env=env)
    core, app = r.stdout.split()
    assert core.startswith(purelib) and app.startswith(purelib), r.stdout + r.stderr

    r = _run(venv, "nrrdd", "--help", cwd=work, env=env)
    assert r.returncode == 0 and "distill" in r.stdout and "ui" in r.stdout, r.stderr[-3000:]
    r = _run(venv, "nrrdd", "distill", "--method", "rded", "--ipc", "1", "--classes", "circle",
             "--dataset-opt", "train_per_class=20", "--dataset-opt", "test_per_class=2",
             "--mipc", "4", "--num-crops", "2", "--out", str(tmp_path / "runs"), "--name", "r",
             cwd=work, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "runs" / "r" / "manifest.json").read_text())
    assert manifest["teacher"]["ref"] == "shipped" and manifest["teacher"]["test_acc"] > 0.9
    r = _run(venv, "nrrdd", "ui", "--help", cwd=work, env=env)
    assert r.returncode == 0 and "streamlit run" in r.stdout, r.stderr[-3000:]
    r = _run(venv, "nrrdd", "ui", "--server.headless", "true", cwd=work, env=env)
    assert r.returncode == 2 and "nrrdd-studio[app]" in r.stderr  # no Streamlit: a clear error

    # With the app extra's dependencies too, the installed app runs its Setup page.
    _link_dists(_dist_closure(PYPROJECT["project"]["optional-dependencies"]["app"]), view)
    script = ("from streamlit.testing.v1 import AppTest; import studio.__main__ as m; "
              "at = AppTest.from_file(str(m.app_script()), default_timeout=300).run(); "
              "assert not at.exception, at.exception; "
              "print([t.value for t in at.title], [s.value for s in at.success])")
    r = _run(venv, "python", "-c", script, cwd=work, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Setup" in r.stdout and "Matches the dataset" in r.stdout, r.stdout


def test_every_package_folder_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts)
             for top in ("nrrdd_core", "studio") for p in (REPO / top).rglob("*.py")
             if "__pycache__" not in p.parts and "streamlit_app" not in p.parts}
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {found - listed}"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"studio.streamlit_app": "."}


def test_declared_dependencies_cover_third_party_imports():
    """Every third-party module that the library, the app helpers and the pages import is a
    declared dependency (runtime for nrrdd_core, runtime + app for studio and the pages)."""
    declared = {Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}
    app = {Requirement(r).name for r in PYPROJECT["project"]["optional-dependencies"]["app"]}
    module_of = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "pillow",
                 "tqdm": "tqdm", "cv2": "opencv-python-headless", "pytorch_grad_cam": "grad-cam",
                 "streamlit": "streamlit", "plotly": "plotly", "pandas": "pandas"}
    local = {"nrrdd_core", "studio", "app_pages"}
    for folder, allowed in (("nrrdd_core", declared), ("studio", declared | app),
                            ("app_pages", declared | app)):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
            mods |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
            for mod in mods - local:
                if mod in sys.stdlib_module_names or mod == "__future__":
                    continue
                assert mod in module_of, f"{path}: imports {mod}, not a declared dependency"
                assert module_of[mod] in allowed, f"{path}: {mod} ({module_of[mod]}) undeclared"


def test_shipped_teacher_is_package_data_with_its_metadata():
    import hashlib

    from nrrdd_core.models.train import SHIPPED_METADATA, SHIPPED_TEACHER, shipped_metadata

    assert SHIPPED_TEACHER.is_file() and "nrrdd_core" in str(SHIPPED_TEACHER)
    meta = json.loads(SHIPPED_METADATA.read_text())
    raw = SHIPPED_TEACHER.read_bytes()
    assert meta["sha256"] == hashlib.sha256(raw).hexdigest() and meta["bytes"] == len(raw)
    assert meta == shipped_metadata(Path(str(SHIPPED_TEACHER)))
    assert meta["arch"] == "resnet20_cifar" and meta["test_acc"] >= 0.9


def test_no_import_guards_hide_missing_modules():
    """A deleted module must fail loudly: no ``find_spec`` checks or ImportError handlers around
    our own modules (the one handler left turns a missing Streamlit into a one-line error)."""
    allowed = {("nrrdd_core/cli.py", "except ModuleNotFoundError as exc:")}
    guard = re.compile(r"find_spec\(|except\s*\(?\s*(?:ModuleNotFoundError|ImportError)[^\n]*")
    found = set()
    for folder in ("nrrdd_core", "studio", "app_pages", "tests", "bench", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if rel == "tests/test_packaging.py":
                continue
            for m in guard.finditer(path.read_text()):
                found.add((rel, m.group(0).strip()))
    assert found <= allowed, sorted(found - allowed)


def test_nrrdd_ui_starts_the_app_script(monkeypatch):
    """``nrrdd ui FLAGS`` runs ``streamlit run <app.py> FLAGS`` (flags untouched)."""
    import streamlit.web.cli

    import studio.warm
    from nrrdd_core.cli import main

    seen = {}
    monkeypatch.setattr(studio.warm, "start", lambda: None)
    monkeypatch.setattr(streamlit.web.cli, "main", lambda: seen.setdefault("argv", list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["nrrdd"])
    main(["ui", "--server.port", "8599", "--server.headless", "true"])
    assert seen["argv"] == ["streamlit", "run", str(REPO / "app.py"), "--server.port", "8599",
                            "--server.headless", "true"]
