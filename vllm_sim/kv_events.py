"""KV-cache events over ZMQ, as vLLM publishes them with `--kv-events-config`.

Wire format (vLLM `vllm/distributed/kv_events.py`, `ZmqEventPublisher`): a PUB socket sends
three frames per batch — the topic, an 8-byte big-endian sequence number, and a msgpack
`KVEventBatch` encoded as an array `[ts, events, data_parallel_rank]`. Events are tagged maps
as current vLLM encodes them: `{"type": "BlockStored", "block_hashes", "parent_block_hash",
"token_ids", "block_size", "lora_id", "medium", "lora_name"}`, `{"type": "BlockRemoved",
"block_hashes", "medium"}`, `{"type": "AllBlocksCleared"}`. The endpoint is bound when it holds
`*`, `::`, `ipc://` or `inproc://` and connected otherwise (vLLM's rule); llm-d's EPP binds
`tcp://…:5557` and reads the pod from a topic `kv@<pod ip:port>@<model>`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from itertools import count
from typing import Any

KNOWN = {"enable_kv_cache_events", "publisher", "endpoint", "replay_endpoint", "buffer_steps", "hwm", "max_queue_size", "topic"}


@dataclass(frozen=True)
class KVEventsConfig:
    endpoint: str = "tcp://*:5557"
    topic: str = ""
    hwm: int = 100_000

    @classmethod
    def parse(cls, text: str) -> "KVEventsConfig | None":
        """vLLM's JSON form; None when events are disabled. Raises ValueError on what the simulator cannot do."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--kv-events-config is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        unknown = set(data) - KNOWN
        if unknown:
            raise ValueError(f"--kv-events-config: unknown keys {sorted(unknown)}; known: {sorted(KNOWN)}")
        if data.get("replay_endpoint"):
            raise ValueError("--kv-events-config: replay_endpoint is not simulated; leave it out")
        enabled = bool(data.get("enable_kv_cache_events", False))
        publisher = data.get("publisher") or ("zmq" if enabled else "null")
        if publisher not in ("zmq", "null"):
            raise ValueError(f"--kv-events-config: publisher {publisher!r}; use zmq or null")
        if not enabled or publisher == "null":
            return None
        return cls(str(data.get("endpoint", cls.endpoint)), str(data.get("topic", "")), int(data.get("hwm", cls.hwm)))


class KVEventPublisher:
    def __init__(self, cfg: KVEventsConfig) -> None:
        import msgpack
        import zmq

        self._pack = msgpack.Packer()
        self._sock = zmq.Context.instance().socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, cfg.hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        e = cfg.endpoint
        if "*" in e or "::" in e or e.startswith(("ipc://", "inproc://")):
            self._sock.bind(e)
        else:
            self._sock.connect(e)
        self._topic = cfg.topic.encode()
        self._seq = count()
        self._again = zmq.Again
        self._noblock = zmq.NOBLOCK
        self.sent = self.dropped = 0

    def publish(self, events: list[dict[str, Any]]) -> None:
        """One batch, now; a full queue drops it (as a PUB socket past its high-water mark does)."""
        payload = self._pack.pack([time.time(), events, 0])
        try:
            self._sock.send_multipart((self._topic, next(self._seq).to_bytes(8, "big"), payload), flags=self._noblock)
            self.sent += 1
        except self._again:
            self.dropped += 1

    def close(self) -> None:
        self._sock.close(linger=0)
