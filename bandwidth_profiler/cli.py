"""`kv-bandwidth-profiler`: profile KV transfer time per backend; write JSON, a table and a PNG.

Example (both backends on this machine, the fs link capped to emulate shared storage):

    kv-bandwidth-profiler --backends nccl,fs --fs-link-gbps 0.02 --fs-link-latency-ms 5 \\
        --min-blocks 1 --max-blocks 1024 --num-samples 5 --output-dir profiles/

Per link (every prefill → decode pair of a links spec, the file the EPP's kv-link-profiles reads):

    kv-bandwidth-profiler --links links.yaml --output-dir profiles/   # writes kv-link-profiles.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from epp.util.progress import progress

from bandwidth_profiler.profiler import ProfileSettings, block_counts, run_profile
from kv_transfer import KVShape, LinkModel


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kv-bandwidth-profiler", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--backends", default="nccl,fs", help="comma-separated: nccl, fs (default: %(default)s)")
    a("--min-blocks", type=int, default=1, help="smallest transfer in KV blocks (default: %(default)s)")
    a("--max-blocks", type=int, default=1024, help="largest transfer in KV blocks (default: %(default)s)")
    a("--num-points", type=int, default=10, help="log-spaced block counts between min and max (default: %(default)s)")
    a("--warmup-blocks", type=int, default=8, help="size of the warm-up transfers (default: %(default)s)")
    a("--num-samples", type=int, default=5, help="transfers per block count; the median is kept (default: %(default)s)")
    a("--num-layers", type=int, default=4, help="model shape: layers (default: %(default)s)")
    a("--num-kv-heads", type=int, default=2, help="model shape: KV heads (default: %(default)s)")
    a("--head-dim", type=int, default=64, help="model shape: head dim (default: %(default)s)")
    a("--block-size", type=int, default=16, help="tokens per block (default: %(default)s)")
    a("--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="KV dtype (default: %(default)s)")
    a("--nccl-link-gbps", type=float, default=0.0, help="link model for nccl, GB/s; 0 = the real copy only (default: %(default)s)")
    a("--nccl-link-latency-ms", type=float, default=0.0, help="link latency for nccl (default: %(default)s)")
    a("--fs-link-gbps", type=float, default=0.0, help="link model for fs, GB/s; 0 = the real copy only (default: %(default)s)")
    a("--fs-link-latency-ms", type=float, default=0.0, help="link latency for fs (default: %(default)s)")
    a("--fs-dir", default=None, help="shared directory for fs (default: a temporary directory)")
    a("--device", default="cpu", choices=("cpu", "cuda"), help="nccl backend: cpu = gloo, cuda = NCCL on the GPU (default: %(default)s)")
    a("--label", default="", help="llm-d.ai/kv-backend value recorded in the profile (default: nvlink for nccl, fs for fs)")
    a("--links", default=None, metavar="SPEC", help="measure every link of this spec (pairs, classes, or instances by node; "
      "see bandwidth_profiler/links.py) instead of --backends, and write kv-link-profiles.json (default: off)")
    a("--no-progress", action="store_true", help="no progress bar (for logs)")
    a("--output-dir", default=".", help="where <backend>.json, the table and the PNG go (default: %(default)s)")
    a("--name", default="kv-transfer-profile", help="base name of the table and PNG (default: %(default)s)")
    return p


def plot(profiles: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for prof in profiles:
        xs = [pt["blocks"] for pt in prof["points"]]
        ys = [pt["seconds"] * 1000 for pt in prof["points"]]
        ax.plot(xs, ys, marker="o", label=f"{prof['backend']} ({prof['kv_backend']})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"KV blocks ({profiles[0]['block_tokens']} tokens, {profiles[0]['block_bytes'] / 1024:g} KiB each)")
    ax.set_ylabel("transfer time (ms, median)")
    ax.set_title("KV-transfer profile")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(profiles: list[dict]) -> str:
    names = [p["backend"] for p in profiles]
    rows = ["| blocks | MiB | " + " | ".join(f"{n} ms" for n in names) + (" | ratio |" if len(names) == 2 else " |"),
            "|---:|---:|" + "---:|" * len(names) + ("---:|" if len(names) == 2 else "")]
    for i, pt in enumerate(profiles[0]["points"]):
        secs = [p["points"][i]["seconds"] for p in profiles]
        cells = " | ".join(f"{s * 1000:.2f}" for s in secs)
        ratio = f" | {secs[1] / secs[0]:.1f}× |" if len(secs) == 2 and secs[0] > 0 else " |"
        rows.append(f"| {pt['blocks']} | {pt['bytes'] / 2**20:.2f} | {cells}{ratio}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    shape = KVShape(args.num_layers, args.num_kv_heads, args.head_dim, args.block_size, args.dtype)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = block_counts(args.min_blocks, args.max_blocks, args.num_points)
    if args.links:
        return _links_main(args, shape, out, len(counts))
    profiles = []
    with progress(len(counts) * len(backends), unit="point", desc="profiling", disable=args.no_progress) as bar:
        for backend in backends:
            gbps = args.nccl_link_gbps if backend == "nccl" else args.fs_link_gbps
            lat = args.nccl_link_latency_ms if backend == "nccl" else args.fs_link_latency_ms
            link = LinkModel.from_gbps(gbps, lat) if gbps else LinkModel(0.0, lat / 1000)
            settings = ProfileSettings(backend, shape, link, args.min_blocks, args.max_blocks, args.num_points, args.warmup_blocks,
                                       args.num_samples, args.fs_dir, args.label, args.device)
            bar.set_description(f"profiling {backend}")
            prof = run_profile(settings, bar.update)
            (out / f"{backend}.json").write_text(json.dumps(prof, indent=2))
            profiles.append(prof)
    text = table(profiles)
    print(text)
    (out / f"{args.name}.md").write_text(text + "\n")
    plot(profiles, out / f"{args.name}.png")
    print(f"wrote {', '.join(str(out / (b + '.json')) for b in backends)}, {out / (args.name + '.png')}")
    sys.stdout.flush()
    os._exit(0)  # receiver threads of the nccl backend may still sit in recv


def _links_main(args: argparse.Namespace, shape: KVShape, out: Path, points: int) -> int:
    from bandwidth_profiler.links import links_table, load_links_spec, measure, plot_links

    try:
        spec = load_links_spec(args.links)
        n = len(spec.pairs()) + len(spec.classes)
    except ValueError as e:
        print(f"kv-bandwidth-profiler: {e}", file=sys.stderr)
        return 2
    with tqdm(total=n * points, unit="point", desc="profiling links", disable=args.no_progress) as bar:
        doc = measure(spec, shape, min_blocks=args.min_blocks, max_blocks=args.max_blocks, points=args.num_points,
                      warmup_blocks=args.warmup_blocks, num_samples=args.num_samples, fs_dir=args.fs_dir,
                      progress=bar.update, describe=lambda s: bar.set_description(f"profiling {s}"))
    target = out / "kv-link-profiles.json"
    target.write_text(json.dumps(doc, indent=2))
    text = links_table(doc)
    print(text)
    (out / "kv-link-profiles.md").write_text(text + "\n")
    plot_links(doc, out / "kv-link-profiles.png")
    print(f"wrote {target} ({n} links), {out / 'kv-link-profiles.png'}")
    sys.stdout.flush()
    os._exit(0)  # receiver threads of the nccl backend may still sit in recv


if __name__ == "__main__":
    sys.exit(main())
