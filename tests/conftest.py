"""Fixtures shared by the unit tests of the server's and the client's parts (the stand-ins
themselves are in tests/standins.py)."""
import numpy
import pytest

from tests import standins


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
