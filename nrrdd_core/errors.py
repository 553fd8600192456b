"""Exceptions raised by ``nrrdd_core``.

Every error a user can cause (bad path, bad value, mismatched teacher) is an
:class:`NrrddError` with a one-line message that says what is wrong and what to do.
The CLI turns these into exit code 2; the app shows them in the page.
"""


class NrrddError(Exception):
    """Base class of every user-facing error of the library."""


class ConfigError(NrrddError, ValueError):
    """A configuration value is out of range or inconsistent (e.g. tau outside [0, 1])."""


class DataError(NrrddError, ValueError):
    """A dataset cannot be read: missing path, empty or corrupt folder, unknown class."""


class TeacherMismatchError(NrrddError, ValueError):
    """A teacher's class count or class order disagrees with the dataset."""


class CheckpointError(NrrddError, ValueError):
    """A checkpoint or cache file is missing, corrupt, truncated or of the wrong kind."""


class NonFiniteLossError(NrrddError, FloatingPointError):
    """A loss became NaN or inf during optimisation; the last good state is kept.

    Attributes:
        step: the 0-based step index at which the non-finite value appeared.
        term: name of the offending loss term.
    """

    def __init__(self, message: str, step: int = -1, term: str = "loss"):
        super().__init__(message)
        self.step = step
        self.term = term


class ResourceError(NrrddError, RuntimeError):
    """A run would not fit the device (memory estimate) or ran out of memory."""


class StoppedError(NrrddError):
    """A run was stopped on request (stop button, Ctrl-C); partial results are kept."""
