"""One declared setting: its default, accepted types, allowed values and one line of help.

Every tunable thing is declared once as a :class:`Setting` where it is used (each souping
method's ``parameters``, the merge's settings, ...); :mod:`hpcsoup.config` builds the
experiment-file schema from those declarations, so a default in Python and in a config file
cannot differ (the model is mergekit's ``ConfigParameterDef``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from hpcsoup.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Setting:
    """One key: its default, accepted types, optional choices or check, and help.

    ``validate(key, value)`` returns the value (an int widened to float where a float
    is expected) or raises :class:`~hpcsoup.errors.ConfigError` naming the key, the
    bad value and what is allowed.
    """

    default: Any
    types: tuple = ()
    choices: Sequence | None = None
    check: Callable[[Any], bool] | None = None
    hint: str = ""   # what a failed check says (e.g. "must be > 0")
    help: str = ""   # one line for humans (--help, docs)

    def validate(self, key: str, value: Any) -> Any:
        types = self.types or (type(self.default),)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in types:
            raise ConfigError(f"config key '{key}' = {value!r}: expected {_names(types)}")
        if not isinstance(value, types):
            raise ConfigError(f"config key '{key}' = {value!r}: expected {_names(types)}"
                              + (f" ({self.hint})" if self.hint else ""))
        items = value if isinstance(value, list) else [value]
        if self.choices is not None:
            bad = [v for v in items if v not in self.choices]
            if bad:
                raise ConfigError(f"config key '{key}' = {value!r}: {bad[0]!r} is not allowed; "
                                  f"choose from {list(self.choices)}")
        if self.check is not None and not self.check(value):
            raise ConfigError(f"config key '{key}' = {value!r}: {self.hint or 'invalid value'}")
        return value


def _names(types: tuple) -> str:
    return " or ".join(t.__name__ for t in types)


def positive(hint: str = "must be > 0") -> dict:
    """``Setting(..., **positive())``: values > 0."""
    return dict(check=lambda v: v > 0, hint=hint)


def nonnegative(hint: str = "must be >= 0") -> dict:
    """``Setting(..., **nonnegative())``: values >= 0."""
    return dict(check=lambda v: v >= 0, hint=hint)


def defaults(settings: dict) -> dict:
    """``{name: default}`` of a dict of settings (nested dicts recurse)."""
    return {k: defaults(v) if isinstance(v, dict) else v.default for k, v in settings.items()}
