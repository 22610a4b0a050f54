"""ps-launch, ps-preflight, ps-status and the remote guard on this machine, without root:
the "hosts" are reached through scripts/cluster/local_rsh.sh and all use 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

from common.launch.probe import measure
from common.wire.transport import free_port
from tests.cluster import SLACK
from tests.clusterenv import CLUSTER_ENV, REPO, SCRIPTS, TINY, python_cmd, run
from tests.test_local import processes_with

LOCAL_RSH = f"sh {SCRIPTS / 'local_rsh.sh'}"


def test_guard_stops_its_command_when_the_session_input_ends():
    guard = subprocess.Popen(python_cmd("common.launch.guard", "--", sys.executable, "-c", "import time; time.sleep(300)"),
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLUSTER_ENV, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not [p for p in processes_with("time.sleep(300)") if p != guard.pid]:
            assert time.monotonic() < deadline, "the command did not start"
            time.sleep(0.1)
        child = [p for p in processes_with("time.sleep(300)") if p != guard.pid]
        guard.stdin.close()                                # the ssh session ends
        code = guard.wait(timeout=20)
        assert code == 128 + signal.SIGTERM and "end of input" in guard.stderr.read()
        assert not [p for p in child if p in processes_with("time.sleep(300)")]
    finally:
        if guard.poll() is None:
            guard.kill()


def test_probe_measures_loopback_and_preflight_names_a_closed_port():
    server = subprocess.Popen(python_cmd("common.launch.probe", "serve", "--bind", "tcp://127.0.0.1:0"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=CLUSTER_ENV, cwd=REPO)
    try:
        ready = server.stdout.readline().split()
        assert ready[0] == "READY", ready
        res = measure(ready[1], deadline=20, bw_seconds=0.2)
        assert res["reachable"] and 0 < res["rtt_ms"] < 1000 and res["up_mbit_s"] > 0 and res["down_mbit_s"] > 0, res
    finally:
        server.stdin.close()
        server.wait(timeout=20)
    port = free_port()
    t0 = time.monotonic()
    done = run(python_cmd("common.launch.preflight", "--targets", f"127.0.0.1:{port}", "--deadline", 5), timeout=60)
    assert done.returncode == 1 and f"cannot reach 127.0.0.1:{port}: connection refused" in done.stderr, done.stderr
    assert time.monotonic() - t0 < 5 + SLACK


def test_preflight_over_local_rsh(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("a servers=1 addr=127.0.0.1\nb workers=1 addr=127.0.0.1\n")
    report = tmp_path / "report.json"
    done = run(python_cmd("common.launch.preflight", "--hostfile", hf, "--rsh", LOCAL_RSH, "--port", free_port(),
                          "--deadline", 30, "--json", report), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    res = json.loads(report.read_text())["results"]
    assert [r["source"] for r in res] == ["a", "b"] and all(r["reachable"] and r["up_mbit_s"] > 0 for r in res)
    # the coordinator's port already taken on its host: named before anything is launched
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run(python_cmd("common.launch.preflight", "--hostfile", hf, "--rsh", LOCAL_RSH, "--port", port,
                              "--deadline", 30), timeout=60)
    assert done.returncode == 1 and f"cannot bind tcp://*:{port}: Address already in use" in done.stderr, done.stderr
    assert "could not start the probe server on a" in done.stderr


def test_ps_launch_trains_and_ps_status_sees_it_and_ctrl_c_stops_everything(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("a servers=2 addr=127.0.0.1\nb workers=2 addr=127.0.0.1\n")
    port = free_port()
    coord = f"127.0.0.1:{port}"
    out = tmp_path / "run"
    job = subprocess.Popen(python_cmd("common.launch.ssh", "--hostfile", hf, "--rsh", LOCAL_RSH, "--port", port,
                                      "--out", out, "--steps", 100000, "--timeout", 30, *TINY),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLUSTER_ENV, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert job.poll() is None and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)
        assert len(processes_with(coord)) >= 4
        # rates over 2 s: a step moves bytes every few tens of ms, so even a loaded machine shows them
        st = run(python_cmd("common.launch.status", "--coordinator", coord, "--json", "--interval", 2), timeout=60)
        assert st.returncode == 0, st.stderr
        snap = json.loads(st.stdout)
        rows = {(r["role"], r["rank"]): r for r in snap["rows"]}
        assert set(rows) == {("server", 0), ("server", 1), ("worker", 0), ("worker", 1)}
        assert rows[("server", 1)]["last"] == "answered" and rows[("worker", 1)]["host"] == "b"
        assert all(r["rate"] > 0 and r["step"] > 0 for r in rows.values()), rows     # training: bytes move
        text = run(python_cmd("common.launch.status", "--coordinator", coord, "--interval", 0.2), timeout=60).stdout
        assert "worker    1 b" in text and f"tcp://127.0.0.1:{port}" in text
        job.send_signal(signal.SIGINT)
        _, err = job.communicate(timeout=60)
        assert job.returncode == 130 and "stopping every role" in err, err
        assert processes_with(coord) == []
    finally:
        if job.poll() is None:
            os.kill(job.pid, signal.SIGKILL)
    gone = run(python_cmd("common.launch.status", "--coordinator", coord, "--timeout", 1), timeout=60)
    assert gone.returncode == 1 and f"no answer from tcp://{coord}" in gone.stderr and "refused" in gone.stderr
