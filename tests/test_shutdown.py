"""TERM (what schedulers and ``kill`` send) or Ctrl-C at any phase stops a process in
bounded time, and a launcher's TERM stops every process of its job: none is left behind.
(tests/test_local.py covers ps-local's Ctrl-C mid-training; tests/test_faults.py what the
rest of a job does when one process is gone.)"""
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.jobs import TINY, Job, corpus
from tests.cluster import ENV
from tests.test_local import processes_with

LONG_EVAL = ["--eval-batches", "3000"]
PHASES = ("registration", "training", "shutdown")
ROLES = ("server-0", "server-1", "worker-0")


def reach(job, victim, phase):
    """Start the job so that ``victim`` is in ``phase``."""
    if phase == "registration":                  # the job never completes: worker 1 is not started
        job.server(0)
        if victim == "server-0":
            job.until(lambda: "listening on" in job.log("server-0"), 30, "server 0 listening")
            return
        if victim == "server-1":
            job.server(1)
        else:
            job.worker(0)
        job.until(lambda: f"registered {victim.replace('-', ' ')}" in job.log("server-0"), 30, "registered")
        return
    job.start()
    if phase == "training":
        job.until(lambda: job.step() >= 5, 60, "step 5")
    else:                                        # worker 1 is done; worker 0 evaluates; the servers wait
        job.until(lambda: "worker 1 is done" in job.log("server-0"), 60, "worker 1 done")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("victim", ROLES)
def test_term_stops_a_process_at_every_phase(victim, phase, tmp_path):
    with Job(tmp_path, S=2, W=2, steps=40, timeout=30, worker_args=LONG_EVAL if phase == "shutdown" else []) as job:
        reach(job, victim, phase)
        p = job.procs[victim]
        assert p.poll() is None
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        code = p.wait(timeout=30)
        took = time.monotonic() - t0
        print(f"\n{victim} TERMed at {phase}: exit {code} after {took:.2f} s")
        # the promise is a bound, not a speed: a checkpoint written and every socket closed with a
        # linger of at most 1 s take about 1 s here; 15 s leaves room for a machine at load 6
        assert code == 130 and took < 15, (code, took, job.log(victim)[-2000:])
        assert "interrupted; stopping" in job.log(victim) and "Traceback" not in job.log(victim)
        if victim.startswith("server") and phase != "registration":     # it wrote its state as it stopped
            ckpts = sorted((job.out / "checkpoints").glob(f"server-{victim[-1]}-v*.safetensors"))
            assert ckpts, "no checkpoint written on TERM"


def ps_local(out, *extra):
    cmd = [sys.executable, "-m", "common.launch.local", "--servers", "2", "--workers", "2", "--steps", "100000",
           "--out", str(out), "--no-progress", *TINY, "--data", str(corpus(out.parent)), "--timeout", "30", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("phase", ["registration", "training"])
def test_ps_local_term_stops_every_process(phase, tmp_path):
    out = tmp_path / "run"
    proc = ps_local(out)
    try:
        deadline = time.monotonic() + 90
        metrics = out / "metrics.jsonl"

        def ready():
            if phase == "registration":
                return (out / "logs" / "worker-1.log").exists()
            return metrics.exists() and len(metrics.read_text().splitlines()) > 3
        while not ready():
            assert time.monotonic() < deadline and proc.poll() is None, "the job did not start"
            time.sleep(0.05)
        coordinator = json.loads((out / "run_config.json").read_text())["launcher"]["coordinator"]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
        print(f"\nps-local TERMed at {phase}: exit {proc.returncode} after {took:.2f} s")
        assert proc.returncode == 130 and "stopping every process" in err, err
        assert processes_with(coordinator) == [], "a process of the job is left behind"
        assert took < 30        # ps-local kills what is left 5 s after its TERM; the rest is a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
