"""Three real hosts (network namespaces psh1..psh3, 10.200.0.0/24): ps-launch trains through
a namespace "rsh", ps-status watches it, a rate-limited link still trains and ps-preflight
names the slow pair, and a cut link is named within the deadline."""
import json
import subprocess
import sys
import time

import pytest

from tests.cluster import SLACK
from tests.clusterenv import CLUSTER_ENV, REPO, RSH, SCRIPTS, TINY, need, netns_hosts, python_cmd, run, sh


@pytest.fixture(scope="module")
def hosts():
    need("ip", "tc")
    with netns_hosts(3) as names:
        yield names


@pytest.fixture
def clean_links(hosts):
    yield hosts
    for h in hosts:
        sh(SCRIPTS / "netns_link.sh", "clear", h, check=False)


def hostfile(tmp_path, text):
    p = tmp_path / "hosts"
    p.write_text(text)
    return p


HOSTS = "psh1 servers=1 addr=10.200.0.1\npsh2 workers=1 addr=10.200.0.2\npsh3 workers=1 addr=10.200.0.3\n"


def val_losses(out):
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r]


def test_three_hosts_train_through_ps_launch(tmp_path, clean_links):
    # two servers on psh1 advertise the address picked by --subnet (the hostfile has no addr=, the
    # coordinator is reached by the name psh1); the workers are on psh2, psh3
    hf = hostfile(tmp_path, "psh1 servers=2\npsh2 workers=1\npsh3 workers=1\n")
    out = tmp_path / "run"
    done = run(python_cmd("common.launch.ssh", "--hostfile", hf, "--rsh", RSH, "--port", 5731,
                          "--subnet", "10.200.0.0/24", "--preflight", "--out", out, "--steps", 30, "--timeout", 30,
                          *TINY))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ps-preflight: OK, 3 pair(s) reachable" in done.stdout              # --preflight ran first
    assert "[psh2 worker-0]" in done.stdout and "[psh3 worker-1]" in done.stdout and "[psh1 server-1]" in done.stdout
    # server 0's lines only: ps-launch prints each role's lines as they come, interleaved
    server0 = "\n".join(ln for ln in done.stdout.splitlines() if ln.startswith("[psh1 server-0]"))
    table = server0.split("address table:")[1].split("job started")[0]
    assert "tcp://10.200.0.1:5731" in table and "psh2" in table and "psh3" in table
    assert "servers tcp://10.200.0.1:5731, tcp://10.200.0.1:" in done.stdout     # both servers, real addresses
    vals = val_losses(out)
    assert vals[-1] < vals[0] - 0.5, vals
    assert (out / "model.safetensors").exists() and (out / "logs" / "worker-1.log").exists()


def test_rate_limited_link_trains_and_preflight_names_the_slow_pair(tmp_path, clean_links):
    hf = hostfile(tmp_path, HOSTS)
    sh(SCRIPTS / "netns_link.sh", "rate", "psh3", "4mbit")
    report = tmp_path / "preflight.json"
    pf = run(python_cmd("common.launch.preflight", "--hostfile", hf, "--rsh", RSH, "--port", 5732, "--deadline", 30,
                        "--json", report))
    assert pf.returncode == 0, pf.stdout + pf.stderr
    res = json.loads(report.read_text())
    slow = [r for r in res["results"] if r.get("slow")]
    assert [(r["source"], r["target"], r["slow"]) for r in slow] == [("psh3", "10.200.0.1:5732", ["up"])], pf.stdout
    assert slow[0]["up_mbit_s"] < 6                                     # the 4 Mbit/s limit, measured
    assert "SLOW pair psh3 -> 10.200.0.1:5732" in pf.stdout
    print(pf.stdout)                                                    # the figures, for the report (-s)

    # the job still completes over the slow link, and ps-status sees it while it runs
    out = tmp_path / "run"
    job = subprocess.Popen(python_cmd("common.launch.ssh", "--hostfile", hf, "--rsh", RSH, "--port", 5733,
                                      "--out", out, "--steps", 40, "--timeout", 60, *TINY),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CLUSTER_ENV, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").exists():
            assert job.poll() is None and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)
        st = run(python_cmd("common.launch.status", "--coordinator", "10.200.0.1:5733", "--json", "--interval", 0.5))
        assert st.returncode == 0, st.stderr
        rows = {(r["role"], r["rank"]): r for r in json.loads(st.stdout)["rows"]}
        assert set(rows) == {("server", 0), ("worker", 0), ("worker", 1)}
        assert rows[("server", 0)]["addr"] == "tcp://10.200.0.1:5733"
        assert rows[("worker", 0)]["host"] == "psh2" and rows[("worker", 1)]["addr"] == "10.200.0.3"
        assert all(r["step"] is not None and r["step"] >= 0 for r in rows.values())
        out_text, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, out_text[-3000:]
    assert len(val_losses(out)) >= 2 and (out / "model.safetensors").exists()


def test_preflight_names_an_unreachable_host_port_within_its_deadline(tmp_path, clean_links):
    hf = hostfile(tmp_path, HOSTS)
    sh(SCRIPTS / "netns_link.sh", "cut", "psh3")
    t0 = time.monotonic()
    pf = run(python_cmd("common.launch.preflight", "--hostfile", hf, "--rsh", RSH, "--port", 5734, "--deadline", 8))
    took = time.monotonic() - t0
    assert pf.returncode == 1, pf.stdout + pf.stderr
    assert "psh3 cannot reach 10.200.0.1:5734" in pf.stderr and "timed out" in pf.stderr
    assert took < 8 + SLACK, took                 # the deadline, plus starting Python on a busy machine
    # from the root namespace, to a host whose link is cut
    t0 = time.monotonic()
    pf = run(python_cmd("common.launch.preflight", "--targets", "10.200.0.3:5735", "--deadline", 4))
    assert pf.returncode == 1 and "cannot reach 10.200.0.3:5735" in pf.stderr, pf.stderr
    assert time.monotonic() - t0 < 4 + SLACK


def test_a_failing_role_stops_every_host(tmp_path, clean_links):
    hf = hostfile(tmp_path, HOSTS)
    out = tmp_path / "run"
    # the workers cannot read their data: the first to fail makes ps-launch stop every role
    done = run(python_cmd("common.launch.ssh", "--hostfile", hf, "--rsh", RSH, "--port", 5736, "--out", out,
                          "--steps", 100000, "--timeout", 30, "--data", tmp_path / "missing", *TINY))
    assert done.returncode == 1
    assert "exited with code 1" in done.stderr and "worker-" in done.stderr
    for h in ("psh1", "psh2", "psh3"):
        left = subprocess.run(["ip", "netns", "pids", h], capture_output=True, text=True).stdout.split()
        assert left == [], f"processes left in {h}: {left}"


def test_interface_and_subnet_pick_the_namespace_address(hosts):
    code = "from common.wire.addresses import pick_address as p; print(p(interface='eth0'), p(subnet='10.200.0.0/24'))"
    done = subprocess.run(["ip", "netns", "exec", "psh2", sys.executable, "-c", code], capture_output=True,
                          text=True, env=CLUSTER_ENV, cwd=REPO, timeout=60)
    assert done.stdout.split() == ["10.200.0.2", "10.200.0.2"], done.stderr
