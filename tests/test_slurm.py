"""A real Slurm (Debian's munge, slurmctld, slurmd, started by scripts/cluster/slurm_local_up.sh)
runs the project's sbatch job end to end, on one node and on three network-namespace nodes,
and `srun` by hand gives every task its role from SLURM_PROCID and SLURMD_NODENAME."""
import json
import subprocess
import sys

import pytest

from tests.clusterenv import CLUSTER_ENV, REPO, TINY, need, netns_hosts, run, slurm

SBATCH = REPO / "scripts" / "slurm" / "ps.sbatch"


def sbatch(tmp_path, steps, *sbatch_args, servers=1):
    out = tmp_path / "run"
    out.mkdir()
    env = dict(CLUSTER_ENV, PS_STEPS=str(steps), PS_OUT=str(out), PS_NUM_SERVERS=str(servers),
               PS_PYTHON=sys.executable, PS_REPO=str(REPO),
               PS_ARGS=" ".join(TINY + ["--timeout", "30"]), PS_PORT="5741")
    done = subprocess.run(["sbatch", "--wait", "--time=5", "-o", str(out / "slurm.out"), *sbatch_args, str(SBATCH)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    log = (out / "slurm.out").read_text() if (out / "slurm.out").exists() else ""
    return done, out, log


def val_losses(out):
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def one_node():
    need("munged", "slurmctld", "slurmd", "sbatch", "srun")
    with slurm(nodes=1, cpus=8):
        yield


def test_sbatch_job_trains_on_one_node(tmp_path, one_node):
    done, out, log = sbatch(tmp_path, 30, "--ntasks=3")
    assert done.returncode == 0, done.stderr + log[-3000:]
    assert "0: " in log and "server:0 INFO stopped cleanly at version 30" in log
    vals = val_losses(out)
    assert vals[-1] < vals[0] - 0.5, vals
    assert (out / "model.safetensors").exists()


def test_srun_by_hand_derives_roles_from_slurm(one_node):
    done = run(["srun", "-n", "4", "--export=ALL,PS_NUM_SERVERS=2", sys.executable, "-m",
                "common.launch.role", "--print"], timeout=120)
    assert done.returncode == 0, done.stderr
    got = sorted((p["global_rank"], p["role"], p["rank"], p["source"], p["num_workers"])
                 for p in map(json.loads, done.stdout.splitlines()))
    assert got == [(0, "server", 0, "slurm", 2), (1, "server", 1, "slurm", 2), (2, "worker", 0, "slurm", 2),
                   (3, "worker", 1, "slurm", 2)]
    nodes = {json.loads(ln)["node"] for ln in done.stdout.splitlines()}
    coords = {json.loads(ln)["coordinator"] for ln in done.stdout.splitlines()}
    assert len(nodes) == 1 and coords == {f"{nodes.pop()}:5700"}


def test_sbatch_job_trains_on_three_namespace_nodes(tmp_path):
    # last in this file: it replaces the one-node cluster by three slurmd, one per namespace host
    need("munged", "slurmctld", "slurmd", "sbatch", "srun", "ip")
    with netns_hosts(3), slurm(nodes=3, cpus=2):
        done, out, log = sbatch(tmp_path, 20, "--nodes=3", "--ntasks=3")
    assert done.returncode == 0, done.stderr + log[-3000:]
    table = log.split("address table:")[1].split("job started")[0]
    assert "tcp://10.200.0.1:5741" in table and "psh2" in table and "psh3" in table     # real node names
    assert "servers tcp://10.200.0.1:5741" in log
    assert (out / "model.safetensors").exists() and len(val_losses(out)) >= 2
