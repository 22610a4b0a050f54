"""The transformer's layers, each a ``*_forward`` / ``*_backward`` pair, side by side.

This file is the specification of the worker's computation: the CuPy kernels of
``worker/kernels/`` are checked against it, and every backward here is checked against
central finite differences in float64 (``tests/test_layers.py``). It follows llm.c's
``train_gpt2.c``: outputs first, then inputs, then weights; gradients named ``d...``;
the derivative sits right under the function it differentiates.

Conventions (STYLE.md, habit 1):
- every function writes into arrays it is given (no hidden allocation of outputs), so
  the model allocates its activations once per (B, T) and reuses them;
- parameter gradients ACCUMULATE (``+=``), so micro-batches accumulate for free;
- activation gradients ASSIGN, except where the input is the residual stream
  (``layernorm_backward``'s ``dx``, ``residual_backward``), where they ADD;
- shapes use B (batch), T (time), C (channels), NH (heads), hs (head size), V (vocab).

Each function works on NumPy or CuPy arrays alike: the array module ``xp`` is taken
from the arguments (thinc's habit), never imported as a global choice.
"""
from __future__ import annotations

import math

import numpy

GELU_SCALE = math.sqrt(2.0 / math.pi)   # GPT-2's tanh approximation of GELU
LN_EPS = 1e-5                           # GPT-2's LayerNorm epsilon


def array_module(x):
    """``numpy`` or ``cupy``: whichever library ``x`` belongs to."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return numpy


# --------------------------------------------------------------------------------------
# token + position embedding


def embedding_forward(out, idx, wte, wpe):
    """out (B,T,C) = wte[idx] + wpe[:T];  idx (B,T) integer token ids."""
    xp = array_module(out)
    T = idx.shape[1]
    xp.take(wte, idx, axis=0, out=out)   # (B,T,C)
    out += wpe[:T]


def embedding_backward(dwte, dwpe, dout, idx):
    """dwte[v] += sum of dout where idx == v;  dwpe[t] += sum over the batch of dout[:, t]."""
    xp = array_module(dout)
    B, T, C = dout.shape
    xp.add.at(dwte, idx.reshape(-1), dout.reshape(B * T, C))
    dwpe[:T] += dout.sum(axis=0)


# --------------------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(out, mean, rstd, x, w, b):
    """out = (x - mean) * rstd * w + b over the last axis.
    out, x (B,T,C); mean, rstd (B,T) are saved for the backward; w, b (C,)."""
    xp = array_module(x)
    mean[...] = x.mean(axis=-1)
    xc = x - mean[..., None]                       # (B,T,C)
    var = (xc * xc).mean(axis=-1)                  # (B,T), biased as in GPT-2
    rstd[...] = 1.0 / xp.sqrt(var + LN_EPS)
    xc *= rstd[..., None]                          # xc is now xhat
    xp.multiply(xc, w, out=out)
    out += b


def layernorm_backward(dx, dw, db, dout, x, mean, rstd, w):
    """dx += (residual stream), dw += , db += .
    With xhat = (x - mean) * rstd and g = dout * w:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))."""
    xhat = (x - mean[..., None]) * rstd[..., None]  # (B,T,C)
    db += dout.sum(axis=(0, 1))
    dw += (dout * xhat).sum(axis=(0, 1))
    g = dout * w                                   # (B,T,C)
    g_mean = g.mean(axis=-1, keepdims=True)
    gx_mean = (g * xhat).mean(axis=-1, keepdims=True)
    g -= g_mean
    xhat *= gx_mean
    g -= xhat
    g *= rstd[..., None]
    dx += g


# --------------------------------------------------------------------------------------
# linear layer (matmul + bias); weights (in, out) as GPT-2's Conv1D


def matmul_forward(out, x, w, b=None):
    """out (..., OC) = x (..., C) @ w (C, OC) + b (OC,)."""
    xp = array_module(x)
    C, OC = w.shape
    xp.matmul(x.reshape(-1, C), w, out=out.reshape(-1, OC))
    if b is not None:
        out += b


def matmul_backward(dx, dw, db, dout, x, w):
    """dx = dout @ w.T (assigned);  dw += x.T @ dout;  db += sum of dout (db may be None)."""
    xp = array_module(x)
    C, OC = w.shape
    dout2 = dout.reshape(-1, OC)
    x2 = x.reshape(-1, C)
    if dx is not None:
        xp.matmul(dout2, w.T, out=dx.reshape(-1, C))
    dw += x2.T @ dout2
    if db is not None:
        db += dout2.sum(axis=0)


# --------------------------------------------------------------------------------------
# causal multi-head self-attention


def _split_heads(qkv, n_head):
    """Views q, k, v (B,NH,T,hs) of qkv (B,T,3C); no copy."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    qkv5 = qkv.reshape(B, T, 3, n_head, hs)
    return (qkv5[:, :, 0].transpose(0, 2, 1, 3), qkv5[:, :, 1].transpose(0, 2, 1, 3),
            qkv5[:, :, 2].transpose(0, 2, 1, 3))


def attention_forward(out, att, qkv, n_head):
    """Causal self-attention.
    out (B,T,C): the heads' outputs side by side; att (B,NH,T,T): the softmaxed
    attention, saved for the backward; qkv (B,T,3C): queries, keys and values."""
    xp = array_module(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = _split_heads(qkv, n_head)            # (B,NH,T,hs) each
    xp.matmul(q, k.transpose(0, 1, 3, 2), out=att)  # (B,NH,T,T)
    att *= 1.0 / math.sqrt(hs)
    future = xp.triu(xp.ones((T, T), dtype=bool), k=1)
    att[..., future] = -xp.inf                    # position t sees only 0..t
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = att @ v                                    # (B,NH,T,hs)
    out.reshape(B, T, n_head, hs)[...] = y.transpose(0, 2, 1, 3)


def attention_backward(dqkv, dout, qkv, att, n_head):
    """dqkv (B,T,3C) assigned, from dout (B,T,C) and the saved att (B,NH,T,T)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = _split_heads(qkv, n_head)
    dq, dk, dv = _split_heads(dqkv, n_head)
    dy = dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)   # (B,NH,T,hs)
    dv[...] = att.transpose(0, 1, 3, 2) @ dy
    datt = dy @ v.transpose(0, 1, 3, 2)                        # (B,NH,T,T)
    # softmax backward: dpre = att * (datt - sum_j datt_j att_j); masked entries have att = 0
    datt -= (datt * att).sum(axis=-1, keepdims=True)
    datt *= att
    datt *= 1.0 / math.sqrt(hs)
    dq[...] = datt @ k
    dk[...] = datt.transpose(0, 1, 3, 2) @ q


# --------------------------------------------------------------------------------------
# GELU, GPT-2's tanh form


def gelu_forward(out, x):
    """out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    xp = array_module(x)
    u = x * x
    u *= 0.044715
    u += 1.0
    u *= x
    u *= GELU_SCALE
    xp.tanh(u, out=u)
    u += 1.0
    u *= x
    xp.multiply(u, 0.5, out=out)


def gelu_backward(dx, dout, x):
    """dx = dout * gelu'(x) (assigned), with t = tanh(u), u = s (x + 0.044715 x^3):
    gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 * 0.044715 x^2)."""
    xp = array_module(x)
    x2 = x * x
    t = xp.tanh(GELU_SCALE * x * (1.0 + 0.044715 * x2))
    du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * x2)
    grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    xp.multiply(dout, grad, out=dx)


# --------------------------------------------------------------------------------------
# residual connection


def residual_forward(out, a, b):
    """out = a + b."""
    xp = array_module(a)
    xp.add(a, b, out=out)


def residual_backward(da, db, dout):
    """da += dout;  db += dout (both are residual streams)."""
    da += dout
    db += dout


# --------------------------------------------------------------------------------------
# fused softmax + cross-entropy over the vocabulary


def softmax_crossentropy_forward(losses, probs, logits, targets):
    """losses (B,T) = -log softmax(logits)[target]; probs (B,T,V) saved for the backward.
    Positions whose target is negative are ignored: their loss is 0 (the masked-LM
    convention). Computed as logsumexp - logit[target] so it never takes log(0)."""
    xp = array_module(logits)
    m = logits.max(axis=-1, keepdims=True)          # (B,T,1)
    xp.subtract(logits, m, out=probs)
    xp.exp(probs, out=probs)
    s = probs.sum(axis=-1, keepdims=True)           # (B,T,1)
    probs /= s
    valid = targets >= 0
    safe = xp.where(valid, targets, 0)
    picked = xp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]   # (B,T)
    losses[...] = xp.where(valid, xp.log(s[..., 0]) + m[..., 0] - picked, 0.0)


def softmax_crossentropy_backward(dlogits, dlosses, probs, targets):
    """dlogits (B,T,V) = dlosses * (probs - onehot(target)) (assigned); ignored
    positions (target < 0) get a zero gradient."""
    xp = array_module(probs)
    valid = targets >= 0
    dl = xp.where(valid, dlosses, 0.0).astype(probs.dtype)
    xp.multiply(probs, dl[..., None], out=dlogits)
    safe = xp.where(valid, targets, 0)
    B, T = targets.shape
    flat = dlogits.reshape(B * T, -1)
    flat[xp.arange(B * T), safe.reshape(-1)] -= dl.reshape(-1)
