"""Gradient compression on the push, with error feedback kept on the worker.

Each chunk of a pushed gradient travels as one or more arrays ("parts"), each tagged
on the wire with its part name (the array descriptor's ``enc``, ``common/wire/protocol.py``)
and carrying the chunk's range:

| scheme | parts of a chunk of n elements                     | bytes      | error of one element              |
|--------|----------------------------------------------------|------------|-----------------------------------|
| none   | the float32 values                                 | 4n         | 0                                 |
| fp16   | ``f16``: float16 (n,) (clipped to +-65504)          | 2n         | <= 2^-11 |x| (normal range)       |
| bf16   | ``bf16``: bfloat16 (n,), round to nearest even      | 2n         | <= 2^-8 |x|                       |
| int8   | ``q``: int8 (n,), ``scale``: float32 per 512-bucket | n + n/128  | < scale = max|bucket| / 127, unbiased (stochastic rounding) |
| topk   | ``idx``: uint32 (k,), ``val``: bfloat16 (k,)        | 6k         | kept: <= 2^-8 |x|; dropped: |x| <= min kept |x| |
| randk  | same, k indices drawn uniformly                      | 6k         | kept: <= 2^-8 |x| (x n/k without error feedback: unbiased) |

with k = ceil(ratio * n). int8 is QSGD's stochastic quantizer (Alistarh et al., "QSGD",
NeurIPS 2017) with s = 127 levels and a max-norm scale per bucket of 512; top-k is the
sparsification of Deep Gradient Compression (Lin et al., ICLR 2018) and of Stich et
al., "Sparsified SGD with Memory" (NeurIPS 2018); random-k is the latter's baseline.
Top-k and random-k values travel as bfloat16: 6 bytes per kept entry instead of 8, and
with error feedback the rounding is carried like everything else not sent.

Error feedback (Seide et al. 2014, "1-Bit SGD"; Karimireddy et al. 2019, "Error
Feedback Fixes SignSGD"): the worker keeps a residual e (same size as the gradient),
sends C(e + g) and keeps e <- (e + g) - D(C(e + g)), where D is exactly the decoding the
server does (``decode`` below, shared by both sides). So, step after step,

    sum of what the servers received + e = sum of the gradients

up to the rounding of the one addition e + g (tests/test_compress.py checks it exactly
on values where that addition is exact, and in float64). The subtraction is exact: a
kept value is its own rounding, within a factor 2 of the original (Sterbenz).

Not here: which chunks go where (``common/placement.py``), bytes on the wire
(``common/wire/codec.py``).
"""
from __future__ import annotations

import math

import numpy

from common.wire.protocol import ProtocolError

SCHEMES = ("none", "fp16", "bf16", "int8", "topk", "randk")
BUCKET = 512                      # int8: elements sharing one scale
FP16_MAX = 65504.0


def all_finite(x) -> bool:
    """No NaN or Inf in ``x`` (float): one BLAS pass, no temporary (x . x is finite unless
    some element is NaN, Inf, or beyond 1e19 in float32, which no gradient is)."""
    return bool(numpy.isfinite(numpy.dot(x, x))) if x.ndim == 1 else bool(numpy.isfinite(x).all())


# --- bfloat16 as uint16 words (numpy has no bfloat16) -----------------------------------------

def to_bf16(x, out=None):
    """float32 (or float64, rounded to float32 first) -> bfloat16 words (uint16),
    round to nearest, ties to even."""
    x32 = numpy.ascontiguousarray(x, dtype=numpy.float32)
    u = x32.view(numpy.uint32)
    r = (u >> 16) & 1
    r += 0x7FFF
    r += u                                   # may wrap only for NaN payloads, which never travel
    r >>= 16
    if out is None:
        out = numpy.empty(x32.shape, dtype=numpy.uint16)
    numpy.copyto(out, r, casting="unsafe")
    return out


def from_bf16(w, out=None, dtype=numpy.float32):
    """bfloat16 words -> float values (exact)."""
    f = (w.astype(numpy.uint32) << 16).view(numpy.float32)
    if out is None:
        return f.astype(dtype, copy=False)
    numpy.copyto(out, f, casting="same_kind")
    return out


# --- the schemes: encode one chunk, decode one chunk ------------------------------------------

class Scheme:
    """One compression scheme: ``encode`` a chunk into parts, ``decode`` parts into a chunk."""
    name = "none"
    parts: tuple = ()             # (part name, wire dtype name) in the order they travel

    def __init__(self, ratio: float = 1.0, unbiased: bool = False):
        self.ratio = ratio
        self.unbiased = unbiased  # randk without error feedback scales by n / k

    def k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.ratio * n))) if n else 0

    def buffers(self, n: int) -> dict:
        """Reusable output arrays for a chunk of n elements (a worker keeps one set per chunk)."""
        raise NotImplementedError

    def encode(self, x, bufs: dict, rng) -> list:
        """[(part name, array)] for the chunk ``x`` (1-D float), written into ``bufs``."""
        raise NotImplementedError

    def decode(self, parts: dict, out):
        """out[:] = the chunk the parts stand for. ``parts``: part name -> array; raises
        ProtocolError on parts that do not fit ``out``."""
        raise NotImplementedError

    def nbytes(self, n: int) -> int:
        """Payload bytes of a chunk of n elements."""
        raise NotImplementedError

    def subtract_sent(self, p, parts: dict, scratch):
        """p -= decode(parts), exactly as ``decode`` would produce it (error feedback)."""
        self.decode(parts, scratch)
        p -= scratch


def _need(parts: dict, name: str, dtype, size=None):
    a = parts.get(name)
    if a is None:
        raise ProtocolError(f"compressed chunk lacks its '{name}' part (got {sorted(parts)})")
    if a.dtype != numpy.dtype(dtype) or a.ndim != 1 or (size is not None and a.size != size):
        want = f"{numpy.dtype(dtype).name} ({size},)" if size is not None else numpy.dtype(dtype).name
        raise ProtocolError(f"part '{name}': expected {want}, got {a.dtype.name} {a.shape}")
    return a


class FP16(Scheme):
    name, parts = "fp16", (("f16", "float16"),)

    def buffers(self, n):
        return {"f16": numpy.empty(n, numpy.float16), "tmp": numpy.empty(n, numpy.float32)}

    def encode(self, x, bufs, rng):
        tmp = bufs["tmp"]
        numpy.clip(x, -FP16_MAX, FP16_MAX, out=tmp, casting="same_kind")   # no inf on the wire
        numpy.copyto(bufs["f16"], tmp, casting="same_kind")
        return [("f16", bufs["f16"])]

    def decode(self, parts, out):
        numpy.copyto(out, _need(parts, "f16", numpy.float16, out.size), casting="same_kind")

    def nbytes(self, n):
        return 2 * n


class BF16(Scheme):
    name, parts = "bf16", (("bf16", "bfloat16"),)

    def buffers(self, n):
        return {"bf16": numpy.empty(n, numpy.uint16)}

    def encode(self, x, bufs, rng):
        return [("bf16", to_bf16(x, bufs["bf16"]))]

    def decode(self, parts, out):
        from_bf16(_need(parts, "bf16", numpy.uint16, out.size), out)

    def nbytes(self, n):
        return 2 * n


class Int8(Scheme):
    """QSGD with 127 levels per sign: q = floor(x / s + u), u ~ U[0, 1), s = max|x| / 127
    over a bucket of ``BUCKET`` elements; x_hat = q s is unbiased and |x_hat - x| < s."""
    name, parts = "int8", (("q", "int8"), ("scale", "float32"))

    def buffers(self, n):
        nb = -(-n // BUCKET)
        return {"q": numpy.empty(n, numpy.int8), "scale": numpy.empty(nb, numpy.float32),
                "tmp": numpy.empty(nb * BUCKET, numpy.float32), "u": numpy.empty(nb * BUCKET, numpy.float32)}

    def encode(self, x, bufs, rng):
        n = x.size
        q, scale, tmp, u = bufs["q"], bufs["scale"], bufs["tmp"], bufs["u"]
        t = tmp.reshape(-1, BUCKET)
        tmp[n:] = 0
        numpy.abs(x, out=tmp[:n], casting="same_kind")
        numpy.max(t, axis=1, out=scale)
        scale *= numpy.float32(1 / 127)
        inv = numpy.divide(1.0, scale, out=numpy.zeros_like(scale), where=scale > 0)
        numpy.copyto(tmp[:n], x, casting="same_kind")
        t *= inv[:, None]                                  # x / s in [-127, 127]
        rng.random(out=u, dtype=numpy.float32)
        tmp += u
        numpy.floor(tmp, out=tmp)
        numpy.clip(tmp, -127, 127, out=tmp)                # rounding of x / s can touch 127 + u
        numpy.copyto(q, tmp[:n], casting="unsafe")
        return [("q", q), ("scale", scale)]

    def decode(self, parts, out):
        n = out.size
        q = _need(parts, "q", numpy.int8, n)
        scale = _need(parts, "scale", numpy.float32, -(-n // BUCKET))
        full = n - n % BUCKET
        numpy.multiply(q[:full].reshape(-1, BUCKET), scale[:full // BUCKET, None],
                       out=out[:full].reshape(-1, BUCKET), casting="same_kind")
        if full < n:
            numpy.multiply(q[full:], scale[-1], out=out[full:], casting="same_kind")

    def nbytes(self, n):
        return n + 4 * -(-n // BUCKET)


class TopK(Scheme):
    """The k = ceil(ratio n) entries of largest magnitude: (index, bfloat16 value) pairs."""
    name, parts = "topk", (("idx", "uint32"), ("val", "bfloat16"))

    def buffers(self, n):
        k = self.k(n)
        return {"idx": numpy.empty(k, numpy.uint32), "val": numpy.empty(k, numpy.uint16),
                "abs": numpy.empty(n, numpy.float32)}

    def select(self, x, bufs, rng):
        n, k = x.size, self.k(x.size)
        a = bufs["abs"]
        numpy.abs(x, out=a, casting="same_kind")
        sel = numpy.argpartition(a, n - k)[n - k:] if k < n else numpy.arange(n)
        sel.sort()                                       # sorted indices: a cache-friendly scatter
        return sel

    def encode(self, x, bufs, rng):
        sel = self.select(x, bufs, rng)
        idx, val = bufs["idx"], bufs["val"]
        numpy.copyto(idx, sel, casting="unsafe")
        v = x[sel]
        if self.unbiased:
            v = v * (x.size / sel.size)
        to_bf16(v, val)
        return [("idx", idx), ("val", val)]

    def decode(self, parts, out):
        n, k = out.size, self.k(out.size)
        idx = _need(parts, "idx", numpy.uint32, k)
        val = _need(parts, "val", numpy.uint16, k)
        if k and int(idx.max()) >= n:
            raise ProtocolError(f"index {int(idx.max())} out of a chunk of {n} elements")
        out[...] = 0
        out[idx] = from_bf16(val, dtype=out.dtype)

    def nbytes(self, n):
        return 6 * self.k(n)

    def subtract_sent(self, p, parts, scratch):
        p[parts["idx"]] -= from_bf16(parts["val"], dtype=p.dtype)      # sparse: only the sent entries


class RandK(TopK):
    """k entries drawn uniformly without replacement (fresh every push)."""
    name = "randk"

    def buffers(self, n):
        bufs = super().buffers(n)
        del bufs["abs"]
        return bufs

    def select(self, x, bufs, rng):
        sel = rng.choice(x.size, self.k(x.size), replace=False)
        sel.sort()
        return sel


SCHEME_CLASSES = {"fp16": FP16, "bf16": BF16, "int8": Int8, "topk": TopK, "randk": RandK}


def make_scheme(name: str, ratio: float = 0.01, error_feedback: bool = True) -> Scheme | None:
    """The scheme ``name`` (None for "none"). Random-k without error feedback is scaled
    by n / k so that its expectation is the gradient."""
    if name == "none":
        return None
    if name not in SCHEME_CLASSES:
        raise ValueError(f"compression must be one of {', '.join(SCHEMES)}, got {name!r}")
    return SCHEME_CLASSES[name](ratio, unbiased=(name == "randk" and not error_feedback))


def decode_chunk(scheme: Scheme, arrays, encs, out):
    """out[:] = the chunk that ``arrays`` (tagged ``encs``) encode under ``scheme``:
    the server's side, and the worker's own view of what it sent."""
    parts = {}
    for a, enc in zip(arrays, encs):
        if enc in parts:
            raise ProtocolError(f"part '{enc}' appears twice in one chunk")
        parts[enc] = a.reshape(-1)
    names = {p for p, _ in scheme.parts}
    if set(parts) != names:
        raise ProtocolError(f"{scheme.name} chunk needs parts {sorted(names)}, got {sorted(parts)}")
    scheme.decode(parts, out)


class PushEncoder:
    """A worker's compression state: the scheme, the error-feedback residual over the
    whole flat vector, reusable output arrays per chunk and a random generator.

    ``encode(b, e, grads)`` -> [(part name, array)] for the chunk ``[b, e)`` of the
    gradient; the arrays stay valid (and must not be reused) until the push is answered,
    which is before the next encode of the same chunk.

    ``momentum`` > 0 is Deep Gradient Compression's momentum correction (Lin et al. 2018,
    section 3.2): the worker keeps the velocity u <- momentum u + g and compresses u (with
    error feedback) instead of g, and the servers run plain SGD; for a sparse scheme the
    velocity of the entries just sent is zeroed ("momentum factor masking"), so a
    coordinate's momentum does not push it again after its accumulated value has left.
    Without compression this is exactly momentum SGD on the servers (the mean of the
    workers' velocities is the velocity of the mean); with top-k it is what makes 1% of
    the entries learn as fast as all of them (docs/wire.md)."""

    def __init__(self, scheme: Scheme, size: int, dtype, error_feedback: bool = True, seed: int = 0,
                 momentum: float = 0.0):
        self.scheme = scheme
        self.error_feedback = error_feedback
        self.momentum = momentum
        self.velocity = numpy.zeros(size, dtype=dtype) if momentum else None
        self.residual = numpy.zeros(size, dtype=dtype) if error_feedback else None
        self.rng = numpy.random.default_rng(seed)
        self._bufs: dict = {}
        self._scratch: dict = {}

    def encode(self, b: int, e: int, grads) -> list:
        key = (b, e)
        bufs = self._bufs.get(key)
        if bufs is None:
            bufs = self._bufs[key] = self.scheme.buffers(e - b)
        g = grads[b:e]
        if self.momentum:                                # u = m u + g: the velocity is what travels
            u = self.velocity[b:e]
            u *= self.momentum
            u += g
            g = u
        if not self.error_feedback:
            parts = self.scheme.encode(g, bufs, self.rng)
            self._mask(g, parts)
            return parts
        p = self.residual[b:e]
        p += g                                           # p = e + g
        parts = self.scheme.encode(p, bufs, self.rng)
        scratch = self._scratch.get(key)
        if scratch is None and not isinstance(self.scheme, TopK):
            scratch = self._scratch[key] = numpy.empty(e - b, dtype=self.residual.dtype)
        self.scheme.subtract_sent(p, dict(parts), scratch)   # e = p - D(C(p)): what was not sent
        self._mask(g, parts)
        return parts

    def _mask(self, u, parts):
        """Momentum factor masking: the velocity of the entries a sparse scheme sent is zeroed."""
        if self.momentum and isinstance(self.scheme, TopK):
            u[dict(parts)["idx"]] = 0
