"""Strict reading of a plugin's `parameters` map, as the Go EPP decodes them (unknown fields are errors).

Every error names the plugin and the field (`plugin 'x': blockSizeTokens must be …`), which the
config loader turns into a file:line pointer at that parameter.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from epp.scheduling.framework import ConfigError
from epp.scheduling.registry import reject_unknown
from epp.util.duration import parse_duration


class Params:
    def __init__(self, plugin: str, parameters: Mapping[str, Any] | None, known: Iterable[str], *, where: str = "") -> None:
        self.plugin = plugin
        self.where = where  # dotted prefix for nested maps, e.g. "kvEventsConfig."
        self.values = dict(parameters or {})
        reject_unknown(plugin, self.values, known, where=where)

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"plugin {self.plugin!r}: {self.where}{field} {message}")

    def has(self, field: str) -> bool:
        return field in self.values and self.values[field] is not None

    def int(self, field: str, default: int, *, minimum: int | None = None) -> int:
        v = self.values.get(field, default)
        if v is None:
            v = default
        if not isinstance(v, int) or isinstance(v, bool) or (minimum is not None and v < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise self.error(field, f"must be an integer{bound}, got {v!r}")
        return v

    def number(self, field: str, default: float, *, lo: float | None = None, hi: float | None = None) -> float:
        v = self.values.get(field, default)
        if v is None:
            v = default
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or (lo is not None and v < lo)
                or (hi is not None and v > hi)):
            rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
            raise self.error(field, f"must be a number{rng}, got {v!r}")
        return float(v)

    def bool(self, field: str, default: bool) -> bool:
        v = self.values.get(field, default)
        if v is None:
            v = default
        if not isinstance(v, bool):
            raise self.error(field, f"must be true or false, got {v!r}")
        return v

    def str(self, field: str, default: str = "") -> str:
        v = self.values.get(field, default)
        if v is None:
            v = default
        if not isinstance(v, str):
            raise self.error(field, f"must be a string, got {v!r}")
        return v

    def duration(self, field: str, default: str | float) -> float:
        try:
            return parse_duration(self.values.get(field, default) or default)
        except ValueError as e:
            raise self.error(field, f"is not a duration: {e}") from None

    def nested(self, field: str, known: Iterable[str]) -> "Params":
        v = self.values.get(field)
        if v is not None and not isinstance(v, Mapping):
            raise self.error(field, f"must be a map, got {v!r}")
        return Params(self.plugin, v, known, where=f"{self.where}{field}.")
