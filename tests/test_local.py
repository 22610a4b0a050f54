"""ps-local, the one-command local job: it trains, writes its run folder, and stops cleanly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster import ENV

SMALL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8",
         "--eval-interval", "20", "--eval-batches", "2", "--sample-bytes", "40", "--timeout", "30"]


def ps_local(*args, **kw):
    return subprocess.run([sys.executable, "-m", "common.launch.local", *map(str, args)], env=ENV,
                          capture_output=True, text=True, **kw)


def processes_with(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
            except OSError:
                continue
            if text in cmd and "Z" not in state.split()[1:2]:
                pids.append(int(d.name))
    return pids


def test_ps_local_trains_and_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    done = ps_local("--servers", 2, "--workers", 2, "--steps", 60, "--out", out, "--no-progress", *SMALL,
                    timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("run_config.json", "config.json", "metrics.jsonl", "model.safetensors", "sample.txt",
                 "logs/server-0.log", "logs/server-1.log", "logs/worker-0.log", "logs/worker-1.log"):
        assert (out / name).exists(), name
    config = json.loads((out / "run_config.json").read_text())
    assert config["launcher"]["workers"] == 2 and config["worker"]["model"]["n_layer"] == 1
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) >= 3 and vals[-1] < vals[0] - 0.5, vals           # validation loss falls
    last = records[-1]
    assert last["step"] == 60 and last["tokens_per_s"] > 0
    from worker.model_checkpoint import load_model
    nbytes = load_model(out).num_params() * 4                            # float32
    # the bytes on the wire: 2 workers, 60 pushes each of the whole gradient (the arrays; headers not counted)
    assert last["bytes_pushed"] == 2 * 60 * nbytes
    assert last["bytes_pulled"] == 2 * 60 * nbytes      # the first pull + 59 answers, when pushing
    assert "sample from the final model" in done.stdout and "validation loss" in done.stdout


def test_a_dying_role_stops_the_job_and_is_named(tmp_path):
    out = tmp_path / "run"
    done = ps_local("--steps", 50, "--out", out, "--no-progress", "--data", tmp_path / "missing.txt", *SMALL,
                    timeout=120)
    assert done.returncode == 1
    assert "worker-" in done.stderr and "exited with code 1" in done.stderr
    assert str(out / "logs") in done.stderr
    assert not processes_with(json.loads((out / "run_config.json").read_text())["launcher"]["coordinator"])


def test_bad_flags_fail_before_anything_starts(tmp_path):
    done = ps_local("--out", tmp_path / "r", "--n-layers", 3, timeout=60)
    assert done.returncode == 2 and "--n-layers" in done.stderr
    done = ps_local("--out", tmp_path / "r", "--heartbeat-misses", 0, timeout=60)     # reaches every role's check
    assert done.returncode == 2 and "heartbeat_misses >= 1" in done.stderr
    assert not (tmp_path / "r").exists()


def test_ctrl_c_stops_every_process(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "common.launch.local", "--steps", "100000", "--out", str(out),
                             "--no-progress", *SMALL], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, "the job did not start"
            time.sleep(0.2)
        coordinator = json.loads((out / "run_config.json").read_text())["launcher"]["coordinator"]
        assert len(processes_with(coordinator)) == 4
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "stopping every process" in err
        assert processes_with(coordinator) == []
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_optimizer_defaults_match_the_single_process_trainer():
    from common.launch.options import OPTIM_DEFAULTS
    from worker.train import TRAIN_DEFAULTS
    assert {k: TRAIN_DEFAULTS[k] for k in OPTIM_DEFAULTS} == OPTIM_DEFAULTS


def test_hello_ps_trains_a_linear_model_through_real_servers():
    done = subprocess.run([sys.executable, "scripts/hello_ps.py"], env=ENV, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    learned = done.stdout.split("learned w = [")[1].split("]")[0].split()
    assert abs(float(done.stdout.split("b = ")[1].split()[0]) - 0.7) < 0.01
    assert [round(float(x), 1) for x in learned] == [2.0, -1.0, 0.5, 3.0]


def test_ps_local_over_curve(tmp_path):
    from common.wire.keys import main as ps_keys
    ps_keys([str(tmp_path / "keys")])
    done = ps_local("--steps", 10, "--out", tmp_path / "run", "--no-progress", "--curve", tmp_path / "keys",
                    *SMALL, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--curve" in (tmp_path / "run" / "logs" / "server-1.log").read_text().splitlines()[0]
    # a segment is not encrypted: with CurveZMQ every array went as an (encrypted) frame
    assert json.loads((tmp_path / "run" / "worker-0.json").read_text())["shm_pushes"] == 0
