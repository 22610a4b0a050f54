"""``ps-status --coordinator HOST:PORT``: a live view of a running job.

It asks the coordinator (server 0) for its STATUS, which holds the job's address
table (every registered process: role, rank, host, pid, address), then asks every
other server the same. Each server counts, per peer, messages, bytes each way, the
last step and the time of the last message (``paramserver/traffic.py``). Two rounds
``--interval`` seconds apart give the rates. One line per process:

    role    rank host    pid    address                last msg  heartbeat  step  bytes/s
    server     0 psh1    4242   tcp://10.200.0.1:5700   answered          -    57  1.9 MB/s
    server     1 psh1    4244   tcp://10.200.0.1:5701   answered      0.4 s    57  1.0 MB/s
    worker     0 psh2    4243   10.200.0.2                 0.1 s      0.2 s    57  0.9 MB/s

For a worker, "last msg" is the most recent message any server got from it, "step"
the highest step it pushed, bytes/s what it moved to and from every server, and the
address the one its connection came from as the coordinator saw it. "heartbeat" is
how long ago the coordinator last heard the process's heartbeat (a worker silent for
--heartbeat-misses beats is dropped: "dropped" follows its age). The heading gives
the view (the workers the steps wait for). ``--watch`` redraws every interval until
Ctrl-C; ``--json`` prints the raw answers instead.

A server that does not answer within ``--timeout`` is reported with the reason a
fresh TCP connect gives (refused, timed out, no route), not waited for forever.
Not here: the counters themselves (the servers keep them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from common.wire import codec
from common.wire.addresses import explain_unreachable
from common.wire.protocol import ERROR, STATUS, ProtocolError
from common.wire.transport import Curve, Dealer, TransportError, normalize


class StatusError(RuntimeError):
    pass


def ask(endpoint: str, timeout: float, curve=None) -> dict:
    """One STATUS round trip to a server; raises StatusError naming the address and why."""
    endpoint = normalize(endpoint)
    sock = Dealer(endpoint, curve=curve)
    try:
        sock.send(codec.encode(STATUS, "tool:status", rid=1))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if sock.poll((end - time.monotonic()) * 1000):
                try:
                    msg = codec.decode(sock.recv())
                except ProtocolError as e:
                    raise StatusError(f"{endpoint} answered with a malformed message: {e}") from None
                if msg.cmd == ERROR:
                    raise StatusError(f"{endpoint} refused STATUS: {msg.meta['message']}")
                return msg.meta.get("status", {})
        why = sock.diagnose() if curve is not None else explain_unreachable(endpoint, min(2.0, timeout))
        raise StatusError(f"no answer from {endpoint} within {timeout:.1f} s ({why})")
    finally:
        sock.close(0)


def snapshot(coordinator: str, timeout: float, curve=None) -> dict:
    """{"coordinator": status of server 0, "servers": {rank: status or {"error": text}}}."""
    coord = ask(coordinator, timeout, curve)
    servers = {0: coord}
    for m in coord.get("members", []):
        if m["role"] == "server" and m["rank"] != 0:
            try:
                servers[m["rank"]] = ask(m["addr"], timeout, curve)
            except StatusError as e:
                servers[m["rank"]] = {"error": str(e)}
    return {"coordinator": coord, "servers": servers, "time": time.monotonic()}


def _rate(new, old, dt):
    return max(0.0, (new - old) / dt) if old is not None and dt > 0 else None


def rows(snap: dict, prev: dict | None = None) -> list[dict]:
    """One row per process of the job, from one snapshot (and the previous one for rates)."""
    coord, servers = snap["coordinator"], snap["servers"]
    dt = snap["time"] - prev["time"] if prev else 0.0
    beats, live = coord.get("heartbeats", {}), set(coord.get("live", []))
    now_c = coord.get("time", time.time())
    out = []
    for m in coord.get("members", []):
        row = dict(m)
        beat = beats.get(f"{m['role']}:{m['rank']}")
        row["heartbeat"] = None if beat is None else max(0.0, now_c - beat)
        row["dropped"] = m["role"] == "worker" and coord.get("started", False) and m["rank"] not in live
        if m["role"] == "server":
            st = servers.get(m["rank"], {})
            if "error" in st:
                row.update(last="NO ANSWER", step=None, rate=None, error=st["error"])
            else:
                old = (prev or {}).get("servers", {}).get(m["rank"], {})
                row.update(last="answered", step=st.get("version"),
                           rate=_rate(st.get("bytes_in", 0) + st.get("bytes_out", 0),
                                      (old.get("bytes_in", 0) + old.get("bytes_out", 0)) if old else None, dt))
        else:
            name = f"worker:{m['rank']}"
            seen = [(s, p) for s, st in servers.items() for p in st.get("peers", []) if p["sender"] == name]
            now = max((st.get("time", 0) for st in servers.values() if "time" in st), default=time.time())
            total = sum(p["bytes_in"] + p["bytes_out"] for _, p in seen)
            old_total = None
            if prev:
                old_total = sum(p["bytes_in"] + p["bytes_out"] for st in prev["servers"].values()
                                for p in st.get("peers", []) if p["sender"] == name)
            last = max((p["last_seen"] for _, p in seen), default=0.0)
            addr = next((p["address"] for s, p in seen if s == 0 and p["address"]), "")
            row.update(addr=m["addr"] or addr, step=max((p["step"] for _, p in seen), default=None),
                       last=f"{max(0.0, now - last):.1f} s" if last else "never", rate=_rate(total, old_total, dt))
            if m["rank"] in coord.get("done", []):
                row["last"] += " (done)"
        out.append(row)
    return out


def _human(rate):
    if rate is None:
        return "-"
    for unit, div in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if rate >= div:
            return f"{rate / div:.1f} {unit}"
    return f"{rate:.0f} B/s"


def render(coordinator: str, snap: dict, table: list[dict]) -> str:
    c = snap["coordinator"]
    head = (f"job at {coordinator}: {sum(r['role'] == 'server' for r in table)} server(s), "
            f"{sum(r['role'] == 'worker' for r in table)} worker(s); "
            + (f"started, version {c.get('version')}, view {c.get('view')} (workers {c.get('live')})"
               if c.get("started") else f"registering, missing {c.get('missing')}")
            + (f"; STOPPING: {c['failure']}" if c.get("failure") else "")
            + (f"; waiting for workers {c['waiting_for']}" if c.get("waiting_for") else ""))
    lines = [head, f"{'role':<7}{'rank':>4} {'host':<12} {'pid':<8} {'address':<26} {'last msg':>12} "
                   f"{'heartbeat':>14} {'step':>6} {'bytes/s':>10}"]
    for r in table:
        beat = "-" if r.get("heartbeat") is None else f"{r['heartbeat']:.1f} s"
        beat += " dropped" if r.get("dropped") else ""
        lines.append(f"{r['role']:<7}{r['rank']:>4} {r['host']:<12} {r['pid']:<8} {r['addr'] or '-':<26} "
                     f"{r['last']:>12} {beat:>14} {'-' if r['step'] is None else r['step']:>6} {_human(r['rate']):>10}")
        if r.get("error"):
            lines.append(f"        {r['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ps-status", description="Show every process of a running job: role, address, "
                                "last message, step and bytes/s.")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of server 0")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between the two samples of a rate (default: 1)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each server (default: 5)")
    p.add_argument("--watch", action="store_true", help="redraw every interval until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (one line per sample)")
    p.add_argument("--curve", default="", help="the job's CurveZMQ key folder, when it runs with --curve")
    args = p.parse_args(argv)
    try:
        curve = Curve(args.curve) if args.curve else None
        prev = snapshot(args.coordinator, args.timeout, curve)
        while True:
            time.sleep(args.interval)
            snap = snapshot(args.coordinator, args.timeout, curve)
            table = rows(snap, prev)
            if args.json:
                print(json.dumps({"coordinator": args.coordinator, "rows": table,
                                  "version": snap["coordinator"].get("version")}), flush=True)
            else:
                print(("\033[H\033[J" if args.watch and sys.stdout.isatty() else "")
                      + render(args.coordinator, snap, table), flush=True)
            if not args.watch:
                return 0
            prev = snap
    except (StatusError, TransportError) as e:
        print(f"ps-status: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
