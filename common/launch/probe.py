"""The network probe of ``ps-preflight``: an echo server, and a client that measures a path.

``python -m common.launch.probe serve --bind tcp://*:PORT [--advertise ADDR]`` runs on a host
where servers will run. It prints ``READY tcp://ADDR:PORT`` and answers, over a
ZeroMQ ROUTER (the sockets the real servers use), three requests:

    [b"ping", payload]     -> [b"pong", payload]          latency
    [b"up", data]          -> [b"ack", len(data)]         bandwidth toward the server (a push)
    [b"down", n (ascii)]   -> [b"data", n bytes]          bandwidth from the server (a pull)

Anything else is dropped (check at the door). It stops at the end of its standard
input (the launcher's session ended) or after ``--for`` seconds.

``python -m common.launch.probe measure ENDPOINT... --deadline S`` runs on every host and
prints one JSON line per endpoint: a TCP connect first (reachable, or the reason it
is not), then the median round trip of small pings, then the bandwidth up and down
(a stream of 64 KiB frames, a window of 8 in flight, for at most ``--bw-seconds`` or
``--bw-bytes``). Every wait is bounded by the deadline, one for all the endpoints.

Not here: which hosts probe which, the report (``common/launch/preflight.py``).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time

from common.launch.guard import read_to_end_of_input
from common.wire.addresses import probe_tcp
from common.wire.transport import Dealer, Router, TransportError, host_port

CHUNK = 64 << 10
WINDOW = 8
MAX_DOWN = 4 << 20          # the most one "down" request may ask for


def serve(bind: str, advertise: str = "", seconds: float = 0.0) -> int:
    router = Router(bind)
    _, port = host_port(router.endpoint)
    host, _ = host_port(bind.replace("*", "0.0.0.0"))
    addr = advertise or (host if host not in ("0.0.0.0", "") else socket.gethostname())
    print(f"READY tcp://{addr}:{port}", flush=True)
    ended = threading.Event()

    def watch_stdin():
        read_to_end_of_input()
        ended.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    zeros = bytes(MAX_DOWN)
    stop_at = time.monotonic() + seconds if seconds > 0 else float("inf")
    try:
        while not ended.is_set() and time.monotonic() < stop_at:
            if not router.poll(100):
                continue
            identity, frames = router.recv()
            kind = bytes(frames[0]) if frames else b""
            if kind == b"ping" and len(frames) == 2:
                router.send(identity, [b"pong", frames[1]])
            elif kind == b"up" and len(frames) == 2:
                router.send(identity, [b"ack", str(len(frames[1])).encode()])
            elif kind == b"down" and len(frames) == 2 and bytes(frames[1]).isdigit():
                n = min(int(bytes(frames[1])), MAX_DOWN)
                router.send(identity, [b"data", memoryview(zeros)[:n]])
    finally:
        router.close(0)
    return 0


class _Budget:
    def __init__(self, deadline: float):
        self.end = time.monotonic() + deadline

    def left(self) -> float:
        return self.end - time.monotonic()


def _recv(sock: Dealer, budget: _Budget):
    if budget.left() <= 0 or not sock.poll(budget.left() * 1000):
        return None
    return sock.recv()


def _latency(sock, budget, pings):
    rtts = []
    for i in range(pings + 1):                 # the first one also waits for the connection
        t0 = time.perf_counter()
        sock.send([b"ping", str(i).encode()])
        reply = _recv(sock, budget)
        if reply is None:
            return rtts, "no answer to ping from the probe server"
        if bytes(reply[0]) != b"pong":
            return rtts, "it answers, but is not a probe server (python -m common.launch.probe serve)"
        if i:
            rtts.append(time.perf_counter() - t0)
    return rtts, None


def _stream(sock, budget, direction, seconds, max_bytes):
    """Bytes moved and seconds taken, streaming with WINDOW requests in flight."""
    payload = bytes(CHUNK)
    req = [b"up", payload] if direction == "up" else [b"down", str(CHUNK).encode()]
    sent = moved = inflight = 0
    t0 = time.perf_counter()
    while True:
        while inflight < WINDOW and sent < max_bytes and time.perf_counter() - t0 < seconds:
            sock.send(req)
            sent += CHUNK
            inflight += 1
        if inflight == 0:
            break
        reply = _recv(sock, budget)
        if reply is None:
            return moved, time.perf_counter() - t0, "the deadline passed during the bandwidth test"
        inflight -= 1
        if bytes(reply[0]) not in (b"ack", b"data") or len(reply) != 2:
            return moved, time.perf_counter() - t0, "a reply that is not the probe's"
        moved += int(bytes(reply[1])) if direction == "up" else len(reply[1])
    return moved, time.perf_counter() - t0, None


def measure(endpoint: str, deadline: float = 10.0, connect_timeout: float = 3.0, pings: int = 20,
            bw_seconds: float = 0.5, bw_bytes: int = 16 << 20) -> dict:
    """Reachability, latency and bandwidth of the path from here to a probe server."""
    budget = _Budget(deadline)
    host, port = host_port(endpoint)
    res = {"target": f"{host}:{port}", "reachable": False}
    reason, took = probe_tcp(host, port, min(connect_timeout, max(0.05, budget.left())))
    res["connect_ms"] = round(took * 1000, 3)
    if reason:
        res["error"] = reason
        return res
    res["reachable"] = True
    sock = Dealer(endpoint)
    try:
        rtts, err = _latency(sock, budget, pings)
        if err:
            res["error"] = err
            return res
        res["rtt_ms"] = round(statistics.median(rtts) * 1000, 3)
        res["rtt_p90_ms"] = round(sorted(rtts)[int(0.9 * (len(rtts) - 1))] * 1000, 3)
        for direction in ("up", "down"):
            moved, secs, err = _stream(sock, budget, direction, bw_seconds, bw_bytes)
            res[f"{direction}_mbit_s"] = round(moved * 8 / max(secs, 1e-9) / 1e6, 2)
            res[f"{direction}_bytes"] = moved
            if err:
                res["error"] = err
                return res
    finally:
        sock.close(0)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.launch.probe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="answer probes until end of input")
    s.add_argument("--bind", default="tcp://*:0", help="where to listen (default: %(default)s, any free port)")
    s.add_argument("--advertise", default="", help="the address to print in READY (default: this host's route)")
    s.add_argument("--for", type=float, default=0.0, dest="seconds", help="stop after this many seconds (0: never)")
    m = sub.add_parser("measure", help="measure the path to probe servers; one JSON line each")
    m.add_argument("endpoints", nargs="+", help="HOST:PORT or tcp://HOST:PORT of probe servers")
    m.add_argument("--deadline", type=float, default=10.0, help="seconds for all the endpoints (default: %(default)s)")
    m.add_argument("--connect-timeout", type=float, default=3.0, help="TCP connect timeout (default: %(default)s)")
    m.add_argument("--bw-seconds", type=float, default=0.5, help="seconds of streaming per direction (default: %(default)s)")
    m.add_argument("--bw-bytes", type=int, default=16 << 20, help="at most this many bytes per direction")
    m.add_argument("--source", default="", help="a name for this host in the output")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        try:
            return serve(args.bind, args.advertise, args.seconds)
        except TransportError as e:          # e.g. the coordinator's port is already taken on this host
            print(f"probe: {e}", flush=True)
            return 1
    budget = _Budget(args.deadline)
    for ep in args.endpoints:
        res = measure(ep, max(0.05, budget.left()), args.connect_timeout, bw_seconds=args.bw_seconds,
                      bw_bytes=args.bw_bytes)
        print(json.dumps(dict(res, source=args.source) if args.source else res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
