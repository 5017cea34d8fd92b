"""One byte budget for the request bodies all ext_proc streams hold at once.

Each stream may hold up to `--max-request-body-bytes`; without a shared bound, many slow uploads
at that size would grow the process without limit. A stream reserves every chunk before keeping
it and gives its bytes back when the body is done or the stream ends, whatever the reason.
"""

from __future__ import annotations


class BodyBudget:
    """Bytes held across streams. Single-threaded (the asyncio loop); 0 disables the bound."""

    __slots__ = ("limit", "held", "peak", "refused", "churn")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.refused = 0
        self.churn = 0  # bytes reserved or given back since the owner last looked (memory trimming)

    def reserve(self, n: int) -> bool:
        if self.limit and self.held + n > self.limit:
            self.refused += 1
            return False
        self.held += n
        self.churn += n
        if self.held > self.peak:
            self.peak = self.held
        return True

    def release(self, n: int) -> None:
        self.held -= n
        self.churn += n
