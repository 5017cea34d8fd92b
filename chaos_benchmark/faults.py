"""Kill and restart processes of a running local stack by name (the names its logs carry).

A P/D pair named `vllm-p2p-proxy` runs as `vllm-p2p-proxy` (the proxy, the endpoint the EPP
picks), `vllm-p2p-proxy-prefill` and `vllm-p2p-proxy-decode`. A restart starts the same command
again; its output goes on in the same log file.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from dataclasses import dataclass

from local_stack.processes import Child
from local_stack.stack import LocalStack

# KILL and TERM end the process; STOP freezes it (a hang; SIGCONT at the restart); the simulator
# takes USR1 as "the engine dies now" (the seed's IndexError → EngineDeadError) and USR2 as "the
# engine hangs" — a restart kills what is left and starts it again.
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "STOP": signal.SIGSTOP, "USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2}
ENDS = ("KILL", "TERM")


@dataclass(frozen=True)
class Fault:
    """Kill `process` `at` seconds into the run; start it again at `restart_at` (None: leave it dead)."""

    process: str
    at: float
    restart_at: float | None
    signal: str = "KILL"

    @classmethod
    def parse(cls, spec: str) -> "Fault":
        """`PROCESS,KILL_AT,RESTART_AT[,SIGNAL]`; RESTART_AT may be `-` (never)."""
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) not in (3, 4) or not parts[0]:
            raise ValueError(f"--fault {spec!r}: expected PROCESS,KILL_AT,RESTART_AT[,SIGNAL], e.g. vllm-p2p-proxy-decode,12,26")
        try:
            at = float(parts[1])
            restart = None if parts[2] in ("-", "") else float(parts[2])
        except ValueError:
            raise ValueError(f"--fault {spec!r}: KILL_AT and RESTART_AT are seconds from the start of the load") from None
        sig = parts[3].upper() if len(parts) == 4 else "KILL"
        if sig not in SIGNALS:
            raise ValueError(f"--fault {spec!r}: signal must be one of {', '.join(SIGNALS)}")
        if restart is not None and restart <= at:
            raise ValueError(f"--fault {spec!r}: the restart must come after the kill")
        return cls(parts[0], at, restart, sig)

    def endpoint(self, stack: LocalStack) -> str:
        """The endpoint (proxy) the process belongs to: what the EPP should stop picking."""
        names = sorted((p.name for p in stack.proxies), key=len, reverse=True)
        return next((n for n in names if self.process == n or self.process.startswith(n + "-")), self.process)


def processes(stack: LocalStack) -> dict[str, Child]:
    return {c.name: c for c in stack.procs.children}


def find(stack: LocalStack, name: str) -> Child:
    found = processes(stack)
    if name not in found:
        raise ValueError(f"no process {name!r} in the stack; there are: {', '.join(sorted(found))}")
    return found[name]


def kill(stack: LocalStack, name: str, sig: str = "KILL") -> None:
    """Signal the process (its whole process group); a killed one is reaped."""
    child = find(stack, name)
    try:
        os.killpg(child.proc.pid, SIGNALS[sig])
    except ProcessLookupError:
        pass
    if sig in ENDS:
        child.proc.wait(timeout=30)


def restart(stack: LocalStack, name: str, sig: str = "KILL") -> Child:
    """Start the process again with the command it ran (or continue a stopped one); returns the new child."""
    child = find(stack, name)
    if sig == "STOP":
        os.killpg(child.proc.pid, signal.SIGCONT)
        return child
    if child.proc.poll() is None:  # a dead or hung engine's server may still be up: replace it
        try:
            os.killpg(child.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.proc.wait(timeout=30)
    child.log.close()
    stack.procs.children.remove(child)
    return stack.procs.start(name, child.cmd[2:])  # cmd = [python, -m, module, args…]


def answers_200(url: str) -> bool:
    """True when `url` answers 200 within a second (a process's /health)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False
