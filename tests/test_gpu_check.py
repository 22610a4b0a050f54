"""scripts/gpu_check.sh in its emulated, quick mode: it runs each check it can on the
CPU emulator, writes report.md and report.json, reports what needs a GPU as skipped
(never as passed), and exits 1 when a check fails."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests import cuda_emu
from tests.cluster import ENV, ROOT

why_not = cuda_emu.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"emulator unavailable: {why_not}")


def test_emulated_quick_run_writes_a_passing_report(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--emulated", "--quick", str(tmp_path)], cwd=ROOT,
                          env=dict(ENV, PYTHON=sys.executable), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "emulated" and report["gpu"].startswith("none")
    status = {c["name"]: c["status"] for c in report["checks"]}
    # the emulated bench compares with torch: without torch its one test skips, and so does the check
    bench = "pass" if importlib.util.find_spec("torch") else "skipped"
    assert status == {"kernels": "pass", "kernels-gpt2": "pass", "model": "pass", "job-fp32": "pass",
                      "job-bf16": "skipped", "bench": bench, "bench-timing": "skipped"}, status
    if bench == "skipped":
        assert "torch" in next(c["reason"] for c in report["checks"] if c["name"] == "bench")
    assert all(c["figures"].get("passed", 0) > 0 for c in report["checks"] if c["status"] == "pass")
    md = (tmp_path / "report.md").read_text()
    assert "| job-bf16 | skipped |" in md and "needs a GPU" in md and "still owed" in md


def test_a_failing_check_fails_the_run(tmp_path, monkeypatch):
    gpu_check = _gpu_check_module()
    monkeypatch.setattr(gpu_check, "checks", lambda emulated, quick, out: [
        ("fine", "a check that passes", [sys.executable, "-c", "print('1 passed')"], 60),
        ("broken", "a check that fails", [sys.executable, "-c", "raise SystemExit(3)"], 60)])
    assert gpu_check.main([str(tmp_path), "--emulated"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["status"] for c in report["checks"]] == ["pass", "fail"]
    assert report["verdict"] == "FAIL: broken" and "## broken: failed" in (tmp_path / "report.md").read_text()


def _gpu_check_module():
    sys.path.insert(0, f"{ROOT}/scripts")
    try:
        import gpu_check
    finally:
        sys.path.remove(f"{ROOT}/scripts")
    return gpu_check


def test_without_a_gpu_the_gpu_mode_fails_every_check_naming_why(tmp_path):
    """Here (no GPU) the GPU mode must not pass anything; and each of its commands is one
    this checkout takes: the test files exist, the jobs and benchmarks stop only for the
    want of a GPU (their arguments parse)."""
    from worker import backend
    try:
        backend.probe("cuda")
        pytest.skip("a GPU is usable here")
    except backend.BackendError as e:
        reason = str(e)
    gpu_check = _gpu_check_module()
    assert gpu_check.main([str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "gpu" and report["gpu"].startswith("none")
    assert {c["status"] for c in report["checks"]} == {"fail"}
    for name, what, cmd, deadline in gpu_check.checks(False, False, tmp_path):
        if "pytest" in cmd:
            assert all(os.path.exists(os.path.join(ROOT, f)) for f in cmd if f.startswith("tests/")), cmd
            continue
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and reason.split(".")[0] in done.stderr, (name, done.stderr[-2000:])
