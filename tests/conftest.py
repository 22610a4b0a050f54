"""Fixtures shared by the unit tests of the server's and the client's parts (the stand-ins
themselves are in tests/standins.py), and a check that every test closes the clients it opened."""
import threading

import numpy
import pytest

from tests import standins
from worker.heartbeat import Heartbeat


@pytest.fixture(autouse=True)
def no_heartbeat_left_running():
    """A test that leaves a worker's heartbeat running (a PSClient not closed, or a thread
    that cannot stop) fails, and the heartbeat is stopped: one left running beats for the
    rest of the session at a coordinator that is gone."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if isinstance(t, Heartbeat) and t not in before]
    for t in left:
        t.stop()
    assert not left, f"the test left {[t.name for t in left]} running: close every PSClient it opens"


@pytest.fixture
def router():
    return standins.Router()


@pytest.fixture
def clock():
    return standins.Clock()


@pytest.fixture
def replies():
    return standins.Replies()


@pytest.fixture
def rng():
    return numpy.random.default_rng(20240)
