"""A BERT-style encoder over one flat buffer: GPT-2's blocks without the causal mask,
trained to fill in masked bytes.

The second transformer of the seed material (Devlin et al. 2019, "BERT: Pre-training
of Deep Bidirectional Transformers for Language Understanding"), built from the same
layers as the GPT (``worker/layers.py``) so that the same servers train it:

- the same blocks as ``worker/model.py`` (pre-LayerNorm attention and GELU MLP, GPT-2
  initialisation), except that attention is BIDIRECTIONAL: every position sees every
  other, before and after it;
- the vocabulary is the ``vocab_size`` byte values plus one [MASK] token, id
  ``vocab_size`` (256 for bytes); ``wte`` has ``vocab_size + 1`` rows;
- the masked-language-model head is the final LayerNorm, the tied ``wte`` and an
  output bias ``mlm.bias`` (BERT's decoder bias; BERT's extra dense+LayerNorm transform
  is left out: the blocks are the same as the GPT's);
- the objective (``mask_tokens``): in every sequence, 15% of the positions are chosen;
  of those, 80% become [MASK], 10% a random byte, 10% stay as they are (BERT's rule);
  the loss is the cross-entropy of the original byte at the chosen positions only
  (targets elsewhere are -1, which ``layers.softmax_crossentropy_*`` ignore).

Exactly ``round(0.15 T)`` positions are chosen in every sequence (BERT draws 15% of the
tokens of each sequence), so every batch of the same shape has the same number of
loss terms: the mean loss of W workers' batches then averages like one big batch's,
the property the BSP lessons rest on.

What it deliberately does not do: BERT's post-LayerNorm blocks, segment embeddings,
next-sentence prediction, HF ``BertForMaskedLM`` export (the blocks differ from it;
``save_bert`` writes our own config). The non-causal attention forward lives here
until ``layers.attention_forward`` takes a ``causal=`` flag; its backward is the
layers' own (the backward reads the saved attention matrix only, so it does not
depend on the mask).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy
from safetensors.numpy import load_file, save as st_save

from common.files import atomic_write
from common.layout import Layout, gpt_layout
from worker.layers import (
    _split_heads, array_module, attention_backward, embedding_backward, embedding_forward,
    gelu_backward, gelu_forward, layernorm_backward, layernorm_forward, matmul_backward,
    matmul_forward, residual_forward, softmax_crossentropy_backward,
    softmax_crossentropy_forward,
)
from worker.model import GPTConfig, init_gpt2_weights

MASK_RATE = 0.15                    # share of each sequence's positions the loss is taken on
MASK_SPLIT = (0.8, 0.1, 0.1)        # of those: [MASK], a random byte, unchanged
MODEL_TYPE = "paramserver-bert"


# --- the one layer that differs -------------------------------------------------------

def bidirectional_attention_forward(out, att, qkv, n_head):
    """Self-attention where every position attends to every position (no causal mask).
    out (B,T,C); att (B,NH,T,T) saved for ``layers.attention_backward``; qkv (B,T,3C)."""
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q, k, v = _split_heads(qkv, n_head)             # (B,NH,T,hs) each
    xp.matmul(q, k.transpose(0, 1, 3, 2), out=att)  # (B,NH,T,T)
    att *= 1.0 / math.sqrt(hs)
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = att @ v                                     # (B,NH,T,hs)
    out.reshape(B, T, n_head, hs)[...] = y.transpose(0, 2, 1, 3)


# --- the parameter table --------------------------------------------------------------

def bert_layout(config: GPTConfig) -> Layout:
    """GPT-2's table for ``vocab_size + 1`` tokens (the [MASK] row), plus ``mlm.bias``.
    Its hash differs from every GPT's, so the coordinator never mixes the two models."""
    V = config.vocab_size + 1
    gpt = gpt_layout(V, config.block_size, config.n_layer, config.n_embd)
    return Layout([(e.name, e.shape) for e in gpt] + [("mlm.bias", (V,))])


class BERT:
    """A BERT-style encoder whose parameters live in the flat vector ``params``
    (gradients in ``grads``), with the same public methods as ``worker.model.GPT``."""

    def __init__(self, config: GPTConfig, dtype=numpy.float32, seed: int = 0):
        self.config = config
        self.mask_id = config.vocab_size              # the [MASK] token
        self.vocab = config.vocab_size + 1            # rows of wte
        self.dtype = numpy.dtype(dtype)
        if self.dtype not in (numpy.float32, numpy.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.xp = numpy
        self.layout = bert_layout(config)
        self.params = numpy.zeros(self.layout.size, dtype=self.dtype)
        self.grads = numpy.zeros(self.layout.size, dtype=self.dtype)
        self.param_views, self.grad_views = self.layout.views(self.params), self.layout.views(self.grads)
        self._acts = None
        self._batch = None
        self.init_weights(seed)

    def init_weights(self, seed: int = 0):
        """The GPT's initialisation (``init_gpt2_weights``)."""
        init_gpt2_weights(self.layout, self.param_views, self.config.n_layer, seed)

    def named_tensors(self) -> dict:
        return dict(self.param_views)

    def named_grads(self) -> dict:
        return dict(self.grad_views)

    def num_params(self) -> int:
        return self.layout.size

    def zero_grad(self):
        self.grads[...] = 0

    def _activations(self, B, T):
        if self._acts is None or self._acts["shape"] != (B, T):
            C, NH = self.config.n_embd, self.config.n_head
            z = lambda *s: numpy.zeros(s, dtype=self.dtype)  # noqa: E731
            self._acts = {"shape": (B, T), "encoded": z(B, T, C), "blocks": [dict(
                ln1=z(B, T, C), ln1_mean=z(B, T), ln1_rstd=z(B, T), qkv=z(B, T, 3 * C), att=z(B, NH, T, T),
                atty=z(B, T, C), attproj=z(B, T, C), res2=z(B, T, C), ln2=z(B, T, C), ln2_mean=z(B, T),
                ln2_rstd=z(B, T), fch=z(B, T, 4 * C), fch_gelu=z(B, T, 4 * C), fcproj=z(B, T, C),
                res3=z(B, T, C)) for _ in range(self.config.n_layer)],
                "lnf": z(B, T, C), "lnf_mean": z(B, T), "lnf_rstd": z(B, T), "logits": z(B, T, self.vocab),
                "probs": z(B, T, self.vocab), "losses": z(B, T), "dres": z(B, T, C), "dC": z(B, T, C),
                "dqkv": z(B, T, 3 * C), "d4C_a": z(B, T, 4 * C), "d4C_b": z(B, T, 4 * C), "dlosses": z(B, T)}
        return self._acts

    def forward(self, idx, targets=None):
        """``idx`` (B, T) tokens in [0, vocab_size] (vocab_size = [MASK]). With ``targets``
        (B, T; -1 where no loss is taken): the mean cross-entropy over the positions
        with a target. Without: the logits (B, T, vocab_size + 1), a fresh array."""
        cfg = self.config
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise ValueError(f"idx must be integers of shape (B, T), got {idx.dtype} {idx.shape}")
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) > self.mask_id):
            raise ValueError(f"token ids must lie in [0, {self.mask_id}] ({self.mask_id} = [MASK])")
        if targets is not None and (targets.shape != idx.shape
                                    or (targets.size and int(targets.max()) >= self.mask_id)):
            raise ValueError(f"targets must have idx's shape {idx.shape} and be < {self.mask_id} (-1 = no loss)")
        p, a = self.param_views, self._activations(B, T)
        embedding_forward(a["encoded"], idx, p["wte.weight"], p["wpe.weight"])        # (B,T,C)
        x = a["encoded"]
        for i, blk in enumerate(a["blocks"]):
            h = f"h.{i}."
            layernorm_forward(blk["ln1"], blk["ln1_mean"], blk["ln1_rstd"], x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
            matmul_forward(blk["qkv"], blk["ln1"], p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
            bidirectional_attention_forward(blk["atty"], blk["att"], blk["qkv"], cfg.n_head)
            matmul_forward(blk["attproj"], blk["atty"], p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
            residual_forward(blk["res2"], x, blk["attproj"])
            layernorm_forward(blk["ln2"], blk["ln2_mean"], blk["ln2_rstd"], blk["res2"], p[h + "ln_2.weight"],
                              p[h + "ln_2.bias"])
            matmul_forward(blk["fch"], blk["ln2"], p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])   # (B,T,4C)
            gelu_forward(blk["fch_gelu"], blk["fch"])
            matmul_forward(blk["fcproj"], blk["fch_gelu"], p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
            residual_forward(blk["res3"], blk["res2"], blk["fcproj"])
            x = blk["res3"]
        layernorm_forward(a["lnf"], a["lnf_mean"], a["lnf_rstd"], x, p["ln_f.weight"], p["ln_f.bias"])
        matmul_forward(a["logits"], a["lnf"], p["wte.weight"].T, p["mlm.bias"])        # (B,T,V+1), tied
        if targets is None:
            self._batch = None
            return a["logits"].copy()
        softmax_crossentropy_forward(a["losses"], a["probs"], a["logits"], targets)
        n_valid = int((targets >= 0).sum())
        self._batch = (idx, targets, n_valid)
        return float(a["losses"].sum()) / max(n_valid, 1)

    def backward(self, dloss: float = 1.0):
        """Accumulate into ``grads`` the gradient of ``dloss`` times the last forward's loss:
        the GPT's backward, layer by layer in reverse, with the MLM bias at the top."""
        if self._batch is None:
            raise RuntimeError("backward() needs a forward(idx, targets) first")
        idx, targets, n_valid = self._batch
        p, g, a = self.param_views, self.grad_views, self._acts
        a["dlosses"][...] = dloss / max(n_valid, 1)
        dlogits = a["logits"]
        softmax_crossentropy_backward(dlogits, a["dlosses"], a["probs"], targets)
        matmul_backward(a["dC"], g["wte.weight"].T, g["mlm.bias"], dlogits, a["lnf"], p["wte.weight"].T)
        dres = a["dres"]
        dres[...] = 0
        x_last = a["blocks"][-1]["res3"] if a["blocks"] else a["encoded"]
        layernorm_backward(dres, g["ln_f.weight"], g["ln_f.bias"], a["dC"], x_last, a["lnf_mean"],
                           a["lnf_rstd"], p["ln_f.weight"])
        for i in reversed(range(self.config.n_layer)):     # dres flows down both residual branches
            h, blk = f"h.{i}.", a["blocks"][i]
            x_in = a["blocks"][i - 1]["res3"] if i > 0 else a["encoded"]
            matmul_backward(a["d4C_a"], g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"], dres, blk["fch_gelu"],
                            p[h + "mlp.c_proj.weight"])
            gelu_backward(a["d4C_b"], a["d4C_a"], blk["fch"])
            matmul_backward(a["dC"], g[h + "mlp.c_fc.weight"], g[h + "mlp.c_fc.bias"], a["d4C_b"], blk["ln2"],
                            p[h + "mlp.c_fc.weight"])
            layernorm_backward(dres, g[h + "ln_2.weight"], g[h + "ln_2.bias"], a["dC"], blk["res2"],
                               blk["ln2_mean"], blk["ln2_rstd"], p[h + "ln_2.weight"])
            matmul_backward(a["dC"], g[h + "attn.c_proj.weight"], g[h + "attn.c_proj.bias"], dres, blk["atty"],
                            p[h + "attn.c_proj.weight"])
            attention_backward(a["dqkv"], a["dC"], blk["qkv"], blk["att"], self.config.n_head)
            matmul_backward(a["dC"], g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"], a["dqkv"], blk["ln1"],
                            p[h + "attn.c_attn.weight"])
            layernorm_backward(dres, g[h + "ln_1.weight"], g[h + "ln_1.bias"], a["dC"], x_in, blk["ln1_mean"],
                               blk["ln1_rstd"], p[h + "ln_1.weight"])
        embedding_backward(g["wte.weight"], g["wpe.weight"], dres, idx)


# --- the objective ----------------------------------------------------------------------

def mask_tokens(idx, rng, mask_id: int, rate: float = MASK_RATE, split=MASK_SPLIT):
    """(inputs, targets) for the masked-LM loss from clean tokens ``idx`` (B, T).
    In each row, ``max(1, round(rate * T))`` positions are chosen uniformly; a chosen
    position's target is its byte, and its input becomes [MASK] (probability split[0]),
    a uniformly random byte in [0, mask_id) (split[1]) or stays (split[2]). Every other
    target is -1 (no loss)."""
    B, T = idx.shape
    k = max(1, round(rate * T))
    chosen_cols = numpy.argsort(rng.random((B, T)), axis=1)[:, :k]          # (B, k) distinct per row
    chosen = numpy.zeros((B, T), dtype=bool)
    numpy.put_along_axis(chosen, chosen_cols, True, axis=1)
    targets = numpy.where(chosen, idx, -1).astype(numpy.int64)
    inputs = numpy.array(idx, dtype=numpy.int64)
    u = rng.random((B, T))
    to_mask = chosen & (u < split[0])
    to_random = chosen & (u >= split[0]) & (u < split[0] + split[1])
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.integers(0, mask_id, size=int(to_random.sum()))
    return inputs, targets


class MaskedBatches:
    """Wraps a ``BatchSampler``: the same windows, masked by ``mask_tokens`` with a generator
    seeded by ``seed`` (its state follows the sampler's epoch and position)."""

    def __init__(self, sampler, mask_id: int, seed: int = 0):
        self.sampler, self.mask_id, self.seed = sampler, mask_id, int(seed)
        self.count = 0

    def next_batch(self):
        idx, _ = self.sampler.next_batch()
        rng = numpy.random.default_rng([self.seed, 0x3A5C, self.count])
        self.count += 1
        return mask_tokens(idx, rng, self.mask_id)


def masked_validation(batches, mask_id: int, seed: int = 1234) -> list:
    """A fixed masking of fixed validation windows: every evaluation scores the same blanks."""
    return [mask_tokens(idx, numpy.random.default_rng([seed, i]), mask_id) for i, (idx, _) in enumerate(batches)]


def fill_in(model: BERT, tokens, seed: int = 0) -> str:
    """A readable demonstration: one window of ``tokens`` with 15% of its bytes masked,
    and the model's guess at every blank (shown as text, '_' for a blank)."""
    T = min(model.config.block_size, len(tokens))
    idx = numpy.asarray(tokens[:T], dtype=numpy.int64)[None, :]
    inputs, targets = mask_tokens(idx, numpy.random.default_rng(seed), model.mask_id, split=(1.0, 0.0, 0.0))
    guess = model.forward(inputs)[0, :, :model.mask_id].argmax(axis=-1)
    blanks = targets[0] >= 0
    filled = numpy.where(blanks, guess, idx[0])
    show = lambda arr: bytes(int(b) for b in arr).decode("utf-8", errors="replace")  # noqa: E731
    masked = show(numpy.where(blanks, ord("_"), idx[0]))
    right = int((guess[blanks] == idx[0][blanks]).sum())
    return (f"original:\n{show(idx[0])}\n\nmasked ({int(blanks.sum())} blanks as _):\n{masked}\n\n"
            f"filled in by the model ({right} of {int(blanks.sum())} right):\n{show(filled)}\n")


# --- checkpoints ------------------------------------------------------------------------

def bert_config(cfg: GPTConfig) -> dict:
    """Our own ``config.json`` (not HF's BERT: the blocks are GPT-2's pre-LayerNorm ones)."""
    return {"model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size + 1, "mask_token_id": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "blocks": "GPT-2 pre-LayerNorm blocks, bidirectional attention, gelu_new, layer_norm_epsilon 1e-5",
            "head": "ln_f, then logits = x @ wte.T + mlm.bias (tied)", "mask_rate": MASK_RATE,
            "mask_split": list(MASK_SPLIT)}


def save_bert(directory, model: BERT, step: int | None = None):
    """``model.safetensors`` (our names, float32) and ``config.json`` into ``directory``, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: numpy.ascontiguousarray(v, dtype=numpy.float32) for n, v in model.named_tensors().items()}
    meta = {"format": "np", "model_type": MODEL_TYPE, "layout_hash": model.layout.hash()}
    if step is not None:
        meta["step"] = str(int(step))
    atomic_write(directory / "model.safetensors", st_save(tensors, metadata=meta))
    atomic_write(directory / "config.json", (json.dumps(bert_config(model.config), indent=2) + "\n").encode())


def load_bert(directory, dtype=numpy.float32) -> BERT:
    """The ``BERT`` that ``save_bert`` wrote into ``directory``."""
    directory = Path(directory)
    d = json.loads((directory / "config.json").read_text())
    if d.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{directory}/config.json: model_type {d.get('model_type')!r}, expected {MODEL_TYPE!r}")
    cfg = GPTConfig(vocab_size=d["vocab_size"] - 1, block_size=d["n_positions"], n_layer=d["n_layer"],
                    n_head=d["n_head"], n_embd=d["n_embd"])
    model = BERT(cfg, dtype=dtype)
    tensors = load_file(str(directory / "model.safetensors"))
    differ = sorted(set(tensors) ^ set(model.layout.names()))
    if differ:
        raise ValueError(f"{directory}/model.safetensors: tensors {differ[:6]} differ from the BERT layout "
                         "of its config.json")
    for name, view in model.named_tensors().items():
        if tuple(tensors[name].shape) != view.shape:
            raise ValueError(f"{directory}/model.safetensors: {name} has shape {tensors[name].shape}, "
                             f"expected {view.shape}")
        view[...] = tensors[name]
    return model
