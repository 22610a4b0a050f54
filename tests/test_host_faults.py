"""Faults of hosts rather than processes, on network-namespace hosts (as root, holding the
cluster lock: tests/clusterenv.py). Server 0 on psh1, server 1 on psh2, both workers on psh3;
BSP, fixed seeds; every result compared with an undisturbed run, bit for bit.

A cut link (a partition, not a death): server 1's host unplugged from the network mid-job
while every process lives (scripts/cluster/netns_link.sh cut):

- the coordinator and both workers notice within the heartbeat deadline (5 missed beats of
  0.2 s), naming server 1 and its address;
- the link back within --timeout: the job goes on and ends with the parameters of an
  undisturbed run, bit for bit;
- the link back only after --timeout: every process stops by itself (no hang) saying how to
  resume; the resume (every role) ends bit-identical too.

A server on another host (a lost node): server 1 killed on psh2 and restarted with
``--resume`` on psh4 from the shared run folder; the coordinator gives the workers and the
other server its new address, and the job ends bit-identical. The same on one machine
(127.0.0.2 for the new address) runs without root.
"""
import time

import pytest

from common.wire.transport import free_port
from tests.clusterenv import SCRIPTS, need, netns_hosts, sh
from tests.jobs import Job, assert_same_params, undisturbed

STEPS = 40
PACE = ["--straggler", "0:0.1"]           # worker 0 sleeps 0.1 s a step: the same numbers, time to cut mid-job
ON = {h: ["ip", "netns", "exec", f"psh{h}"] for h in (1, 2, 3, 4)}
_REFERENCE = {}


def reference(tmp_path_factory):
    """The undisturbed job, on 127.0.0.1 (the same numbers on any hosts: sums in rank order)."""
    if not _REFERENCE:
        _REFERENCE.update(undisturbed(tmp_path_factory.mktemp("undisturbed"), steps=STEPS, timeout=20,
                                      worker_args=PACE))
    return _REFERENCE


@pytest.fixture(scope="module")
def hosts():
    need("ip")
    with netns_hosts(4) as names:
        yield names


def start_on_hosts(job, resume=()):
    job.server(0, *resume, prefix=ON[1])
    job.server(1, "--bind", "tcp://10.200.0.2:*", *resume, prefix=ON[2])
    for r in range(2):
        job.worker(r, prefix=ON[3])


def cut(host):
    sh(SCRIPTS / "netns_link.sh", "cut", host)


def restore(host):
    sh(SCRIPTS / "netns_link.sh", "restore", host, check=False)


def server1_named(job, name) -> bool:
    text = job.log(name)
    return ("server 1 at tcp://10.200.0.2:" in text and
            ("has sent no heartbeat" in text if name == "server-0" else "has not heard from server 1" in text))


def test_a_link_back_within_the_timeout_is_noticed_and_the_job_ends_bit_identical(tmp_path, tmp_path_factory,
                                                                                 hosts):
    want = reference(tmp_path_factory)
    with Job(tmp_path, steps=STEPS, timeout=30, heartbeat=0.2, misses=5, host="10.200.0.1",
             worker_args=PACE) as job:
        start_on_hosts(job)
        job.until(lambda: job.step() >= 8, 90, "step 8")
        cut("psh2")
        try:
            t0 = time.monotonic()
            noticed = {}
            for name in ("server-0", "worker-0", "worker-1"):
                job.until(lambda: server1_named(job, name), 20, f"{name} names server 1")
                noticed[name] = time.monotonic() - t0
        finally:
            restore("psh2")
        print(f"\nserver 1's link cut: noticed after {', '.join(f'{n} {s:.1f} s' for n, s in noticed.items())}"
              f" (silence 1.0 s = 5 beats of 0.2 s); link back {time.monotonic() - t0:.1f} s after the cut")
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), {n: job.log(n)[-2000:] for n in codes}
        assert "heard from again" in job.log("server-0") and "heard from again" in job.log("worker-0")
        assert_same_params(job.final_params(), want)


def test_a_link_back_after_the_timeout_stops_the_job_saying_how_to_resume(tmp_path, tmp_path_factory, hosts):
    want = reference(tmp_path_factory)
    timeout = 8
    with Job(tmp_path, steps=STEPS, timeout=timeout, heartbeat=0.2, misses=5, host="10.200.0.1",
             worker_args=PACE) as job:
        start_on_hosts(job)
        job.until(lambda: job.step() >= 8, 90, "step 8")
        cut("psh2")
        try:
            t0 = time.monotonic()
            codes = job.wait(6 * timeout)                      # no process hangs
            took = time.monotonic() - t0
        finally:
            restore("psh2")
        print(f"\nserver 1's link cut for good: every process had stopped {took:.1f} s later (--timeout {timeout})")
        assert all(c != 0 for c in codes.values()), codes
        assert "server 1 at tcp://10.200.0.2:" in job.log("server-0")
        for name in codes:
            assert "resume the whole job from the checkpoints" in job.log(name), (name, job.log(name)[-2000:])

        start_on_hosts(job, resume=["--resume"])               # what the message says: every role again
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), {n: job.log(n)[-2000:] for n in codes}
        assert_same_params(job.final_params(), want)


def moved(job, new_addr: str):
    """Server 1 died at version 10 and came back at ``new_addr``: the job told everyone."""
    assert job.procs["server-1"].returncode == 0
    assert f"to {new_addr}" in job.log("server-0") and "the other servers and the workers are told" in job.log("server-0")
    for r in range(2):
        assert "server 1 moved from" in job.log(f"worker-{r}") and new_addr in job.log(f"worker-{r}")
    assert "loaded the checkpoint of version 10" in job.log("server-1")


def test_a_server_restarted_at_another_address_rejoins_and_the_job_ends_bit_identical(tmp_path, tmp_path_factory):
    want = reference(tmp_path_factory)
    with Job(tmp_path, steps=STEPS, timeout=20, worker_args=PACE) as job:
        job.server(0)
        job.server(1, "--die-at-version", 10)
        job.worker(0)
        job.worker(1)
        job.until(lambda: job.procs["server-1"].poll() is not None, 60, "server 1 dies at version 10")
        port = free_port("127.0.0.2")
        job.server(1, "--resume", "--bind", f"tcp://127.0.0.2:{port}")     # another address of this host
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), {n: job.log(n)[-2000:] for n in codes}
        moved(job, f"tcp://127.0.0.2:{port}")
        assert_same_params(job.final_params(), want)


def test_a_server_restarted_on_another_host_rejoins_and_the_job_ends_bit_identical(tmp_path, tmp_path_factory,
                                                                                  hosts):
    want = reference(tmp_path_factory)
    with Job(tmp_path, steps=STEPS, timeout=30, heartbeat=0.2, misses=5, host="10.200.0.1",
             worker_args=PACE) as job:
        job.server(0, prefix=ON[1])
        job.server(1, "--bind", "tcp://10.200.0.2:*", "--die-at-version", 10, prefix=ON[2])
        for r in range(2):
            job.worker(r, prefix=ON[3])
        job.until(lambda: job.procs["server-1"].poll() is not None, 90, "server 1 dies at version 10")
        t0 = time.monotonic()
        # psh4 cannot bind psh2's address (the one in the checkpoint): it binds its own and says so
        job.server(1, "--resume", "--bind", "tcp://10.200.0.4:*", prefix=ON[4])
        codes = job.wait(120)
        print(f"\nserver 1 restarted on psh4: the job ended {time.monotonic() - t0:.1f} s later")
        assert all(c == 0 for c in codes.values()), {n: job.log(n)[-2000:] for n in codes}
        assert "cannot bind the address of the checkpoint" in job.log("server-1")
        new = job.log("server-0").split("server 1 moved from ")[1].split(" to ")[1].split(":")[:3]
        moved(job, ":".join(new))
        assert ":".join(new).startswith("tcp://10.200.0.4:")
        assert_same_params(job.final_params(), want)
