"""Real cluster pieces for tests: network-namespace hosts and a local Slurm, always undone.

Both come from the repository's own scripts (``scripts/cluster/``). A test that needs
them skips, with the reason, when not root or when a command is missing
(``scripts/cluster/ci_install.sh`` installs them). The context managers tear down
what they started even when the test fails: namespaces (and any process left in
them, stopped by PID by ``netns_down.sh``) and the Slurm daemons (by PID file).
Both hold ``cluster_lock``: the hosts psh1..N and the local Slurm are one per machine,
so two test runs on one machine (or the docs test, tests/test_docs.py) take turns.
"""
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import ENV

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "cluster"
RSH = f"bash {SCRIPTS / 'netns_rsh.sh'}"
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8",
        "--eval-interval", "10", "--eval-batches", "2", "--sample-bytes", "20"]
CLUSTER_ENV = dict(ENV, PYTHONPATH=str(REPO))


def need(*commands, root=True):
    """Skip the calling test (or module) unless root and every command exists."""
    if root and os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, daemons)")
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (bash scripts/cluster/ci_install.sh installs them)")


def sh(*args, timeout=120, check=True, **kw):
    done = subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


LOCK = Path("/tmp/paramserver-cluster.lock")
_held = [0]                                    # this process's depth of cluster_lock (it nests)


@contextlib.contextmanager
def cluster_lock():
    """Held while a test uses the namespace hosts or the local Slurm (released if the test
    dies: the kernel drops a dead process's flock)."""
    if _held[0]:
        _held[0] += 1
        try:
            yield
        finally:
            _held[0] -= 1
        return
    # read-only: flock needs no write access, so another user's lock file serves as well
    fd = os.open(LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[0] = 1
        try:
            yield
        finally:
            _held[0] = 0
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def netns_hosts(n: int):
    """Hosts psh1..psh<n> at 10.200.0.1..n/24 (the root namespace is 10.200.0.254)."""
    with cluster_lock():
        sh(SCRIPTS / "netns_down.sh", check=False)          # a previous run killed before its teardown
        try:
            made = sh(SCRIPTS / "netns_up.sh", n, check=False)
            if made.returncode != 0 and "not permitted" in (made.stdout + made.stderr).lower():
                pytest.skip(f"network namespaces are not permitted here: {made.stderr.strip()[-200:]}")
            if made.returncode != 0:
                raise RuntimeError(f"netns_up.sh {n} failed:\n{made.stdout}\n{made.stderr}")
            yield [f"psh{i}" for i in range(1, n + 1)]
        finally:
            sh(SCRIPTS / "netns_down.sh", check=False)


@contextlib.contextmanager
def slurm(nodes: int = 1, cpus: int = 8):
    """A running Slurm (munged, slurmctld, slurmd) with ``nodes`` node(s)."""
    env = dict(os.environ, SLURM_NODES=str(nodes), SLURM_CPUS=str(cpus), SLURM_INSTALL="0")
    with cluster_lock():
        try:
            sh(SCRIPTS / "slurm_local_up.sh", env=env, timeout=180)
            yield
        finally:
            sh(SCRIPTS / "slurm_local_down.sh", check=False, timeout=120)


def python_cmd(module, *args):
    return [sys.executable, "-m", module, *map(str, args)]


def run(cmd, timeout=180, **kw):
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, env=CLUSTER_ENV,
                          cwd=REPO, **kw)
