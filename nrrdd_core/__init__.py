"""NRR-DD Studio core library: dataset distillation (SRe2L, RDED, NRR-DD, EDF).

The library never imports Streamlit and never prints; it logs through ``logging``
under the ``nrrdd_core`` logger.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
