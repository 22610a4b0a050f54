"""CurveZMQ: authorised processes train; a process without an authorised key, with the
wrong server key, or without CurveZMQ at all is refused and told so, well within its deadline."""
import shutil
import time

import numpy as np
import pytest

from common.wire.keys import main as ps_keys
from common.layout import Layout
from tests.cluster import Servers
from worker.client import DeadlineError, PSClient, RemoteError

LAYOUT = Layout([("w", (4,))])


@pytest.fixture
def keys(tmp_path):
    folder = tmp_path / "keys"
    assert ps_keys([str(folder)]) == 0
    return folder


def test_authorised_client_trains_over_curve(keys, tmp_path):
    with Servers(2, 1, str(tmp_path), ["--curve", keys, "--optimizer", "sgd", "--lr", "1.0"]) as servers:
        client = PSClient(servers.cluster(0, curve=str(keys)))
        client.register(LAYOUT, "float64")
        params = np.zeros(4)
        client.init(params)
        client.push_pull(np.ones(4), params, 0)
        assert params.tolist() == [-1.0] * 4
        client.done()
        client.close()
        assert servers.wait() == [0, 0]


def refused(servers, curve, timeout=20.0):
    client = PSClient(servers.cluster(0, curve=curve, timeout=timeout))
    t0 = time.monotonic()
    try:
        with pytest.raises((RemoteError, DeadlineError)) as err:
            client.register(LAYOUT, "float64")
    finally:
        client.close()
    return str(err.value), time.monotonic() - t0


def test_unauthorised_key_is_refused_and_told(keys, tmp_path):
    intruder = tmp_path / "intruder"
    intruder.mkdir()
    shutil.copy(keys / "server.key", intruder)               # knows the server, but is not authorised
    assert ps_keys([str(intruder), "--client", "client"]) == 0
    assert not (keys / "authorized" / "client.key").read_bytes() == (intruder / "client.key").read_bytes()
    with Servers(1, 1, str(tmp_path), ["--curve", keys], timeout=30.0) as servers:
        text, took = refused(servers, str(intruder))
        assert "refused this process's CurveZMQ key" in text and took < 10


def test_wrong_server_key_is_refused_and_told(keys, tmp_path):
    other = tmp_path / "other"
    assert ps_keys([str(other)]) == 0                        # a different job's keys
    with Servers(1, 1, str(tmp_path), ["--curve", keys], timeout=30.0) as servers:
        text, took = refused(servers, str(other))
        assert "another server key" in text and took < 10


def test_plain_client_gets_nothing_and_is_told(keys, tmp_path):
    with Servers(1, 1, str(tmp_path), ["--curve", keys], timeout=30.0) as servers:
        text, took = refused(servers, "")
        assert "--curve" in text and took < 10


def test_ps_keys_keeps_existing_keys_and_a_client_only_folder(keys, tmp_path):
    before = (keys / "server.key_secret").read_bytes()
    assert ps_keys([str(keys), "--client", "host7"]) == 0
    assert (keys / "server.key_secret").read_bytes() == before
    assert (keys / "authorized" / "host7.key").exists()
    client_only = tmp_path / "client_only"
    client_only.mkdir()
    shutil.copy(keys / "server.key", client_only)
    assert ps_keys([str(client_only), "--client", "w1"]) == 0
    assert (client_only / "server.key").read_bytes() == (keys / "server.key").read_bytes()
    assert not (client_only / "server.key_secret").exists()
    assert oct((keys / "client.key_secret").stat().st_mode & 0o777) == "0o600"
