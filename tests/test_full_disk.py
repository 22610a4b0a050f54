"""A full disk under a running BSP job: its run folder on a small tmpfs, filled to the last
byte while the job trains (as root; the test mounts and unmounts the tmpfs itself).

- by default, the first checkpoint that cannot be written stops the job: the failure names
  the file and the errno, every process exits (no hang, no traceback), the older
  checkpoints are whole and no temporary file is left; once space is freed, the job resumed
  from the last good version ends with the parameters of an undisturbed run, bit for bit;
- with ``--on-checkpoint-error continue``, the servers warn at each failed save and go on;
  worker 0 leaves out the metrics lines it cannot write (no torn line); once space is freed
  the job ends, again bit-identical.
"""
import contextlib
import errno
import json
import os
import subprocess
import time

import pytest

from paramserver import shard_checkpoint
from tests.jobs import Job, assert_same_params, undisturbed

STEPS, EVERY = 60, 4
PACE = ["--straggler", "0:0.15"]          # worker 0 sleeps 0.15 s a step: the same numbers, time to fill the disk
_REFERENCE = {}


@contextlib.contextmanager
def small_tmpfs(path, size="4m"):
    """``path`` on a tmpfs of ``size``, unmounted (and its contents gone) however the test ends."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (the full disk)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder) -> os.PathLike:
    """Write a file into ``folder`` until the disk refuses one byte more; returns its path."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    return filler


def reference(tmp_path_factory):
    if not _REFERENCE:
        _REFERENCE.update(undisturbed(tmp_path_factory.mktemp("undisturbed"), steps=STEPS, every=EVERY, timeout=20,
                                      worker_args=PACE))
    return _REFERENCE


def failed_saves(job, s) -> int:
    return job.log(f"server-{s}").count(f"server {s} could not write its checkpoint")


def test_a_full_disk_stops_the_job_cleanly_and_a_resume_ends_bit_identical(tmp_path, tmp_path_factory):
    want = reference(tmp_path_factory)
    with small_tmpfs(tmp_path / "run"), Job(tmp_path, steps=STEPS, every=EVERY, timeout=20, worker_args=PACE) as job:
        job.start()
        job.until(lambda: job.step() >= 6, 60, "step 6")
        filler = fill(job.out)
        t0 = time.monotonic()
        codes = job.wait(60)                                  # every process ends by itself
        stopped_in = time.monotonic() - t0
        print(f"\nthe disk filled at step >= 6; every process had exited {stopped_in:.1f} s later")
        assert all(c != 0 for c in codes.values()), codes
        logs = "\n".join(job.log(n) for n in job.procs)
        assert "Traceback" not in logs, logs[-4000:]
        failed = [s for s in range(2) if failed_saves(job, s)]
        assert failed, logs[-4000:]
        s = failed[0]
        assert "could not write its checkpoint of version" in job.log(f"server-{s}")
        assert str(job.out / "checkpoints" / f"server-{s}-v000000") in job.log(f"server-{s}")
        assert "No space left on device (errno 28 ENOSPC)" in job.log(f"server-{s}")
        for r in range(2):                                    # the workers were told why
            assert "could not write its checkpoint" in job.log(f"worker-{r}"), job.log(f"worker-{r}")[-2000:]
        held = [shard_checkpoint.versions(job.out / "checkpoints", s) for s in range(2)]
        last_good = max(set(held[0]) & set(held[1]))
        assert not [p for p in (job.out / "checkpoints").iterdir() if p.name.endswith(".tmp")]

        filler.unlink()                                       # space freed: resume from the last good version
        for s in range(2):
            job.server(s, "--resume")
        for r in range(2):
            job.worker(r)
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), codes
        assert f"resumes from the servers' checkpoints at version {last_good}" in job.log("server-0")
        assert_same_params(job.final_params(), want)


def test_on_checkpoint_error_continue_warns_each_time_and_the_job_ends_bit_identical(tmp_path, tmp_path_factory):
    want = reference(tmp_path_factory)
    with small_tmpfs(tmp_path / "run"), Job(tmp_path, steps=STEPS, every=EVERY, timeout=20, worker_args=PACE,
                                            server_args=["--on-checkpoint-error", "continue"]) as job:
        job.start()
        job.until(lambda: job.step() >= 6, 60, "step 6")
        filler = fill(job.out)
        job.until(lambda: min(failed_saves(job, s) for s in range(2)) >= 2, 60, "two failed saves on each server")
        # the metrics file's last page had room for a few lines more: worker 0 fails a little later
        job.until(lambda: "metrics.jsonl (" in job.log("worker-0"), 60, "a metrics line that cannot be written")
        filler.unlink()
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), codes
        for s in range(2):
            log = job.log(f"server-{s}")
            assert log.count("Going on without it (--on-checkpoint-error continue)") == failed_saves(job, s) >= 2
            assert "errno 28 ENOSPC" in log
            assert job.server_json(s)["checkpoints_failed"] == failed_saves(job, s)
        worker0 = job.log("worker-0")
        assert "metrics.jsonl (" in worker0 and "is written again" in worker0, worker0[-3000:]
        lines = (job.out / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(ln)["step"] for ln in lines]       # every line whole
        assert steps[-1] == STEPS and len(steps) < STEPS + 1   # the lines of the full disk left out
        assert_same_params(job.final_params(), want)


def test_processes_whose_log_cannot_be_written_train_on(tmp_path, tmp_path_factory):
    """Server 1 and worker 1 log to /dev/full (every write: ENOSPC): they train to the end."""
    want = reference(tmp_path_factory)
    with Job(tmp_path, steps=STEPS, every=EVERY, timeout=20, worker_args=PACE) as job:
        for name in ("server-1", "worker-1"):
            (job.logs / f"{name}.1.log").symlink_to("/dev/full")
        job.start()
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), (codes, job.log("server-0")[-2000:])
        assert_same_params(job.final_params(), want)
