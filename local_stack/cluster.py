"""A P/D cluster the llm-d way in the local stack: nodes, prefill and decode pods, a link per pair.

    cluster:
      nodes: [worker-a, worker-b]
      pods:
      - {name: prefill-a, node: worker-a, role: prefill, kv_backend: nvlink}
      - {name: decode-a,  node: worker-a, role: decode,  kv_backend: nvlink}
      links:                       # per (prefill, decode) pair; a pair not listed takes its node's or `between_nodes`
      - {prefill: prefill-a, decode: decode-a, gbps: 2.0, latency_ms: 0.05, kv_backend: nvlink}
      node_links: {worker-a: {gbps: 2.0, latency_ms: 0.05, kv_backend: nvlink}}
      between_nodes: {gbps: 0.05, latency_ms: 1.0, kv_backend: ethernet}

Every pod is a simulator engine speaking NIXL (the decode pulls the KV blocks over TCP); a decode
pod also runs `pd-proxy --sidecar`, which is its endpoint. The link a pair's KV crosses is the
decode engine's `--peer-link` for that prefill (bandwidth cap + latency on top of the real copy),
and can be scaled at run time (`epp-stack degrade-link`). The EPP sees the pods in the endpoints
file with `llm-d.ai/role`, `kubernetes.io/hostname` and `llm-d.ai/kv-backend`, and the links as
measured by `kv-bandwidth-profiler --links` over the same link models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Link(_Strict):
    gbps: float = Field(gt=0)  # GB/s
    latency_ms: float = Field(0.0, ge=0)
    kv_backend: str = ""  # what the fabric is (nvlink, fs, ethernet): the profile's label


class PairLink(Link):
    prefill: str
    decode: str


class Pod(_Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    node: str
    role: Literal["prefill", "decode"]
    kv_backend: str = ""  # the pod's llm-d.ai/kv-backend label


class Cluster(_Strict):
    nodes: list[str] = Field(min_length=1)
    pods: list[Pod] = Field(min_length=2)
    links: list[PairLink] = []
    node_links: dict[str, Link] = {}
    between_nodes: Link | None = None
    live_profile_max_age: float = Field(10.0, gt=0)  # the sidecars' --live-profile-max-age (s)

    @model_validator(mode="after")
    def _consistent(self):
        names = [p.name for p in self.pods]
        if len(set(names)) != len(names):
            raise ValueError("pod names must be unique")
        for p in self.pods:
            if p.node not in self.nodes:
                raise ValueError(f"pod {p.name}: node {p.node!r} is not in nodes")
        for n in self.node_links:
            if n not in self.nodes:
                raise ValueError(f"node_links.{n}: not in nodes")
        if not self.prefills or not self.decodes:
            raise ValueError("a P/D cluster needs at least one prefill and one decode pod")
        by_name = {p.name: p for p in self.pods}
        for link in self.links:
            if by_name.get(link.prefill) is None or by_name[link.prefill].role != "prefill":
                raise ValueError(f"links: {link.prefill!r} is not a prefill pod")
            if by_name.get(link.decode) is None or by_name[link.decode].role != "decode":
                raise ValueError(f"links: {link.decode!r} is not a decode pod")
        for p in self.prefills:
            for d in self.decodes:
                self.link(p.name, d.name)  # every pair has a link
        return self

    @property
    def prefills(self) -> list[Pod]:
        return [p for p in self.pods if p.role == "prefill"]

    @property
    def decodes(self) -> list[Pod]:
        return [p for p in self.pods if p.role == "decode"]

    def pod(self, name: str) -> Pod:
        for p in self.pods:
            if p.name == name:
                return p
        raise ValueError(f"no pod {name!r}; pods: {', '.join(p.name for p in self.pods)}")

    def link(self, prefill: str, decode: str) -> Link:
        for link in self.links:
            if link.prefill == prefill and link.decode == decode:
                return link
        p, d = self.pod(prefill), self.pod(decode)
        found = self.node_links.get(p.node) if p.node == d.node else self.between_nodes
        if found is None:
            where = f"node_links.{p.node}" if p.node == d.node else "between_nodes"
            raise ValueError(f"no link for {prefill} -> {decode}: list the pair under links or give {where}")
        return found

    def links_spec(self) -> dict:
        """The `kv-bandwidth-profiler --links` spec measuring every pair over its link model."""
        return {"links": [{"prefill": p.name, "decode": d.name, "backend": "pull", "link_gbps": (lk := self.link(p.name, d.name)).gbps,
                           "link_latency_ms": lk.latency_ms, "kv_backend": lk.kv_backend}
                          for p in self.prefills for d in self.decodes]}
