"""Profile every (prefill, decode) link the Llumnix way and write the EPP's link-profiles file.

The seed's Llumnix fork profiles the transfer time from every instance to every other at
log-spaced block counts. Here a links spec says what to measure, three ways that combine:

    links:      # explicit pairs
    - {prefill: prefill-a, decode: decode-a, backend: nccl}
    classes:    # one measurement standing for a link class (topology level [+ kv-backend fabric])
    - {level: none, backend: nccl, link_gbps: 1.0, link_latency_ms: 0.5, kv_backend: ethernet}
    instances:  # every prefill-capable instance to every decode-capable one, by node
    - {name: prefill-a, node: worker-a, role: prefill}
    fabrics:    # how a link inside each node, and between nodes, is made
      worker-a: {backend: nccl}
      between-nodes: {backend: nccl, link_gbps: 1.0}

Each link is measured with the kv_transfer backend it names (`nccl`: a second rank in this
process, `fs`: a shared directory) behind a link model (bandwidth cap + latency) standing for
the fabric. The output is `inference-epp/kv-link-profiles/v1`, what `kv-link-profiles` reads.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bandwidth_profiler.profiler import ProfileSettings, run_profile
from kv_transfer import KVShape, LinkModel

LINKS_SCHEMA = "inference-epp/kv-link-profiles/v1"
BETWEEN_NODES = "between-nodes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Fabric(_Strict):
    backend: Literal["nccl", "fs", "pull"]  # pull: the simulator's NIXL read over TCP
    link_gbps: float = Field(0.0, ge=0)  # 0 = the real copy only
    link_latency_ms: float = Field(0.0, ge=0)
    kv_backend: str = ""  # the label recorded with the profile (nvlink, fs, ethernet, …)

    def link(self) -> LinkModel:
        return LinkModel.from_gbps(self.link_gbps, self.link_latency_ms) if self.link_gbps else LinkModel(0.0, self.link_latency_ms / 1000)


class PairSpec(Fabric):
    prefill: str
    decode: str


class ClassSpec(Fabric):
    level: Literal["host", "rack", "zone", "region", "none"]
    match_kv_backend: str | None = None


class Instance(_Strict):
    name: str
    node: str
    role: Literal["prefill", "decode", "prefill-decode"]


class LinksSpec(_Strict):
    links: list[PairSpec] = []
    classes: list[ClassSpec] = []
    instances: list[Instance] = []
    fabrics: dict[str, Fabric] = {}

    def pairs(self) -> list[PairSpec]:
        """The explicit pairs, then every prefill → decode pair of `instances` (p ≠ d), in order."""
        out = list(self.links)
        for p in self.instances:
            if p.role == "decode":
                continue
            for d in self.instances:
                if d.name == p.name or d.role == "prefill":
                    continue
                key = p.node if p.node == d.node else BETWEEN_NODES
                fabric = self.fabrics.get(key)
                if fabric is None:
                    raise ValueError(f"no fabric for the link {p.name} -> {d.name}: add fabrics.{key}")
                out.append(PairSpec(prefill=p.name, decode=d.name, **fabric.model_dump()))
        return out


def load_links_spec(path: str) -> LinksSpec:
    try:
        spec = LinksSpec.model_validate(yaml.safe_load(Path(path).read_text()) or {})
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read links spec {path}: {e}") from None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{path}: {problems}") from None
    if not spec.links and not spec.classes and not spec.instances:
        raise ValueError(f"{path}: nothing to measure; give links, classes or instances")
    return spec


def measure(spec: LinksSpec, shape: KVShape, *, min_blocks: int, max_blocks: int, points: int, warmup_blocks: int,
            num_samples: int, fs_dir: str | None = None, progress: Callable[[int], None] = lambda n: None,
            describe: Callable[[str], None] = lambda s: None) -> dict:
    """Measure every pair and class of the spec; the link-profiles document."""

    def one(f: Fabric, what: str) -> dict:
        describe(what)
        prof = run_profile(ProfileSettings(f.backend, shape, f.link(), min_blocks, max_blocks, points, warmup_blocks, num_samples,
                                           fs_dir, f.kv_backend), progress)
        return {"kv_backend": prof["kv_backend"], "backend": f.backend, "link": prof["link"], "points": prof["points"]}

    links = [{"prefill": p.prefill, "decode": p.decode, **one(p, f"{p.prefill} -> {p.decode}")} for p in spec.pairs()]
    classes = []
    for c in spec.classes:
        entry = {"level": c.level, **one(c, f"class {c.level}")}
        if c.match_kv_backend is not None:
            entry["match_kv_backend"] = c.match_kv_backend
        classes.append(entry)
    return {
        "schema": LINKS_SCHEMA,
        "block_tokens": shape.block_size,
        "block_bytes": shape.block_bytes,
        "shape": {"num_layers": shape.num_layers, "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                  "block_size": shape.block_size, "dtype": shape.dtype},
        "settings": {"min_blocks": min_blocks, "max_blocks": max_blocks, "points": points, "warmup_blocks": warmup_blocks,
                     "num_samples": num_samples},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "links": links,
        "classes": classes,
    }


def link_names(doc: dict) -> list[str]:
    return [f"{e['prefill']} -> {e['decode']}" for e in doc["links"]] + [
        f"class {e['level']}" + (f"/{e['match_kv_backend']}" if e.get("match_kv_backend") else "") for e in doc["classes"]]


def links_table(doc: dict) -> str:
    entries = doc["links"] + doc["classes"]
    names = link_names(doc)
    rows = ["| link | fabric | " + " | ".join(f"{pt['blocks']} blk ms" for pt in entries[0]["points"]) + " |",
            "|---|---|" + "---:|" * len(entries[0]["points"])]
    for name, e in zip(names, entries):
        rows.append(f"| {name} | {e['kv_backend']} | " + " | ".join(f"{pt['seconds'] * 1000:.2f}" for pt in e["points"]) + " |")
    return "\n".join(rows)


def plot_links(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, e in zip(link_names(doc), doc["links"] + doc["classes"]):
        ax.plot([pt["blocks"] for pt in e["points"]], [pt["seconds"] * 1000 for pt in e["points"]], marker="o", label=f"{name} ({e['kv_backend']})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"KV blocks ({doc['block_tokens']} tokens, {doc['block_bytes'] / 1024:g} KiB each)")
    ax.set_ylabel("transfer time (ms, median)")
    ax.set_title("KV-transfer profile per link")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
