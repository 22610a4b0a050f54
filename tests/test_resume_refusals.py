"""ps-local refuses a resume that cannot continue the same run, before anything trains: no
checkpoints to resume, a run folder that would be overwritten, and a job whose settings
differ from the checkpoints' (the servers name the field, both values and the file).
The refusals themselves, field by field, are tests/test_shard_checkpoint.py."""
import subprocess
import sys

from tests.cluster import ENV

SMALL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4",
         "--sample-bytes", "0", "--eval-interval", "100", "--eval-batches", "1", "--no-progress", "--timeout", "60"]


def ps_local(*args):
    return subprocess.run([sys.executable, "-m", "common.launch.local", *map(str, args), *SMALL], env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_resume_without_checkpoints_and_a_used_run_folder_are_refused_before_anything_starts(tmp_path):
    done = ps_local("--steps", 4, "--out", tmp_path / "none", "--resume")
    assert done.returncode == 2 and "checkpoints does not exist; give the --out of the job to resume" in done.stderr
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    done = ps_local("--steps", 4, "--out", used)
    assert done.returncode == 2 and "already exists and is not empty" in done.stderr, done.stderr
    assert sorted(p.name for p in used.iterdir()) == ["notes.txt"]


def test_a_resume_with_other_optimizer_settings_is_refused_naming_the_field_and_the_file(tmp_path):
    out = tmp_path / "run"
    first = ps_local("--steps", 4, "--out", out)
    assert first.returncode == 0, first.stdout + first.stderr
    metrics = (out / "metrics.jsonl").read_text()
    done = ps_local("--steps", 4, "--out", out, "--resume", "--lr", 0.01)
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    assert "was written by another job: optimizer lr: 0.003 in the checkpoint, 0.01 in this job" in text, text
    assert str(out / "checkpoints" / "server-0-v00000004.safetensors") in text
    assert (out / "metrics.jsonl").read_text() == metrics            # nothing trained
    again = ps_local("--steps", 4, "--out", out, "--resume")         # the same flags: it resumes (and is done)
    assert again.returncode == 0, again.stdout + again.stderr
