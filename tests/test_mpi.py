"""mpirun (Open MPI) starts one command everywhere; ps-role gives each rank its role from
OMPI_COMM_WORLD_RANK, and the job trains on this machine."""
import json
import os
import sys

from common.wire.transport import free_port
from tests.clusterenv import TINY, need, run


def test_mpirun_ps_role_trains(tmp_path):
    need("mpirun", root=False)
    port = free_port()
    out = tmp_path / "run"
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    env = ["-x", f"PS_COORDINATOR=127.0.0.1:{port}", "-x", "PYTHONPATH", "-x", "OPENBLAS_NUM_THREADS",
           "-x", "OMP_NUM_THREADS", "-x", "PYTHONUNBUFFERED"]
    done = run(["mpirun", *root, "--oversubscribe", "--bind-to", "none", "-n", "3", *env, sys.executable, "-m",
                "common.launch.role", "--servers", "1", "--steps", "20", "--timeout", "30", "--out", str(out), *TINY],
               timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert records[-1]["step"] == 20 and vals[-1] < vals[0] - 0.5, vals
    assert (out / "model.safetensors").exists()
