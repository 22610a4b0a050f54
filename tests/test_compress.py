"""Compression: each scheme's error bound, the wire format, and error feedback's invariant
(the sum of what was sent plus the residual is the sum of the gradients)."""
import math

import numpy as np
import pytest

from common.wire import codec
from common.wire.compress import (BUCKET, FP16_MAX, PushEncoder, decode_chunk, from_bf16, make_scheme, to_bf16)
from common.wire.protocol import ProtocolError

SIZES = [1, 7, 511, 512, 513, 4099]


def grad(n, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    # gradients of very different scales side by side, as in a network's layers
    return (rng.standard_normal(n) * np.exp(rng.uniform(-8, 2, n))).astype(dtype)


def roundtrip(scheme, x, rng=None):
    parts = scheme.encode(x, scheme.buffers(x.size), rng or np.random.default_rng(1))
    out = np.empty(x.size, x.dtype)
    decode_chunk(scheme, [a for _, a in parts], [n for n, _ in parts], out)
    return parts, out


def bf16_reference(x32):
    """Round to nearest, ties to even, by comparing the two neighbouring bfloat16 values."""
    out = []
    for v in x32.astype(np.float32):
        u = int(np.array(v).view(np.uint32))
        lo, hi = u & 0xFFFF0000, (u & 0xFFFF0000) + 0x10000
        dlo = abs(float(v) - float(np.array(lo, np.uint32).view(np.float32)))
        dhi = abs(float(np.array(hi, np.uint32).view(np.float32)) - float(v))
        pick = lo if dlo < dhi else hi if dhi < dlo else (lo if not (lo >> 16) & 1 else hi)
        out.append(pick >> 16)
    return np.array(out, np.uint16)


def test_bf16_rounds_to_nearest_even():
    x = np.concatenate([grad(2000), np.array([1.0, -2.5, 3.0039062, 1.00390625, 1.01171875, 0.0, -0.0])]).astype(np.float32)
    assert (to_bf16(x) == bf16_reference(x)).all()
    assert (from_bf16(to_bf16(x)) == from_bf16(bf16_reference(x))).all()


@pytest.mark.parametrize("n", SIZES)
def test_fp16_error_bound(n):
    x = grad(n)
    x[0] = 1e6                                         # beyond float16: clipped, never inf
    parts, out = roundtrip(make_scheme("fp16"), x)
    assert [p for p, _ in parts] == ["f16"] and parts[0][1].dtype == np.float16
    assert out[0] == FP16_MAX and np.isfinite(out).all()
    normal = np.abs(x[1:]) >= 2.0 ** -14
    err = np.abs(out[1:] - x[1:])
    assert (err[normal] <= 2.0 ** -11 * np.abs(x[1:][normal])).all()
    assert (err[~normal] <= 2.0 ** -25).all()          # subnormal float16: half its spacing


@pytest.mark.parametrize("n", SIZES)
def test_bf16_error_bound(n):
    x = grad(n)
    parts, out = roundtrip(make_scheme("bf16"), x)
    assert parts[0][1].dtype == np.uint16 and parts[0][1].size == n
    assert (np.abs(out - x) <= 2.0 ** -8 * np.abs(x)).all()


@pytest.mark.parametrize("n", SIZES)
def test_int8_error_bound_and_unbiased(n):
    scheme = make_scheme("int8")
    x = grad(n)
    x[: min(n, BUCKET)][::3] = 0                      # zeros stay zeros
    parts, out = roundtrip(scheme, x)
    q, scale = dict(parts)["q"], dict(parts)["scale"]
    assert q.dtype == np.int8 and q.size == n and scale.size == math.ceil(n / BUCKET)
    assert np.abs(q.astype(int)).max() <= 127
    s = np.repeat(scale, BUCKET)[:n]
    assert (np.abs(out - x) <= s * (1 + 1e-6)).all()  # less than one level of its bucket
    assert (out[x == 0] == 0).all()
    # stochastic rounding is unbiased: the mean of many encodings tends to x
    rng = np.random.default_rng(5)
    draws = np.mean([roundtrip(scheme, x, rng)[1] for _ in range(400)], axis=0)
    assert (np.abs(draws - x) <= 4 * s / math.sqrt(400) + 1e-12).all()
    assert scheme.nbytes(n) == q.nbytes + scale.nbytes


def test_int8_of_an_all_zero_chunk_is_zero():
    _, out = roundtrip(make_scheme("int8"), np.zeros(1000, np.float32))
    assert (out == 0).all()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ratio", [0.01, 0.1, 1.0])
def test_topk_keeps_the_largest(n, ratio):
    scheme = make_scheme("topk", ratio)
    x = grad(n, seed=n)
    parts, out = roundtrip(scheme, x)
    idx, val = dict(parts)["idx"], dict(parts)["val"]
    k = max(1, math.ceil(ratio * n))
    assert idx.size == val.size == k and idx.dtype == np.uint32 and (np.diff(idx.astype(np.int64)) > 0).all()
    kept = np.zeros(n, bool)
    kept[idx] = True
    assert (np.abs(out[kept] - x[kept]) <= 2.0 ** -8 * np.abs(x[kept])).all()
    assert (out[~kept] == 0).all()
    if k < n:
        assert np.abs(x[~kept]).max() <= np.abs(x[kept]).min()
    assert scheme.nbytes(n) == idx.nbytes + val.nbytes == 6 * k


def test_randk_without_error_feedback_is_unbiased():
    n = 200
    scheme = make_scheme("randk", 0.1, error_feedback=False)
    x = grad(n, dtype=np.float64)
    rng = np.random.default_rng(3)
    outs = [roundtrip(scheme, x, rng)[1] for _ in range(3000)]
    assert all(np.count_nonzero(o) <= 20 for o in outs[:20])
    mean = np.mean(outs, axis=0)
    spread = np.abs(x) * math.sqrt(n / 20) / math.sqrt(3000)
    assert (np.abs(mean - x) <= 5 * spread + 2.0 ** -8 * np.abs(x) * 10).all()


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "topk", "randk"])
def test_error_feedback_carries_what_was_not_sent(name):
    """sent_1 + ... + sent_T + e_T = g_1 + ... + g_T, exactly, where every e + g is exact
    (gradients on a grid of 2^-12 in float64); per step, sent_t + e_{t+1} = e_t + g_t bit for bit."""
    n, T = 1500, 30
    enc = PushEncoder(make_scheme(name, 0.05), n, np.float64, error_feedback=True, seed=4)
    rng = np.random.default_rng(7)
    total_g, total_sent = np.zeros(n), np.zeros(n)
    for t in range(T):
        g = rng.integers(-4096, 4096, n) * 2.0 ** -12 * (1 + (np.arange(n) % 50 == 0) * 30)
        before = enc.residual.copy()
        parts = enc.encode(0, n, g)
        sent = np.empty(n)
        decode_chunk(enc.scheme, [a for _, a in parts], [p for p, _ in parts], sent)
        assert ((sent + enc.residual) == (before + g)).all(), "the residual is exactly what was not sent"
        total_g += g
        total_sent += sent
    assert ((total_sent + enc.residual) == total_g).all()
    if name == "topk":          # and top-k with feedback sends every coordinate eventually
        assert np.abs(enc.residual).max() < np.abs(total_g).max()


def test_error_feedback_in_float32_stays_close():
    n, T = 4096, 50
    enc = PushEncoder(make_scheme("topk", 0.01), n, np.float32, seed=0)
    total_g, total_sent = np.zeros(n), np.zeros(n)
    for t in range(T):
        g = grad(n, seed=t)
        parts = enc.encode(0, n, g)
        sent = np.empty(n, np.float32)
        decode_chunk(enc.scheme, [a for _, a in parts], [p for p, _ in parts], sent)
        total_g += g
        total_sent += sent
    err = np.abs(total_sent + enc.residual - total_g).max()
    assert err <= 1e-6 * np.abs(total_g).max() * T


def test_compressed_chunks_travel_and_decode():
    """A push of two compressed chunks through the codec: parts tagged, ranges shared."""
    scheme = make_scheme("topk", 0.1)
    enc = PushEncoder(scheme, 300, np.float32, seed=0)
    g = grad(300)
    arrays, ranges, encs = [], [], []
    for b, e in [(0, 100), (100, 300)]:
        for part, a in enc.encode(b, e, g):
            arrays.append(a)
            ranges.append((b, e))
            encs.append(part)
    wire = dict(scheme.parts)
    frames = codec.encode("push", "worker:0", arrays=arrays, ranges=ranges, encs=encs,
                          dtypes=[wire[p] for p in encs])
    msg = codec.decode([bytes(f) for f in frames])
    assert msg.encs == ["idx", "val", "idx", "val"] and msg.dtypes[1] == "bfloat16"
    assert msg.ranges == [(0, 100), (0, 100), (100, 300), (100, 300)]
    out = np.empty(200, np.float32)
    decode_chunk(scheme, msg.arrays[2:], msg.encs[2:], out)
    assert np.count_nonzero(out) == 20
    with pytest.raises(ProtocolError, match="parts"):
        decode_chunk(scheme, msg.arrays[2:3], msg.encs[2:3], out)
    bad = msg.arrays[2].copy()
    bad[0] = 500
    with pytest.raises(ProtocolError, match="out of a chunk"):
        decode_chunk(scheme, [bad, msg.arrays[3]], msg.encs[2:], out)
    with pytest.raises(ProtocolError, match="expected uint32"):
        decode_chunk(scheme, [msg.arrays[2].astype(np.int64), msg.arrays[3]], msg.encs[2:], out)


def test_momentum_correction_sends_the_velocity():
    """DGC's momentum correction: the worker's velocity u = m u + g is what error feedback
    carries. Dense (fp16): sum of sent + residual = sum of the velocities of momentum SGD,
    so server SGD on what was sent is momentum SGD on the gradients, up to the residual.
    Sparse (top-k): the velocity of the entries sent is zeroed, the others' go on."""
    n, T, m = 800, 25, 0.5
    rng = np.random.default_rng(2)
    grads = [rng.integers(-512, 512, n) * 2.0 ** -10 for _ in range(T)]

    dense = PushEncoder(make_scheme("fp16"), n, np.float64, seed=1, momentum=m)
    u, total_u, total_sent = np.zeros(n), np.zeros(n), np.zeros(n)
    for g in grads:
        u = m * u + g
        total_u += u
        parts = dense.encode(0, n, g)
        sent = np.empty(n)
        decode_chunk(dense.scheme, [a for _, a in parts], [p for p, _ in parts], sent)
        total_sent += sent
    np.testing.assert_allclose(total_sent + dense.residual, total_u, rtol=0, atol=1e-12)

    sparse = PushEncoder(make_scheme("topk", 0.05), n, np.float64, seed=1, momentum=m)
    for g in grads:
        before = sparse.velocity.copy()
        idx = dict(sparse.encode(0, n, g))["idx"]
        assert (sparse.velocity[idx] == 0).all()
        rest = np.setdiff1d(np.arange(n), idx)
        np.testing.assert_array_equal(sparse.velocity[rest], (m * before + g)[rest])
