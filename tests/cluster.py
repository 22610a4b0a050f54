"""Start real server processes for a test, and always end them (by PID) afterwards."""
import os
import subprocess
import sys
import threading
import time

from common.wire.shm import remove_job_segments
from common.wire.transport import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PYTHONPATH: subprocesses import this checkout, not whatever an editable install points at
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
           PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
# Seconds a busy machine may add to a deadline a test measures: starting Python with NumPy and
# ZeroMQ takes about 0.5 s here but up to 5 s on 2 cores at load 6; a test asserts
# "took < deadline + SLACK", which still tells a deadline kept from a wait that never ends.
SLACK = 10.0


class Servers:
    """S server processes on 127.0.0.1 for W workers; logs in ``logdir``."""

    def __init__(self, S, W, logdir, args=(), timeout=20.0):
        self.S, self.W, self.logdir = S, W, logdir
        self.coordinator = f"127.0.0.1:{free_port()}"
        self.timeout = timeout
        self.procs = []
        for s in range(S):
            log = open(os.path.join(logdir, f"server{s}.log"), "w")
            bind = f"tcp://{self.coordinator}" if s == 0 else "tcp://127.0.0.1:*"
            cmd = [sys.executable, "-m", "paramserver", "--rank", str(s), "--bind", bind, "--num-servers", str(S),
                   "--num-workers", str(W), "--coordinator", self.coordinator, "--timeout", str(timeout),
                   *map(str, args)]
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV))

    def cluster(self, rank=-1, **kw):
        from common.cluster import ClusterConfig
        kw = dict(dict(num_servers=self.S, num_workers=self.W, coordinator=self.coordinator,
                       timeout=self.timeout), **kw)
        return ClusterConfig(rank=rank, **kw)

    def joined(self, rank, layout, job=None, **kw):
        """(client, parameters): a PSClient of worker ``rank`` registered (worker 0 also
        initializes the parameters to zeros) that has pulled them; the caller closes it."""
        import numpy as np
        from worker.client import PSClient
        c = PSClient(self.cluster(rank, **kw), job)
        try:
            c.register(layout, "float64")
            params = np.zeros(layout.size)
            if rank == 0:
                c.init(params)
            c.pull(params)
        except BaseException:
            c.close()
            raise
        return c, params

    def log(self, s):
        with open(os.path.join(self.logdir, f"server{s}.log")) as f:
            return f.read()

    def wait(self, timeout=30.0):
        """Every server's exit code (raises if one is still running after ``timeout``)."""
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        remove_job_segments(self.coordinator)     # as ps-local does: a process killed with -9 leaves its own


def run_threads(fn, n, timeout=120.0):
    """fn(rank) in n threads; re-raise the first exception; fail if one hangs."""
    errors, results = [], [None] * n

    def body(r):
        try:
            results[r] = fn(r)
        except BaseException as e:   # noqa: BLE001 - reported to the test below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]
    return results
