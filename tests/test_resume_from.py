"""Resuming from a chosen version (``--resume-from VERSION``) and the tokenizer check at resume,
through ps-local as a user runs it:

- the newest checkpoint of one server is damaged: ``ps-local --resume`` is refused and offers
  the last good version as a command; that command resumes the job, sets the newer
  checkpoints aside, and the job ends with the very parameters of the undisturbed run;
- a job resumed with another tokenizer (same model shape, other token meanings) is refused
  before anything trains, naming both sha256 and the checkpoint file.
"""
import json
import re
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

from tests.cluster import ENV
from tests.jobs import corpus

SMALL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4",
         "--sample-bytes", "0", "--eval-interval", "100", "--eval-batches", "1", "--no-progress", "--timeout", "60"]


def ps_local(*args):
    return subprocess.run([sys.executable, "-m", "common.launch.local", *map(str, args), *SMALL], env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_a_damaged_newest_checkpoint_offers_a_version_that_resumes_bit_identical(tmp_path):
    out = tmp_path / "run"
    data = corpus(tmp_path)
    first = ps_local("--steps", 12, "--checkpoint-every", 4, "--out", out, "--data", data)
    assert first.returncode == 0, first.stdout + first.stderr
    undisturbed = load_file(str(out / "model.safetensors"))
    damaged = out / "checkpoints" / "server-1-v00000012.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])                     # truncated, as by a full disk

    t0 = time.monotonic()
    refused = ps_local("--steps", 12, "--checkpoint-every", 4, "--out", out, "--data", data, "--resume")
    print(f"\nps-local --resume of a damaged newest checkpoint: exit {refused.returncode} after "
          f"{time.monotonic() - t0:.1f} s")
    text = refused.stdout + refused.stderr
    assert refused.returncode == 1, text
    assert f"cannot read {damaged}" in text and "--resume-from 8" in text, text

    again = ps_local("--steps", 12, "--checkpoint-every", 4, "--out", out, "--data", data, "--resume-from", 8)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text
    assert "resumes from the servers' checkpoints at version 8" in (out / "logs" / "server-0.log").read_text()
    superseded = sorted(p.name for p in (out / "checkpoints" / "superseded").iterdir())
    assert superseded == ["server-0-v00000012.safetensors", "server-1-v00000012.safetensors"], superseded
    resumed = load_file(str(out / "model.safetensors"))
    for k in undisturbed:
        assert np.array_equal(resumed[k], undisturbed[k]), k
    # the job wrote its own version 12 again: a later --resume takes it, not the damaged one
    assert (out / "checkpoints" / "server-1-v00000012.safetensors").stat().st_size > 1000


def test_resume_from_a_version_some_server_lacks_is_refused_naming_what_it_has(tmp_path):
    out = tmp_path / "run"
    data = corpus(tmp_path)
    first = ps_local("--steps", 8, "--checkpoint-every", 4, "--out", out, "--data", data)
    assert first.returncode == 0, first.stdout + first.stderr
    done = ps_local("--steps", 8, "--checkpoint-every", 4, "--out", out, "--data", data, "--resume-from", 6)
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    # (each server refuses; ps-local names the first to exit, whichever it is)
    assert re.search(r"--resume-from 6: server [01] has no checkpoint of that version", text), text
    assert "[4, 8]" in text, text


def test_a_resume_with_another_tokenizer_is_refused_naming_both_sha256_and_the_file(tmp_path):
    out = tmp_path / "run"
    data = corpus(tmp_path)
    prepared = tmp_path / "bpe"
    prep = subprocess.run([sys.executable, "-m", "worker.prepare", "--data", str(data), "--tokenizer", "bpe:300",
                           "--out", str(prepared)], env=ENV, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    bpe_sha = json.loads((prepared / "prepared.json").read_text())["tokenizer"]["sha256"]
    # the same model shape (--vocab-size 300) for the byte tokenizer and the BPE: only the tokenizer differs
    first = ps_local("--steps", 4, "--out", out, "--data", data, "--vocab-size", 300)
    assert first.returncode == 0, first.stdout + first.stderr
    metrics = (out / "metrics.jsonl").read_text()
    done = ps_local("--steps", 8, "--out", out, "--data", prepared, "--vocab-size", 300, "--resume")
    text = done.stdout + done.stderr
    assert done.returncode == 1, text
    from worker.tokenizer import bytes_tokenizer
    assert (f"tokenizer sha256: {bytes_tokenizer().sha256!r} in the checkpoint, {bpe_sha!r} in this job"
            in text), text
    assert str(out / "checkpoints" / "server-0-v00000004.safetensors") in text
    assert (out / "metrics.jsonl").read_text() == metrics                # nothing trained
