"""This host's addresses, chosen by interface name or subnet, and why a peer cannot be reached.

The commonest launch failures in ps-lite and BytePS are address mistakes: a server
advertises an address its peers cannot use (the container's, loopback, the wrong
NIC), or a coordinator is unreachable from the other hosts. This module gives the
pieces to get that right and to say what went wrong:

- ``interfaces()``: every IPv4 address of this host, by interface (``ip -j addr``,
  with an ioctl fallback where ``ip`` is missing; no new dependency);
- ``pick_address(interface=, subnet=, toward=)``: the address to advertise: the one
  on the named interface, or the one inside the given subnet, or the one on the
  route toward the coordinator; an error lists what this host has;
- ``probe_tcp(host, port, timeout)``: a plain TCP connect that answers with a reason
  a person can act on ("connection refused": nothing listens; "timed out": a firewall
  or a cut link; "network unreachable": no route), used in deadline errors and by
  ``ps-preflight``.

Not here: binding sockets (``common/wire/transport.py``), which address a server binds
(``common/cluster.py``: bind and advertise are separate settings).
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import shutil
import socket
import struct
import subprocess
import time

SIOCGIFADDR, SIOCGIFNETMASK = 0x8915, 0x891B


def interfaces() -> dict[str, list[tuple[str, int]]]:
    """interface name -> [(IPv4 address, prefix length)], in the kernel's order."""
    if shutil.which("ip"):
        try:
            out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout
            table = {}
            for link in json.loads(out or "[]"):
                addrs = [(a["local"], int(a["prefixlen"])) for a in link.get("addr_info", [])
                         if a.get("family") == "inet"]
                if addrs:
                    table[link["ifname"]] = addrs
            return table
        except (OSError, subprocess.SubprocessError, ValueError, KeyError):
            pass
    return _interfaces_ioctl()


def _interfaces_ioctl() -> dict[str, list[tuple[str, int]]]:
    """One address per interface from SIOCGIFADDR/SIOCGIFNETMASK (no aliases)."""
    table = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24])
                mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), SIOCGIFNETMASK, req)[20:24])
            except OSError:
                continue                                   # no IPv4 address on it
            table[name] = [(addr, ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen)]
    return table


def describe_interfaces(table=None) -> str:
    table = interfaces() if table is None else table
    return ", ".join(f"{n} ({', '.join(f'{a}/{p}' for a, p in addrs)})" for n, addrs in table.items()) or "none"


def route_address(to_host: str) -> str:
    """The IP address of this host's interface on the route to ``to_host`` (no packet
    is sent: connecting a UDP socket only asks the kernel for the route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(to_host), 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def pick_address(interface: str = "", subnet: str = "", toward: str = "", table=None) -> str:
    """The address peers should use to reach this host.

    ``interface``: the first IPv4 address of that interface (e.g. ``eth0``, ``ib0``);
    ``subnet``: the first address of any interface inside it (``10.200.0.0/24``);
    both: the address must satisfy both; neither: the route toward ``toward``.
    Raises ``ValueError`` naming the interfaces and addresses this host has."""
    if not interface and not subnet:
        return route_address(toward) if toward else "127.0.0.1"
    table = interfaces() if table is None else table
    net = None
    if subnet:
        try:
            net = ipaddress.IPv4Network(subnet, strict=False)
        except ValueError as e:
            raise ValueError(f"subnet {subnet!r} is not an IPv4 network such as 10.0.0.0/24: {e}") from None
    if interface and interface not in table:
        raise ValueError(f"this host ({socket.gethostname()}) has no interface {interface!r} with an IPv4 "
                         f"address; it has: {describe_interfaces(table)}")
    names = [interface] if interface else list(table)
    for name in names:
        for addr, _ in table[name]:
            if net is None or ipaddress.IPv4Address(addr) in net:
                return addr
    where = f"interface {interface!r}" if interface else "any interface"
    raise ValueError(f"{where} of this host ({socket.gethostname()}) has no address in {subnet}; "
                     f"it has: {describe_interfaces(table)}")


_REASONS = {errno.ECONNREFUSED: "connection refused (nothing listens on that port, or a firewall rejects it)",
            errno.ENETUNREACH: "network unreachable (no route from this host to that address)",
            errno.EHOSTUNREACH: "host unreachable (no route, or the host is down)",
            errno.ETIMEDOUT: "timed out"}


def probe_tcp(host: str, port: int, timeout: float = 3.0) -> tuple[str | None, float]:
    """Try one TCP connection. Returns (None, seconds) when it opened, else (reason, seconds)."""
    t0 = time.monotonic()
    try:
        addr = socket.gethostbyname(host)
    except OSError as e:
        return f"the name {host!r} does not resolve ({e.strerror or e})", time.monotonic() - t0
    try:
        with socket.create_connection((addr, port), timeout=max(0.05, timeout)):
            return None, time.monotonic() - t0
    except socket.timeout:
        return f"timed out after {timeout:.1f} s (a cut link, a firewall dropping packets, or a host " \
               "that is down)", time.monotonic() - t0
    except OSError as e:
        return _REASONS.get(e.errno, e.strerror or str(e)), time.monotonic() - t0


def explain_unreachable(endpoint: str, timeout: float = 2.0) -> str:
    """A few words on why ``tcp://host:port`` did not answer, from a fresh TCP probe
    (for deadline errors: "the port is open" means the process is there but silent)."""
    if not endpoint.startswith("tcp://"):
        return ""
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    try:
        reason, _ = probe_tcp(host.strip("[]"), int(port), timeout)
    except ValueError:
        return ""
    return "a TCP connect to it works now" if reason is None else f"TCP connect: {reason}"
