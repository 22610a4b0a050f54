"""Logging set-up shared by every process: one line per event, prefixed with the role.

Each process logs to stderr; launchers redirect it to a per-role log file. The prefix
(``server:1``, ``worker:0``) is what a user greps for when a job misbehaves.
"""
from __future__ import annotations

import logging
import sys


def setup(name: str, level: str = "INFO") -> logging.Logger:
    """Configure the root logger for a process named ``name`` and return its logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(name)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def add_log_level(parser):
    """``--log-level``, the same on every role."""
    parser.add_argument("--log-level", default="INFO", choices=LEVELS, help="what a process logs (default: INFO)")
