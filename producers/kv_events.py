"""Engines' KV-cache events over ZMQ → the precise producer's block index (llm-d's kvevents pool).

Two ways to hear the engines, as llm-d's `kvEventsConfig`:
* `zmqEndpoint` (global socket): the EPP binds a SUB socket there and every vLLM connects its
  PUB socket to it (`--kv-events-config '{…"endpoint":"tcp://epp:5557","topic":"kv@<pod ip:port>@<model>"}'`);
  the pod is read from the topic.
* `discoverPods`: the EPP connects a SUB socket to `tcp://<endpoint ip>:<socketPort>` of every
  endpoint in its datastore whose labels match `podLabelSelector` (vLLM's default `tcp://*:5557`
  binds there); the pod is that endpoint.

Frames: topic, 8-byte big-endian sequence, msgpack batch `[ts, events, dp_rank]` (a map is also
read); events are tagged arrays (older vLLM) or tagged maps (current vLLM). A `BlockStored`
names its blocks by engine hashes and carries their token ids: the EPP recomputes its own keys
from the tokens (chained from the parent block's key) so lookups by prompt find them. A sequence
that goes backwards means the engine restarted: its pod is cleared. A malformed message is
counted and dropped, never fatal; one message is capped at `MAX_MESSAGE_BYTES`; events naming a
pod that is not one of the EPP's endpoints are dropped (they could fill memory, never steer a
request), so an engine's first events may be lost if it publishes before discovery lists it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from epp.observability.logging import get_logger
from producers.kv_block_index import KVBlockIndex, TokenKeys

log = get_logger("epp.kv-events")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RESYNC_SECONDS = 1.0
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name")
_REMOVED_FIELDS = ("block_hashes", "medium")


@dataclass
class EventsConfig:
    zmq_endpoint: str = ""
    topic_filter: str = "kv@"
    discover_pods: bool = True
    socket_port: int = 5557
    pod_namespace: str = ""
    pod_selector: list[tuple[str, str, str]] = field(default_factory=lambda: [("llm-d.ai/inference-serving", "=", "true")])


def parse_selector(text: str) -> list[tuple[str, str, str]]:
    """`k=v,k2!=v2,k3` (Kubernetes equality selectors) → [(key, op, value)]; raises ValueError."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        for op in ("!=", "==", "="):
            if op in part:
                k, v = part.split(op, 1)
                out.append((k.strip(), "!=" if op == "!=" else "=", v.strip()))
                break
        else:
            if not part.replace(".", "").replace("-", "").replace("/", "").replace("_", "").isalnum():
                raise ValueError(f"cannot read label selector term {part!r}; use key=value, key!=value or key")
            out.append((part, "exists", ""))
    return out


def selector_matches(selector: list[tuple[str, str, str]], labels: Mapping[str, str]) -> bool:
    for key, op, value in selector:
        if op == "exists" and key not in labels:
            return False
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
    return True


def _uint64(h: Any) -> int:
    """An engine block hash as llm-d reads it: an int (as uint64) or the last 8 bytes, big-endian."""
    if isinstance(h, bool):
        raise ValueError("block hash is a boolean")
    if isinstance(h, int):
        return h & 0xFFFFFFFFFFFFFFFF
    if isinstance(h, (bytes, bytearray)) and h:
        return int.from_bytes(bytes(h[-8:]).rjust(8, b"\0"), "big")
    raise ValueError(f"unsupported block hash {type(h).__name__}")


def _fields(event: Any) -> tuple[str, list]:
    if isinstance(event, (list, tuple)) and event and isinstance(event[0], str):
        return event[0], list(event[1:])
    if isinstance(event, Mapping) and isinstance(event.get("type"), str):
        tag = event["type"]
        order = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS if tag == "BlockRemoved" else ()
        return tag, [event.get(k) for k in order]
    raise ValueError("event is neither a tagged array nor a tagged map")


class EventApplier:
    """Decodes one message and applies it to the index; no sockets (the subscriber thread feeds it)."""

    def __init__(self, index: KVBlockIndex, keys: TokenKeys) -> None:
        import msgpack

        self._unpack = msgpack.unpackb
        self.index = index
        self.keys = keys
        self.last_seq: dict[str, int] = {}
        self.known_pods: set[str] | None = None  # endpoints' ip:port; None = accept every pod
        self.messages = self.malformed = self.gaps = self.restarts = self.foreign = 0

    def apply(self, topic: bytes, seq: bytes, payload: bytes, source_pod: str | None = None) -> None:
        parts = topic.decode(errors="replace").split("@")
        pod, model = (parts[1], parts[2]) if len(parts) == 3 else (source_pod or topic.decode(errors="replace"), "")
        if source_pod:
            pod = source_pod
        self.messages += 1
        if self.known_pods is not None and pod not in self.known_pods:
            self.foreign += 1  # not an endpoint of this pool: it could only fill memory, never steer a request
            if self.foreign == 1 or self.foreign % 1000 == 0:
                log.warning("KV events from a pod that is not an endpoint dropped", pod=pod, dropped=self.foreign)
            return
        try:
            self._sequence(pod, int.from_bytes(seq[:8], "big"))
            batch = self._unpack(payload, raw=False, strict_map_key=False)
            events = batch.get("events") if isinstance(batch, Mapping) else batch[1] if isinstance(batch, (list, tuple)) and len(batch) >= 2 else None
            if not isinstance(events, (list, tuple)):
                raise ValueError("batch has no event list")
            for ev in events:
                self._event(pod, model, ev)
        except Exception as e:  # noqa: BLE001 - anything an engine sends must not stop the subscriber
            self.malformed += 1
            if self.malformed <= 5 or self.malformed % 1000 == 0:
                log.warning("KV event dropped", pod=pod, error=f"{type(e).__name__}: {e}", dropped=self.malformed)

    def _sequence(self, pod: str, seq: int) -> None:
        last = self.last_seq.get(pod)
        if last is not None and seq < last:
            self.restarts += 1
            log.info("KV event sequence went back; engine restarted, clearing its blocks", pod=pod, last=last, seq=seq)
            self.index.clear(pod)
        elif last is not None and seq > last + 1:
            self.gaps += 1
        self.last_seq[pod] = seq

    def _event(self, pod: str, model: str, ev: Any) -> None:
        tag, f = _fields(ev)
        if tag == "BlockStored":
            hashes, parent, tokens = f[0], f[1] if len(f) > 1 else None, f[2] if len(f) > 2 else None
            if not isinstance(hashes, (list, tuple)) or not isinstance(tokens, (list, tuple)):
                raise ValueError("BlockStored needs block_hashes and token_ids lists")
            tier = str(f[5] if len(f) > 5 and f[5] else "gpu").lower()
            lora = f[6] if len(f) > 6 else None
            parent_key = None
            if parent is not None and _uint64(parent) != 0:
                parent_key = self.index.request_key(_uint64(parent))
                if parent_key is None:
                    return  # its parent was never seen (or evicted): the chain cannot be rebuilt
            request_keys = self.keys.keys(parent_key, [int(t) & 0xFFFFFFFF for t in tokens], lora if isinstance(lora, str) and lora else model)
            if request_keys:
                self.index.add([_uint64(h) for h in hashes], request_keys, (pod, tier))
        elif tag == "BlockRemoved":
            hashes = f[0]
            if not isinstance(hashes, (list, tuple)):
                raise ValueError("BlockRemoved needs block_hashes")
            tier = str(f[1] if len(f) > 1 and f[1] else "gpu").lower()
            for h in hashes:
                self.index.evict_engine_key(_uint64(h), (pod, tier))
        elif tag == "AllBlocksCleared":
            self.index.clear(pod)
        else:
            raise ValueError(f"unknown event {tag!r}")


class KVEventsSubscriber:
    """A daemon thread: SUB sockets (bound and/or per endpoint), polled, messages applied in order."""

    def __init__(self, applier: EventApplier, cfg: EventsConfig, endpoints: Callable[[], Any] | None = None) -> None:
        self.applier = applier
        self.cfg = cfg
        self.endpoints = endpoints  # () -> the datastore's endpoints (discoverPods)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bound: str | None = None
        self.connected: dict[str, str] = {}  # pod (ip:port) -> zmq address

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kv-events-subscriber", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        import zmq

        ctx = zmq.Context.instance()
        poller = zmq.Poller()
        pods: dict[Any, str | None] = {}
        by_pod: dict[str, Any] = {}
        next_bind = next_sync = 0.0
        bound = None
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if self.cfg.zmq_endpoint and bound is None and now >= next_bind:
                    bound = self._bind(ctx, zmq)
                    next_bind = now + 5.0
                    if bound is not None:
                        poller.register(bound, zmq.POLLIN)
                        pods[bound] = None
                if self.endpoints is not None and now >= next_sync:
                    self.applier.known_pods = {e.hostport for e in self.endpoints()}
                    if self.cfg.discover_pods:
                        self._sync(ctx, zmq, poller, pods, by_pod)
                    next_sync = now + RESYNC_SECONDS
                for sock, _ in poller.poll(200) if pods else ():
                    for _ in range(1000):  # bounded burst per socket, then look at the others
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(frames) == 3:
                            self.applier.apply(frames[0], frames[1], frames[2], pods.get(sock))
                        else:
                            self.applier.malformed += 1
                if not pods:
                    self._stop.wait(0.2)
        except Exception:  # noqa: BLE001
            log.exception("KV events subscriber stopped")
        finally:
            for sock in pods:
                sock.close(linger=0)

    def _socket(self, ctx: Any, zmq: Any) -> Any:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt_string(zmq.SUBSCRIBE, self.cfg.topic_filter)
        return sock

    def _bind(self, ctx: Any, zmq: Any) -> Any:
        sock = self._socket(ctx, zmq)
        try:
            sock.bind(self.cfg.zmq_endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            log.error("Cannot bind the KV events socket; retrying every 5s", endpoint=self.cfg.zmq_endpoint, error=str(e))
            return None
        self.bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("KV events socket bound", endpoint=self.bound, topic_filter=self.cfg.topic_filter)
        return sock

    def _sync(self, ctx: Any, zmq: Any, poller: Any, pods: dict, by_pod: dict) -> None:
        ns = self.cfg.pod_namespace
        wanted = {e.hostport: e.address for e in self.endpoints()
                  if selector_matches(self.cfg.pod_selector, e.labels) and not (ns and e.namespace and e.namespace != ns)}
        for pod in [p for p in by_pod if p not in wanted]:
            sock = by_pod.pop(pod)
            poller.unregister(sock)
            pods.pop(sock, None)
            sock.close(linger=0)
            self.connected.pop(pod, None)
            self.applier.index.clear(pod)
            self.applier.last_seq.pop(pod, None)
        for pod, address in wanted.items():
            if pod in by_pod:
                continue
            sock = self._socket(ctx, zmq)
            host = f"[{address}]" if ":" in address and not address.startswith("[") else address
            target = f"tcp://{host}:{self.cfg.socket_port}"
            if ":" in address:
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(target)
            poller.register(sock, zmq.POLLIN)
            pods[sock] = pod
            by_pod[pod] = sock
            self.connected[pod] = target
            log.info("KV events: subscribed to endpoint", pod=pod, address=target)
