"""A live server under thousands of random and mutated messages: it stays up, its
parameters do not move, its memory stays bounded, and a normal worker then trains.
(scripts/fuzz_server.py is the same check for as long as you like.) And a whole BSP job
fuzzed on every endpoint while it trains ends with the very parameters of an undisturbed
run (scripts/fuzz_job.py, for as many frames as you like)."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fuzz_job  # noqa: E402
import fuzz_server  # noqa: E402

from common.wire import codec  # noqa: E402
from tests.cluster import Servers  # noqa: E402
from worker.client import PSClient  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_server_is_unharmed(seed, tmp_path):
    findings = fuzz_server.run(6000, seed, str(tmp_path), say=lambda *_: None)
    assert findings["answered"] > 0.8 * findings["messages"]       # refusals are answered
    assert findings["rss_after_mib"] < findings["rss_before_mib"] + 64
    log = (tmp_path / "fuzzed-server.log").read_text()
    assert "refused" in log and "Traceback" not in log


def test_a_peer_that_never_reads_cannot_stall_the_server(tmp_path):
    """Requests from a peer that never reads its answers fill that peer's queue; the
    server drops further answers to it and keeps serving everyone else."""
    layout = fuzz_server.LAYOUT
    with Servers(1, 1, str(tmp_path), ["--optimizer", "sgd", "--lr", "1"]) as servers:
        client = PSClient(servers.cluster(0))
        job = client.register(layout, "float32")
        client.init(np.zeros(layout.size, np.float32))
        host, port = job["servers"][0].split("//")[1].rsplit(":", 1)
        import zmq
        rude = zmq.Context.instance().socket(zmq.DEALER)
        rude.setsockopt(zmq.LINGER, 0)
        rude.setsockopt(zmq.RCVBUF, 4096)
        rude.connect(job["servers"][0])
        pull = [bytes(f) for f in codec.encode("pull", "tool:0", rid=1)]
        for _ in range(3000):                       # each answer carries the parameters; never read
            rude.send_multipart(pull)
        time.sleep(1.0)
        params = np.zeros(layout.size, np.float32)
        client.push_pull(np.ones(layout.size, np.float32), params, 0)
        assert (params == -1).all()
        client.done()
        client.close()
        rude.close()
        assert servers.wait() == [0]


def test_a_job_fuzzed_on_every_endpoint_while_it_trains_ends_bit_for_bit_as_left_alone(tmp_path):
    findings = fuzz_job.run(20_000, 3, tmp_path, steps=80, say=print)
    assert findings["identical"]
    assert len(findings["endpoints"]) == 4          # two servers, each on TCP and on its Unix-socket twin
    assert findings["frames"] >= 300 and findings["answered"] > 0, findings     # the fuzz ran while it trained
    assert max(p - s for p, s in zip(findings["rss_peak_mib"], findings["rss_start_mib"])) < 64
