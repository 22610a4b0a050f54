"""The parameter layout: one table name -> shape -> offset over ONE flat vector.

This is the seam of the whole system. The model keeps every parameter in one
contiguous vector ``params`` (and every gradient in ``grads``, same layout); each
named tensor is a view at a fixed offset. The servers never see names or shapes:
they store, average and update ranges ``[begin, end)`` of that vector. Only this
module knows offsets.

What it holds:
- ``Layout``: the ordered table, its total size, a stable hash that every process
  compares at registration, views into a buffer, and shard ranges for S servers.
- ``gpt_layout``: the GPT-2 table, with the names and shapes of the usual GPT-2
  tooling (HF ``GPT2Model``: ``wte.weight``, ``h.0.attn.c_attn.weight`` ...; linear
  weights stored ``(in, out)`` as GPT-2's Conv1D does), so a checkpoint maps one to
  one onto those tools.

What it does not do: allocate the model's activations, know about optimizers, or
know how ranges travel (see ``common/wire/protocol.py``).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One named tensor of the flat vector: elements ``[offset, offset + size)``."""
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.size


class Layout:
    """An ordered table of named tensors packed back to back in one flat vector."""

    def __init__(self, tensors):
        """``tensors``: an iterable of ``(name, shape)`` in storage order."""
        entries, offset, seen = [], 0, set()
        for name, shape in tensors:
            shape = tuple(int(d) for d in shape)
            if not isinstance(name, str) or not name:
                raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
            if name in seen:
                raise ValueError(f"tensor name {name!r} appears twice in the layout")
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r} has a negative dimension: {shape}")
            seen.add(name)
            entries.append(Entry(name, shape, offset))
            offset += math.prod(shape)
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.size: int = offset
        self._by_name = {e.name: e for e in self.entries}

    # --- lookup -------------------------------------------------------------------
    def __getitem__(self, name: str) -> Entry:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    # --- identity -----------------------------------------------------------------
    def table(self) -> list[list]:
        """The table as plain lists ``[name, [dims...]]``: what travels at registration."""
        return [[e.name, list(e.shape)] for e in self.entries]

    @classmethod
    def from_table(cls, table) -> "Layout":
        """Inverse of ``table()``; raises ``ValueError`` on anything malformed."""
        if not isinstance(table, (list, tuple)):
            raise ValueError(f"a layout table is a list of [name, shape], got {type(table).__name__}")
        rows = []
        for row in table:
            if (not isinstance(row, (list, tuple)) or len(row) != 2 or not isinstance(row[0], str)
                    or not isinstance(row[1], (list, tuple))
                    or not all(isinstance(d, int) and not isinstance(d, bool) for d in row[1])):
                raise ValueError(f"bad layout row {row!r}: expected [name, [dims...]]")
            rows.append((row[0], tuple(row[1])))
        return cls(rows)

    def hash(self) -> str:
        """A stable hex digest of names and shapes in order (independent of dtype,
        process and Python version): two processes agree on it iff their tables agree."""
        blob = json.dumps(self.table(), separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # --- views --------------------------------------------------------------------
    def views(self, buf) -> dict:
        """name -> view of ``buf`` (a flat array of ``self.size`` elements) with the tensor's shape."""
        if buf.ndim != 1 or buf.shape[0] != self.size:
            raise ValueError(f"expected a flat buffer of {self.size} elements, got shape {buf.shape}")
        return {e.name: buf[e.offset:e.end].reshape(e.shape) for e in self.entries}

    # --- ranges -------------------------------------------------------------------
    def span(self, prefix: str) -> tuple[int, int]:
        """``[begin, end)`` from the first to the last tensor whose name starts with
        ``prefix`` (``"h.3."``: block 3): the range a layer's hooks name."""
        hits = [e for e in self.entries if e.name.startswith(prefix)]
        if not hits:
            raise KeyError(f"no tensor name starts with {prefix!r}")
        return min(e.offset for e in hits), max(e.end for e in hits)

    def decay_ranges(self) -> list[tuple[int, int]]:
        """Ranges of the tensors that take weight decay: matrices (ndim >= 2), not
        biases or LayerNorm gains, as in GPT-2/nanoGPT training."""
        return merge_ranges((e.offset, e.end) for e in self.entries if len(e.shape) >= 2)

    def shard_ranges(self, num_shards: int, align: int = 16) -> list[tuple[int, int]]:
        """Cut ``[0, size)`` into ``num_shards`` contiguous ranges of nearly equal
        bytes (every parameter has the same dtype, so bytes are elements). Boundaries
        fall on multiples of ``align`` elements (64 bytes in float32) so each shard
        starts cache-line aligned; the last shard takes the remainder."""
        return even_ranges(self.size, num_shards, align)


def even_ranges(size: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``[0, size)`` cut into ``parts`` contiguous ranges whose lengths differ by at
    most ``align`` elements. Empty ranges appear only when ``size < parts * align``."""
    if parts < 1:
        raise ValueError(f"need at least one part, got {parts}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    units = -(-size // align)          # number of aligned blocks, rounded up
    cuts = [min(size, (units * i // parts) * align) for i in range(parts + 1)]
    cuts[-1] = size
    return [(cuts[i], cuts[i + 1]) for i in range(parts)]


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Sorted, non-overlapping union of ``[begin, end)`` ranges (touching ones merged)."""
    out: list[list[int]] = []
    for b, e in sorted(ranges):
        if b >= e:
            continue
        if out and b <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([b, e])
    return [(b, e) for b, e in out]


def intersect_ranges(ranges, begin: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``ranges`` inside ``[begin, end)``, shifted to start at 0 there:
    what a server owning ``[begin, end)`` needs of a global range list."""
    out = []
    for b, e in ranges:
        lo, hi = max(b, begin), min(e, end)
        if lo < hi:
            out.append((lo - begin, hi - begin))
    return out


def gpt_layout(vocab_size: int, block_size: int, n_layer: int, n_embd: int) -> Layout:
    """The GPT-2 parameter table, in GPT-2's order and with GPT-2's names.

    Linear weights are ``(in, out)``, GPT-2's Conv1D convention, so ``y = x @ W + b``.
    The output projection is tied to ``wte`` and has no entry of its own.
    """
    V, T, L, C = vocab_size, block_size, n_layer, n_embd
    rows = [("wte.weight", (V, C)), ("wpe.weight", (T, C))]
    for i in range(L):
        p = f"h.{i}."
        rows += [
            (p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)),
            (p + "attn.c_attn.weight", (C, 3 * C)), (p + "attn.c_attn.bias", (3 * C,)),
            (p + "attn.c_proj.weight", (C, C)), (p + "attn.c_proj.bias", (C,)),
            (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
            (p + "mlp.c_fc.weight", (C, 4 * C)), (p + "mlp.c_fc.bias", (4 * C,)),
            (p + "mlp.c_proj.weight", (4 * C, C)), (p + "mlp.c_proj.bias", (C,)),
        ]
    rows += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return Layout(rows)
