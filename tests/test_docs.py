"""Every command of the lessons runs, and draws the figures the lessons show.

The lessons (``docs/lesson*.md``), ``docs/bert.md`` and ``docs/export.md`` hold their commands in
```` ```bash ```` blocks. This test runs the blocks of each file in order, as a learner
would, in a copy of the repository (so the committed figures and ``runs/`` are left
alone), with ``ps-train``, ``ps-local`` and ``ps-plot`` pointing at this checkout's code.
A block fails the test if any of its commands exits non-zero (``bash -e``).

An HTML comment just before a block (invisible on GitHub) adapts it to the test:

    <!-- test: --steps 300 => --steps 20; --eval-interval 25 => --eval-interval 10 -->
    <!-- test: needs transformers torch -->      (skipped unless these import)

After the blocks, every figure the file shows (``![...](img/X.png)``) must have been
drawn by them: the copy's ``docs/img`` starts empty.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(ROOT.glob("docs/lesson*.md")) + [ROOT / "docs" / name for name in ("bert.md", "export.md")]
COMMANDS = {"ps-train": "worker.train", "ps-local": "common.launch_local", "ps-plot": "common.plot"}
MARKER = re.compile(r"<!--\s*test:(.*?)-->", re.S)


def blocks(text: str) -> list[dict]:
    """The ```bash blocks of a markdown text, each with the test markers just before it."""
    out, pending, lines, i = [], [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.search(line)
        if m:
            pending.append(m.group(1).strip())
        elif line.strip() == "```bash":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            subs, needs = [], []
            for marker in pending:
                for item in filter(None, (x.strip() for x in marker.split(";"))):
                    if item.startswith("needs "):
                        needs += item.split()[1:]
                    else:
                        old, sep, new = item.partition("=>")
                        assert sep, f"test marker {item!r}: expected 'OLD => NEW' or 'needs MODULE ...'"
                        subs.append((old.strip(), new.strip()))
            code = "\n".join(lines[i + 1:j])
            for old, new in subs:
                assert old in code, f"test marker: {old!r} is not in the block:\n{code}"
                code = code.replace(old, new)
            out.append({"code": code, "needs": needs, "line": i + 1})
            pending, i = [], j
        elif line.strip() and not line.startswith("<!--"):
            pending = []                       # a marker applies to the block right after it
        i += 1
    return out


def figures(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\((img/[^)]+\.png)\)", text)


def repo_copy(dest: Path) -> Path:
    for name in ("common", "worker", "paramserver", "scripts", "docs"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "img"))
    (dest / "docs" / "img").mkdir()
    bin_dir = dest / ".bin"
    bin_dir.mkdir()
    for cmd, module in list(COMMANDS.items()) + [("python", None)]:
        shim = bin_dir / cmd
        run = f'"{sys.executable}"' + (f" -m {module}" if module else "")
        shim.write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        shim.chmod(0o755)
    return dest


def test_the_markers_are_read():
    text = "intro\n<!-- test: --steps 300 => --steps 2; needs numpy -->\n```bash\nps-train --steps 300\n```\n" \
           "```bash\necho hi\n```\n"
    got = blocks(text)
    assert [b["code"] for b in got] == ["ps-train --steps 2", "echo hi"]
    assert got[0]["needs"] == ["numpy"] and got[1]["needs"] == []
    assert figures("see ![the loss](img/a.png) and ![x](img/b.png)") == ["img/a.png", "img/b.png"]


@pytest.mark.parametrize("doc", FILES, ids=[f.name for f in FILES])
def test_every_command_of_the_lesson_runs(doc, tmp_path):
    text = doc.read_text()
    todo = blocks(text)
    status = re.search(r"^\*\*Status\*\*:(.*?)\n\n", text, re.M | re.S)     # the status paragraph
    if not todo:                               # a lesson whose feature has not landed says so
        assert status and "issue" in status.group(1), f"{doc.name}: no command and no status line"
        return
    work = repo_copy(tmp_path / "repo")
    env = dict(os.environ, PATH=f"{work / '.bin'}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(work),
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    skipped = []
    for block in todo:
        missing = [m for m in block["needs"] if importlib.util.find_spec(m) is None]
        if missing:
            skipped.append(f"line {block['line']} needs {missing}")
            continue
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block["code"]], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (f"{doc.name}, the block at line {block['line']} failed "
                                      f"(exit {done.returncode}):\n{block['code']}\n--- stdout\n"
                                      f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
    for fig in figures(text):
        assert (ROOT / "docs" / fig).exists(), f"{doc.name} shows {fig}, which is not committed"
        assert (work / "docs" / fig).exists() or skipped, f"{doc.name}: no command drew {fig}"
    if skipped:
        pytest.skip(f"{doc.name}: ran the other blocks; skipped {'; '.join(skipped)}")
