"""KV-transfer profiles per (prefill, decode) link: which fabric a pair's KV cache crosses, measured.

Disaggregated P/D moves every prompt's KV cache from the prefill pod to the decode pod, so which
prefill serves which decode is a question about the link between them. Like the Llumnix fork in
the seed, the EPP keeps the transfer time measured at log-spaced block counts, here per link,
and estimates a prompt's transfer by interpolation. Profiles come from, most specific first:

1. live: the decode pod's sidecar exports one profile per prefill peer on its /metrics
   (`pdproxy_kv_transfer_profile_seconds{prefill="ip:port",blocks="N"}`, read by the scraper);
2. pair: a link-profiles file (`kv-bandwidth-profiler --links`) names the two endpoints;
3. class: the same file gives a profile per link class — the tightest topology level the two
   pods share (host, rack, zone, region, none: llm-d's levels, from the same pod labels),
   optionally narrowed to a `llm-d.ai/kv-backend` fabric both sides carry (NVLink vs PCIe
   inside one host);
4. endpoint: the decode endpoint's own (single-backend) profile.

Without any of them a pair has no estimate: plugins fall back to load, never to an error.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from epp.datastore.endpoint import KV_BACKEND_LABEL, Endpoint, TransferProfile
from epp.observability.logging import get_logger

SCHEMA = "inference-epp/kv-link-profiles/v1"
LEVELS = ("host", "rack", "zone", "region", "none")
# The pod labels llm-d's topology-extractor reads by default.
DEFAULT_TOPOLOGY_LABELS: Mapping[str, str] = {
    "host": "kubernetes.io/hostname",
    "rack": "topology.kubernetes.io/rack",
    "zone": "topology.kubernetes.io/zone",
    "region": "topology.kubernetes.io/region",
}
MAX_POINTS = 64  # per profile: a log-spaced profile has ~10
MAX_LINKS = 100_000
_log = get_logger("epp.links")


class LinkProfileError(ValueError):
    """A link-profiles file is malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True, slots=True)
class LinkClass:
    level: str  # one of LEVELS
    kv_backend: str | None = None  # both pods' llm-d.ai/kv-backend must be this; None = any

    def describe(self) -> str:
        return self.level if self.kv_backend is None else f"{self.level}/{self.kv_backend}"


@dataclass(slots=True)
class LinkTable:
    """One source's profiles: exact pairs by endpoint identifier, and classes (most specific first)."""

    pairs: dict[tuple[str, str], TransferProfile] = field(default_factory=dict)
    classes: list[tuple[LinkClass, TransferProfile]] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.pairs) + len(self.classes)


def _ids(e: Endpoint) -> tuple[str, ...]:
    """The names a profiles file may use for an endpoint: key (namespace/name), name, ip:port."""
    return (e.key, e.name, e.hostport) if e.key != e.name else (e.name, e.hostport)


class LinkProfiles:
    """The EPP's view of every link; lookups are lock-free reads of tables swapped whole."""

    def __init__(self, topology_labels: Mapping[str, str] | None = None) -> None:
        self.topology_labels: dict[str, str] = dict(topology_labels or DEFAULT_TOPOLOGY_LABELS)
        self._table = LinkTable()
        self._file: _FileSource | None = None
        self._memo: dict[tuple[str, str], tuple] = {}

    # -- sources --------------------------------------------------------------------------------
    def replace(self, table: LinkTable) -> None:
        self._table = table

    def watch_file(self, path: str, interval: float) -> None:
        """Load `path` now and re-read it when it changes, checked every `interval` s.

        A malformed file raises; a missing one is an empty table (no data: plugins fall back to
        load) until it appears — the profiler may not have written it yet.
        """
        self._file = _FileSource(Path(path), interval)
        self._table = self._file.load()

    @property
    def table(self) -> LinkTable:
        f = self._file
        if f is not None and f.due():
            try:
                self._table = f.reload() or self._table
            except LinkProfileError as e:  # keep serving the last good table; say why once per change
                f.report(e)
        return self._table

    # -- lookups --------------------------------------------------------------------------------
    def level(self, a: Endpoint, b: Endpoint) -> str:
        """The tightest topology level two endpoints share ("none" when they share none)."""
        for lvl in ("host", "rack", "zone", "region"):
            key = self.topology_labels.get(lvl)
            va = a.labels.get(key) if key else None
            if va and va == b.labels.get(key):
                return lvl
        return "none"

    def lookup(self, prefill: Endpoint, decode: Endpoint) -> tuple[TransferProfile | None, str]:
        """The most specific profile of the link prefill → decode, and where it came from.

        Memoised per pair while the two endpoints, the table and the decode pod's metrics (its
        live profiles) are the same objects: a scheduling cycle looks up every prefill × decode pair.
        """
        table = self.table
        metrics = decode.metrics
        k = (prefill.key, decode.key)
        m = self._memo.get(k)
        if m is not None and m[0] is prefill and m[1] is decode and m[2] is table and m[3] is metrics:
            return m[4], m[5]
        prof, source = self._lookup(prefill, decode, table, metrics.link_profiles)
        if len(self._memo) >= MAX_LINKS:
            self._memo.clear()
        self._memo[k] = (prefill, decode, table, metrics, prof, source)
        return prof, source

    def _lookup(self, prefill: Endpoint, decode: Endpoint, table: LinkTable,
                live: Mapping[str, TransferProfile] | None) -> tuple[TransferProfile | None, str]:
        if live:
            prof = live.get(prefill.hostport) or live.get(prefill.name)
            if prof is not None:
                return prof, "live"
        if table.pairs:
            for p in _ids(prefill):
                for d in _ids(decode):
                    prof = table.pairs.get((p, d))
                    if prof is not None:
                        return prof, "pair"
        if table.classes:
            lvl = self.level(prefill, decode)
            pb, db = prefill.labels.get(KV_BACKEND_LABEL), decode.labels.get(KV_BACKEND_LABEL)
            for cls, prof in table.classes:
                if cls.level == lvl and (cls.kv_backend is None or cls.kv_backend == pb == db):
                    return prof, "class:" + cls.describe()
        prof = decode.metrics.transfer_profile
        if prof is not None:
            return prof, "endpoint"
        return None, ""

    def transfer_seconds(self, prefill: Endpoint, decode: Endpoint, tokens: int) -> tuple[float | None, str]:
        prof, source = self.lookup(prefill, decode)
        if prof is None:
            return None, ""
        return prof.seconds_for_tokens(tokens), source


# -- the profiles file ---------------------------------------------------------------------------


class _FileSource:
    def __init__(self, path: Path, interval: float) -> None:
        self.path, self.interval = path, interval
        self._next = 0.0
        self._stamp: tuple[float, int] | None = None
        self._reported: str | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime, st.st_size

    def load(self) -> LinkTable:
        self._stamp = self._stat()
        self._next = time.monotonic() + self.interval
        if self._stamp is None:
            _log.warning("Link profiles file not found; pairs fall back to load until it appears", file=str(self.path))
            return LinkTable(source=str(self.path))
        return load_link_profiles(self.path)

    def reload(self) -> LinkTable | None:
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:  # unchanged, or gone (the last profiles stay)
            return None
        table = load_link_profiles(self.path)
        self._stamp, self._reported = stamp, None
        _log.info("Link profiles reloaded", file=str(self.path), links=len(table.pairs), classes=len(table.classes))
        return table

    def report(self, error: LinkProfileError) -> None:
        if str(error) != self._reported:
            self._reported = str(error)
            _log.warning("Link profiles not reloaded; keeping the last good ones", error=str(error))


def _profile(entry: Mapping[str, Any], where: str, block_tokens: int) -> TransferProfile:
    points = entry.get("points")
    if not isinstance(points, list) or not points:
        raise LinkProfileError(f"{where}: points must be a non-empty list of {{blocks, seconds}}")
    if len(points) > MAX_POINTS:
        raise LinkProfileError(f"{where}: at most {MAX_POINTS} points, got {len(points)}")
    xs: list[int] = []
    ys: list[float] = []
    for j, pt in enumerate(points):
        b = pt.get("blocks") if isinstance(pt, Mapping) else None
        s = pt.get("seconds") if isinstance(pt, Mapping) else None
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise LinkProfileError(f"{where}.points[{j}].blocks must be an integer >= 1, got {b!r}")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s < 0:
            raise LinkProfileError(f"{where}.points[{j}].seconds must be a number >= 0, got {s!r}")
        if xs and b <= xs[-1]:
            raise LinkProfileError(f"{where}.points[{j}].blocks must increase ({b} after {xs[-1]})")
        xs.append(b)
        ys.append(float(s))
    bt = entry.get("block_tokens", block_tokens)
    if not isinstance(bt, int) or isinstance(bt, bool) or bt < 1:
        raise LinkProfileError(f"{where}.block_tokens must be an integer >= 1, got {bt!r}")
    return TransferProfile(tuple(xs), tuple(ys), bt, int(entry.get("block_bytes", 0) or 0), str(entry.get("kv_backend", "") or ""))


def parse_link_profiles(data: Any, source: str) -> LinkTable:
    """Validate a link-profiles document (the profiler's `--links` output) into a table."""
    if not isinstance(data, Mapping):
        raise LinkProfileError(f"{source}: must be a map with 'links' and/or 'classes'")
    schema = data.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise LinkProfileError(f"{source}: schema {schema!r} is not {SCHEMA!r}")
    unknown = set(data) - {"schema", "block_tokens", "block_bytes", "links", "classes", "created", "host", "shape", "settings", "device"}
    if unknown:
        raise LinkProfileError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
    block_tokens = data.get("block_tokens", 16)
    table = LinkTable(source=source)
    links = data.get("links") or []
    classes = data.get("classes") or []
    if not isinstance(links, list) or not isinstance(classes, list):
        raise LinkProfileError(f"{source}: links and classes must be lists")
    if len(links) + len(classes) > MAX_LINKS:
        raise LinkProfileError(f"{source}: more than {MAX_LINKS} links")
    for i, e in enumerate(links):
        where = f"{source}: links[{i}]"
        if not isinstance(e, Mapping) or not isinstance(e.get("prefill"), str) or not isinstance(e.get("decode"), str):
            raise LinkProfileError(f"{where}: needs 'prefill' and 'decode' (endpoint name, namespace/name or ip:port)")
        table.pairs[(e["prefill"], e["decode"])] = _profile(e, where, block_tokens)
    for i, e in enumerate(classes):
        where = f"{source}: classes[{i}]"
        if not isinstance(e, Mapping) or e.get("level") not in LEVELS:
            raise LinkProfileError(f"{where}: level must be one of {', '.join(LEVELS)}")
        backend = e.get("match_kv_backend")
        if backend is not None and not isinstance(backend, str):
            raise LinkProfileError(f"{where}: match_kv_backend must be a string")
        table.classes.append((LinkClass(e["level"], backend), _profile(e, where, block_tokens)))
    # a class narrowed to a fabric is more specific than the bare level
    table.classes.sort(key=lambda c: (LEVELS.index(c[0].level), c[0].kv_backend is None))
    return table


def load_link_profiles(path: str | Path) -> LinkTable:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise LinkProfileError(f"cannot read link profiles {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as e:
        raise LinkProfileError(f"{path}: invalid JSON/YAML: {getattr(e, 'problem', None) or e}") from None
    return parse_link_profiles(data, str(path))

