"""Compile proto/ into epp/admin/ with grpcio-tools (`make proto`); the generated code is checked in."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    args = ["grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", *protos]
    code = protoc.main(args)
    if code == 0:
        print("compiled " + ", ".join(protos))
    return code


if __name__ == "__main__":
    sys.exit(main())
