"""BSP under packet loss: 10% of the packets on a worker's link dropped (nftables on a
network-namespace bridge, scripts/cluster/netns_link.sh) make the job slow, not wrong:
the parameters are bit for bit those of the same job on a clean link.

TCP retransmits what is lost, so nothing is lost to the job; what could break the
equality is the job's own machinery (a resent push applied twice, a worker dropped for a
heartbeat that came late). The deadlines here are generous: a lossy link is not a dead
one. Three hosts (namespaces psl1..psl3 of their own bridge, so this test never touches
another test's hosts): servers on psl1, a worker on psl2 and one on psl3. Needs root,
ip and nft (scripts/cluster/ci_install.sh installs them); skips otherwise.
"""
import contextlib
import os
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.clusterenv import SCRIPTS, need, sh
from tests.jobs import Job

P = "psl"
NET_ENV = dict(os.environ, NETNS_PREFIX=P, NETNS_HOST_ADDR="0", NETNS_ETC_HOSTS="0")
STEPS = 16


@contextlib.contextmanager
def hosts(n):
    sh(SCRIPTS / "netns_down.sh", check=False, env=NET_ENV)
    try:
        made = sh(SCRIPTS / "netns_up.sh", n, check=False, env=NET_ENV)
        if made.returncode != 0 and "not permitted" in (made.stdout + made.stderr).lower():
            pytest.skip(f"network namespaces are not permitted here: {made.stderr.strip()[-200:]}")
        assert made.returncode == 0, made.stdout + made.stderr
        yield [f"{P}{i}" for i in range(1, n + 1)]
    finally:
        sh(SCRIPTS / "netns_down.sh", check=False, env=NET_ENV)


def retransmitted(host) -> int:
    """TCP segments retransmitted so far inside ``host`` (its own network namespace counters)."""
    text = subprocess.run(["ip", "netns", "exec", host, "cat", "/proc/net/snmp"], capture_output=True,
                          text=True, check=True).stdout
    head, values = [ln.split() for ln in text.splitlines() if ln.startswith("Tcp:")][:2]
    return int(values[head.index("RetransSegs")])


def train(folder):
    with Job(folder, S=2, W=2, steps=STEPS, timeout=90, heartbeat=0.5, misses=40, host="10.200.0.1") as job:
        on = {h: ["ip", "netns", "exec", f"{P}{h}"] for h in (1, 2, 3)}
        job.server(0, prefix=on[1])
        job.server(1, prefix=on[1])
        job.worker(0, prefix=on[2])
        job.worker(1, prefix=on[3])
        codes = job.wait(300)
        assert all(c == 0 for c in codes.values()), {n: job.log(n)[-2000:] for n in codes}
        assert "dropped worker" not in job.log("server-0")
        return load_file(str(job.out / "model.safetensors")), job


def test_ten_percent_loss_gives_the_same_parameters_as_a_clean_link(tmp_path):
    need("ip", "nft")
    with hosts(3):
        clean, _ = train(tmp_path / "clean")
        before = retransmitted(f"{P}3")
        sh(SCRIPTS / "netns_link.sh", "loss", f"{P}3", 10, env=NET_ENV)
        try:
            lossy, job = train(tmp_path / "lossy")
        finally:
            sh(SCRIPTS / "netns_link.sh", "clear", f"{P}3", check=False, env=NET_ENV)
        resent = retransmitted(f"{P}3") - before
        print(f"\n10% loss on worker 1's link: {resent} TCP segments retransmitted by its host; "
              f"worker 1 waited {job.worker_json(1)['wait_s']:.1f} s in all")
        assert resent > 0                                  # the loss was real
        for k in clean:
            assert np.array_equal(clean[k], lossy[k]), f"{k} differs by {np.abs(clean[k] - lossy[k]).max()}"
