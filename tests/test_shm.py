"""Shared memory between the processes of one host (``common/wire/shm.py``, ``--shm``):
a peer's segment is checked before it is mapped and every offset against it; a job gives
the same bits through shared memory as through sockets; no segment outlives its job,
not even a killed worker's."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from common.wire import codec
from common.wire.protocol import ProtocolError
from common.wire.shm import PeerSegments, Segment, job_segments, remove_job_segments, segment_name
from tests.cluster import ENV, Servers, run_threads
from tests.test_liveness import FLAGS, LAYOUT, _joined, _push_threes_when
from tests.test_local import SMALL

COORD = f"127.0.0.1:{40000 + os.getpid() % 20000}"     # a job name of this test process alone


@pytest.fixture
def clean():
    yield
    remove_job_segments(COORD)


def test_a_segment_is_attached_only_with_its_job_role_rank_and_size(clean):
    seg = Segment.create(COORD, "worker", 1, 4096)
    try:
        peer = Segment.attach(seg.name, COORD, "worker", 1, 4096)
        seg.array(np.float32, 1024)[:] = np.arange(1024)
        assert peer.array(np.float32, 4, at=8).tolist() == [2, 3, 4, 5]
        with pytest.raises(ValueError):                       # read-only for the peer
            peer.array(np.float32, 4)[0] = 1
        for name, role, rank, nbytes, what in [
                (seg.name, "worker", 0, 4096, "not worker 0's"),        # another rank's
                (seg.name, "server", 1, 4096, "not server 1's"),        # another role's
                (seg.name, "worker", 1, 8192, "8192 bytes"),            # another size
                ("../../etc/passwd", "worker", 1, 4096, "not worker 1's"),
                (segment_name("10.0.0.1:1", "worker", 1), "worker", 1, 4096, "not worker 1's")]:   # another job
            with pytest.raises(ProtocolError, match=what):
                Segment.attach(name, COORD, role, rank, nbytes)
        for count, at in [(1025, 0), (1, 4096), (1, 2), (1, -4)]:      # outside the mapping, misaligned
            with pytest.raises(ProtocolError, match="outside"):
                peer.array(np.float32, count, at=at)
    finally:
        seg.close()
    assert not job_segments(COORD)                            # the owner removed it


def test_shm_is_a_cluster_field_and_curve_turns_it_off():
    from common.cluster import ClusterConfig
    assert ClusterConfig().use_shm and not ClusterConfig(shm="off").use_shm
    assert not ClusterConfig(curve="keys/").use_shm                # a segment is not encrypted
    with pytest.raises(ValueError, match="shm must be one of auto, off"):
        ClusterConfig(shm="on")


def test_a_symlink_is_not_followed(clean):
    name = segment_name(COORD, "worker", 0, pid=1)
    os.symlink("/etc/hostname", f"/dev/shm/{name}")
    with pytest.raises(ProtocolError, match="cannot open"):
        Segment.attach(name, COORD, "worker", 0, 4096)


def test_arrays_in_shared_memory_decode_like_frames_and_offsets_are_checked(clean):
    seg = Segment.create(COORD, "worker", 0, 64 * 4)
    grads = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    seg.array(np.float32, 64)[:] = grads
    ranges = [(0, 16), (32, 64)]
    arrays = [grads[b:e] for b, e in ranges]
    framed = codec.decode(codec.encode("push", "worker:0", arrays=arrays, ranges=ranges))
    frames = codec.encode("push", "worker:0", arrays=arrays, ranges=ranges, at=[0, 128], shm=seg.name)
    assert len(frames) == 1                                   # the header alone travels
    peers = PeerSegments(COORD, lambda role, r: 64 * 4, lambda role, r, b, e: b * 4)
    shared = peers.decode(frames, identity=b"w0")
    for a, b in zip(framed.arrays, shared.arrays):
        assert np.array_equal(a, b)
    assert shared.ranges == framed.ranges and shared.at == [0, 128] and peers.readers == {b"w0"}
    with pytest.raises(ProtocolError, match="maps no segment"):
        codec.decode(frames)                                  # a receiver without the sender's segment
    lying = codec.encode("push", "worker:0", arrays=arrays, ranges=ranges, at=[0, 64], shm=seg.name)
    with pytest.raises(ProtocolError, match="not where range"):
        peers.decode(lying)                                   # in bounds, but not where [32, 64) lies
    beyond = codec.encode("push", "worker:0", arrays=[grads], ranges=[(0, 64)], at=[4], shm=seg.name)
    with pytest.raises(ProtocolError):
        peers.decode(beyond)
    impostor = codec.encode("push", "worker:1", arrays=arrays, ranges=ranges, at=[0, 128], shm=seg.name)
    with pytest.raises(ProtocolError, match="not worker 1's"):
        peers.decode(impostor)                                # worker 1 naming worker 0's segment
    seg.close()


def test_the_segments_of_dead_processes_are_removed(clean):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    other = "10.9.9.9:7"                                          # another job of this user
    stale = [segment_name(COORD, "worker", 3, pid=dead), segment_name(other, "server", 0, pid=dead)]
    alive = segment_name(other, "server", 1, pid=os.getppid())   # its process lives: kept
    for name in stale + [alive]:
        open(f"/dev/shm/{name}", "wb").close()
    try:
        mine = Segment.create(COORD, "worker", 0, 16)             # a new process cleans up first
        assert job_segments(COORD) == [mine.name] and job_segments(other) == [alive]
        mine.close()
    finally:
        remove_job_segments(other)


def ps_local(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "common.launch.local", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_the_same_bits_through_shared_memory_and_through_sockets(tmp_path):
    runs = {}
    for shm in ("auto", "off"):
        out = tmp_path / shm
        proc = ps_local("--steps", 12, "--out", out, "--no-progress", "--shm", shm, *SMALL, "--eval-interval", 6)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        losses = [(r["step"], r.get("loss"), r.get("val_loss"))
                  for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
        runs[shm] = losses, (out / "model.safetensors").read_bytes()
        pushes = [json.loads((out / f"worker-{r}.json").read_text())["shm_pushes"] for r in range(2)]
        assert (min(pushes) >= 12) if shm == "auto" else pushes == [0, 0], pushes   # every step's, or none
    assert runs["auto"] == runs["off"]


def test_a_worker_killed_with_kill_9_leaves_no_segment(tmp_path):
    out = tmp_path / "run"
    proc = ps_local("--workers", 2, "--steps", 100000, "--out", out, "--no-progress", *SMALL, "--heartbeat", 0.2,
                    "--timeout", 60)
    try:
        deadline = time.monotonic() + 120
        while not (out / "run_config.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the job did not start"
            time.sleep(0.1)
        coordinator = json.loads((out / "run_config.json").read_text())["launcher"]["coordinator"]
        workers = []
        while len(workers) < 2:                               # both workers' segments: shared memory is in use
            assert time.monotonic() < deadline and proc.poll() is None, "no worker segments appeared"
            workers = [n for n in job_segments(coordinator) if "-worker" in n]
            time.sleep(0.1)
        assert any("-server" in n for n in job_segments(coordinator))
        victim = next(n for n in workers if "-worker1-" in n)
        os.kill(int(victim.rsplit("-", 1)[1]), signal.SIGKILL)
        assert victim in job_segments(coordinator)            # a killed process removes nothing itself
        proc.send_signal(signal.SIGINT)                       # the end of the job
        _, err = proc.communicate(timeout=60)
        assert "removed" in err and victim in err, err
        assert job_segments(coordinator) == []
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_push_through_shared_memory_sent_again_is_applied_once(tmp_path):
    """The exactly-once check of test_liveness, with the push's bytes in the worker's
    segment: three copies while its step waits and one after it was applied make one
    update, and the answers (through the server's segment) carry it."""
    with Servers(1, 2, str(tmp_path), FLAGS + ["--out", tmp_path / "out"], timeout=20) as servers:
        copies_in = threading.Event()

        def worker(rank):
            c, params = _joined(servers, rank, LAYOUT, shm="auto")
            if rank == 1:
                return _push_threes_when(copies_in, c, params)
            assert c.segment is not None and c.requests.shared_with == {0}     # the pull's answer set it up
            link, peers = c.links[0], c.requests.segments

            def answer():
                assert link.poll(20000), "no answer"
                return peers.decode(link.recv())
            c.segment.array(np.float64, LAYOUT.size)[:] = 1.0
            push = codec.encode("push", c.name, step=0, rid=77, arrays=[np.ones(LAYOUT.size)],
                                ranges=[(0, LAYOUT.size)], at=[0], shm=c.segment.name, session=c.session)
            assert len(push) == 1                                # the header alone
            for _ in range(3):
                link.send(push)
            link.send(codec.encode("pull", c.name, rid=78, shm=c.segment.name))   # answered after the copies
            first = answer()
            assert first.rid == 78 and first.meta["version"] == 0 and first.at == [0]
            copies_in.set()                                      # now worker 1 pushes: the step completes
            applied = answer()
            link.send(push)                                      # a copy of a push already applied
            again = answer()
            assert not link.poll(500), "more answers than pushes"
            c.done()
            c.close()
            return [(m.rid, m.meta["version"], m.at, m.arrays[0].copy()) for m in (applied, again)]
        answers, params1 = run_threads(worker, 2, timeout=60)
        for rid, version, at, values in answers:
            assert rid == 77 and version == 1 and at == [0]
            np.testing.assert_array_equal(values, np.full(LAYOUT.size, -1.0))    # 0 - 0.5 * (1 + 3) / 2
        np.testing.assert_array_equal(params1, np.full(LAYOUT.size, -1.0))
        assert servers.wait() == [0]
        metrics = json.loads((tmp_path / "out" / "server-0.json").read_text())
        assert metrics["version"] == 1 and metrics["repeated_pushes"] == 1
