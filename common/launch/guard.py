"""``python -m common.launch.guard -- CMD...``: run CMD on a remote host and end it with the session.

An ssh client that is killed does not kill what it started on the other side (unless a
terminal was allocated), so a launcher that stops a job by ending its ssh sessions
would leave servers and workers behind. ``ps-launch`` therefore starts every remote
role under this guard, which:

- starts CMD in its own process group, its output going where the guard's goes;
- watches its own standard input, which is the ssh session's: at end of file (the
  launcher closed it, or the session died) it stops CMD's whole group;
- on SIGTERM, SIGHUP or SIGINT does the same;
- exits with CMD's exit code.

Stopping is TERM to the group, then KILL after ``GRACE_S`` seconds. The guard only
signals the group it created. Not here: ssh itself, the choice of roles.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

GRACE_S = 5.0


def read_to_end_of_input():
    """Return when standard input ends (the launcher closed it, or its session died)."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass


def stop_group(proc: subprocess.Popen, grace: float = GRACE_S):
    """TERM the process group of ``proc``, KILL it if still there after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m common.launch.guard -- CMD [ARGS...]", file=sys.stderr)
        return 2
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    stopping = threading.Event()

    def stop(reason: str):
        if not stopping.is_set():
            stopping.set()
            print(f"guard: {reason}; stopping {os.path.basename(argv[0])} (pid {proc.pid})", file=sys.stderr,
                  flush=True)
            stop_group(proc)

    def watch_stdin():
        read_to_end_of_input()
        if proc.poll() is None:
            stop("the launcher's session ended (end of input)")

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda s, f: threading.Thread(target=stop, args=(f"signal {s}",), daemon=True).start())
    threading.Thread(target=watch_stdin, daemon=True).start()
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:     # pragma: no cover - PEP 475 retries, kept for clarity
            continue
    stopping.set()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
