"""scripts/failures.py, the demonstration behind docs/failures.md and lesson 7, runs and finds
every outcome as documented (a worker dropped, a server restarted to identical parameters, a
dead coordinator's job resumed to identical parameters); scripts/lessons/step_times.py reads
from the kept run folders what the failures cost (lesson 7's table)."""
import json
import subprocess
import sys
from pathlib import Path

from tests.cluster import ENV

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "lessons"))
import step_times  # noqa: E402


def test_the_failures_demonstration_finds_every_outcome_as_documented(tmp_path):
    done = subprocess.run([sys.executable, "scripts/failures.py", "--steps", "120", "--keep", str(tmp_path),
                           "--eval-interval", "40"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("-> as documented") == 3
    assert done.stdout.count("bit for bit: True") == 2
    runs = {name: step_times.row(tmp_path / name) for name in ("uninterrupted", "worker", "server", "coordinator")}
    killed = int(done.stdout.split("killed worker 1 (pid ")[1].split("at step ")[1].split()[0])
    # a step just after the death waited for the drop: more than (k - 1) h = 4 x 0.2 s (beats of 0.2 s, 5 misses)
    assert float(runs["worker"]["longest ms"]) > 800 and killed <= int(runs["worker"]["at step"]) <= killed + 3
    assert int(runs["server"]["saves"]) > 120                  # --checkpoint-every 1: a save a version
    vals = {name: r["val loss"] for name, r in runs.items()}
    assert vals["server"] == vals["coordinator"] == vals["uninterrupted"] != vals["worker"]
    again = subprocess.run([sys.executable, "scripts/failures.py", "worker", "--steps", "100", "--keep", str(tmp_path)],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=200)
    assert again.returncode != 0 and "holds a run of other flags" in again.stdout + again.stderr


def test_step_times_reads_the_longest_step_and_the_cost_of_a_save(tmp_path):
    lines = [{"step": 0, "val_loss": 5.0, "elapsed_s": 0.0}] + [
        {"step": s, "loss": 3.0, "elapsed_s": 0.01 * s + (0.5 if s >= 7 else 0.0)} for s in range(1, 11)]
    lines[-1]["val_loss"] = 2.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for rank, (n, secs) in enumerate([(10, 0.02), (5, 0.02)]):
        (tmp_path / f"server-{rank}.json").write_text(json.dumps({"checkpoints_written": n, "checkpoint_s": secs}))
    r = step_times.row(tmp_path)
    assert r == {"run": tmp_path.name, "steps": "10", "median ms": "10.0", "longest ms": "510", "at step": "7",
                 "saves": "15", "ms/save": "3.0", "val loss": "2.5000"}
