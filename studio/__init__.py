"""The Streamlit front end of NRR-DD Studio (pages stay thin; the work is in ``nrrdd_core``).

Modules: :mod:`studio.keys` (every ``session_state`` key and URL parameter name),
:mod:`studio.settings` (environment switches such as ``NRRDD_STUDIO_TINY``),
:mod:`studio.setup` (the shared setup kept in the URL), :mod:`studio.cache` (cached loaders),
:mod:`studio.jobs` (background jobs polled by fragments), :mod:`studio.widgets` (shared widgets),
:mod:`studio.runners` (job bodies), :mod:`studio.reference` (published figures).
"""
