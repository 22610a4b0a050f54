"""Placement: the flat vector cut into chunks, and which server owns each chunk.

A placement is a list of ``[begin, end, server]`` rows, one per chunk, covering the
flat parameter vector ``[0, size)`` exactly once (the coordinator sends it to every
process in its JOB answer; clients and servers only ever read the rows).

``place_chunks`` cuts the vector into equal chunks of at most ``chunk_mb`` MiB, as
BytePS partitions its tensors (Jiang et al., "A Unified Architecture for Accelerating
Distributed DNN Training in Heterogeneous GPU/CPU Clusters", OSDI 2020):
- chunks of a few MB keep every message below glibc's mmap threshold, so the memory
  libzmq receives into is reused message after message instead of being faulted in
  page by page (measured: one page fault per 4 KiB for a 43 MB message, none for
  4 MB chunks; docs/wire.md);
- a chunk is the unit a worker pushes as soon as its gradients are final and the unit
  a server can update and answer on its own, so chunks smaller than a layer let
  communication overlap the backward and the next forward;
- the count is at least ``MIN_CHUNKS_PER_SERVER`` per server (small models still
  pipeline) unless that makes chunks under ``MIN_CHUNK_BYTES`` (each message costs a
  fixed ~0.1-0.3 ms of Python on both sides), and a multiple of the number of servers,
  so the chunks are equal up to the alignment and every server carries the same bytes.
Chunks are then assigned greedily, largest first, each to the least-loaded server
(Graham's LPT rule); with equal chunks this deals them out round-robin, so the chunks
of every layer are spread over every server and a layer's push goes to all of them
at once.

``describe`` prints a placement as a table for
``ps-local --show-placement`` / ``python -m worker --show-placement``.

Not here: offsets of named tensors (``common/layout.py``), what travels
(``common/wire/protocol.py``).
"""
from __future__ import annotations

from common.layout import Layout, even_ranges

MIN_CHUNKS_PER_SERVER = 4
MIN_CHUNK_BYTES = 512 << 10   # ... but not below this: a message costs ~0.1-0.3 ms of Python, as long as 0.5 MiB takes on the wire
ALIGN = 16                    # elements: a chunk starts on a 64-byte boundary in float32
DEFAULT_CHUNK_MB = 4.0


def chunk_ranges(size: int, num_servers: int, chunk_elems: int, align: int = ALIGN,
                 min_elems: int = MIN_CHUNK_BYTES // 4) -> list[tuple[int, int]]:
    """``[0, size)`` cut into n contiguous chunks of at most about ``chunk_elems``
    elements, n a multiple of ``num_servers`` and at least ``MIN_CHUNKS_PER_SERVER *
    num_servers`` where that leaves chunks of ``min_elems`` or more (else as many as
    that allows, one per server at least); boundaries on multiples of ``align`` (of 1
    for a vector too small to give every server an aligned chunk), so lengths differ by
    at most ``align``. No chunk is empty."""
    if size < 0 or num_servers < 1 or chunk_elems < 1:
        raise ValueError(f"need size >= 0, servers >= 1, chunk >= 1; got {size}, {num_servers}, {chunk_elems}")
    if size == 0:
        return []
    if size < align * num_servers:
        align = 1
    units = -(-size // align)                         # aligned blocks in the vector
    n = max(-(-size // chunk_elems), min(MIN_CHUNKS_PER_SERVER * num_servers, size // max(1, min_elems)))
    n = num_servers * -(-n // num_servers)            # a multiple of S: equal bytes per server
    if n > units:                                     # never an empty chunk
        n = num_servers * (units // num_servers) or units
    return even_ranges(size, n, align)


def assign_greedy(ranges, num_servers: int) -> list[list[int]]:
    """``[begin, end, server]`` rows: each chunk, largest first (ties: lower offset first),
    to the server with the fewest elements so far (ties: the lower rank)."""
    load = [0] * num_servers
    owner = {}
    for b, e in sorted(ranges, key=lambda r: (-(r[1] - r[0]), r[0])):
        s = min(range(num_servers), key=lambda k: (load[k], k))
        owner[(b, e)] = s
        load[s] += e - b
    return [[b, e, owner[(b, e)]] for b, e in ranges]


def chunk_elements(chunk_mb: float, itemsize: int = 4) -> int:
    """Elements in a chunk of ``chunk_mb`` MiB (float32 unless told)."""
    if not chunk_mb > 0:
        raise ValueError(f"chunk size must be > 0 MiB, got {chunk_mb}")
    return max(ALIGN, int(chunk_mb * (1 << 20)) // itemsize)


def place_chunks(layout: Layout, num_servers: int, chunk_mb: float = DEFAULT_CHUNK_MB, itemsize: int = 4) -> list:
    """The job's placement: equal chunks of at most ``chunk_mb`` MiB, dealt greedily."""
    return assign_greedy(chunk_ranges(layout.size, num_servers, chunk_elements(chunk_mb, itemsize)), num_servers)


def check(placement, size: int, num_servers: int):
    """Raise ValueError unless the rows cover ``[0, size)`` exactly once with valid servers."""
    pos = 0
    for b, e, s in sorted(placement):
        if b != pos or e <= b or not 0 <= s < num_servers:
            raise ValueError(f"placement row [{b}, {e}, {s}] breaks the cover of [0, {size}) at {pos}")
        pos = e
    if pos != size:
        raise ValueError(f"placement covers [0, {pos}), the vector has {size} elements")


def loads(placement, num_servers: int) -> list[int]:
    """Elements per server."""
    out = [0] * num_servers
    for b, e, s in placement:
        out[s] += e - b
    return out


def imbalance(placement, num_servers: int) -> float:
    """max / mean of the servers' loads (1.0 is perfect balance)."""
    load = loads(placement, num_servers)
    mean = sum(load) / num_servers
    return max(load) / mean if mean else 1.0


def _tensors_in(layout: Layout, b: int, e: int) -> str:
    names = [x.name for x in layout if x.offset < e and x.end > b]
    if not names:
        return ""
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} tensors)"


def describe(layout: Layout, placement, num_servers: int, itemsize: int = 4) -> str:
    """The placement as a table: chunk, range, MB, server, tensors; then each server's
    bytes and the balance (max / mean)."""
    rows = [f"{'chunk':>5}  {'range':>23}  {'MB':>7}  {'server':>6}  tensors"]
    for i, (b, e, s) in enumerate(sorted(placement)):
        rows.append(f"{i:>5}  {f'[{b}, {e})':>23}  {(e - b) * itemsize / 1e6:>7.3f}  {s:>6}  "
                    f"{_tensors_in(layout, b, e)}")
    load = loads(placement, num_servers)
    rows.append("")
    for s, n in enumerate(load):
        count = sum(1 for row in placement if row[2] == s)
        rows.append(f"server {s}: {count} chunk(s), {n * itemsize / 1e6:.3f} MB")
    rows.append(f"{len(placement)} chunks, {layout.size * itemsize / 1e6:.3f} MB over {num_servers} server(s); "
                f"max/mean = {imbalance(placement, num_servers):.4f}")
    return "\n".join(rows)



def add_show_placement(group):
    """``--show-placement``, one definition for the worker and ps-local (which asks a worker)."""
    group.add_argument("--show-placement", action="store_true",
                       help="print how the model's flat vector is cut into chunks (--chunk-mb) and dealt over "
                            "the servers, with each server's bytes and the balance, and exit")
