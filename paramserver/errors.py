"""The error that stops a server."""
from __future__ import annotations


class ServerError(RuntimeError):
    """The job cannot go on (a deadline passed, the coordinator refused us); the text says why."""
