"""Every command of README.md and docs/*.md runs as written, and draws the figures the docs show.

The docs hold their commands in ```` ```bash ```` blocks (and ```` ```python ```` ones). This
test runs the blocks of each file in order, as a reader would, in a copy of the
repository (so the committed figures and ``runs/`` are left alone), with every console
script of setup.cfg (``ps-local``, ``ps-plot``, ``ps-launch``, ...) and ``python``
pointing at this checkout's code. A block fails the test if any of its commands exits
non-zero (``bash -e -o pipefail``). ``pip`` is a stand-in that installs nothing: it
accepts ``pip install -e .`` and ``-e ".[extra,...]"`` when every extra exists in
setup.cfg (the checkout is already on PYTHONPATH), and refuses anything else.

An HTML comment just before a block (invisible on GitHub) adapts it to the test; items
are separated by ``;``:

    <!-- test: --steps 300 => --steps 20 -->     replace text in the block (fewer steps);
                                                 {port} in the new text is a free TCP port
    <!-- test: needs transformers torch -->      skipped unless these modules import; also
                                                 ``needs root``, ``needs gpu`` (CuPy and a
                                                 device), ``needs cmd:NAME`` (on PATH)
    <!-- test: skip: REASON -->                  never run here, for the reason given (a real
                                                 cluster, a command that never ends); last
    <!-- test: parallel -->                      each line is its own process, all started
                                                 at once (the docs' "in four terminals")
    <!-- test: finally: COMMAND -->              run after the file's blocks, whatever
                                                 happened (tear down what the block set up)

A block skipped for want of root, a GPU or a module makes the file's test skip, naming
it, after the other blocks ran; a ``skip:`` block is a decision written in the doc, and
the file's test passes on the blocks that ran (``test_what_the_docs_test_covers`` lists
them all). Blocks that need root also hold a lock shared with tests/clusterenv.py, since
the namespace hosts and the local Slurm are one per machine.

Figures: every figure a file under docs/ shows (``![...](img/X.png)``) must have been drawn
by that file's blocks (the copy's ``docs/img`` starts empty); README.md may show figures
drawn by a doc; every committed figure is shown by some doc.
"""
import configparser
import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clusterenv import cluster_lock

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*test:(.*?)-->", re.S)
FENCE = re.compile(r"^```(bash|python)\s*$")


def blocks(text: str) -> list[dict]:
    """The ```bash and ```python blocks of a markdown text, each with its test markers applied."""
    out, pending, lines, i = [], [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.search(line)
        fence = FENCE.match(line.strip())
        if m:
            pending.append(m.group(1).strip())
        elif fence:
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            block = {"lang": fence.group(1), "line": i + 1, "needs": [], "skip": None, "parallel": False,
                     "finally": []}
            code = "\n".join(lines[i + 1:j])
            for marker in pending:
                marker, _, reason = marker.partition("skip:")     # a reason may hold anything: it comes last
                items = marker.split(";") + (["skip:" + reason] if _ else [])
                for item in filter(None, (x.strip() for x in items)):
                    if item.startswith("needs "):
                        block["needs"] += item.split()[1:]
                    elif item.startswith("skip:"):
                        block["skip"] = item[5:].strip()
                        assert block["skip"], "a skip marker names its reason: <!-- test: skip: REASON -->"
                    elif item == "parallel":
                        block["parallel"] = True
                    elif item.startswith("finally:"):
                        block["finally"].append(item[8:].strip())
                    else:
                        old, sep, new = item.partition("=>")
                        assert sep, (f"test marker {item!r}: expected 'OLD => NEW', 'needs ...', 'skip: REASON', "
                                     "'parallel' or 'finally: COMMAND'")
                        assert old.strip() in code, f"test marker: {old.strip()!r} is not in the block:\n{code}"
                        code = code.replace(old.strip(), new.strip())
            block["code"] = code
            out.append(block)
            pending, i = [], j
        elif line.strip() and not line.startswith("<!--"):
            pending = []                       # a marker applies to the block right after it
        i += 1
    return out


def figures(text: str) -> list[str]:
    """The PNGs a markdown text shows, as written (``img/a.png``, ``docs/img/a.png``)."""
    return re.findall(r"!\[[^\]]*\]\(((?:docs/)?img/[^)]+\.png)\)", text)


def doc_files() -> list[Path]:
    """README.md and every doc with a command, and every lesson (with commands or a status line)."""
    docs = sorted((ROOT / "docs").glob("*.md"))
    return [ROOT / "README.md"] + [d for d in docs if blocks(d.read_text()) or d.name.startswith("lesson")]


FILES = doc_files()


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip().split(":")[0] for name, target in (ln.split("=") for ln in lines)}


PIP = '''#!{python}
"""pip, as the docs test sees it: `pip install -e .` or -e ".[extras]" with known extras; nothing installed."""
import configparser, re, sys
args = sys.argv[1:]
cfg = configparser.ConfigParser(); cfg.read("setup.cfg")
known = set(cfg["options.extras_require"])
m = re.fullmatch(r"\\.(?:\\[([\\w,-]+)\\])?", args[2]) if len(args) == 3 and args[:2] == ["install", "-e"] else None
if not m:
    sys.exit(f"pip (docs test): installs nothing; `pip {{' '.join(args)}}` needs a test marker in the doc")
unknown = set(filter(None, (m.group(1) or "").split(","))) - known
if unknown:
    sys.exit(f"pip (docs test): setup.cfg has no extra {{sorted(unknown)}} (it has {{sorted(known)}})")
print(f"pip (docs test): `pip {{' '.join(args)}}` is valid; the checkout is on PYTHONPATH")
'''


def repo_copy(dest: Path) -> Path:
    for name in ("common", "worker", "paramserver", "scripts", "docs", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "img"))
    for name in ("README.md", "setup.cfg", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    (dest / "docs" / "img").mkdir()
    bin_dir = dest / ".bin"
    bin_dir.mkdir()
    for cmd, module in list(console_scripts().items()) + [("python", None), ("python3", None)]:
        shim = bin_dir / cmd
        run = f'"{sys.executable}"' + (f" -m {module}" if module else "")
        shim.write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        shim.chmod(0o755)
    (bin_dir / "pip").write_text(PIP.format(python=sys.executable))
    (bin_dir / "pip").chmod(0o755)
    return dest


def missing(needs: list[str]) -> list[str]:
    """What of a block's ``needs`` this machine lacks."""
    out = []
    for need in needs:
        if need == "root":
            ok = os.geteuid() == 0
        elif need == "gpu":
            ok = importlib.util.find_spec("cupy") is not None and _gpu_count() > 0
        elif need.startswith("cmd:"):
            ok = shutil.which(need[4:]) is not None
        else:
            ok = importlib.util.find_spec(need) is not None
        if not ok:
            out.append(need)
    return out


def _gpu_count() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:                          # no driver, no device: CuPy raises its own errors
        return 0


def run_block(block: dict, work: Path, env: dict) -> None:
    code = block["code"]
    if "{port}" in code:
        from common.wire.transport import free_port
        code = code.replace("{port}", str(free_port()))
    if block["lang"] == "python":
        cmds = [[str(work / ".bin" / "python"), "-c", code]]
    elif block["parallel"]:
        cmds = [["bash", "-e", "-o", "pipefail", "-c", ln] for ln in code.splitlines() if ln.strip()
                and not ln.lstrip().startswith("#")]
    else:
        cmds = [["bash", "-e", "-o", "pipefail", "-c", code]]
    logs = [(work / f".block-{block['line']}-{i}.out", work / f".block-{block['line']}-{i}.err")
            for i in range(len(cmds))]                 # files, not pipes: parallel processes never block on a full pipe
    procs = []
    try:
        for c, (out, err) in zip(cmds, logs):
            with open(out, "w") as o, open(err, "w") as e:
                procs.append(subprocess.Popen(c, cwd=work, env=env, stdout=o, stderr=e, text=True,
                                              start_new_session=True))
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:                        # a failed or hung block leaves nothing running
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    for p, c, (out, err) in zip(procs, cmds, logs):
        assert p.returncode == 0, (f"the block at line {block['line']} failed (exit {p.returncode}):\n{c[-1]}\n"
                                   f"--- stdout\n{out.read_text()[-3000:]}\n--- stderr\n{err.read_text()[-3000:]}")


def test_the_markers_are_read():
    text = ("intro\n<!-- test: --steps 300 => --steps 2; needs numpy -->\n```bash\nps-train --steps 300\n```\n"
            "```bash\necho hi\n```\n<!-- test: skip: needs hosts node1..3 -->\n```bash\nssh node1\n```\n"
            "<!-- test: parallel; finally: echo bye; :5700 => :{port} -->\n```python\nprint(':5700')\n```\n"
            "<!-- test: needs root; skip: a; b -->\n```bash\nx\n```\n")
    got = blocks(text)
    assert [b["code"] for b in got] == ["ps-train --steps 2", "echo hi", "ssh node1", "print(':{port}')", "x"]
    assert got[4]["skip"] == "a; b" and got[4]["needs"] == ["root"]
    assert got[0]["needs"] == ["numpy"] and got[1]["needs"] == [] and got[1]["skip"] is None
    assert got[2]["skip"] == "needs hosts node1..3"
    assert got[3]["parallel"] and got[3]["finally"] == ["echo bye"] and got[3]["lang"] == "python"
    assert figures("see ![the loss](img/a.png) and ![x](docs/img/b.png)") == ["img/a.png", "docs/img/b.png"]
    with pytest.raises(AssertionError, match="not in the block"):
        blocks("<!-- test: --steps 9 => --steps 1 -->\n```bash\nps-train\n```\n")
    with pytest.raises(AssertionError, match="names its reason"):
        blocks("<!-- test: skip: -->\n```bash\nps-train\n```\n")
    assert missing(["numpy", "cmd:sh", "no_such_module_here", "cmd:no-such-command-here"]) == [
        "no_such_module_here", "cmd:no-such-command-here"]


def test_a_block_fails_when_any_of_its_commands_fails(tmp_path):
    env = dict(os.environ)
    run_block({"lang": "bash", "line": 1, "parallel": True, "code": "sleep 0.2\necho {port} > p.txt"}, tmp_path, env)
    assert int((tmp_path / "p.txt").read_text()) > 0                     # {port}: a free port
    for bad in ({"lang": "bash", "line": 2, "parallel": True, "code": "sleep 0.2\nfalse"},
                {"lang": "bash", "line": 3, "parallel": False, "code": "false\ntrue"},
                {"lang": "bash", "line": 4, "parallel": False, "code": "false | true"}):
        with pytest.raises(AssertionError, match=f"line {bad['line']} failed"):
            run_block(bad, tmp_path, env)


def test_the_pip_stand_in_checks_extras_and_installs_nothing(tmp_path):
    work = repo_copy(tmp_path / "repo")
    pip = str(work / ".bin" / "pip")
    ok = subprocess.run([pip, "install", "-e", ".[plots,test]"], cwd=work, capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    for args, why in [(["install", "-e", ".[plot]"], "no extra ['plot']"), (["install", "cupy"], "installs nothing")]:
        bad = subprocess.run([pip, *args], cwd=work, capture_output=True, text=True)
        assert bad.returncode != 0 and why in bad.stderr


def test_every_figure_is_committed_and_shown():
    shown = {f: [] for f in (p.name for p in (ROOT / "docs" / "img").glob("*.png"))}
    for doc in FILES:
        for fig in figures(doc.read_text()):
            path = (doc.parent / fig).resolve()
            assert path.exists(), f"{doc.name} shows {fig}, which is not committed"
            shown.setdefault(path.name, []).append(doc)
    assert not [f for f, docs in shown.items() if not docs], "committed figures no doc shows"
    for fig, docs in shown.items():
        if any(d.name == "README.md" for d in docs):
            assert any(d.parent.name == "docs" for d in docs), f"README shows {fig}, which no doc under docs/ draws"


def test_what_the_docs_test_covers():
    """Every block of every doc is run, or its file says why not. Printed with ``pytest -s``."""
    lines, ran, skipped = [], 0, 0
    for doc in FILES:
        for b in blocks(doc.read_text()):
            why = b["skip"] or (f"needs {' '.join(b['needs'])}" if b["needs"] else "")
            ran, skipped = ran + (not b["skip"]), skipped + bool(b["skip"])
            lines.append(f"{doc.relative_to(ROOT)}:{b['line']}: {'SKIP ' + why if b['skip'] else 'run ' + why}")
    print("\n".join(lines) + f"\n{ran} blocks run (some only with root, a GPU or a module), {skipped} never run here")
    never = [ln for ln in lines if ln.startswith("docs/lesson") and " SKIP " in ln]
    assert not never, f"every command of the course runs (root or a GPU aside): {never}"


@pytest.mark.parametrize("doc", FILES, ids=[f.name for f in FILES])
def test_every_command_of_the_doc_runs(doc, tmp_path):
    text = doc.read_text()
    todo = blocks(text)
    status = re.search(r"^\*\*Status\*\*:(.*?)\n\n", text, re.M | re.S)     # the status paragraph
    if not todo:                               # a lesson whose feature has not landed says so
        assert status and "issue" in status.group(1), f"{doc.name}: no command and no status line"
        return
    work = repo_copy(tmp_path / "repo")
    env = dict(os.environ, PATH=f"{work / '.bin'}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(work),
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env_skipped, decided, teardown = [], [], []
    lock = cluster_lock() if any("root" in b["needs"] for b in todo) else contextlib.nullcontext()
    if any("root" in b["needs"] for b in todo):
        env["PS_CLUSTER_LOCK_HELD"] = "1"          # a script that takes the lock itself must not wait for ours
    with lock:
        try:
            for block in todo:
                if block["skip"]:
                    decided.append(f"line {block['line']} ({block['skip']})")
                    continue
                lacking = missing(block["needs"])
                if lacking:
                    env_skipped.append(f"line {block['line']} needs {' '.join(lacking)}")
                    continue
                teardown += block["finally"]
                run_block(block, work, env)
        finally:
            for cmd in teardown:
                subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, timeout=300)
    drawn_here = doc.parent.name == "docs"
    for fig in figures(text) if drawn_here else []:
        assert (doc.parent / fig).exists(), f"{doc.name} shows {fig}, which is not committed"
        assert (work / "docs" / fig).exists() or env_skipped, f"{doc.name}: no command drew {fig}"
    if env_skipped:
        pytest.skip(f"{doc.name}: ran the other blocks; skipped {'; '.join(env_skipped)}")
