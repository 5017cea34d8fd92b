"""Kubernetes resource quantities ("1Gi", "500M", "1k", "100") as flow-control limits spell them."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "m": Decimal("0.001"),
}
_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:[eE]([+-]?\d+))?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")


def parse_quantity(value: str | int | float) -> int:
    """The integer value of a quantity (rounded up, as resource.Quantity.Value() does). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"invalid quantity {value!r}; use a number or a Kubernetes quantity such as 100, 1k, 500Mi or 1Gi")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    m = _QUANTITY.match(text)
    if not m:
        raise ValueError(f"invalid quantity {value!r}; use a number or a Kubernetes quantity such as 100, 1k, 500Mi or 1Gi")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        raise ValueError(f"invalid quantity {value!r}") from None
    if m.group(2):
        number *= Decimal(10) ** int(m.group(2))
    number *= _SUFFIXES[m.group(3) or ""]
    whole = int(number.to_integral_value(rounding="ROUND_CEILING"))
    return whole
