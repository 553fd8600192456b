"""CPU pressure (studio.pressure) and the live view's slower polling while the CPU is contended."""

from __future__ import annotations

from studio import pressure


class Fake:
    """A PSI "some" total (microseconds) and a clock, both set by the test."""

    def __init__(self):
        self.t, self.total = 0.0, 0

    def at(self, t: float, total_s: float) -> None:
        self.t, self.total = t, int(total_s * 1e6)


def gauge(fake: Fake, window: float = 3.0) -> pressure.Gauge:
    return pressure.Gauge(read=lambda: fake.total, clock=lambda: fake.t, window=window)


def test_pressure_is_the_rate_of_the_psi_total_over_the_window():
    f = Fake()
    g = gauge(f)
    f.at(0.0, 0.0)
    assert g.pressure() is None  # one sample: no rate yet
    f.at(1.0, 0.2)
    assert g.pressure() is None  # less than half the window
    f.at(2.0, 1.2)
    assert abs(g.pressure() - 0.6) < 1e-9  # 1.2 s of waiting in 2 s
    f.at(5.0, 1.5)  # the samples older than the window are dropped: (5.0 - 2.0) s, 0.3 s more
    assert abs(g.pressure() - 0.1) < 1e-9


def test_busy_has_hysteresis_and_keeps_its_state_without_psi(tmp_path):
    f = Fake()
    g = gauge(f)
    values = iter([0.0, 0.65, 0.65 + 0.45, 0.65 + 0.45 + 0.3, 0.65 + 0.45 + 0.3 + 0.55])
    f.at(0.0, next(values))
    g.pressure()
    f.at(1.0, next(values))
    g.window = 1.0
    assert pressure.busy(False, g) is True        # 0.65 >= BUSY
    f.at(2.0, next(values))
    assert pressure.busy(True, g) is True         # 0.45: still busy (>= CALM)
    f.at(3.0, next(values))
    assert pressure.busy(True, g) is False        # 0.3 < CALM
    f.at(4.0, next(values))
    assert pressure.busy(False, g) is False       # 0.55 < BUSY: not busy yet
    none = pressure.Gauge(read=lambda: None)
    assert pressure.busy(True, none) is True and pressure.busy(False, none) is False


def test_read_total_parses_the_some_line(tmp_path):
    p = tmp_path / "cpu"
    p.write_text("some avg10=9.57 avg60=37.00 avg300=26.48 total=7350127974\n"
                 "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert pressure.read_total(p) == 7350127974
    assert pressure.read_total(tmp_path / "absent") is None
