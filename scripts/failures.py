"""Failures, shown: a local job loses a worker, a server, the coordinator; what happens.

    python scripts/failures.py                  # every scenario (about a minute on 2 cores)
    python scripts/failures.py worker server    # some of them
    python scripts/failures.py worker --keep runs/lesson7 --eval-interval 25   # lesson 7: the run
                        # folders kept, the job left alone among them, validation curves to plot

Each scenario runs ``ps-local`` as a user would, finds a process's PID among its children
(as ``pgrep -f`` would), kills it with SIGKILL (a crash), and reports what the job did and
how long it took, from the run folder's logs and files:

- ``worker``:      worker 1 dies; the coordinator drops it after 5 missed heartbeats and
                   the steps go on with worker 0; the job ends normally;
- ``server``:      server 1 dies and ps-local (``--respawn``) starts it again with
                   ``--resume``; it loads its checkpoint (``--checkpoint-every 1``), the
                   workers send it their pushes again, and the final parameters are bit
                   for bit those of an uninterrupted run;
- ``coordinator``: server 0 dies and is not started again; every other process waits
                   ``--timeout`` for it (a coordinator restarted with ``--resume`` would
                   rejoin: tests/test_respawn.py), then stops naming it; ``ps-local
                   --resume`` continues the job from the servers' checkpoints, and again
                   the final parameters equal the uninterrupted run's.
Each scenario kills its process as soon as the job reaches a set step (a quarter, a third,
half of ``--steps``), its PID looked up beforehand, so the kill lands within a few steps
of it. With ``--keep`` the job is also run undisturbed (``uninterrupted``, reused by a later
call with the same flags), so that ``ps-plot`` can lay the runs over each other.
docs/failures.md explains each outcome; tests/test_faults.py checks them all; lesson 7
(docs/lesson7_failures.md) plots them.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                 # run from a clone without installing
import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from common.wire.transport import free_port  # noqa: E402

MODEL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8",
         "--eval-batches", "2", "--sample-bytes", "0", "--log-interval", "1"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


class LocalJob:
    """``ps-local`` in the background, and what a user would look at."""
    eval_interval = 100000                    # validation only at the end, unless --eval-interval (lesson 7)

    def __init__(self, out: Path, steps: int, *extra):
        self.out, self.port, self.steps = out, free_port(), steps
        cmd = [sys.executable, "-m", "common.launch.local", "--servers", "2", "--workers", "2", "--steps", str(steps),
               "--out", str(out), "--port", str(self.port), "--no-progress", "--timeout", "8", "--heartbeat", "0.2",
               *self.worker_args(), *extra]
        self.proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    @classmethod
    def worker_args(cls) -> list[str]:
        return MODEL + ["--eval-interval", str(cls.eval_interval)]

    def step(self) -> int:
        path = self.out / "metrics.jsonl"
        lines = path.read_text().split("\n")[:-1] if path.exists() else []    # complete lines: one may be half written
        return max((json.loads(ln).get("step", 0) for ln in lines if ln.strip()), default=-1)

    def wait_step(self, step: int, timeout=120.0):
        deadline = time.monotonic() + timeout
        while self.step() < step:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the job did not reach step {step}:\n{self.proc.stdout.read()}")
            time.sleep(0.05)

    def pid(self, role: str, rank: int, timeout: float = 60.0) -> int:
        """The PID of a process of the job: the child of ps-local whose command line is that
        role and rank, as ``pgrep -f "worker --rank 1"`` finds it. (ps-status shows the same
        PIDs, but starting it takes seconds on a busy machine, in which this small job may end.)"""
        module = {"worker": "worker", "server": "paramserver"}[role]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            for pid in children(self.proc.pid):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if Path(f"/proc/{pid}").exists() else []
                words = [a.decode(errors="replace") for a in argv]
                if module in words and "--rank" in words and words[words.index("--rank") + 1] == str(rank):
                    return pid
            time.sleep(0.05)
        raise SystemExit(f"no {role} {rank} among ps-local's processes within {timeout:.0f} s")

    def finish(self, timeout=180.0) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out

    def log(self, name: str) -> str:
        return (self.out / "logs" / f"{name}.log").read_text(errors="replace")

    def lines(self, name: str, *words) -> list[str]:
        return [ln for ln in self.log(name).splitlines() if any(w in ln for w in words)]


def children(parent: int) -> list[int]:
    """The PIDs whose parent is ``parent`` (read from /proc, as ps and pgrep do)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue                                 # a process that ended meanwhile
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def params(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def kill_at(job: LocalJob, role: str, rank: int, step: int) -> float:
    """SIGKILL ``role`` ``rank`` of ``job`` as soon as the job reaches ``step``. The PID is
    looked up first, so the kill lands within a few steps of ``step``. Returns the time of
    the kill."""
    job.wait_step(1)
    pid = job.pid(role, rank)
    job.wait_step(step)
    if job.proc.poll() is not None or job.step() >= job.steps:
        raise SystemExit(f"the job ended before {role} {rank} could be killed: give more --steps")
    os.kill(pid, signal.SIGKILL)
    print(f"  killed {role} {rank} (pid {pid}) at step {job.step()}")
    return time.monotonic()


def worker(folder: Path, steps: int, reference):
    job = LocalJob(folder / "worker", steps)
    t0 = kill_at(job, "worker", 1, steps // 4)
    code, _ = job.finish()
    took = time.monotonic() - t0
    drop = job.lines("server-0", "dropped worker 1")
    print(f"  ps-local exit code {code}; the job ended {took:.1f} s after the kill, at step {job.step()}")
    print("  server 0: " + (drop[0].split(" WARNING ")[-1] if drop else "(no drop logged)"))
    applied = json.loads((job.out / "server-0.json").read_text())["applied_by_worker"]
    print(f"  gradients averaged in, per worker: {applied}")
    return code == 0 and bool(drop)


def server(folder: Path, steps: int, reference):
    job = LocalJob(folder / "server", steps, "--respawn", "--checkpoint-every", "1")
    t0 = kill_at(job, "server", 1, steps // 3)
    code, out = job.finish()
    back = job.lines("server-0", "came back")
    print(f"  ps-local exit code {code}; the job ended {time.monotonic() - t0:.1f} s after the kill")
    print("  " + next((ln for ln in out.splitlines() if "killed by signal" in ln), "ps-local: ?"))
    print("  server 0: " + (back[0].split(" WARNING ")[-1] if back else "(server 1 did not come back)"))
    resent = sum(json.loads((job.out / f"worker-{r}.json").read_text())["resends"] for r in range(2))
    print(f"  pushes sent again after the lost connection: {resent}; applied twice: never "
          f"({len(job.lines('server-1', 'answered again'))} recognised as repeats)")
    equal = same(params(job.out), reference())
    print(f"  final parameters equal to an uninterrupted run's, bit for bit: {equal}")
    return code == 0 and equal


def coordinator(folder: Path, steps: int, reference):
    out = folder / "coordinator"
    job = LocalJob(out, steps, "--checkpoint-every", "5")
    t0 = kill_at(job, "server", 0, steps // 2)
    code, _ = job.finish()
    print(f"  ps-local exit code {code}; every process stopped {time.monotonic() - t0:.1f} s after the kill")
    for name in ("server-1", "worker-0"):
        err = job.lines(name, " ERROR ")
        print(f"  {name}: " + (err[-1].split(" ERROR ")[-1][:150] + "..." if err else "(no error logged)"))
    again = LocalJob(out, steps, "--checkpoint-every", "5", "--resume")
    code2, said = again.finish()
    if code2 != 0:
        print(said)
    at = again.lines("server-0", "resumes from the servers' checkpoints")
    print(f"  ps-local --resume: exit code {code2}; " + (at[-1].split(" INFO ")[-1] if at else "?"))
    equal = same(params(out), reference())
    print(f"  final parameters equal to an uninterrupted run's, bit for bit: {equal}")
    return code == 1 and code2 == 0 and equal


def uninterrupted(out: Path, steps: int) -> Path:
    """The same job left alone, to compare with; one already in ``out`` (an earlier call
    with the same --keep, --steps and --eval-interval) is used again."""
    if (out / "model.safetensors").exists():
        config = json.loads((out / "run_config.json").read_text())
        if config["launcher"]["steps"] == steps and config["worker_args"] == LocalJob.worker_args():
            print(f"uninterrupted: the job left alone, from {out} (an earlier run)")
            return out
        raise SystemExit(f"{out} holds a run of other flags; give another --keep (or remove it)")
    print("uninterrupted: the job left alone, to compare with")
    code, said = LocalJob(out, steps).finish()
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{said}")
    return out


SCENARIOS = {"worker": worker, "server": server, "coordinator": coordinator}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], help="default: all")
    p.add_argument("--steps", type=int, default=400, help="steps of each job (default: 400)")
    p.add_argument("--keep", default="", help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--eval-interval", type=int, default=0,
                   help="worker 0 evaluates the validation loss every this many steps, for loss curves to "
                        "compare (ps-plot, lesson 7; default: only at the end)")
    args = p.parse_args(argv)
    if args.eval_interval:
        LocalJob.eval_interval = args.eval_interval
    folder = Path(args.keep or tempfile.mkdtemp(prefix="failures-"))
    cache = {}

    def reference():
        if "params" not in cache:
            cache["params"] = params(uninterrupted(folder / "uninterrupted", args.steps))
        return cache["params"]
    chosen = args.scenarios or list(SCENARIOS)
    if args.keep or {"server", "coordinator"} & set(chosen):   # first: kept beside the others (ps-plot)
        reference()
    ok = True
    for name in chosen:
        print(f"{name}: {SCENARIOS[name].__name__} killed with SIGKILL")
        good = SCENARIOS[name](folder, args.steps, reference)
        print(f"  -> {'as documented' if good else 'NOT AS DOCUMENTED'}")
        ok &= good
    print(f"run folders: {folder}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
