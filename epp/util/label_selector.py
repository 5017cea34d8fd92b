"""Kubernetes label selectors in their string form (`app=vllm,env in (a,b),tier!=x,key,!gone`), as --endpoint-selector takes them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s+\(([^)]*)\)$")
_EQ = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_EXISTS = re.compile(rf"^(!?)\s*({_KEY})$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        v = labels.get(self.key)
        if self.op in ("=", "in"):
            return v in self.values
        if self.op in ("!=", "notin"):
            return v not in self.values  # a missing label satisfies != and notin, as in Kubernetes
        if self.op == "exists":
            return v is not None
        return v is None


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_selector(text: str) -> list[Requirement]:
    """Requirements of a selector string; ValueError naming the bad term otherwise."""
    if not text.strip():
        raise ValueError("empty label selector")
    reqs: list[Requirement] = []
    for term in _split(text):
        if not term:
            raise ValueError(f"invalid label selector {text!r}: empty term")
        if m := _SET.match(term):
            values = frozenset(v.strip() for v in m.group(4).split(",") if v.strip())
            if not values:
                raise ValueError(f"invalid label selector term {term!r}: {m.group(3)} needs at least one value")
            reqs.append(Requirement(m.group(1), m.group(3), values))
        elif m := _EQ.match(term):
            op = "=" if m.group(3) in ("=", "==") else "!="
            reqs.append(Requirement(m.group(1), op, frozenset({m.group(4)})))
        elif m := _EXISTS.match(term):
            reqs.append(Requirement(m.group(2), "!exists" if m.group(1) else "exists"))
        else:
            raise ValueError(f"invalid label selector term {term!r}; use key=value, key!=value, key in (a,b), key notin (a,b), key or !key")
    return reqs


def matches(requirements: list[Requirement], labels: Mapping[str, str]) -> bool:
    return all(r.matches(labels) for r in requirements)
