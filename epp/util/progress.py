"""Progress for long commands: a tqdm bar on a terminal, plain periodic lines in a log or a pipe.

A bar written to a file is thousands of carriage-return frames; `progress()` returns an object
with the same `update(n)` / `set_description(text)` / context-manager API either way.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class PlainProgress:
    """One line every `every_s` seconds (and at the end): `desc: done/total unit (pct%, rate/s)`."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", disable: bool = False, every_s: float = 10.0,
                 stream: IO[str] | None = None) -> None:
        self.total, self.desc, self.unit, self.disable, self.every_s = total, desc, unit, disable, every_s
        self.stream = stream or sys.stderr
        self.n = 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def _line(self, now: float) -> None:
        if self.disable:
            return
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = self.n / (now - self.t0) if now > self.t0 else 0.0
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {rate:.1f} {self.unit}/s", file=self.stream, flush=True)

    def close(self) -> None:
        self._line(time.monotonic())
        self.disable = True

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int, desc: str = "", unit: str = "it", disable: bool = False, leave: bool = True, stream: IO[str] | None = None):
    """A tqdm bar when `stream` (default stderr) is a terminal, else PlainProgress."""
    out = stream or sys.stderr
    if getattr(out, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=leave, file=out)
    return PlainProgress(total, desc, unit, disable, stream=out)
