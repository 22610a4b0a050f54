"""Checkpoints: GPT-2 names and shapes, exact round trips, loud refusals, atomic writes."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from common.optim import OptimConfig, make_optimizer
from worker import model_checkpoint as ck
from worker.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=256, block_size=8, n_layer=2, n_head=2, n_embd=8)


def saved(tmp_path, seed=1, step=None):
    model = GPT(CFG, seed=seed)
    model.params += np.random.default_rng(seed).normal(0, 0.1, model.params.shape).astype(np.float32)
    ck.save_model(tmp_path, model, step)
    return model


def test_round_trip_identical(tmp_path):
    model = saved(tmp_path)
    back = ck.load_model(tmp_path)
    assert back.config == CFG
    assert np.array_equal(back.params, model.params)
    idx = np.arange(16).reshape(2, 8)
    assert np.array_equal(back.forward(idx), model.forward(idx))
    other = GPT(CFG, seed=9)
    ck.load_model_into(other, tmp_path)
    assert np.array_equal(other.params, model.params)


def test_file_holds_gpt2_names_shapes_and_config(tmp_path):
    model = saved(tmp_path, step=7)
    tensors = load_file(str(tmp_path / ck.MODEL_FILE))
    assert sorted(tensors) == sorted(model.layout.names())
    assert tensors["h.0.attn.c_attn.weight"].shape == (8, 24)          # (in, out): Conv1D
    assert tensors["h.1.mlp.c_proj.weight"].shape == (32, 8)
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert "lm_head.weight" not in tensors                              # tied to wte
    cfg = json.loads((tmp_path / ck.CONFIG_FILE).read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"]) == (256, 8, 8, 2, 2)
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["tie_word_embeddings"] is True and cfg["resid_pdrop"] == cfg["attn_pdrop"] == cfg["embd_pdrop"] == 0
    meta = ck._read_metadata(tmp_path / ck.MODEL_FILE)
    assert meta["format"] == "pt" and meta["step"] == "7" and meta["layout_hash"] == model.layout.hash()
    assert oct(os.stat(tmp_path / ck.MODEL_FILE).st_mode & 0o777) == "0o644"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]   # no temporary left behind


def test_hf_style_keys_accepted(tmp_path):
    """A state dict as HF's GPT2LMHeadModel saves it: 'transformer.' prefix, lm_head, mask buffers."""
    model = saved(tmp_path)
    t = {"transformer." + k: v.copy() for k, v in model.named_tensors().items()}
    t["lm_head.weight"] = t["transformer.wte.weight"].copy()
    t["transformer.h.0.attn.bias"] = np.ones((1, 1, 8, 8), np.float32)
    save_file(t, str(tmp_path / ck.MODEL_FILE), metadata={"format": "pt"})
    assert np.array_equal(ck.load_model(tmp_path).params, model.params)
    t["lm_head.weight"] = t["lm_head.weight"] + 1
    save_file(t, str(tmp_path / ck.MODEL_FILE), metadata={"format": "pt"})
    with pytest.raises(ck.CheckpointError, match="lm_head.weight differs"):
        ck.load_model(tmp_path)


def rewrite(tmp_path, edit):
    t = load_file(str(tmp_path / ck.MODEL_FILE))
    edit(t)
    save_file(t, str(tmp_path / ck.MODEL_FILE), metadata={"format": "pt"})


def test_refuses_malformed_checkpoints(tmp_path):
    saved(tmp_path)
    rewrite(tmp_path, lambda t: t.pop("h.1.ln_2.bias"))
    with pytest.raises(ck.CheckpointError, match=r"missing \['h.1.ln_2.bias'\]"):
        ck.load_model(tmp_path)
    saved(tmp_path)
    rewrite(tmp_path, lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(ck.CheckpointError, match=r"unexpected \['extra'\]"):
        ck.load_model(tmp_path)
    saved(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"h.0.attn.c_attn.weight": np.zeros((24, 8), np.float32)}))
    with pytest.raises(ck.CheckpointError, match=r"shape \(24, 8\), expected \(8, 24\)"):
        ck.load_model(tmp_path)
    saved(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"ln_f.bias": np.zeros(8, np.int32)}))
    with pytest.raises(ck.CheckpointError, match="dtype int32"):
        ck.load_model(tmp_path)
    saved(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"ln_f.bias": np.full(8, np.nan, np.float32)}))
    with pytest.raises(ck.CheckpointError, match="NaN"):
        ck.load_model(tmp_path)
    (tmp_path / ck.MODEL_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ck.CheckpointError, match="not a valid safetensors"):
        ck.load_model(tmp_path)
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load_model(tmp_path / "nowhere")


def test_refuses_mismatched_config(tmp_path):
    saved(tmp_path)
    cfg = json.loads((tmp_path / ck.CONFIG_FILE).read_text())
    (tmp_path / ck.CONFIG_FILE).write_text(json.dumps(dict(cfg, n_layer=3)))
    with pytest.raises(ck.CheckpointError, match=r"missing \['h.2"):
        ck.load_model(tmp_path)
    (tmp_path / ck.CONFIG_FILE).write_text(json.dumps(dict(cfg, activation_function="relu")))
    with pytest.raises(ck.CheckpointError, match="activation_function"):
        ck.load_model(tmp_path)
    (tmp_path / ck.CONFIG_FILE).write_text(json.dumps(dict(cfg, model_type="bert")))
    with pytest.raises(ck.CheckpointError, match="model_type"):
        ck.load_model(tmp_path)
    (tmp_path / ck.CONFIG_FILE).write_text("{broken")
    with pytest.raises(ck.CheckpointError, match="not valid JSON"):
        ck.load_model(tmp_path)
    (tmp_path / ck.CONFIG_FILE).write_text(json.dumps(cfg))
    bigger = GPT(GPTConfig(vocab_size=256, block_size=8, n_layer=2, n_head=2, n_embd=16))
    with pytest.raises(ck.CheckpointError, match="differs from the model"):
        ck.load_model_into(bigger, tmp_path)


def test_trainer_state_round_trip(tmp_path):
    model = saved(tmp_path, step=3)
    opt = make_optimizer(OptimConfig(), model.num_params())
    for _ in range(3):
        model.grads[...] = np.random.default_rng(0).normal(size=model.grads.shape)
        opt.step(model.params, model.grads, 1e-2)
    ck.save_model(tmp_path, model, 3)
    ck.save_trainer_state(tmp_path, 3, opt.state_dict(), {"sampler": {"epoch": 1, "pos": 5}})
    st = ck.load_trainer_state(tmp_path, expected_size=model.num_params())
    assert st["step"] == 3 and st["state"] == {"sampler": {"epoch": 1, "pos": 5}}
    again = make_optimizer(OptimConfig(), model.num_params())
    again.load_state_dict(st["optimizer"])
    assert again.t == 3 and np.array_equal(again.m, opt.m) and np.array_equal(again.v, opt.v)
    with pytest.raises(ck.CheckpointError, match=r"expected \(5,\)"):
        ck.load_trainer_state(tmp_path, expected_size=5)
    ck.save_model(tmp_path, model, 4)                  # as if a save died between the two files
    with pytest.raises(ck.CheckpointError, match="step 4 but trainer_state.safetensors from step 3"):
        ck.load_trainer_state(tmp_path)


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f.bin"
    ck.atomic_write(path, b"old")
    ck.atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    with pytest.raises(TypeError):
        ck.atomic_write(path, "not bytes")             # the failed write leaves the old file whole
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["f.bin"]
