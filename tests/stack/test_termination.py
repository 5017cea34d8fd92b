"""A benchmark command killed with SIGTERM stops the processes it started, as Ctrl-C does."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.conftest import wait_until

COMMAND = textwrap.dedent("""
    import sys, time
    from local_stack.processes import ProcessGroup, run_stopping_children_on_termination

    def main():
        group = ProcessGroup(sys.argv[1])
        try:
            child = group.start("sleeper", ["http.server", "--bind", "127.0.0.1", "0"])
            print(child.proc.pid, flush=True)
            time.sleep(60)
            return 0
        finally:
            group.stop()
            print("stopped", flush=True)

    sys.exit(run_stopping_children_on_termination("sleeper-command", main))
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"  # a zombie has exited


def test_sigterm_stops_the_children(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", COMMAND, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        child = int(proc.stdout.readline())
        assert _alive(child)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "stopped"
        assert proc.wait(timeout=30) == 130
        assert wait_until(lambda: not _alive(child), timeout=10)
    finally:
        proc.kill()
