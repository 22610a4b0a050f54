"""Any single process of a BSP job killed with SIGKILL mid-job and started again (what
``ps-local --respawn`` does: a server with ``--resume``) leaves the final parameters bit for
bit those of an undisturbed run: the coordinator (server 0, which rejoins the running job
from its checkpoint and the book in it, the others waiting for it up to ``--timeout``),
another server, and a worker (restarted within its heartbeat allowance, it takes its
place in the view again and pushes the very gradient of the step that waited for it).

Checkpoints every version (``--checkpoint-every 1``), so a server comes back at the job's
version wherever the kill lands; worker 0 is paced so that the kill lands mid-job.
"""
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.jobs import Job

STEPS = 30
ARGS = dict(steps=STEPS, timeout=30, heartbeat=0.2, misses=25, every=1, worker_args=["--straggler", "0:0.1"])
_REFERENCE = {}


def reference(tmp_path_factory):
    if not _REFERENCE:
        with Job(tmp_path_factory.mktemp("undisturbed"), **ARGS) as job:
            job.start()
            assert all(c == 0 for c in job.wait(120).values())
            _REFERENCE.update(load_file(str(job.out / "model.safetensors")))
    return _REFERENCE


@pytest.mark.parametrize("victim", ["server-0", "server-1", "worker-1"])
def test_a_process_killed_and_started_again_leaves_the_parameters_bit_identical(victim, tmp_path, tmp_path_factory):
    want = reference(tmp_path_factory)
    with Job(tmp_path, **ARGS) as job:
        job.start()
        job.until(lambda: job.step() >= 10, 90, "step 10")
        job.kill(victim)
        t0 = time.monotonic()
        role, rank = victim.split("-")
        if role == "server":
            job.server(int(rank), "--resume")
        else:
            job.worker(int(rank))
        codes = job.wait(120)
        print(f"\n{victim} killed at step >= 10 and started again: the job ended {time.monotonic() - t0:.1f} s later")
        assert all(c == 0 for c in codes.values()), {n: job.log(n)[-2000:] for n in codes}
        assert job.runs[victim] == 2
        if victim == "server-0":
            assert "the coordinator came back from its checkpoint of version" in job.log("server-0")
        got = load_file(str(job.out / "model.safetensors"))
        for k in want:
            assert np.array_equal(got[k], want[k]), f"{k}: max difference {np.abs(got[k] - want[k]).max()}"
