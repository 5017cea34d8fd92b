"""Helpers for the P/D tests: a pool of prefill and decode pods, configs built as the EPP builds them."""

from __future__ import annotations

import random
import textwrap

import pytest
from prometheus_client import CollectorRegistry

from epp.config import build, parse
from epp.datastore import Datastore, Endpoint
from epp.scheduling.framework import LLMRequest
from epp.scheduling.registry import PluginContext

ROLE = "llm-d.ai/role"
HOST = "kubernetes.io/hostname"
BACKEND = "llm-d.ai/kv-backend"


def pod(name: str, role: str | None, ip: str, host: str = "", backend: str = "", port: int = 8000) -> Endpoint:
    labels = {ROLE: role} if role else {}
    if host:
        labels[HOST] = host
    if backend:
        labels[BACKEND] = backend
    return Endpoint(name=name, address=ip, port=port, labels=labels)


def seed_cluster() -> list[Endpoint]:
    """The seed's two workers: worker-a's two GPUs over NVLink, worker-b's two over PCIe/shared storage."""
    return [
        pod("prefill-a", "prefill", "10.0.1.1", "worker-a", "nvlink"),
        pod("decode-a", "decode", "10.0.1.2", "worker-a", "nvlink"),
        pod("prefill-b", "prefill", "10.0.2.1", "worker-b", "fs"),
        pod("decode-b", "decode", "10.0.2.2", "worker-b", "fs"),
    ]


def request(tokens: int = 100, rid: str = "r", max_tokens: int | None = 16, body=None, text: str = "") -> LLMRequest:
    return LLMRequest(request_id=rid, model="m", target_model="m", api="chat/completions", prompt_tokens=tokens,
                      max_tokens=max_tokens, body=body, prompt_text=text)


class Built:
    """A config built against a datastore holding `endpoints`, with its own metrics registry."""

    def __init__(self, text: str, endpoints: list[Endpoint], seed: int = 7, allow_experimental: bool = True) -> None:
        self.datastore = Datastore()
        self.datastore.replace_all(endpoints)
        self.registry = CollectorRegistry()
        ctx = PluginContext(datastore=self.datastore, services={"rng": random.Random(seed), "metrics_registry": self.registry})
        # llm-d's topology plugins are alpha: loaded as with --allow-experimental-plugins
        self.built = build(parse(textwrap.dedent(text), "test.yaml"), ctx, allow_experimental=allow_experimental)
        self.scheduler = self.built.scheduler
        self.plugins = self.built.plugins

    def route(self, req: LLMRequest):
        """Schedule and run PreRequest, as the director does."""
        result = self.scheduler.schedule(req, self.datastore.endpoints())
        self.scheduler.pre_request(req, result)
        return result

    def done(self, req: LLMRequest, result, outcome: str = "success") -> None:
        self.scheduler.response_complete(req, result, outcome)

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def endpoint(self, name: str) -> Endpoint:
        return next(e for e in self.datastore.endpoints() if e.name == name)


@pytest.fixture
def cluster():
    return seed_cluster()
