"""Roles from Slurm, MPI or PS_* variables; Slurm host lists; hostfiles; choosing the
advertised address by interface or subnet; the remote command line of ps-launch."""
import shlex
import subprocess
import sys

import pytest

from common.launch import hostfile
from common.cluster import ClusterConfig, advertised_endpoint
from common.launch.ssh import remote_command, role_commands
from common.wire.addresses import interfaces, pick_address
from common.launch.launcher_env import derive, expand_hostlist
from tests.clusterenv import CLUSTER_ENV, REPO


def test_hostlists_expand_as_slurm_writes_them():
    assert expand_hostlist("psh[1-3],gpu[01-02,7],login") == ["psh1", "psh2", "psh3", "gpu01", "gpu02", "gpu7",
                                                               "login"]
    assert expand_hostlist("vm") == ["vm"]
    with pytest.raises(ValueError, match="cannot read"):
        expand_hostlist("n[a-b]")


def test_slurm_ranks_become_servers_then_workers():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "5", "SLURM_JOB_NODELIST": "node[07-09]", "SLURMD_NODENAME": "node07",
           "PS_NUM_SERVERS": "2", "PS_PORT": "6000"}
    got = [derive(dict(env, SLURM_PROCID=str(g))) for g in range(5)]
    assert [(p.role, p.rank) for p in got] == [("server", 0), ("server", 1), ("worker", 0), ("worker", 1),
                                               ("worker", 2)]
    assert {p.coordinator for p in got} == {"node07:6000"} and got[0].node == "node07"
    assert got[0].num_workers == 3 and got[0].source == "slurm"
    # a step's own node list wins over the job's (srun -w inside a bigger allocation)
    assert derive(dict(env, SLURM_STEP_NODELIST="node09")).coordinator == "node09:6000"


def test_mpi_wins_over_an_inherited_slurm_rank_and_needs_a_coordinator():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3",
           "PS_COORDINATOR": "10.0.0.1:5700"}
    p = derive(env)
    assert (p.role, p.rank, p.source, p.coordinator) == ("worker", 1, "openmpi", "10.0.0.1:5700")
    assert derive({"PMI_RANK": "0", "PMI_SIZE": "2", "PS_COORDINATOR": "h:1"}).role == "server"
    with pytest.raises(ValueError, match="PS_COORDINATOR"):
        derive({"PMI_RANK": "0", "PMI_SIZE": "2"})
    with pytest.raises(ValueError, match="no global rank"):
        derive({})
    with pytest.raises(ValueError, match="cannot hold 3 server"):
        derive({"PS_GLOBAL_RANK": "0", "PS_WORLD_SIZE": "3", "PS_COORDINATOR": "h:1"}, num_servers=3)


def test_ps_role_prints_the_command_it_would_exec():
    env = dict(CLUSTER_ENV, SLURM_PROCID="1", SLURM_NTASKS="3", SLURM_JOB_NODELIST="vm", PS_PORT="5999")
    done = subprocess.run([sys.executable, "-m", "common.launch.role", "--print", "--steps", "7", "--n-layer", "1",
                           "--lr", "0.01"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    import json
    p = json.loads(done.stdout)
    cmd = p["command"]
    assert cmd[1:3] == ["-m", "worker"] and cmd[cmd.index("--coordinator") + 1] == "vm:5999"
    assert "--n-layer" in cmd and "--lr" not in cmd                 # the optimizer goes to servers only
    assert cmd[cmd.index("--steps") + 1] == "7"


HOSTS = """# a comment
node1 servers=2 addr=10.0.0.1
node2 workers=2
node3                # one worker
"""


def test_hostfile_ranks_and_coordinator():
    hosts = hostfile.parse(HOSTS)
    assert [(h.name, h.addr, h.servers, h.workers) for h in hosts] == [
        ("node1", "10.0.0.1", [0, 1], []), ("node2", "node2", [], [0, 1]), ("node3", "node3", [], [2])]
    assert hostfile.coordinator(hosts, 5700) == "10.0.0.1:5700"
    for bad, words in [("n1 servers=x", "whole numbers"), ("n1 cores=2", "expected servers=N"),
                       ("n1 workers=1", "at least one server"), ("n1 servers=1\nn1 workers=1", "appears twice")]:
        with pytest.raises(ValueError, match=words):
            hostfile.parse(bad)
    roles = role_commands(hosts, 5700, ["--lr", "0.1"], ["--steps", "3"], "python3", 30.0)
    names = [(h.name, n) for h, n, _ in roles]
    assert names == [("node1", "server-0"), ("node1", "server-1"), ("node2", "worker-0"), ("node2", "worker-1"),
                     ("node3", "worker-2")]
    s0, s1 = roles[0][2], roles[1][2]
    assert s0[s0.index("--bind") + 1] == "tcp://*:5700" and s1[s1.index("--bind") + 1] == "tcp://*:*"
    assert s0[s0.index("--advertise") + 1] == "tcp://10.0.0.1:*"      # bind everywhere, advertise the hostfile's


def test_remote_command_survives_a_shell_round_trip(tmp_path):
    argv = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "a b", "it's", "$HOME"]
    cmd = remote_command(argv, str(tmp_path), str(REPO), sys.executable, 1, guard=False)
    done = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str(["a b", "it's", "$HOME"]), done.stderr
    assert shlex.split(cmd)[0] == "cd"


def test_addresses_by_interface_and_subnet():
    table = {"lo": [("127.0.0.1", 8)], "eth0": [("192.168.5.4", 24), ("10.1.2.3", 16)], "ib0": [("10.9.0.7", 16)]}
    assert pick_address("eth0", table=table) == "192.168.5.4"
    assert pick_address(subnet="10.9.0.0/16", table=table) == "10.9.0.7"
    assert pick_address("eth0", "10.1.0.0/16", table=table) == "10.1.2.3"
    with pytest.raises(ValueError, match=r"no interface 'eth9'.*lo \(127.0.0.1/8\)"):
        pick_address("eth9", table=table)
    with pytest.raises(ValueError, match="no address in 172.16.0.0/12"):
        pick_address(subnet="172.16.0.0/12", table=table)
    # this machine's real table has loopback
    assert ("127.0.0.1", 8) in interfaces()["lo"]
    assert pick_address("lo") == "127.0.0.1" and pick_address(subnet="127.0.0.0/8") == "127.0.0.1"
    # a server bound everywhere advertises what --interface picks, not the route's address
    cfg = ClusterConfig(coordinator="127.0.0.1:5700", interface="lo")
    assert advertised_endpoint(cfg, "tcp://0.0.0.0:5701") == "tcp://127.0.0.1:5701"
    assert advertised_endpoint(ClusterConfig(advertise="10.0.0.5:*"), "tcp://0.0.0.0:5702") == "tcp://10.0.0.5:5702"
