"""Server durability: a killed server restarted from its checkpoint, and a whole job resumed
from the servers' checkpoints, end with the very parameters of an uninterrupted run
(bsp, fixed seeds; the sums are in rank order, so a run is reproducible bit for bit).

- killed right after its checkpoint of version 10 (``--die-at-version``: a real SIGKILL
  at a checkpoint boundary) and restarted with ``--resume``: equal;
- with ``--checkpoint-every 1``, killed by the test at any moment, several times: equal
  (the checkpoint of a version is written before any worker sees that version);
- every process killed, then the job resumed (every server with ``--resume``): equal, and
  the loss curve continues where it stopped;
- restarted from a checkpoint older than the job: the job stops, saying why and how to
  resume it.
"""
import time

import pytest

from tests.jobs import Job, assert_same_params, undisturbed

STEPS = 24
_REFERENCE = {}


def reference(tmp_path_factory, S):
    """The parameters of an uninterrupted run with S servers (computed once per S)."""
    if S not in _REFERENCE:
        _REFERENCE[S] = undisturbed(tmp_path_factory.mktemp(f"reference{S}"), S=S, W=2, steps=STEPS, timeout=20)
    return _REFERENCE[S]


def test_server_killed_at_a_checkpoint_restarts_and_the_job_ends_as_if_nothing_happened(tmp_path, tmp_path_factory):
    want = reference(tmp_path_factory, 2)
    with Job(tmp_path, S=2, W=2, steps=STEPS, timeout=20, every=5) as job:
        job.server(0)
        job.server(1, "--die-at-version", 10)
        job.worker(0)
        job.worker(1)
        job.until(lambda: job.procs["server-1"].poll() is not None, 60, "server 1 dies at version 10")
        assert job.procs["server-1"].returncode == -9
        t0 = time.monotonic()
        job.server(1, "--resume")
        codes = job.wait(120)
        print(f"\nserver 1 restarted from version 10; the job ended {time.monotonic() - t0:.1f} s later")
        assert all(c == 0 for c in codes.values()), codes
        log = job.log("server-1")
        assert "loaded the checkpoint of version 10" in log
        assert "came back" in job.log("server-0") and job.server_json(1)["resumed_at"] == 10
        resent = sum(job.worker_json(r)["resends"] for r in range(2))
        assert resent >= 2                                  # both workers sent their push to server 1 again
        assert_same_params(job.final_params(), want)


def test_checkpoint_every_step_survives_a_kill_at_any_moment(tmp_path, tmp_path_factory):
    want = reference(tmp_path_factory, 3)
    with Job(tmp_path, S=3, W=2, steps=STEPS, timeout=20, every=1) as job:
        job.start()
        for at, victim in ((5, "server-1"), (10, "server-2"), (15, "server-1")):
            job.until(lambda: job.step() >= at, 60, f"step {at}")
            with job.frozen("worker-0", "worker-1"):   # the servers go on: the kill lands anywhere in theirs
                # with the workers frozen the job cannot end: killed after its last step, a
                # server was restarted into a job that had finished (a failure on a quiet machine)
                assert job.step() < STEPS - 2, f"the job reached step {job.step()} before the test could kill"
                job.kill(victim)
            job.server(int(victim[-1]), "--resume")
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), codes
        assert job.runs == {"server-0": 1, "server-1": 3, "server-2": 2, "worker-0": 1, "worker-1": 1}
        assert_same_params(job.final_params(), want)


@pytest.mark.parametrize("how", ["kill", "term"])
def test_a_whole_job_resumed_from_its_checkpoints_continues_the_same_curve(how, tmp_path, tmp_path_factory):
    import signal
    want = reference(tmp_path_factory, 2)
    # paced (worker 0 sleeps 0.1 s a step: the same numbers, slower), so that the stop lands mid-job
    # even on a quiet machine, where the 24 tiny steps would otherwise be over before the test looks
    with Job(tmp_path, S=2, W=2, steps=STEPS, timeout=20, every=5, worker_args=["--straggler", "0:0.1"]) as job:
        job.start()
        job.until(lambda: job.step() >= 12, 60, "step 12")
        if how == "kill":
            for name in list(job.procs):
                job.kill(name)
        else:                                                  # every role stops on its own TERM
            assert set(job.signal_at_once(signal.SIGTERM).values()) == {130}
        stopped = job.step()
        for s in range(2):
            job.server(s, "--resume")
        for r in range(2):
            job.worker(r)
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), codes
        resumed = int(job.log("server-0").split("resumes from the servers' checkpoints at version ")[1].split()[0])
        # a TERMed server saves the version it holds as it stops; it may have applied a step whose
        # answer worker 0 never read (nor logged): the servers are at most one step ahead of its log
        assert 10 <= resumed <= stopped + 1 and (how == "term" or resumed % 5 == 0)
        assert f"joining the job at version {resumed}" in job.log("worker-1")
        steps = [r["step"] for r in job.metrics()]
        # one curve: kept up to the resume, then continued (a step the servers applied but whose answer
        # worker 0 never read before the TERM has no line: its loss was never seen by a worker)
        assert steps == [s for s in range(STEPS + 1) if s <= stopped or s > resumed], (steps, stopped, resumed)
        lines = [r for r in job.metrics() if "bytes_pushed" in r]
        per_step = lines[0]["bytes_pushed"] // lines[0]["step"]            # both workers' pushes of one step
        assert [r["bytes_pushed"] for r in lines] == [r["step"] * per_step for r in lines]   # counted on, once
        clock = [r["elapsed_s"] for r in job.metrics()]
        assert clock == sorted(clock), clock                               # the clock goes on from the resume
        assert_same_params(job.final_params(), want)


def test_a_server_restarted_behind_the_job_stops_it_and_says_how_to_resume(tmp_path):
    with Job(tmp_path, S=2, W=2, steps=400, timeout=10, every=20) as job:
        job.start()
        job.until(lambda: job.step() >= 25, 60, "step 25")
        job.kill("server-1")
        t0 = time.monotonic()
        job.server(1, "--resume")
        codes = job.wait(60)
        print(f"\nserver 1 came back behind the job: stopped {time.monotonic() - t0:.1f} s later")
        assert all(c == 1 for c in codes.values()), codes
        for name in ("server-0", "worker-0", "worker-1"):
            assert "came back from its checkpoint of version" in job.log(name), job.log(name)[-2000:]
        assert "Resume the whole job" in job.log("server-1")


def test_a_server_restarted_into_an_asp_job_stops_it_and_says_why(tmp_path):
    mode = ["--mode", "asp"]
    with Job(tmp_path, S=2, W=2, steps=400, timeout=10, server_args=mode, worker_args=mode) as job:
        job.start()
        job.until(lambda: job.step() >= 10, 60, "step 10")
        job.kill("server-1")
        job.server(1, "--resume")
        codes = job.wait(60)
        assert all(c == 1 for c in codes.values()), codes
        assert "came back into a running asp job" in job.log("worker-0")


@pytest.mark.parametrize("flags", [["--mode", "diloco", "--local-steps", "2"],
                                   ["--mode", "diloco", "--local-steps", "2", "--compress-pull", "int8"],
                                   ["--compress-pull", "topk", "--compress-pull-ratio", "0.1"]])
def test_a_server_killed_with_outer_momentum_or_compressed_pulls_restarts_bit_exact(flags, tmp_path,
                                                                                   tmp_path_factory):
    """diloco: the outer Nesterov buffer is the shard's optimizer state, so it is in the
    checkpoint; --compress-pull: so are the copy the workers hold (θ̂) and its versions. A
    server killed after version 5 and restarted ends the job with the parameters of an
    uninterrupted run (and the diloco workers' inner AdamW goes on)."""
    with Job(tmp_path_factory.mktemp("reference"), S=2, W=2, steps=STEPS, timeout=20,
             server_args=flags, worker_args=flags) as job:
        job.start()
        assert all(c == 0 for c in job.wait(120).values())
        want = job.final_params()
    with Job(tmp_path, S=2, W=2, steps=STEPS, timeout=20, every=5, server_args=flags, worker_args=flags) as job:
        job.server(0)
        job.server(1, "--die-at-version", 5)
        job.worker(0)
        job.worker(1)
        job.until(lambda: job.procs["server-1"].poll() is not None, 60, "server 1 dies at version 5")
        job.server(1, "--resume")
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), codes
        assert "loaded the checkpoint of version 5" in job.log("server-1")
        assert_same_params(job.final_params(), want)
