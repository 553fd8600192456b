"""``python -m studio [streamlit flags]``: start the app with a head start.

The same as ``streamlit run app.py [flags]``, except that :func:`studio.warm.start` imports torch
and ``nrrdd_core``, loads the built-in dataset and runs the teacher once while the server boots
and the browser connects (measured in ``bench/ui_speed.py``).
"""

import os
import sys
from pathlib import Path

# Before torch is imported (see app.py): idle OpenMP threads sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    from streamlit.web import cli

    from studio import warm

    app = Path(__file__).resolve().parents[1] / "app.py"
    warm.start()
    sys.argv = ["streamlit", "run", str(app), *(sys.argv[1:] if argv is None else argv)]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
