"""Fast CPU variants of the layers of ``worker/layers.py``: same mathematics, fewer passes.

``worker/layers.py`` stays the readable specification; every function here computes the
same quantity up to float rounding, and ``tests/test_fastlayers.py`` checks each against
its reference (forward and backward) and each backward against float64 finite
differences. What makes them faster on a CPU, all measured with
``scripts/profile_worker.py``:

- no temporaries in hot code: every intermediate goes into a scratch buffer the caller
  owns (``Scratch``), so a step allocates nothing and takes no page faults;
- elementwise work in row chunks of ~128K elements (512 KiB in float32), so the dozen
  passes of GELU or LayerNorm reuse what the previous pass left in cache; bigger chunks
  than L2 would favour, because with two threads every NumPy call is also a GIL
  hand-over, and fewer calls scale better;
- LayerNorm keeps ``xhat`` from its forward (one more (B,T,C) buffer) instead of
  re-deriving it, and GELU keeps ``tanh(u)``;
- causal attention in query blocks of ``ATT_BLOCK`` rows: block ``[r0, r1)`` only
  computes keys ``[0, r1)``, so most of the work above the diagonal is never done (7/16
  of the T x T products at T=256), and the masked entries of ``att`` are never written (they stay the 0
  the buffer was allocated with); the 1/sqrt(hs) scale goes on q in the forward and on
  dq, dk in the backward, the smaller arrays;
- sums along an axis as BLAS matrix-vector products with a vector of ones (about 3x
  faster than ``np.sum`` on these shapes);
- the embedding's scatter-add sums sorted rows with ``np.add.reduceat``, not ``np.add.at``.

Same conventions as ``worker/layers.py``: outputs first, then inputs, then weights, then
scratch; parameter gradients accumulate, activation gradients assign except where the
input is the residual stream. ``layernorm_backward`` overwrites its ``dout`` (a scratch
gradient in the model); the references never do. NumPy only: a CuPy backend has its own
kernels (``worker/kernels/``).
"""
from __future__ import annotations

import math

import numpy as np

from worker.layers import GELU_SCALE, LN_EPS

CHUNK_ELEMS = 1 << 17        # elements per chunk of elementwise work (512 KiB of float32)
ATT_BLOCK = 32               # query rows per causal attention block (a little faster than 64)


class Scratch:
    """Named work buffers, allocated on first use and reused for the same name and shape."""

    def __init__(self):
        self._bufs = {}
        self._consts = {}

    def constant(self, name, build):
        """A buffer computed once by ``build()`` and kept under ``name``."""
        if name not in self._consts:
            self._consts[name] = build()
        return self._consts[name]

    def get(self, name, shape, dtype, zeros=False):
        """The buffer ``name`` of this shape and dtype, allocated (zeroed if ``zeros``) the
        first time it is asked for; one buffer per (name, shape, dtype), so layers of
        different widths that share a name each keep their own."""
        key = (name, tuple(shape), np.dtype(dtype).char)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = (np.zeros if zeros else np.empty)(key[1], dtype=dtype)
        return buf


def _ones(scratch, n, dtype):
    """A vector of n ones: sums along an axis as a matrix-vector product, which BLAS does
    about 3x faster than np.sum on these shapes."""
    return scratch.constant(f"ones{n}{np.dtype(dtype).char}", lambda: np.ones(n, dtype=dtype))


def _row_chunks(n_rows, row_elems):
    """[lo, hi) row ranges of about CHUNK_ELEMS elements each."""
    step = max(1, CHUNK_ELEMS // max(row_elems, 1))
    for lo in range(0, n_rows, step):
        yield lo, min(n_rows, lo + step)


# --------------------------------------------------------------------------------------
# LayerNorm that keeps xhat


def layernorm_forward(out, xhat, mean, rstd, x, w, b, scratch):
    """As layers.layernorm_forward, and also xhat (B,T,C) = (x - mean) * rstd, kept for
    the backward."""
    C = x.shape[-1]
    x2, xh2, o2 = x.reshape(-1, C), xhat.reshape(-1, C), out.reshape(-1, C)
    m1, r1 = mean.reshape(-1), rstd.reshape(-1)
    np.matmul(x2, _ones(scratch, C, x.dtype), out=m1)
    m1 *= 1.0 / C
    np.subtract(x2, m1[:, None], out=xh2)                      # xc
    # row-wise sum of squares without a temporary: a batched (1,C) @ (C,1) dot
    var = scratch.get("ln_var", (x2.shape[0], 1, 1), x.dtype)
    np.matmul(xh2[:, None, :], xh2[:, :, None], out=var)
    np.multiply(var.reshape(-1), 1.0 / C, out=r1)
    r1 += LN_EPS
    np.sqrt(r1, out=r1)
    np.divide(1.0, r1, out=r1)
    xh2 *= r1[:, None]
    np.multiply(xh2, w, out=o2)
    o2 += b


def layernorm_backward(dx, dw, db, dout, xhat, rstd, w, scratch):
    """dx += , dw += , db += ; dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with
    g = dout * w. Overwrites ``dout`` (it becomes g)."""
    C = dout.shape[-1]
    d2, xh2, dx2 = dout.reshape(-1, C), xhat.reshape(-1, C), dx.reshape(-1, C)
    n = d2.shape[0]
    ones_n = _ones(scratch, n, dout.dtype)
    db += ones_n @ d2                                          # column sums
    tmp = scratch.get("ln_tmp", d2.shape, dout.dtype)
    np.multiply(d2, xh2, out=tmp)
    dw += ones_n @ tmp
    d2 *= w                                                    # g
    gm = scratch.get("ln_gm", (n, 1), dout.dtype)
    gxm = scratch.get("ln_gxm", (n, 1, 1), dout.dtype)
    np.matmul(d2, _ones(scratch, C, dout.dtype), out=gm[:, 0])
    gm *= 1.0 / C                                              # mean(g) per row
    np.matmul(d2[:, None, :], xh2[:, :, None], out=gxm)        # sum(g * xhat) per row
    gxm *= 1.0 / C
    r = rstd.reshape(-1, 1)
    # dx += rstd * g - rstd * mean(g) - xhat * (rstd * mean(g xhat))
    gm *= r
    gxm2 = gxm.reshape(n, 1)
    gxm2 *= r
    for lo, hi in _row_chunks(n, C):
        g, t = d2[lo:hi], tmp[lo:hi]
        g *= r[lo:hi]
        g -= gm[lo:hi]
        np.multiply(xh2[lo:hi], gxm2[lo:hi], out=t)
        g -= t
        dx2[lo:hi] += g


# --------------------------------------------------------------------------------------
# GELU that keeps tanh(u)


def gelu_forward(out, tanh_u, x):
    """As layers.gelu_forward (the same operations in the same order, so the result is
    bit-identical), and also tanh_u = tanh(sqrt(2/pi) (x + 0.044715 x^3)) kept for the
    backward. ``tanh_u`` has x's shape."""
    F = x.shape[-1]
    x2, o2, t2 = x.reshape(-1, F), out.reshape(-1, F), tanh_u.reshape(-1, F)
    for lo, hi in _row_chunks(x2.shape[0], F):
        xs, u, t = x2[lo:hi], o2[lo:hi], t2[lo:hi]
        np.multiply(xs, xs, out=u)
        u *= 0.044715
        u += 1.0
        u *= xs
        u *= GELU_SCALE
        np.tanh(u, out=t)
        np.add(t, 1.0, out=u)
        u *= xs
        u *= 0.5


def gelu_backward(dx, dout, x, tanh_u, scratch):
    """dx = dout * gelu'(x) (assigned), from the forward's tanh_u:
    gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 * 0.044715 x^2). dx may be dout."""
    F = x.shape[-1]
    x2, d2, dx2, t2 = x.reshape(-1, F), dout.reshape(-1, F), dx.reshape(-1, F), tanh_u.reshape(-1, F)
    rows = max(1, CHUNK_ELEMS // F)
    a = scratch.get("gelu_a", (rows, F), x.dtype)
    b = scratch.get("gelu_b", (rows, F), x.dtype)
    for lo, hi in _row_chunks(x2.shape[0], F):
        xs, t = x2[lo:hi], t2[lo:hi]
        k = hi - lo
        u, g = a[:k], b[:k]
        np.multiply(xs, xs, out=u)
        u *= 1.5 * 0.044715 * GELU_SCALE
        u += 0.5 * GELU_SCALE                                  # u = 0.5 s (1 + 3c x^2)
        np.multiply(t, t, out=g)
        np.subtract(1.0, g, out=g)                             # 1 - t^2
        g *= xs
        g *= u                                                 # 0.5 x (1 - t^2) s (1 + 3c x^2)
        np.multiply(t, 0.5, out=u)
        g += u
        g += 0.5                                               # + 0.5 (1 + t)
        np.multiply(d2[lo:hi], g, out=dx2[lo:hi])


# --------------------------------------------------------------------------------------
# linear layer backward without a temporary for dw


def matmul_backward(dx, dw, db, dout, x, w, scratch):
    """As layers.matmul_backward: dx assigned (may be None), dw += , db += (may be None)."""
    C, OC = w.shape
    dout2, x2 = dout.reshape(-1, OC), x.reshape(-1, C)
    if dx is not None:
        np.matmul(dout2, w.T, out=dx.reshape(-1, C))
    tmp = scratch.get("mm_dw", (C, OC), dw.dtype)
    np.matmul(x2.T, dout2, out=tmp)
    dw += tmp
    if db is not None:
        db += _ones(scratch, dout2.shape[0], dout.dtype) @ dout2      # column sums


# --------------------------------------------------------------------------------------
# causal self-attention in query blocks


def _heads(qkv, n_head):
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q5 = qkv.reshape(B, T, 3, n_head, hs)
    return [q5[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]      # (B,NH,T,hs) views


def _blocks(T):
    return [(r0, min(T, r0 + ATT_BLOCK)) for r0 in range(0, T, ATT_BLOCK)]


def attention_forward(out, att, qkv, n_head, scratch):
    """As layers.attention_forward. Entries of ``att`` above the diagonal are not written:
    they must be 0, as in a freshly zeroed buffer that only this function writes."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = _heads(qkv, n_head)
    qs = scratch.get("att_qs", q.shape, q.dtype)                       # q / sqrt(hs)
    np.multiply(q, 1.0 / math.sqrt(hs), out=qs)
    y = out.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)            # (B,NH,T,hs) view
    for r0, r1 in _blocks(T):
        s = att[:, :, r0:r1, :r1]                                      # (B,NH,rq,r1) view
        np.matmul(qs[:, :, r0:r1], k[:, :, :r1].transpose(0, 1, 3, 2), out=s)
        diag = s[..., r0:r1]                                           # (B,NH,rq,rq)
        np.copyto(diag, -np.inf, where=_future(scratch, r1 - r0))      # t sees only 0..t
        m = scratch.get(f"att_m{r1 - r0}", (B, n_head, r1 - r0), s.dtype)
        np.max(s, axis=-1, out=m)
        s -= m[..., None]
        np.exp(s, out=s)
        np.matmul(s, _ones(scratch, r1, s.dtype), out=m)              # row sums
        np.divide(1.0, m, out=m)
        s *= m[..., None]
        np.matmul(s, v[:, :, :r1], out=y[:, :, r0:r1])


def _future(scratch, n):
    """(n, n) booleans: True above the diagonal (the future of each row's position)."""
    return scratch.constant(f"att_future{n}", lambda: np.triu(np.ones((n, n), dtype=bool), k=1))


def attention_backward(dqkv, dout, qkv, att, n_head, scratch):
    """As layers.attention_backward: dqkv (B,T,3C) assigned, from dout (B,T,C) and the
    forward's att (B,NH,T,T), whose entries above the diagonal are 0."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    q, k, v = _heads(qkv, n_head)
    dq, dk, dv = _heads(dqkv, n_head)
    dy = dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)          # (B,NH,T,hs)
    blocks = _blocks(T)
    # dv[keys c0:c1] = sum over queries r of att[r, c] dy[r]; queries before c0 have
    # att = 0 there, so one product per key block over queries c0.., assigned
    for c0, c1 in blocks:
        np.matmul(att[:, :, c0:, c0:c1].transpose(0, 1, 3, 2), dy[:, :, c0:], out=dv[:, :, c0:c1])
    # softmax backward per query block: dpre = att * (datt - sum_j datt_j att_j) * scale,
    # kept here without the scale, which is applied to dq and dk at the end (smaller).
    # dpre's entries above the diagonal stay 0: never written outside the blocks, and
    # multiplied by att = 0 inside the diagonal blocks.
    dpre = scratch.get("att_dpre", att.shape, att.dtype, zeros=True)
    for r0, r1 in blocks:
        p, d = att[:, :, r0:r1, :r1], dpre[:, :, r0:r1, :r1]
        np.matmul(dy[:, :, r0:r1], v[:, :, :r1].transpose(0, 1, 3, 2), out=d)   # datt
        rs = scratch.get(f"att_rs{r1 - r0}", (B, n_head, r1 - r0, 1, 1), att.dtype)
        np.matmul(d[..., None, :], p[..., :, None], out=rs)           # sum_j datt_j att_j
        d -= rs[..., 0]
        d *= p                                      # dpre / scale: the scale goes on dq, dk
        np.matmul(d, k[:, :, :r1], out=dq[:, :, r0:r1])
    for c0, c1 in blocks:
        np.matmul(dpre[:, :, c0:, c0:c1].transpose(0, 1, 3, 2), q[:, :, c0:], out=dk[:, :, c0:c1])
    dqkv[..., :2 * C] *= scale                 # dq and dk, in one pass over (B,T,2C)


# --------------------------------------------------------------------------------------
# embedding backward by sorted segment sums


def embedding_backward(dwte, dwpe, dout, idx):
    """As layers.embedding_backward: dwte[v] += rows of dout where idx == v; dwpe[:T] += ."""
    B, T, C = dout.shape
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    tokens = flat[order]
    starts = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]])
    sums = np.add.reduceat(dout.reshape(B * T, C)[order], starts, axis=0)
    dwte[tokens[starts]] += sums
    dwpe[:T] += dout.sum(axis=0)
