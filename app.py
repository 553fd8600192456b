"""NRR-DD Studio: a browser workbench for dataset distillation.

Run with ``make run`` (``python -m studio``: ``streamlit run app.py`` with a start-up warm-up).
The pages live in ``app_pages/``, not ``pages/``: Streamlit runs a ``pages/`` folder next to the
main script in its old multipage mode, where a deep link such as ``/explorer`` on a fresh server
would run that page without this file (no navigation, no setup from the URL). The shared UI code is in ``studio/``; all computation in
``nrrdd_core``.
"""

import os

# Before torch is imported: idle OpenMP threads must sleep, not spin. The server runs torch in
# several threads (script runs, one worker per job); with GNU OpenMP's default spin-wait, the
# idle teams of the other threads take the 2 cores from the busy one (measured: a CIDD step
# 5-6 s instead of 0.4 s, a 512x512 matmul loop 2.0 s instead of 0.2 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from studio import warm  # noqa: E402 - light: the background imports wait on its events

import streamlit as st  # noqa: E402

from studio import setup, widgets  # noqa: E402

# a local icon: a Material icon name would make the browser fetch it from fonts.gstatic.com
# (errors offline); an image is served by the app itself
st.set_page_config(page_title="NRR-DD Studio", page_icon=widgets.app_icon(), layout="wide")
st.html(widgets.PIXELATED_CSS)

setup.init_session()
setup.write_url()
warm.start(after_server=False)  # background imports, once per process (studio.warm)

page = st.navigation([
    st.Page("app_pages/1_setup.py", title="Setup", icon=":material/tune:", url_path="setup",
            default=True),
    st.Page("app_pages/2_explorer.py", title="Grad-CAM explorer", icon=":material/visibility:",
            url_path="explorer"),
    st.Page("app_pages/3_refine.py", title="Refine live", icon=":material/auto_fix_high:",
            url_path="refine"),
    st.Page("app_pages/4_compare.py", title="Compare", icon=":material/compare:",
            url_path="compare"),
    st.Page("app_pages/5_evaluate.py", title="Evaluate", icon=":material/school:",
            url_path="evaluate"),
    st.Page("app_pages/6_runs.py", title="Runs", icon=":material/folder_open:", url_path="runs"),
])
warm.page_started(page.url_path)  # the first page decides when torch is imported
warm.run_started()  # background imports wait while the user's script runs go on
try:
    page.run()
finally:
    warm.run_ended()
    warm.PAGE_SHOWN.set()  # the later pages' imports may start now (see studio.warm)
