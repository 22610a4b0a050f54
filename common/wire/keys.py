"""``ps-keys``: make the CurveZMQ keys of a job.

    ps-keys keys/                     # server key pair + one client key pair, authorised
    ps-keys keys/ --client host7      # add another authorised client key pair

Then start every process with ``--curve keys/`` (``ps-local --curve keys/`` does it for a
local job). Copy the folder to every host of the job; a host that only runs workers
needs ``server.key``, its own ``<name>.key_secret`` and nothing else. Remove a client's
file from ``authorized/`` to lock it out (servers read the folder at start).
"""
from __future__ import annotations

import argparse
import sys

from common.wire.transport import CLIENT_KEY, generate_keys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ps-keys", description=__doc__.split("\n\n")[0].strip(),
                                epilog="Every socket of a job started with --curve DIR is encrypted and "
                                       "authenticated; a process without an authorised key gets nothing.")
    p.add_argument("folder", help="where to write the keys (created if missing)")
    p.add_argument("--client", action="append", default=[],
                   help=f"name of a client key pair to create and authorise (default: {CLIENT_KEY}); repeatable")
    args = p.parse_args(argv)
    written = generate_keys(args.folder, clients=args.client or [CLIENT_KEY])
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{args.folder}: every requested key exists already (kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
