"""Ring all-reduce by hand: W processes average a vector with no server (lesson 10).

    python scripts/lessons/ring_allreduce.py --workers 3 --size 1000     # W processes on 127.0.0.1
    python scripts/lessons/ring_allreduce.py --rank R --peers A0,A1,... --size N --rounds K   # one rank

The vector is cut into W chunks. The ranks stand in a ring, rank r sending only to
rank r + 1 and receiving only from rank r - 1 (modulo W), over plain ZeroMQ sockets
(PUSH to the right, PULL from the left). Two phases of W - 1 steps each:

- reduce-scatter: at step k rank r sends its partial sum of chunk r - k and adds the
  partial sum of chunk r - k - 1 that arrives from the left. After W - 1 steps rank r
  holds the full sum of chunk r + 1, summed in the order c, c + 1, ..., c + W - 1 (mod W)
  for chunk c; it multiplies it by 1 / W.
- all-gather: at step k rank r sends the finished chunk r + 1 - k and stores the
  finished chunk r - k that arrives: after W - 1 steps every rank holds every chunk.

Each rank sends and receives 2 (W - 1) / W of the vector, whatever W is (Patarasuk and
Yuan 2009; Baidu's "Bringing HPC techniques to deep learning", 2017).

With ``--workers W`` it starts W processes, each with its own seeded gradient, and
checks the average against the parameter server's arithmetic (the workers' vectors
added in rank order, then times 1 / W: ``paramserver/shard.py``). With ``--rank`` it is
one rank of a timed run (``scripts/lessons/allreduce_vs_ps.py`` starts those): a warm-up
all-reduce, then ``--rounds`` timed ones, printing one JSON line of seconds.

A teaching reference, not a product path: no pipelining of a chunk in pieces, no
failure handling (a dead neighbour stops the ring: every receive has a deadline that
names the rank it waits for).
"""
import argparse
import json
import subprocess
import sys
import time

import numpy as np
import zmq


def chunk_ranges(n: int, world: int) -> list[tuple[int, int]]:
    """W nearly equal chunks [b, e) of a vector of n entries."""
    cuts = [n * c // world for c in range(world + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class RingLinks:
    """Rank r's two sockets: PULL bound at peers[r], PUSH to peers[r + 1]."""

    def __init__(self, rank: int, peers: list[str], timeout: float = 60.0):
        self.rank, self.world, self.timeout = rank, len(peers), timeout
        self.bytes_sent = 0
        ctx = zmq.Context.instance()
        self.left = ctx.socket(zmq.PULL)
        self.left.setsockopt(zmq.LINGER, 0)
        self.left.bind(peers[rank])
        self.right = ctx.socket(zmq.PUSH)
        self.right.setsockopt(zmq.LINGER, 0)
        self.right.connect(peers[(rank + 1) % self.world])

    def send(self, chunk: np.ndarray):
        self.right.send(np.ascontiguousarray(chunk))     # copied into the message: the buffer changes later
        self.bytes_sent += chunk.nbytes

    def recv(self, like: np.ndarray) -> np.ndarray:
        if not self.left.poll(int(self.timeout * 1000)):
            raise TimeoutError(f"ring rank {self.rank}: nothing from rank {(self.rank - 1) % self.world} "
                               f"in {self.timeout:g} s (is it running?)")
        got = np.frombuffer(self.left.recv(), dtype=like.dtype)
        if got.shape != like.shape:
            raise ValueError(f"ring rank {self.rank}: expected {like.dtype} {like.shape}, got {got.shape}")
        return got

    def close(self):
        self.left.close()
        self.right.close()


def ring_allreduce(vector: np.ndarray, links: RingLinks) -> np.ndarray:
    """Replaces ``vector`` (this rank's gradient) by the average over the ring, in place."""
    r, w = links.rank, links.world
    chunk = [vector[b:e] for b, e in chunk_ranges(vector.size, w)]            # views
    for k in range(w - 1):                                  # reduce-scatter
        links.send(chunk[(r - k) % w])
        mine = chunk[(r - k - 1) % w]
        mine += links.recv(mine)
    chunk[(r + 1) % w] *= 1.0 / w                           # this rank's finished chunk: sum -> mean
    for k in range(w - 1):                                  # all-gather
        links.send(chunk[(r + 1 - k) % w])
        mine = chunk[(r - k) % w]
        mine[...] = links.recv(mine)
    return vector


def ps_average(vectors: list[np.ndarray]) -> np.ndarray:
    """What the parameter server computes: the workers' vectors added in rank order, times 1 / W."""
    total = vectors[0].copy()
    for v in vectors[1:]:
        total += v
    total *= 1.0 / len(vectors)
    return total


def seeded_gradient(rank: int, size: int) -> np.ndarray:
    return np.random.default_rng(1000 + rank).standard_normal(size).astype(np.float32)


def one_rank(rank: int, peers: list[str], size: int, rounds: int, wait_go: bool = False) -> dict:
    """A rank of a run: a warm-up all-reduce, then ``rounds`` timed ones (each of a fresh
    copy of the gradient); returns the seconds of each, the bytes this rank sent per
    all-reduce and the average it computed. ``wait_go``: print "ready" after the warm-up
    and wait for a line on stdin (the timing script starts every rank's rounds at once)."""
    links = RingLinks(rank, peers)
    grad = seeded_gradient(rank, size)
    try:
        result = ring_allreduce(grad.copy(), links)
        if wait_go:
            print("ready", flush=True)
            sys.stdin.readline()
        seconds, sent = [], links.bytes_sent
        for _ in range(rounds):
            vec = grad.copy()
            t0 = time.perf_counter()
            ring_allreduce(vec, links)
            seconds.append(time.perf_counter() - t0)
    finally:
        links.close()
    return {"rank": rank, "seconds": seconds, "bytes_sent": (links.bytes_sent - sent) / max(rounds, 1),
            "result": result}


def check(world: int, size: int):
    """W processes on 127.0.0.1 average seeded gradients; compared with the PS's arithmetic."""
    from common.wire.transport import free_port
    peers = [f"tcp://127.0.0.1:{free_port()}" for _ in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--peers", ",".join(peers),
                               "--size", str(size), "--rounds", "0", "--print-result"], stdout=subprocess.PIPE, text=True)
             for r in range(world)]
    results = [np.array(json.loads(p.communicate(timeout=120)[0])["result"], np.float32) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a ring rank failed")
    want = ps_average([seeded_gradient(r, size) for r in range(world)])
    same = all(np.array_equal(results[0], res) for res in results)
    first = chunk_ranges(size, world)[0]
    print(f"ring all-reduce of {size} float32 over {world} processes")
    print(f"  every rank holds the same vector: {same}")
    print(f"  chunk 0 (summed in rank order, as the PS sums) equal to the PS's average bit for bit: "
          f"{np.array_equal(results[0][first[0]:first[1]], want[first[0]:first[1]])}")
    print(f"  whole vector equal bit for bit: {np.array_equal(results[0], want)}; "
          f"max |ring - PS| = {np.abs(results[0] - want).max():.1e} (float32 spacing near 1: {np.spacing(np.float32(1)):.1e})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, help="start W processes on 127.0.0.1 and check the result")
    ap.add_argument("--rank", type=int, help="run one rank (with --peers)")
    ap.add_argument("--peers", default="", help="every rank's ZeroMQ address, in rank order, comma-separated")
    ap.add_argument("--size", type=int, default=1000, help="float32 entries of the vector (default: 1000)")
    ap.add_argument("--rounds", type=int, default=5, help="timed all-reduces after the warm-up (default: 5)")
    ap.add_argument("--print-result", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--wait-go", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.workers:
        return check(args.workers, args.size)
    if args.rank is None:
        ap.error("give --workers W, or --rank R with --peers")
    out = one_rank(args.rank, args.peers.split(","), args.size, args.rounds, args.wait_go)
    out["result"] = out["result"].tolist() if args.print_result else None
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    main()
