"""The single-process trainer: outputs, exact resume, learning, and sampling from its checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worker import model_checkpoint as ck
from worker.metrics import METRICS, read_metrics
from worker.train import RUN_CONFIG, main, parse_configs, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
        "--eval-batches", "2", "--log-interval", "1", "--eval-interval", "5", "--no-progress",
        "--lr-decay-steps", "20", "--warmup-steps", "3"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small text file: a few KB of varied lines, enough for a train/val split."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "(", ")", ":", "\n"]
    path.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 3000)))
    return path


def run(args, capsys=None):
    result = train(parse_configs([str(a) for a in args]))
    if capsys is not None:
        capsys.readouterr()
    return result


def test_outputs_and_resume_continues_the_same_curve(tmp_path, text_file, capsys):
    data = ["--data", text_file, "--doc-bytes", "1000"]
    straight = run(TINY + data + ["--steps", 20, "--out", tmp_path / "a"], capsys)
    run(TINY + data + ["--steps", 10, "--out", tmp_path / "b"], capsys)
    # a line the interrupted run wrote after its checkpoint must not survive the resume
    with open(tmp_path / "b" / METRICS, "a") as f:
        f.write(json.dumps({"step": 11, "loss": -1.0}) + "\n")
    resumed = run(["--resume", tmp_path / "b", "--steps", 20], capsys)

    a, b = read_metrics(tmp_path / "a" / METRICS), read_metrics(tmp_path / "b" / METRICS)
    assert [r["step"] for r in a] == list(range(21))
    assert [r["step"] for r in b] == list(range(21))
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]           # exactly the same curve
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    assert [r.get("lr") for r in a] == [r.get("lr") for r in b]
    assert sum("val_loss" in r for r in a) == 5                                 # steps 0, 5, 10, 15, 20
    assert {"loss", "lr", "tokens_per_s", "elapsed_s", "grad_norm"} <= set(a[1])
    assert a[0]["fingerprint"]["source"] == str(text_file) and a[0]["unigram_entropy"] > 0
    assert straight["val_loss"] == resumed["val_loss"]
    assert np.array_equal(ck.load_model(tmp_path / "a").params, ck.load_model(tmp_path / "b").params)
    saved = json.loads((tmp_path / "a" / RUN_CONFIG).read_text())
    assert set(saved) == {"model", "optim", "data", "train"} and saved["model"]["n_embd"] == 16


def test_resume_refuses_to_change_the_model(tmp_path, text_file, capsys):
    run(TINY + ["--data", text_file, "--doc-bytes", "1000", "--steps", 2, "--out", tmp_path], capsys)
    with pytest.raises(SystemExit):
        parse_configs(["--resume", str(tmp_path), "--n-embd", "32"])
    assert "cannot change the model" in capsys.readouterr().err
    configs = parse_configs(["--resume", str(tmp_path), "--steps", "9", "--lr", "0.5"])
    assert configs["train"].steps == 9 and configs["optim"].lr == 0.5       # explicit flags win
    assert configs["model"].n_embd == 16 and configs["train"].out == str(tmp_path)
    with pytest.raises(SystemExit):
        parse_configs(["--resume", str(tmp_path / "nothing")])
    assert "is it a ps-train run folder" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path)]) is None            # ps-train exits 0: sys.exit(None)


def test_lr_decay_follows_steps_unless_given():
    assert parse_configs(["--steps", "77"])["optim"].lr_decay_steps == 77
    assert parse_configs(["--steps", "77", "--lr-decay-steps", "0"])["optim"].lr_decay_steps == 0


def test_learns_well_below_unigram_entropy(tmp_path):
    """The acceptance check: 500 steps of a small model on the built-in corpus bring the
    validation loss well below the unigram entropy. A child process with one BLAS thread:
    on tiny matrices a second thread only costs (and the machine is shared)."""
    args = ["--n-layer", 1, "--n-embd", 32, "--n-head", 2, "--block-size", 32, "--batch-size", 16,
            "--steps", 500, "--eval-batches", 4, "--eval-interval", 500, "--log-interval", 100,
            "--no-progress", "--out", tmp_path]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "worker.train", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "final validation loss" in out and "unigram entropy" in out
    metrics = read_metrics(tmp_path / METRICS)
    entropy, val = metrics[0]["unigram_entropy"], metrics[-1]["val_loss"]
    assert metrics[0]["fingerprint"]["source"] == "python-stdlib" and metrics[-1]["step"] == 500
    assert 2.9 < entropy < 3.5                                       # Python source, in nats
    assert val < entropy - 0.5, (val, entropy)


def generate(ckpt, *args):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    script = ROOT / "scripts" / "generate.py"
    out = subprocess.run([sys.executable, str(script), str(ckpt), *map(str, args)],
                         capture_output=True, env=env, check=True)
    return out.stdout


def test_generate_is_deterministic_under_a_seed(tmp_path, text_file, capsys):
    run(TINY + ["--data", text_file, "--doc-bytes", "1000", "--steps", 5, "--out", tmp_path], capsys)
    a = generate(tmp_path, "--prompt", "def ", "--bytes", 40, "--seed", 1, "--top-k", 10)
    b = generate(tmp_path, "--prompt", "def ", "--bytes", 40, "--seed", 1, "--top-k", 10)
    c = generate(tmp_path, "--prompt", "def ", "--bytes", 40, "--seed", 2, "--top-k", 10)
    assert a == b and a != c and a.startswith(b"def ")
    greedy = generate(tmp_path, "--bytes", 20, "--temperature", 0, "--seed", 5)
    assert greedy == generate(tmp_path, "--bytes", 20, "--temperature", 0, "--seed", 6)


def test_threads_give_the_same_training(tmp_path, text_file, capsys):
    """--threads 2 cuts each batch into two slices run in parallel; the loss curve is the
    same up to float32 rounding of the summed gradients."""
    data = ["--data", text_file, "--doc-bytes", "1000", "--steps", 10]
    one = run(TINY + data + ["--out", tmp_path / "one"], capsys)
    two = run(TINY + data + ["--out", tmp_path / "two", "--threads", 2], capsys)
    a, b = read_metrics(tmp_path / "one" / METRICS), read_metrics(tmp_path / "two" / METRICS)
    np.testing.assert_allclose([r["loss"] for r in a[1:]], [r["loss"] for r in b[1:]], rtol=1e-4)
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-3
    assert json.loads((tmp_path / "two" / RUN_CONFIG).read_text())["train"]["threads"] == 2
