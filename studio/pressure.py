"""CPU pressure of the machine, for live views that give the CPU back to the run when it is scarce.

Linux reports in ``/proc/pressure/cpu`` (PSI, kernel 4.20+) the total time, in microseconds, during
which at least one runnable task waited for a CPU ("some"). Its rate over the last few seconds is
the share of time the CPU was contended: measured on 2 cores with a run being watched in the
browser, about 0.4 on an otherwise quiet machine and 0.6-0.75 with two competing busy processes
(0.04 with nobody watching). A live view polls less often while the pressure is high
(:func:`studio.widgets.live`): on a busy machine each browser redraw (tens of ms of a core) would
come out of the run's share. No PSI (macOS, Windows, old kernels, some containers): no reading,
the views keep their normal rate.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

PSI_CPU = Path("/proc/pressure/cpu")
#: Seconds of history the pressure is averaged over.
WINDOW = 3.0
#: Enter the busy state above this share of contended time, leave it below :data:`CALM` (the
#: gap keeps a view from switching back and forth).
BUSY = 0.6
CALM = 0.4


def read_total(path: Path = PSI_CPU) -> int | None:
    """The "some" total of ``path`` in microseconds, or None when the file is absent or
    unreadable."""
    try:
        with open(path) as f:
            line = f.readline()
        return int(line.split("total=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


class Gauge:
    """Rate of a PSI total over the last :data:`WINDOW` s, from samples taken by the callers
    (each page poll samples once; reading the file costs microseconds). Thread-safe: one per
    process serves every session."""

    def __init__(self, read=read_total, clock=time.monotonic, window: float = WINDOW):
        self._read, self._clock, self.window = read, clock, window
        self._samples: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def pressure(self) -> float | None:
        """Share of the last ``window`` s (in [0, 1]) during which some task waited for a CPU;
        None without PSI or before the samples span half the window."""
        total = self._read()
        if total is None:
            return None
        now = self._clock()
        with self._lock:
            self._samples.append((now, total))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
                self._samples.popleft()
            t0, v0 = self._samples[0]
        if now - t0 < self.window / 2:
            return None
        return min(1.0, max(0.0, (total - v0) / 1e6 / (now - t0)))


_GAUGE = Gauge()


def busy(was_busy: bool, gauge: Gauge = _GAUGE) -> bool:
    """Whether the machine's CPU is contended now, with hysteresis: a view that was busy stays
    busy until the pressure falls below :data:`CALM`, one that was not becomes busy above
    :data:`BUSY`; no reading keeps the previous state."""
    p = gauge.pressure()
    if p is None:
        return was_busy
    return p >= CALM if was_busy else p >= BUSY
