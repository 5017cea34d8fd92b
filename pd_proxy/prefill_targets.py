"""Sidecar mode: where the EPP's `x-prefiller-host-port` may send a prefill leg — the pool's prefill pods only.

llm-d's routing sidecar once followed that header anywhere (llm-d issue #979: a client-set header
made the sidecar connect to any host). The EPP strips client values, but the sidecar must not rely
on it: the target is checked against the same endpoint source the EPP uses — the endpoints file
(pods labelled `llm-d.ai/role` prefill, prefill-decode or both) — and/or host:ports given on the
command line. llm-d's allowlist holds hosts only; this one holds host:port, since pods sharing an
address (a node's host network, loopback here) must not open each other's other ports.
"""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

from epp.datastore.endpoint import PREFILL_ROLES, ROLE_LABEL
from epp.discovery.static_file import EndpointsFileError, parse_endpoints

HEADER = "x-prefiller-host-port"
MAX_VALUE = 300  # a host:port is short; anything longer is refused before it is parsed


class TargetRefused(ValueError):
    """The header names something the sidecar will not connect to; `status` is the answer's HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_target(value: str | None) -> str | None:
    """The first value of the header, trimmed, as `host:port` (None: absent or empty — prefill locally)."""
    if value is None:
        return None
    first = value.split(",", 1)[0].strip()
    if not first:
        return None
    if len(first) > MAX_VALUE:
        raise TargetRefused(400, f"{HEADER} is longer than {MAX_VALUE} characters")
    host, sep, port = first.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host or "@" in host:
        raise TargetRefused(400, f"{HEADER} must be host:port, got {first!r}")
    try:
        ip = ipaddress.ip_address(host)
        return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"
    except ValueError:
        return f"{host.lower()}:{int(port)}"


class PrefillAllowlist:
    """The set of prefill host:ports, from `--prefill-allow` entries and an endpoints file re-read when it changes."""

    def __init__(self, static: list[str] = (), endpoints_file: str | None = None, recheck_s: float = 1.0) -> None:
        self.static = {t for t in (parse_target(s) for s in static) if t}
        self.path = Path(endpoints_file) if endpoints_file else None
        self.recheck_s = recheck_s
        self._from_file: set[str] = set()
        self._mtime: float | None = None
        self._checked = 0.0
        if self.path is not None:
            self._reload(force=True)

    @property
    def configured(self) -> bool:
        return bool(self.static) or self.path is not None

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.recheck_s:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return  # gone for now: keep the last good set (a file being replaced)
        if mtime == self._mtime:
            return
        try:
            eps = parse_endpoints(self.path.read_text(), str(self.path))
        except (OSError, EndpointsFileError) as e:
            print(f"pd-proxy: endpoints file {self.path} not reloaded, keeping the last good prefill set: {e}", flush=True)
            return
        self._mtime = mtime
        self._from_file = {parse_target(f"{e.address}:{e.port}") for e in eps if e.labels.get(ROLE_LABEL) in PREFILL_ROLES}

    def allowed(self, target: str) -> bool:
        if self.path is not None:
            self._reload()
        return target in self.static or target in self._from_file

    def check(self, target: str) -> None:
        """Raises TargetRefused (403) unless `target` is one of the pool's prefill pods."""
        if not self.allowed(target):
            source = " and ".join(s for s in (self.path and f"the endpoints file {self.path}", self.static and "--prefill-allow") if s)
            raise TargetRefused(403, f"{HEADER} names {target}, which is not a prefill pod of this pool ({source}); "
                                     "the sidecar only sends prefill legs to those")

    def targets(self) -> set[str]:
        if self.path is not None:
            self._reload()
        return self.static | self._from_file
