"""``ps-preflight``: before training, can every process reach every server, and how well?

With a hostfile (the one ``ps-launch`` takes), over the same ``--rsh``:

1. on every host that will run servers, start a probe server (``common/launch/probe.py``)
   where the servers will listen: on the coordinator's host at the coordinator's port
   itself (so a port already taken, or blocked, shows up now), elsewhere on a free
   port, advertised at the hostfile's ``addr=``; its sessions end with this command;
2. on every host, one after the other (so bandwidth figures are not shared), run the
   probe client against every probe server: a TCP connect, the median of 20 small
   round trips, and a bandwidth test toward the server (as a push) and from it (as a
   pull);
3. print one line per pair, and mark SLOW a pair whose bandwidth is below
   ``--slow-fraction`` of the median of the pairs between different hosts (or below
   ``--min-mbit``).

It fails fast: the first pair that cannot connect ends the run with exit code 1 and a
line naming the source host and the unreachable ``host:port`` with the reason
(refused, timed out, no route). The whole run is bounded by ``--deadline``.

With ``--targets HOST:PORT ...`` it measures from this machine only, against probe
servers started by hand (``python -m common.launch.probe serve``) or any TCP port (then only
reachability is checked). ``--json FILE`` saves every figure.

Not here: launching the job (``ps-launch --preflight`` calls this first).
"""
from __future__ import annotations

import argparse
import json
import select
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common.launch import hostfile
from common.launch.ssh import REPO, remote_command
from common.launch.probe import measure


def _readline(proc: subprocess.Popen, until: float) -> str:
    """One line of ``proc``'s output, or '' if none came before ``until`` (monotonic)."""
    buf = b""
    while time.monotonic() < until:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, min(0.2, until - time.monotonic())))
        if ready:
            ch = proc.stdout.read(1)                 # unbuffered (bufsize=0): select() sees all there is
            if not ch:
                break
            buf += ch
            if ch == b"\n":
                break
    return buf.decode(errors="replace").strip()


class Preflight:
    def __init__(self, hosts, rsh, port, python, deadline, remote_dir):
        self.hosts, self.rsh, self.port, self.python = hosts, shlex.split(rsh), port, python
        self.end = time.monotonic() + deadline
        self.remote_dir = remote_dir
        self.servers: list[tuple[hostfile.Host, subprocess.Popen, str]] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def _rsh(self, host, argv, stdin=subprocess.PIPE):
        # no guard: the probe server itself ends with its input, the client by its deadline
        cmd = remote_command(argv, self.remote_dir, REPO, self.python, 1, guard=False)
        return subprocess.Popen(self.rsh + [host.name, cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=stdin, start_new_session=True, bufsize=0)

    def start_probe_servers(self):
        """Start one probe server per server host; returns an error text or None."""
        for h in self.hosts:
            if not h.servers:
                continue
            port = self.port if 0 in h.servers else 0
            proc = self._rsh(h, [self.python, "-m", "common.launch.probe", "serve", "--bind", f"tcp://*:{port}",
                                 "--advertise", h.addr])
            self.servers.append((h, proc, ""))
        for i, (h, proc, _) in enumerate(self.servers):
            line = _readline(proc, time.monotonic() + max(0.1, self.left()))
            if not line.startswith("READY "):
                rest = line + "\n" + self._drain(proc)
                return (f"could not start the probe server on {h.name} (for server(s) {h.servers}): "
                        f"{rest.strip() or 'no answer before the deadline'}")
            self.servers[i] = (h, proc, line.split()[1])
        return None

    def _drain(self, proc, seconds=1.0) -> str:
        out, until = [], time.monotonic() + seconds
        while True:
            line = _readline(proc, until)
            if not line:
                return "\n".join(out)
            out.append(line)

    def measure_from(self, h) -> tuple[list[dict], str | None]:
        endpoints = [ep for _, _, ep in self.servers]
        proc = self._rsh(h, [self.python, "-m", "common.launch.probe", "measure", *endpoints, "--deadline",
                             f"{max(0.1, self.left() - 0.5):.2f}", "--source", h.name], stdin=subprocess.DEVNULL)
        try:
            out, _ = proc.communicate(timeout=max(0.5, self.left() + 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return [], f"the probe on {h.name} gave no result within the deadline"
        results = []
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("{"):
                results.append(json.loads(line))
        if len(results) != len(endpoints):
            return results, (f"the probe on {h.name} exited with code {proc.returncode} after "
                             f"{len(results)} of {len(endpoints)} targets:\n{out.decode(errors='replace')[-2000:]}")
        return results, None

    def stop(self):
        for _, proc, _ in self.servers:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for _, proc, _ in self.servers:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def mark_slow(results: list[dict], fraction: float, min_mbit: float) -> list[str]:
    """Mark (``slow`` key) and describe the pairs far below the others' bandwidth."""
    lines = []
    for d in ("up", "down"):
        key = f"{d}_mbit_s"
        cross = [r[key] for r in results if key in r and r.get("source") != r.get("target_host")]
        med = statistics.median(cross) if cross else 0.0
        for r in results:
            if key not in r or r.get("source") == r.get("target_host"):
                continue
            if r[key] < fraction * med or r[key] < min_mbit:
                r.setdefault("slow", []).append(d)
                lines.append(f"{r.get('source', 'here')} -> {r['target']}: {d} {r[key]:.1f} Mbit/s, "
                             f"{r[key] / med if med else 0:.3f}x the median {med:.1f} Mbit/s of the pairs")
    return lines


def report(results: list[dict]) -> str:
    head = f"{'from':<12} {'to':<24} {'connect ms':>10} {'rtt ms':>8} {'up Mbit/s':>10} {'down Mbit/s':>12}"
    rows = [head]
    for r in results:
        to = r["target"] + (f" ({r['target_host']})" if r.get("target_host") else "")
        if not r["reachable"] or "rtt_ms" not in r:
            rows.append(f"{r.get('source', 'here'):<12} {to:<24} {'UNREACHABLE' if not r['reachable'] else '':>10} "
                        f"{r.get('error', '')}")
            continue
        rows.append(f"{r.get('source', 'here'):<12} {to:<24} {r['connect_ms']:>10.2f} {r['rtt_ms']:>8.3f} "
                    f"{r.get('up_mbit_s', float('nan')):>10.1f} {r.get('down_mbit_s', float('nan')):>12.1f}"
                    + ("  SLOW " + "+".join(r["slow"]) if r.get("slow") else ""))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ps-preflight", allow_abbrev=False,
                                description="Check, before training, that every host reaches every server host and "
                                            "the coordinator; measure latency and bandwidth per pair; fail fast "
                                            "naming an unreachable host:port.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--hostfile", help="the hostfile of ps-launch: probe from every host to every server host")
    where.add_argument("--targets", nargs="+", metavar="HOST:PORT", help="probe these endpoints from this machine")
    p.add_argument("--rsh", default="ssh -o BatchMode=yes", help="how to run a command on a host (default: %(default)s)")
    p.add_argument("--port", type=int, default=5700, help="the coordinator's port, probed on its host (default: 5700)")
    p.add_argument("--python", default=sys.executable, help="Python on the hosts (default: this one)")
    p.add_argument("--remote-dir", default=str(Path.cwd()), help="working directory on the hosts (default: this one)")
    p.add_argument("--deadline", type=float, default=30.0, help="seconds for the whole check (default: %(default)s)")
    p.add_argument("--slow-fraction", type=float, default=0.25,
                   help="a pair below this fraction of the median bandwidth is SLOW (default: %(default)s)")
    p.add_argument("--min-mbit", type=float, default=0.0, help="a pair below this many Mbit/s is SLOW (default: off)")
    p.add_argument("--json", default="", help="write every figure to this file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    results, error = [], None
    if args.targets:
        end = t0 + args.deadline
        for t in args.targets:
            r = measure(t, max(0.05, end - time.monotonic()))
            results.append(r)
            if not r["reachable"]:
                error = f"this host cannot reach {r['target']}: {r['error']}"
                break
    else:
        try:
            hosts = hostfile.read(args.hostfile)
        except (OSError, ValueError) as e:
            print(f"ps-preflight: {e}", file=sys.stderr)
            return 2
        pf = Preflight(hosts, args.rsh, args.port, args.python, args.deadline, args.remote_dir)
        try:
            error = pf.start_probe_servers()
            names = {ep.split("://")[1]: h.name for h, _, ep in pf.servers if ep}
            for h in ([] if error else hosts):
                got, error = pf.measure_from(h)
                for r in got:
                    r["target_host"] = names.get(r["target"], "")
                results += got
                bad = next((r for r in got if not r["reachable"]), None)
                if bad is not None:
                    error = (f"{h.name} cannot reach {bad['target']} (server host {bad['target_host']}): "
                             f"{bad['error']}")
                if error:
                    break
        finally:
            pf.stop()
    slow = mark_slow(results, args.slow_fraction, args.min_mbit) if not error else []
    if results:
        print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "error": error, "slow": slow,
                                               "seconds": time.monotonic() - t0}, indent=2) + "\n")
    if error:
        print(f"ps-preflight: FAILED after {time.monotonic() - t0:.1f} s: {error}", file=sys.stderr)
        return 1
    for line in slow:
        print(f"ps-preflight: SLOW pair {line}")
    print(f"ps-preflight: OK, {len(results)} pair(s) reachable in {time.monotonic() - t0:.1f} s"
          + (f"; {len(slow)} slow" if slow else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
