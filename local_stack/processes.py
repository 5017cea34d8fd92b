"""Start child processes, wait until they answer, and stop every one of them (no strays)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence


@dataclass
class Child:
    name: str
    cmd: list[str]
    proc: subprocess.Popen
    log_path: Path
    log: IO[bytes] = field(repr=False)


class ProcessGroup:
    """Children in their own sessions; `stop()` signals each group, then kills what remains."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Child:
        """A module of this project (`python -m args…`) with this interpreter."""
        return self.start_command(name, [sys.executable, "-m", *args], {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def start_command(self, name: str, cmd: Sequence[str], env: dict[str, str]) -> Child:
        """Any program (e.g. a vLLM server in its own venv) with exactly this environment."""
        cmd = list(cmd)
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        child = Child(name, cmd, proc, log_path, log)
        self.children.append(child)
        return child

    def run(self, name: str, args: Sequence[str], timeout: float) -> Child:
        """A one-shot command (not a member of the group): waits for it; raises with the log's tail on failure."""
        child = self.start(name, args)
        self.children.remove(child)
        try:
            code = child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.proc.pid, signal.SIGKILL)
            child.proc.wait()
            code = -1
        finally:
            child.log.close()
        if code != 0:
            raise RuntimeError(f"{name} failed (exit {code}); log {child.log_path}:\n{tail(child.log_path)}")
        return child

    def wait_http(self, child: Child, url: str, timeout: float = 60.0) -> None:
        """Until `url` answers 200; raises with the log's tail if the child dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode}; log {child.log_path}:\n{tail(child.log_path)}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{child.name} not ready at {url} after {timeout:g}s; log {child.log_path}:\n{tail(child.log_path)}")

    def stop(self, timeout: float = 10.0) -> None:
        for c in reversed(self.children):
            if c.proc.poll() is None:
                try:
                    os.killpg(c.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for c in self.children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if c.proc.poll() is None:
                try:
                    os.killpg(c.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                c.proc.wait()
            c.log.close()
        self.children.clear()

    def alive(self) -> list[str]:
        return [c.name for c in self.children if c.proc.poll() is None]


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_stopping_children_on_termination(command: str, main: Callable[[], int]) -> int:
    """Runs a command's `main` with SIGTERM and SIGHUP raising KeyboardInterrupt, as Ctrl-C does, so its
    `finally` stops the children it started; without it a benchmark killed by `kill` or a closed terminal
    leaves its whole stack running. Exits 130 on any of the three."""
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{command}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
