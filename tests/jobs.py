"""A whole job of real processes for failure tests: start, kill (by PID), restart, watch.

Each role is the command a user types (``python -m paramserver``, ``python -m worker``)
with a tiny GPT, small deadlines and fast heartbeats, so that failures resolve in
seconds. Every process this helper starts is ended by its PID when the test ends.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common.wire.shm import remove_job_segments
from common.wire.transport import free_port
from tests.cluster import ENV

TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
        "--eval-interval", "100000", "--eval-batches", "1", "--sample-bytes", "0", "--log-interval", "1",
        "--doc-bytes", "4096"]
OPTIM = ["--optimizer", "adamw", "--lr", "3e-3", "--grad-clip", "1.0", "--warmup-steps", "2"]


def corpus(folder, size=64_000, seed=0) -> Path:
    """A small text file of words drawn from a fixed vocabulary (fast to load, the same every run)."""
    import random
    words = ("the server holds a shard of the flat vector and every worker pushes its gradient then pulls "
             "fresh parameters back step after step until the job is done or a process dies").split()
    rng = random.Random(seed)
    text, n = [], 0
    while n < size:
        line = " ".join(rng.choice(words) for _ in range(rng.randrange(4, 14))) + ".\n"
        text.append(line)
        n += len(line)
    path = Path(folder) / "corpus.txt"
    path.write_text("".join(text))
    return path


class Job:
    """S servers and W workers on 127.0.0.1; logs and the run folder under ``folder``."""

    def __init__(self, folder, S=2, W=2, steps=30, timeout=10.0, heartbeat=0.2, misses=5, every=5,
                 server_args=(), worker_args=(), env=None, host="127.0.0.1", prefix=()):
        self.folder = Path(folder)
        self.out = self.folder / "run"
        self.logs = self.folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.S, self.W, self.steps, self.host, self.prefix = S, W, steps, host, list(prefix)
        self.port = free_port()
        self.coordinator = f"{host}:{self.port}"
        self.common = ["--num-servers", S, "--num-workers", W, "--coordinator", self.coordinator,
                       "--timeout", timeout, "--heartbeat", heartbeat, "--heartbeat-misses", misses]
        self.server_args = [*OPTIM, "--checkpoint-every", every, *server_args]
        data = corpus(self.folder)
        self.worker_args = [*TINY, "--data", data, "--steps", steps, *worker_args]
        self.env = dict(ENV, **(env or {}))
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.runs: dict[str, int] = {}

    # --- processes --------------------------------------------------------------------
    def server_cmd(self, s, *extra):
        bind = f"tcp://{self.host}:{self.port if s == 0 else '*'}"
        return [sys.executable, "-m", "paramserver", "--rank", s, "--bind", bind, *self.common,
                "--out", self.out, *self.server_args, *extra]

    def worker_cmd(self, r, *extra):
        return [sys.executable, "-m", "worker", "--rank", r, *self.common, "--out", self.out,
                *self.worker_args, *extra]

    def _start(self, name, cmd, prefix=None):
        n = self.runs[name] = self.runs.get(name, 0) + 1
        log = open(self.logs / f"{name}.{n}.log", "w")
        cmd = (self.prefix if prefix is None else list(prefix)) + [str(c) for c in cmd]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        self.started[name] = time.monotonic()
        return self.procs[name]

    def server(self, s, *extra, prefix=None):
        return self._start(f"server-{s}", self.server_cmd(s, *extra), prefix)

    def worker(self, r, *extra, prefix=None):
        return self._start(f"worker-{r}", self.worker_cmd(r, *extra), prefix)

    def start(self, servers=(), workers=()):
        """Every server and worker (or those given), servers first."""
        for s in (servers or range(self.S)):
            self.server(s)
        for r in (workers or range(self.W)):
            self.worker(r)

    def kill(self, name, sig=signal.SIGKILL):
        p = self.procs[name]
        if p.poll() is None:
            os.kill(p.pid, sig)
        p.wait(timeout=30)

    @contextlib.contextmanager
    def frozen(self, *names):
        """The named processes stopped (SIGSTOP) for the block and then let go (SIGCONT): what
        the block does happens between two of their instructions, however slow the test is to
        get there (a kill while the workers are frozen lands before the job can end)."""
        stopped = [self.procs[n] for n in names if self.procs[n].poll() is None]
        for p in stopped:
            os.kill(p.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for p in stopped:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGCONT)

    def signal_at_once(self, sig, timeout=30.0) -> dict:
        """``sig`` to every running process as ONE event, as a Ctrl-C of the whole job would:
        each is first frozen (SIGSTOP), so that none can react to another's signal (a stopped
        coordinator telling the rest to stop) before its own is pending; then every process gets
        ``sig`` and all go on (SIGCONT). Returns {name: exit code} once every process ended."""
        running = [p for p in self.procs.values() if p.poll() is None]
        for p in running:
            os.kill(p.pid, signal.SIGSTOP)
        for p in running:
            os.kill(p.pid, sig)
        for p in running:
            os.kill(p.pid, signal.SIGCONT)
        return self.wait(timeout)

    def wait(self, timeout=60.0, names=None) -> dict:
        """{name: exit code} once every process (or those named) has ended; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        out = {}
        for name in names or list(self.procs):
            p = self.procs[name]
            try:
                out[name] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still runs {timeout:.0f} s later; its log:\n{self.log(name)[-3000:]}")
        return out

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        remove_job_segments(self.coordinator)     # as ps-local does: a process killed with -9 leaves its own

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # --- what happened ----------------------------------------------------------------
    def log(self, name, run=None) -> str:
        n = run or self.runs.get(name, 1)
        path = self.logs / f"{name}.{n}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_of(self, name) -> str:
        return "\n".join(self.log(name, n) for n in range(1, self.runs.get(name, 0) + 1))

    def final_params(self) -> dict:
        """The parameters the job saved at its end (name -> array)."""
        from safetensors.numpy import load_file
        return load_file(str(self.out / "model.safetensors"))

    def metrics(self) -> list:
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return []
        complete = path.read_text().split("\n")[:-1]          # the last line may be half written
        return [json.loads(ln) for ln in complete if ln.strip()]

    def step(self) -> int:
        """The last step worker 0 logged (it logs every step)."""
        return max((r.get("step", 0) for r in self.metrics()), default=-1)

    def until(self, cond, timeout=60.0, what="the condition"):
        deadline = time.monotonic() + timeout
        while not cond():
            dead = [n for n, p in self.procs.items() if p.poll() not in (None, 0)]
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached within {timeout:.0f} s; exited: {dead}")
            time.sleep(0.05)

    def server_json(self, s) -> dict:
        return json.loads((self.out / f"server-{s}.json").read_text())

    def worker_json(self, r) -> dict:
        return json.loads((self.out / f"worker-{r}.json").read_text())


def undisturbed(folder, **job_args) -> dict:
    """The final parameters of a whole job run with ``job_args`` and nothing done to it: the
    reference a disturbed run must equal bit for bit (BSP sums in rank order)."""
    with Job(folder, **job_args) as job:
        job.start()
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), codes
        return job.final_params()


def assert_same_params(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), f"{k}: max difference {np.abs(got[k] - want[k]).max()}"
