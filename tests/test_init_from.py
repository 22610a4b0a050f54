"""--init-from: a GPT-2 built and saved by Hugging Face transformers (random weights, odd
shapes, no download) read into our flat buffer gives HF's logits; a mismatched
checkpoint is refused naming the tensor; fine-tuning through ps-local starts from those
weights (worker 0's INIT seeds the servers) and the export loads back in HF with the
logits ours computes. Skips unless ``transformers`` and ``torch`` are installed."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.cluster import ENV
from worker import model_checkpoint as checkpoint, pretrained
from worker.model_checkpoint import CheckpointError
from worker.model import GPT, GPTConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5          # float32 both sides, the same sums in different orders (tests/test_hf_export.py)


def hf_gpt2(folder, vocab_size, n_positions, n_embd, n_layer, n_head, seed=0):
    """A randomly initialised GPT2LMHeadModel, every parameter moved off its initial value
    (so a tensor read into the wrong place or transposed shows), saved by save_pretrained."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                  n_head=n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, tie_word_embeddings=True)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(folder)
    return hf


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(torch.from_numpy(idx)).logits.numpy()


@pytest.mark.parametrize("shape", [dict(vocab_size=77, n_positions=24, n_embd=36, n_layer=2, n_head=3),
                                   dict(vocab_size=259, n_positions=10, n_embd=20, n_layer=3, n_head=5)])
def test_a_hf_gpt2_reads_into_ours_with_the_same_logits(shape, tmp_path):
    hf = hf_gpt2(tmp_path, **shape)
    got = pretrained.checkpoint_shape(tmp_path)
    assert got == dict(vocab_size=shape["vocab_size"], block_size=shape["n_positions"], n_layer=shape["n_layer"],
                       n_head=shape["n_head"], n_embd=shape["n_embd"])
    ours = GPT(GPTConfig(**got), seed=123)
    pretrained.load_init(ours, tmp_path)
    idx = np.random.default_rng(1).integers(0, shape["vocab_size"], size=(2, shape["n_positions"]))
    err = np.abs(ours.forward(idx) - hf_logits(hf, idx)).max()
    assert err < ATOL, f"max |logit difference| {err:.2e}"


def test_a_shorter_context_cuts_the_position_table(tmp_path):
    """--block-size below the folder's n_positions: the first T positions of HF's logits."""
    hf = hf_gpt2(tmp_path, vocab_size=256, n_positions=32, n_embd=24, n_layer=2, n_head=2)
    from worker import train
    mc = train.parse_configs(["--init-from", str(tmp_path), "--block-size", "12"])["model"]
    assert mc.block_size == 12 and mc.n_embd == 24
    ours = GPT(mc)
    pretrained.load_init(ours, tmp_path)
    idx = np.random.default_rng(2).integers(0, 256, size=(2, 12))
    assert np.abs(ours.forward(idx) - hf_logits(hf, idx)).max() < ATOL
    with pytest.raises(SystemExit):                       # longer than the checkpoint's: refused
        train.parse_configs(["--init-from", str(tmp_path), "--block-size", "33"])


def test_a_mismatched_checkpoint_is_refused_naming_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file
    hf_gpt2(tmp_path / "hf", vocab_size=256, n_positions=8, n_embd=16, n_layer=2, n_head=2)
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    prefix = "transformer." if "transformer.wte.weight" in tensors else ""
    name = prefix + "h.1.mlp.c_fc.weight"
    for what, change, message in [
            ("transposed", lambda t: t.update({name: np.ascontiguousarray(t[name].T)}),
             r"h\.1\.mlp\.c_fc\.weight has shape \(64, 16\), expected \(16, 64\)"),
            ("missing", lambda t: t.pop(prefix + "h.0.ln_2.bias"), r"missing \['h\.0\.ln_2\.bias'\]")]:
        bad = tmp_path / what
        bad.mkdir()
        (bad / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
        t = dict(tensors)
        change(t)
        save_file(t, bad / "model.safetensors")
        model = GPT(GPTConfig(**pretrained.checkpoint_shape(bad)))
        before = model.params.copy()
        with pytest.raises(CheckpointError, match=message):
            pretrained.load_init(model, bad)
        assert np.array_equal(model.params, before)                   # nothing loaded half-way
    # a shape flag that disagrees with the folder's config.json
    from worker import train
    with pytest.raises(SystemExit):
        train.parse_configs(["--init-from", str(tmp_path / "hf"), "--n-layer", "3"])
    assert train.parse_configs(["--init-from", str(tmp_path / "hf"), "--n-layer", "2"])["model"].n_layer == 2
    with pytest.raises(CheckpointError, match="no config.json"):
        pretrained.checkpoint_shape(tmp_path)


def test_ps_train_starts_from_the_weights(tmp_path, capsys):
    """Step 0's validation loss is the loaded model's, not a fresh draw's."""
    from worker import train
    from worker.data import DataConfig, load_data, validation_batches
    hf_gpt2(tmp_path / "hf", vocab_size=256, n_positions=16, n_embd=24, n_layer=1, n_head=2)
    flags = ["--init-from", str(tmp_path / "hf"), "--steps", "2", "--batch-size", "4", "--eval-batches", "2",
             "--no-progress", "--out", str(tmp_path / "run")]
    train.train(train.parse_configs(flags))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    loaded = checkpoint.load_model(tmp_path / "hf")
    val = validation_batches(load_data(DataConfig()).val, 4, 16, 2)
    assert first["val_loss"] == pytest.approx(train.evaluate(loaded, val), abs=1e-6)


def test_fine_tune_through_ps_local_and_load_back_in_hf(tmp_path):
    """worker 0 reads the weights and INITs the servers; the job trains them; the run folder
    is a GPT-2 checkpoint HF loads, giving the logits ours computes."""
    from worker import train
    from worker.data import DataConfig, load_data, validation_batches
    hf_gpt2(tmp_path / "hf", vocab_size=259, n_positions=16, n_embd=24, n_layer=2, n_head=3)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "common.launch.local", "--servers", "2", "--workers", "2",
                           "--steps", "4", "--out", str(out), "--no-progress", "--init-from", str(tmp_path / "hf"),
                           "--batch-size", "4", "--eval-batches", "2", "--eval-interval", "4",
                           "--sample-bytes", "8", "--timeout", "60"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    initial = checkpoint.load_model(tmp_path / "hf")
    val = validation_batches(load_data(DataConfig()).val, 4, 16, 2)
    assert records[0]["val_loss"] == pytest.approx(train.evaluate(initial, val), abs=1e-6)
    assert records[-1]["step"] == 4 and records[-1]["val_loss"] < records[0]["val_loss"]
    tuned = checkpoint.load_model(out)
    assert tuned.config == initial.config and not np.array_equal(tuned.params, initial.params)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = np.random.default_rng(3).integers(0, 259, size=(2, 16))
    err = np.abs(tuned.forward(idx) - hf_logits(hf, idx)).max()
    assert err < ATOL, f"max |logit difference| {err:.2e}"
    assert transformers.AutoTokenizer.from_pretrained(out)("def")["input_ids"] == list(b"def")
