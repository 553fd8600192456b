"""``python -m studio [streamlit flags]``: start the app with a head start.

The same as ``streamlit run app.py [flags]``, except that :func:`studio.warm.start` starts the
background import of torch and ``nrrdd_core`` as soon as the server is up, timed by the first
page (see :mod:`studio.warm`; measured in ``bench/ui_speed.py``). ``nrrdd ui [flags]`` runs this
too, also from a non-editable install (the app's script and pages are package data).
"""

import os
import sys
from pathlib import Path

# Before torch is imported (see app.py): idle OpenMP threads sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Streamlit runs a full gc.collect(2) after every script run, fragment polls included; with
# torch's object graph in the heap that holds the GIL for most of each poll and starves the
# refinement worker thread (py-spy: 93% of GIL samples in ScriptRunner._on_script_finished).
# Python's own generational GC still runs. .streamlit/config.toml says the same for
# `streamlit run app.py`; this covers `nrrdd ui` from any folder.
os.environ.setdefault("STREAMLIT_RUNNER_POST_SCRIPT_GC", "false")


def app_script() -> Path:
    """The app's main script: ``app.py`` at the repository root in a checkout (and an editable
    install), else the installed copy ``studio/streamlit_app/app.py`` (package data, with its
    ``app_pages/`` and ``.streamlit/config.toml`` beside it, see pyproject.toml).

    Raises:
        FileNotFoundError: neither exists (a broken install).
    """
    here = Path(__file__).resolve().parent
    for path in (here.parent / "app.py", here / "streamlit_app" / "app.py"):
        if path.is_file() and (path.parent / "app_pages").is_dir():
            return path
    raise FileNotFoundError(f"the app's app.py is missing beside {here}; reinstall nrrdd-studio")


def main(argv: list[str] | None = None) -> int:
    """``streamlit run APP [argv]`` after starting the warm-up; returns Streamlit's exit code."""
    from streamlit.web import cli

    from studio import warm

    app = app_script()
    warm.start()  # imports torch in the background once the server is up (studio.warm)
    sys.argv = ["streamlit", "run", str(app), *(sys.argv[1:] if argv is None else argv)]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
