"""scripts/failures.py, the demonstration behind docs/failures.md, runs and finds every
outcome as documented (a worker dropped, a server restarted to identical parameters, a
dead coordinator's job resumed to identical parameters)."""
import subprocess
import sys
from pathlib import Path

from tests.cluster import ENV

ROOT = Path(__file__).resolve().parents[1]


def test_the_failures_demonstration_finds_every_outcome_as_documented(tmp_path):
    done = subprocess.run([sys.executable, "scripts/failures.py", "--steps", "120", "--keep", str(tmp_path)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("-> as documented") == 3
    assert done.stdout.count("bit for bit: True") == 2
