"""Endpoints from a YAML file, re-read when it changes (the embedded default, no cluster needed).

    endpoints:
    - {name: vllm-p2p-proxy, address: 127.0.0.1, port: 8080, labels: {role: proxy, llm-d.ai/kv-backend: nvlink}}

Optional per endpoint: `namespace`, `metricsUrl`. A file that fails to parse keeps the last good
set and logs why, so a half-saved edit never empties the pool. The same format is llm-d's
`file-discovery` plugin's. Optionally the file lists InferenceObjectives for request priorities
when there is no cluster (`objectives: [{name: batch, priority: -1}]`).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import yaml

from epp.datastore import Datastore, Endpoint
from epp.datastore.objectives import Objectives
from epp.observability.logging import get_logger

log = get_logger("epp.discovery.static")


class EndpointsFileError(ValueError):
    pass


def parse_endpoints(text: str, source: str) -> list[Endpoint]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise EndpointsFileError(f"{source}:{mark.line + 1 if mark else '?'}: invalid YAML: {getattr(e, 'problem', e)}") from None
    items = data.get("endpoints") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise EndpointsFileError(f"{source}: expected a map with an 'endpoints' list")
    out: list[Endpoint] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"{source}: endpoints[{i}]"
        if not isinstance(item, dict):
            raise EndpointsFileError(f"{where}: must be a map with name, address, port")
        try:
            port = int(item["port"])
            address = str(item["address"])
        except (KeyError, TypeError, ValueError):
            raise EndpointsFileError(f"{where}: needs 'address' and an integer 'port'") from None
        if not 0 < port < 65536:
            raise EndpointsFileError(f"{where}: port {port} out of range")
        labels: Any = item.get("labels") or {}
        if not isinstance(labels, dict):
            raise EndpointsFileError(f"{where}: labels must be a map")
        ep = Endpoint(
            name=str(item.get("name") or f"{address}:{port}"),
            address=address,
            port=port,
            labels={str(k): str(v) for k, v in labels.items()},
            namespace=str(item.get("namespace", "")),
            metrics_url=item.get("metricsUrl") or item.get("metrics_url"),
        )
        if ep.key in seen:
            raise EndpointsFileError(f"{where}: duplicate endpoint name {ep.key!r}")
        seen.add(ep.key)
        out.append(ep)
    return out


def parse_objectives(text: str, source: str) -> list[tuple[str, int]]:
    """The optional `objectives` list: [{name, priority}] (priority defaults to 0)."""
    data = yaml.safe_load(text) or {}
    items = data.get("objectives") if isinstance(data, dict) else None
    if items is None:
        return []
    if not isinstance(items, list):
        raise EndpointsFileError(f"{source}: objectives must be a list of {{name, priority}}")
    out = []
    for i, item in enumerate(items):
        prio = item.get("priority", 0) if isinstance(item, dict) else None
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(prio, int) or isinstance(prio, bool):
            raise EndpointsFileError(f"{source}: objectives[{i}]: needs a 'name' and an integer 'priority'")
        out.append((item["name"], prio))
    return out


class StaticFileDiscovery:
    def __init__(self, datastore: Datastore, path: str, poll_interval: float = 1.0, objectives: Objectives | None = None) -> None:
        self.datastore = datastore
        self.objectives = objectives
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._stamp: tuple[float, int] | None = None

    def load(self) -> bool:
        """Read the file if it changed; True when the datastore was updated."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise EndpointsFileError(f"endpoints file {self.path} does not exist") from None
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return False
        text = self.path.read_text()
        endpoints = parse_endpoints(text, str(self.path))
        objectives = parse_objectives(text, str(self.path))
        self._stamp = stamp
        self.datastore.replace_all(endpoints)
        if self.objectives is not None:
            self.objectives.replace("file", objectives)
        self.datastore.mark_synced()
        log.info("Endpoints loaded", file=str(self.path), endpoints=[f"{e.key}={e.hostport}" for e in endpoints])
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.load()
            except (EndpointsFileError, OSError) as e:
                log.error("Endpoints file not reloaded; keeping the last good set", error=str(e))
