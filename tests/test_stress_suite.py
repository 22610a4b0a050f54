"""scripts/stress_suite.sh finds what it exists to find: a test that fails in one run of
two is listed with the runs it failed in, the exit status says so, and the CPU burners
it started are gone when it ends."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stress(tmp_path, *args):
    """The script on the tests in ``tmp_path``; its logs go there too (mktemp follows TMPDIR)."""
    return subprocess.run(["bash", "scripts/stress_suite.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TMPDIR=str(tmp_path)))

FLAKY = '''
from pathlib import Path

def test_fails_in_the_first_run_only():
    count = Path(__file__).with_name("runs")
    n = int(count.read_text()) if count.exists() else 0
    count.write_text(str(n + 1))
    assert n > 0, "the first run"

def test_always_passes():
    pass
'''


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_a_test_that_fails_in_one_run_of_two_is_found_and_the_burners_are_stopped(tmp_path):
    (tmp_path / "test_flaky.py").write_text(FLAKY)
    done = stress(tmp_path, "-n", "2", "-b", "1", "--", str(tmp_path / "test_flaky.py"))
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert re.search(r"run 1: exit 1 .*1 failed, 1 passed", out), out
    assert re.search(r"run 2: exit 0 .*2 passed", out), out
    assert "1 of 2 run(s) failed" in out
    assert re.search(r"^\s+1 \S*test_flaky.py::test_fails_in_the_first_run_only$", out, re.M), out
    pids = [int(p) for p in re.search(r"burner\(s\) \(PIDs ([\d ]+)\)", out).group(1).split()]
    assert len(pids) == 1 and not alive(pids[0])


def test_a_steady_suite_passes_and_bad_arguments_are_refused(tmp_path):
    (tmp_path / "test_steady.py").write_text("def test_one():\n    pass\n")
    done = stress(tmp_path, "-n", "1", "-b", "0", "--", str(tmp_path / "test_steady.py"))
    assert done.returncode == 0 and "0 of 1 run(s) failed" in done.stdout, done.stdout + done.stderr
    bad = stress(tmp_path, "-n", "three")
    assert bad.returncode == 2 and "whole numbers" in bad.stderr


SLOW = '''
import subprocess
import time
from pathlib import Path

def test_slow():
    child = subprocess.Popen(["sleep", "300"])
    try:
        Path(__file__).with_name("child").write_text(str(child.pid))
        time.sleep(300)
    finally:
        child.kill()
        child.wait()
        Path(__file__).with_name("cleaned up").write_text("")
'''


def test_a_stopped_stress_run_interrupts_pytest_whose_tests_clean_up_and_leaves_no_burner(tmp_path):
    import signal
    import time
    (tmp_path / "test_slow.py").write_text(SLOW)
    # started with SIGINT ignored, as by nohup or from a script's background command: what it
    # starts inherits that, and pytest must still be interrupted
    script = subprocess.Popen(["bash", "scripts/stress_suite.sh", "-n", "1", "-b", "1", "--",
                               str(tmp_path / "test_slow.py")], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=str(tmp_path)),
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        first = script.stdout.readline()
        burners = [int(p) for p in re.search(r"PIDs ([\d ]+)\)", first).group(1).split()]
        deadline = time.monotonic() + 120
        while not (tmp_path / "child").exists():           # the slow test runs, with a process of its own
            assert time.monotonic() < deadline and script.poll() is None, first
            time.sleep(0.1)
        child = int((tmp_path / "child").read_text())
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=90) == 130
        assert "interrupted" in script.stderr.read()
        assert (tmp_path / "cleaned up").exists(), "pytest was killed, not interrupted: no test cleaned up"
        assert not alive(child)
        assert not any(alive(p) for p in burners)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
