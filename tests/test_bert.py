"""The BERT-style encoder: its gradient against finite differences, bidirectional attention,
BERT's masking rule, checkpoints, and a masked-LM loss that falls through real servers."""
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.cluster import ENV
from tests.gradcheck import assert_close, numerical_grad
from worker.bert import BERT, bert_layout, bidirectional_attention_forward, load_bert, mask_tokens, save_bert
from worker.layers import attention_backward
from worker.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=4)


def masked_batch(B=2, T=5, seed=0, V=7):
    rng = np.random.default_rng(seed)
    return mask_tokens(rng.integers(0, V, size=(B, T)), rng, V, rate=0.4)


def test_whole_model_gradient_float64():
    model = BERT(TINY, dtype=np.float64, seed=3)
    model.params += np.random.default_rng(0).normal(0, 0.3, size=model.params.shape)   # every path non-trivial
    idx, targets = masked_batch()
    assert (idx == TINY.vocab_size).any() and (targets < 0).any() and (targets >= 0).any()
    model.zero_grad()
    model.forward(idx, targets)
    model.backward()
    analytic = model.grads.copy()
    numeric = numerical_grad(lambda: model.forward(idx, targets), model.params)
    for e in model.layout:
        assert_close(analytic[e.offset:e.end], numeric[e.offset:e.end], rtol=1e-6, what=e.name)


def test_bidirectional_attention_backward_is_the_layers_backward():
    """layers.attention_backward reads only the saved attention matrix, so it is also the
    backward of the non-causal forward: checked against finite differences."""
    rng = np.random.default_rng(1)
    B, T, C, NH = 2, 4, 6, 2
    qkv = rng.normal(size=(B, T, 3 * C))
    dout = rng.normal(size=(B, T, C))
    out, att = np.zeros((B, T, C)), np.zeros((B, NH, T, T))

    def f():
        bidirectional_attention_forward(out, att, qkv, NH)
        return float((out * dout).sum())
    f()
    assert (att[:, :, 0, 1:] > 0).all()            # position 0 sees the future
    dqkv = np.zeros_like(qkv)
    attention_backward(dqkv, dout, qkv, att, NH)
    assert_close(dqkv, numerical_grad(f, qkv), rtol=1e-7, what="dqkv")


def test_every_position_sees_both_sides():
    idx = np.random.default_rng(2).integers(0, 7, size=(1, 6))
    later = idx.copy()
    later[0, -1] = (later[0, -1] + 1) % 7                # change the last token only
    bert, gpt = BERT(TINY, seed=0), GPT(TINY, seed=0)
    assert np.abs(bert.forward(idx)[0, 0] - bert.forward(later)[0, 0]).max() > 1e-6
    assert np.abs(gpt.forward(idx)[0, 0] - gpt.forward(later)[0, 0]).max() == 0     # the GPT cannot


def test_mask_tokens_follows_berts_rule():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 256, size=(400, 100))
    inputs, targets = mask_tokens(idx, rng, mask_id=256)
    chosen = targets >= 0
    assert (chosen.sum(axis=1) == 15).all()                          # exactly 15% of every row
    np.testing.assert_array_equal(targets[chosen], idx[chosen])      # the loss asks for the original byte
    np.testing.assert_array_equal(inputs[~chosen], idx[~chosen])     # the rest is untouched
    n = chosen.sum()
    masked = (inputs[chosen] == 256).mean()
    kept = (inputs[chosen] == idx[chosen]).mean()
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1 - 1 / 256 * 0.1) < 0.015 and abs(replaced - 0.1) < 0.015, \
        (n, masked, kept, replaced)
    assert inputs.max() <= 256 and inputs.min() >= 0


def test_layout_differs_from_the_gpts_and_checkpoints_round_trip(tmp_path):
    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=8)
    assert bert_layout(cfg).hash() != cfg.layout().hash()
    assert bert_layout(cfg)["wte.weight"].shape == (257, 8) and bert_layout(cfg)["mlm.bias"].shape == (257,)
    model = BERT(cfg, seed=4)
    model.params += 0.01
    save_bert(tmp_path, model, step=5)
    back = load_bert(tmp_path)
    np.testing.assert_array_equal(back.params, model.params)
    assert json.loads((tmp_path / "config.json").read_text())["mask_token_id"] == 256


def test_ps_local_trains_bert_and_its_masked_lm_loss_falls(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "common.launch.local", "--model", "bert", "--servers", "2", "--workers", "2",
         "--steps", "60", "--out", str(out), "--no-progress", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
         "--block-size", "32", "--batch-size", "8", "--eval-interval", "20", "--eval-batches", "2",
         "--sample-bytes", "32", "--timeout", "30"], env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) >= 3 and vals[-1] < vals[0] - 1.0, vals       # ln 257 = 5.55 -> below 4.5
    assert json.loads((out / "config.json").read_text())["model_type"] == "paramserver-bert"
    assert "filled in by the model" in (out / "sample.txt").read_text()
    assert load_bert(out).num_params() == bert_layout(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)).size


def test_unknown_model_is_refused():
    from worker.distributed import WorkerConfig
    with pytest.raises(ValueError, match="gpt, bert"):
        WorkerConfig(model="t5")
