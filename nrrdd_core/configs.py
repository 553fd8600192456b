"""Typed, documented, validated configuration dataclasses.

Every method config is a frozen dataclass deriving from :class:`ConfigBase` whose fields are
declared with :func:`param`, which records the documentation, unit and valid range. From that
metadata the CLI generates its flags, the app its sliders, and :meth:`ConfigBase.validate` its
checks (raising :class:`~nrrdd_core.errors.ConfigError` with the field name).

Example::

    @dataclass(frozen=True)
    class MyConfig(ConfigBase):
        lr: float = param(0.05, "Adam learning rate", unit="1", lo=0.0, lo_open=True)
        mask_mode: str = param("soft", "mask form", choices=("soft", "binary", "scaled"))
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


def param(default: Any, doc: str, *, unit: str | None = None, lo: float | None = None,
          hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
          choices: tuple | None = None, source: str | None = None, ui: bool = True) -> Any:
    """Declare a config field with documentation and a valid range.

    Args:
        default: default value (the published or official value).
        doc: one-line meaning.
        unit: unit (``"steps"``, ``"px"``, ``"epochs"``...) or None.
        lo, hi: inclusive bounds (exclusive with ``lo_open``/``hi_open``); None = unbounded.
        choices: allowed values for a string/enum field.
        source: where the default comes from (``"paper"``, ``"code"``, ``"ours"``...).
        ui: whether the app shows it as a knob.
    """
    meta = {"doc": doc, "unit": unit, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "choices": tuple(choices) if choices is not None else None, "source": source, "ui": ui}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, f.type)


@dataclass(frozen=True)
class ConfigBase:
    """Base of every config dataclass: validated on construction, JSON round-trip."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check types, ranges and choices of every field.

        Raises:
            ConfigError: naming the field, its value and the valid range.
        """
        for f in dataclasses.fields(self):
            m = f.metadata
            v = getattr(self, f.name)
            if not m:
                continue
            if m.get("choices") is not None and v not in m["choices"]:
                raise ConfigError(f"{f.name}={v!r} is not one of {list(m['choices'])}")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lo, hi = m.get("lo"), m.get("hi")
                if not math.isfinite(v):  # NaN or +-inf: every range is finite or open-ended
                    raise ConfigError(f"{f.name}={v} is not a finite number; valid range "
                                      f"{describe_range(m) or '(-inf, inf)'}")
                if lo is not None and (v < lo or (m.get("lo_open") and v == lo)):
                    raise ConfigError(f"{f.name}={v} is out of range {describe_range(m)}")
                if hi is not None and (v > hi or (m.get("hi_open") and v == hi)):
                    raise ConfigError(f"{f.name}={v} is out of range {describe_range(m)}")

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None, **overrides: Any):
        """Build from a dict (unknown keys raise ConfigError), with keyword overrides."""
        d = dict(d or {})
        d.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) for {cls.__name__}: {unknown}; "
                              f"valid: {sorted(names)}")
        out = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                out[f.name] = coerce(_field_type(cls, f), d[f.name], f.name)
        return cls(**out)

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated)."""
        return type(self).from_dict(self.to_dict(), **changes)

    @classmethod
    def describe(cls) -> list[dict]:
        """One dict per field: name, type, default, doc, unit, lo, hi, choices, source, ui."""
        rows = []
        for f in dataclasses.fields(cls):
            t = _field_type(cls, f)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            row = {"name": f.name, "type": getattr(t, "__name__", str(t)), "default": default}
            row.update({k: f.metadata.get(k) for k in
                        ("doc", "unit", "lo", "hi", "lo_open", "hi_open", "choices", "source", "ui")})
            rows.append(row)
        return rows


def describe_range(meta: dict) -> str:
    """Human form of a field's range, e.g. ``[0, 1]`` or ``(0, inf)``; ``""`` for a field with
    no range (booleans, strings, or numbers without bounds)."""
    lo, hi = meta.get("lo"), meta.get("hi")
    if meta.get("type") == "bool" or (lo is None and hi is None):
        return ""
    left = "(" if (lo is None or meta.get("lo_open")) else "["
    right = ")" if (hi is None or meta.get("hi_open")) else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def coerce(t: Any, v: Any, name: str = "value") -> Any:
    """Convert ``v`` (possibly a string from the command line or a URL) to type ``t``."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], v, name) if inner else v
    try:
        if t is bool:
            if isinstance(v, str):
                if v.lower() in ("1", "true", "yes", "on"):
                    return True
                if v.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(v)
            return bool(v)
        if t is int:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError(v)
            return int(v)
        if t is float:
            return float(v)
        if t is str:
            return str(v)
        if origin in (tuple, list):
            seq = v.split(",") if isinstance(v, str) else list(v)
            elem = args[0] if args else str
            vals = [coerce(elem, s.strip() if isinstance(s, str) else s, name) for s in seq]
            return tuple(vals) if origin is tuple else vals
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read {v!r} as {getattr(t, '__name__', t)}") from exc
    return v
