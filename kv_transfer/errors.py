"""The one error a KV transfer raises: which link failed and why, in a line a person can act on."""

from __future__ import annotations

import re

_GLOO_LOCATION = re.compile(r"^\[[^\]]*\]\s*")


class KVTransferError(Exception):
    """A transfer that did not (or will not) complete; the request it belongs to must fail now."""


def short_reason(e: BaseException) -> str:
    """torch/gloo messages carry a source location and advice; keep the first sentence of the cause."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = _GLOO_LOCATION.sub("", text)
    return text.split(". This is typically")[0].rstrip(". ")
