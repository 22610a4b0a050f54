"""Fuzz a live server: thousands of random and mutated messages, then check it is unharmed.

    python scripts/fuzz_server.py                        # 20,000 messages, seed 0
    python scripts/fuzz_server.py --messages 200000 --seed 7

Starts one server (server 0, the coordinator) for a one-worker job, registers a worker,
gives the server parameters, then sends messages of every malformed kind a network can
deliver: random bytes, random msgpack, valid headers with a field replaced, truncated
or bit-flipped headers, frames of the wrong size, missing or extra frames, absurd shapes,
a few large junk frames, gradients with NaN, unowned ranges, wrong dtypes or future
steps. Then it checks that the server is still up, that its parameters are bit for bit
what they were (checksum of a pull), that its memory stayed bounded, and that a normal
worker then trains a step. Exit 0 when every check holds. tests/test_fuzz.py runs it
with fewer messages.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
import msgpack  # noqa: E402  (the fuzzer forges headers itself, bypassing the codec's checks)
import numpy as np  # noqa: E402
import zmq  # noqa: E402  (raw frames, not the project's transport: the point is to send garbage)

from common.cluster import ClusterConfig  # noqa: E402
from common.layout import Layout  # noqa: E402
from common.wire.protocol import PROTOCOL_VERSION  # noqa: E402
from common.wire.transport import free_port  # noqa: E402
from worker.client import PSClient  # noqa: E402

N = 64                                 # parameters of the fuzzed job
LAYOUT = Layout([("w", (N,))])


def _random_object(rng: random.Random, depth=0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.randrange(-2 ** 63, 2 ** 64)
    if kind == 1:
        return rng.random() * 10 ** rng.randrange(-5, 40)
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 3:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.choice([None, True, False, float("nan"), float("inf")])
    if kind == 5:
        return rng.choice(["push", "pull", "init", "register", "norm", "status", "job", "ok", "error"])
    if kind in (6, 7):
        return [_random_object(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {_random_key(rng): _random_object(rng, depth + 1) for _ in range(rng.randrange(5))}


def _random_key(rng):
    return rng.choice(["v", "cmd", "from", "step", "rid", "arrays", "meta", "dtype", "shape", "range",
                       "loss", "role", "rank", "x" * rng.randrange(1, 9)])


def _base(rng: random.Random):
    """A well-formed header and frames that the server must still refuse (or answer
    without changing state): pushes come from a worker rank the job lacks AND for a
    future step, so no single mutation turns one into a valid update."""
    arr = np.ones(N, dtype=np.float32)
    cmd = rng.choice(["push", "push", "pull", "init", "norm", "register", "status", "barrier", "shutdown"])
    meta = {"push": {"loss": 1.0}, "norm": {"sumsq": 1.0}, "barrier": {"name": "b"},
            "register": {"role": "worker", "rank": 0, "host": "fuzz", "pid": 1}}.get(cmd, {})
    arrays = [{"dtype": "float32", "shape": [N], "range": [0, N]}] if cmd in ("push", "init") else []
    sender = "worker:7" if cmd == "push" else rng.choice(["worker:0", "server:0", "tool:0"])
    header = {"v": PROTOCOL_VERSION, "cmd": cmd, "from": sender, "step": 999 if cmd == "push" else 0,
              "rid": rng.randrange(1, 1 << 30), "arrays": arrays, "meta": meta}
    return header, [arr.tobytes() for _ in arrays]


def messages(rng: random.Random, count: int):
    """``count`` malformed or harmless messages (lists of byte frames)."""
    for _ in range(count):
        kind = rng.randrange(12)
        header, frames = _base(rng)
        if kind == 0:                                          # random bytes
            yield [bytes(rng.randrange(256) for _ in range(rng.randrange(200))) for _ in range(rng.randrange(1, 4))]
        elif kind == 1:                                        # random msgpack as a header
            yield [msgpack.packb(_random_object(rng), use_bin_type=True)] + frames
        elif kind == 2:                                        # one field replaced by anything
            header[rng.choice(list(header))] = _random_object(rng)
            yield [msgpack.packb(header, use_bin_type=True)] + frames
        elif kind == 3:                                        # a truncated header
            packed = msgpack.packb(header)
            yield [packed[:rng.randrange(len(packed))]] + frames
        elif kind == 4:                                        # a few flipped bytes in the header
            packed = bytearray(msgpack.packb(header))
            for _ in range(rng.randrange(1, 6)):
                packed[rng.randrange(len(packed))] = rng.randrange(256)
            yield [bytes(packed)] + frames
        elif kind == 5 and frames:                             # a frame of the wrong size
            cut = rng.choice([-1, 1, -4, 4, -len(frames[0]), 1000])
            yield [msgpack.packb(header)] + [frames[0][:cut] if cut < 0 else frames[0] + bytes(cut)]
        elif kind == 6:                                        # frames missing or extra
            yield [msgpack.packb(header)] + frames[:0] + [b"\x00" * 8] * rng.randrange(0, 3)
        elif kind == 7:                                        # absurd shapes
            header["arrays"] = [{"dtype": rng.choice(["float64", "float32", "int8"]),
                                 "shape": [rng.choice([2 ** 39, 2 ** 20, 0, 3])] * rng.randrange(1, 9)}]
            yield [msgpack.packb(header), b"\x00" * 16]
        elif kind == 8 and rng.random() < 0.05:                # now and then a large junk frame
            yield [msgpack.packb(header), os.urandom(rng.randrange(1, 8) << 20)]
        elif kind == 9:                                        # NaN, wrong dtype, unowned range
            bad = np.ones(N, dtype=np.float32)
            bad[rng.randrange(N)] = rng.choice([np.nan, np.inf, -np.inf])
            header.update(cmd="push", arrays=[{"dtype": "float32", "shape": [N], "range": [0, N]}],
                          meta={"loss": 0.5})
            choice = rng.randrange(3)
            if choice == 1:
                header["arrays"] = [{"dtype": "float64", "shape": [N], "range": [0, N]}]
                bad = bad.astype(np.float64)
            elif choice == 2:
                header["arrays"][0]["range"] = [N, 2 * N]
            yield [msgpack.packb(header), bad.tobytes()]
        elif kind == 10:                                       # wrong version, unknown command
            header.update(rng.choice([{"v": rng.randrange(2, 99)}, {"cmd": "exec"}, {"v": "1"}]))
            yield [msgpack.packb(header)] + frames
        else:                                                  # well-formed but refused (or harmless)
            yield [msgpack.packb(header)] + frames


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def checksum(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def run(count: int, seed: int, logdir: str, say=print) -> dict:
    """Fuzz a fresh server with ``count`` messages; return the findings (raises on failure)."""
    port = free_port()
    coord = f"127.0.0.1:{port}"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "paramserver", "--num-workers", "1", "--coordinator", coord,
                               "--bind", f"tcp://{coord}", "--optimizer", "sgd", "--lr", "0.5", "--timeout", "60"],
                              stdout=open(os.path.join(logdir, "fuzzed-server.log"), "w"),
                              stderr=subprocess.STDOUT, env=env)
    sock = None
    try:
        client = PSClient(ClusterConfig(rank=0, coordinator=coord, timeout=30))
        client.register(LAYOUT, "float32")
        params = np.random.default_rng(seed).normal(size=N).astype(np.float32)
        client.init(params)
        before, rss0 = checksum(params), rss_mib(server.pid)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{coord}")
        rng, sent, replies, t0 = random.Random(seed), 0, 0, time.monotonic()
        for frames in messages(rng, count):
            sock.send_multipart(frames)
            sent += 1
            while sock.poll(0):                               # keep our own queue short
                sock.recv_multipart()
                replies += 1
            if sent % 1000 == 0 and server.poll() is not None:
                raise AssertionError(f"the server died after {sent} messages (exit {server.returncode})")
        deadline = time.monotonic() + 30
        while replies < sent * 0.9 and time.monotonic() < deadline and sock.poll(1000):
            sock.recv_multipart()
            replies += 1
        assert server.poll() is None, f"the server died (exit {server.returncode})"
        rss1 = rss_mib(server.pid)
        got = np.zeros(N, dtype=np.float32)
        client.pull(got)
        assert checksum(got) == before and client.version == 0, "the fuzz changed the server's parameters"
        client.push_pull(np.ones(N, dtype=np.float32), got, step=0, loss=1.0)    # a normal worker trains
        np.testing.assert_allclose(got, params - 0.5, rtol=1e-6)
        client.done()
        client.close()
        assert server.wait(timeout=30) == 0, "the server did not stop cleanly after the fuzz"
        findings = {"messages": sent, "answered": replies, "seconds": round(time.monotonic() - t0, 1),
                    "rss_before_mib": round(rss0, 1), "rss_after_mib": round(rss1, 1)}
        say(f"fuzz: {sent} messages in {findings['seconds']} s, {replies} answered; server RSS "
            f"{rss0:.1f} -> {rss1:.1f} MiB; parameters unchanged; a worker then trained; clean stop")
        return findings
    finally:
        if sock is not None:
            sock.close()
        if server.poll() is None:
            server.kill()
            server.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000, help="messages to send (default: 20000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generator (default: 0)")
    ap.add_argument("--logdir", default=".", help="where the server's log goes (default: .)")
    args = ap.parse_args(argv)
    findings = run(args.messages, args.seed, args.logdir)
    if findings["rss_after_mib"] > findings["rss_before_mib"] + 64:
        print("memory grew by more than 64 MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
