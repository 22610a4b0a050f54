"""The NumPy specification of attention that saves ``lse`` instead of ``att``.

``worker/layers.py`` saves the whole softmax ``att`` (B,NH,T,T) for the backward. The
memory-efficient CUDA attention (``attention.cu``, design 2) saves only ``lse``
(B,NH,T), the log-sum-exp of each row of scaled, causally masked scores, from which
``att = exp(scores * scale - lse)`` is recomputed. These two functions state that
contract on top of the reference layers, so the kernels have something to be checked
against and the launchers something to fall back to; they work on NumPy or CuPy.

Not here: anything fast (they build the T x T array they exist to avoid). Phase 2 may
move them into ``worker/layers.py`` beside the functions they wrap.
"""
from __future__ import annotations

import math

from worker import layers


def _scaled_masked_scores(qkv, n_head):
    """(B,NH,T,T) q.k / sqrt(hs), -inf where a query would see the future."""
    xp = layers.array_module(qkv)
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    qkv5 = qkv.reshape(B, T, 3, n_head, hs)
    q = qkv5[:, :, 0].transpose(0, 2, 1, 3)
    k = qkv5[:, :, 1].transpose(0, 2, 1, 3)
    s = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))
    s[..., xp.triu(xp.ones((T, T), dtype=bool), k=1)] = -xp.inf
    return s


def attention_lse_forward(out, lse, qkv, n_head):
    """out (B,T,C) as layers.attention_forward; lse (B,NH,T) = log sum_j exp(s_ij)."""
    xp = layers.array_module(qkv)
    B, T, C3 = qkv.shape
    att = xp.empty((B, n_head, T, T), dtype=qkv.dtype)
    layers.attention_forward(out, att, qkv, n_head)
    s = _scaled_masked_scores(qkv, n_head)
    m = s.max(axis=-1)                                  # finite: key 0 is always seen
    lse[...] = m + xp.log(xp.exp(s - m[..., None]).sum(axis=-1))


def attention_lse_backward(dqkv, dout, qkv, lse, n_head):
    """dqkv (B,T,3C) assigned, as layers.attention_backward with att = exp(s - lse)."""
    xp = layers.array_module(qkv)
    att = xp.exp(_scaled_masked_scores(qkv, n_head) - lse[..., None])   # 0 in the future
    layers.attention_backward(dqkv, dout, qkv, att.astype(qkv.dtype, copy=False), n_head)
