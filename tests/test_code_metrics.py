"""scripts/code_metrics.py: it catches what it measures, and the tree keeps what issue 17 won.

The checker first: each measure run on a small tree written here that has the fault,
and on one that does not. Then the repository: no mixins, imports as docs/architecture.md
draws them, every import of the repository's own modules resolved in it, and a Server
of fewer than 15 attributes with no long function or private access in paramserver/.
"""
import json
import subprocess
import sys
from pathlib import Path

from scripts.code_metrics import REPO, measure

MIXIN = '''
class Joining:
    def register(self):
        return self.router.send(self.name)


class Failing:
    def stop(self):
        self.stopping = True


class Server(Joining, Failing):
    def __init__(self):
        self.router, self.name = None, "server:0"
'''

COMPOSED = '''
class Replier:
    def __init__(self, router):
        self.router = router

    def send(self, x):
        return self.router.send(x)


class Server:
    def __init__(self, router):
        self.replier = Replier(router)
'''


def tree(tmp_path, files: dict) -> Path:
    for path, text in files.items():
        p = tmp_path / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for pkg in ("common", "common/wire", "paramserver", "worker"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").touch()
    return tmp_path


def test_it_finds_mixins_and_not_composition(tmp_path):
    m = measure(tree(tmp_path / "a", {"paramserver/server.py": MIXIN}))
    assert any("Server(Joining, Failing)" in x for x in m["mixins"])
    assert any("Joining reads self.name, self.router" in x for x in m["mixins"])
    assert m["attributes"] == {"Server": 2}
    assert measure(tree(tmp_path / "b", {"paramserver/server.py": COMPOSED}))["mixins"] == []


def test_it_finds_private_access_across_modules_only(tmp_path):
    m = measure(tree(tmp_path, {
        "paramserver/a.py": "class A:\n    def __init__(self):\n        self._x = 1\n\n\ndef peek(a):\n    return a._x\n",
        "paramserver/b.py": "def peek(a):\n    return a._x + a.__class__.__name__.__len__()\n"}))
    assert m["private_access"] == ["paramserver/b.py:2 ._x"]


def test_it_finds_long_functions(tmp_path):
    body = "def f():\n" + "    x = 1\n" * 60 + "    return x\n"
    m = measure(tree(tmp_path, {"worker/long.py": body, "worker/short.py": "def g():\n    return 1\n"}))
    assert m["long_functions"] == ["worker/long.py:1 f (62 lines)"]


def test_it_finds_imports_against_the_map_and_unresolved_ones(tmp_path):
    m = measure(tree(tmp_path, {
        "worker/client.py": "import zmq\nfrom paramserver import shard\nfrom common.wire import codec\n",
        "common/wire/codec.py": "X = 1\n",
        "paramserver/shard.py": "from worker import checkpoint\n"}))
    assert sorted(m["imports_against_map"]) == ["paramserver/shard.py:1 (paramserver) imports worker.checkpoint",
                                                "worker/client.py:1 imports zmq",
                                                "worker/client.py:2 (worker) imports paramserver.shard"]
    assert m["unresolved_imports"] == ["paramserver/shard.py:1 worker.checkpoint"]


def test_the_repository_keeps_the_map_and_the_composition():
    """The command, as docs/architecture.md runs it, on this repository."""
    done = subprocess.run([sys.executable, "scripts/code_metrics.py", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout)
    assert m["mixins"] == []
    assert m["imports_against_map"] == []
    assert m["unresolved_imports"] == []
    assert m["attributes"]["Server"] < 15 and m["attributes"]["PSClient"] < 15
    assert m["long_functions"] == [] and m["private_access"] == []     # in paramserver/, worker/ and common/
