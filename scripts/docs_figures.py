"""The numbers the lessons quote, checked against what their commands print today.

    python scripts/docs_figures.py                      # every lesson (as long as the lessons take)
    python scripts/docs_figures.py --lesson 4           # one lesson
    python scripts/docs_figures.py --lesson 4 --keep /tmp/figs     # keep the run (outputs, runs/)
    python scripts/docs_figures.py --lesson 4 --from /tmp/figs     # check again without running
    python scripts/docs_figures.py --lesson 4 --update  # write today's values into the stale quotes

It runs a lesson's command blocks as a reader would, at the sizes the lesson states (the
docs test, tests/test_docs.py, runs them at a few steps; only its ``{port}`` substitutions
and its ``needs``/``skip``/``parallel``/``finally`` markers are kept here), in a copy of the
repository, then reads every number the lesson marks as quoted and prints it beside
today's, with the relative difference and a verdict. Exit status 1 if any is stale.
``--update`` rewrites each stale quote with today's value (at the quote's precision; every
marked number of an output listing that holds a stale one, so a listing shows one run) and
copies the figures the lesson drew into docs/img, so numbers and figures come from one
run. It is not in CI: the lessons take minutes each.

THE MARKERS (HTML comments: invisible when the Markdown is rendered)

1. After a number in prose or in a table cell (the quoted value is the last number
   before the comment on its line)::

       a step takes 12.3 ms<!-- figure time /(\\S+) ms a step on free links/ -->
       | 2.484<!-- figure loss jsonl runs/lesson1-sgd/metrics.jsonl val_loss step=300 --> |

2. On the line before an output listing (a fence without a language), one item a line;
   each regex is applied to the listing (the quoted value) and to today's output::

       <!-- figures
       exact /P = ([\\d,]+) float32/
       order /max difference (\\S+)/
       -->

3. On the line before an output listing (or before another marker of it), a kind for
   every number of a row::

       <!-- figures rows: key time loss exact - ratio | key time loss -->

   Each line of the listing with exactly as many numbers as one of the kinds lists (the
   first that fits, lists separated by ``|``) is a row; it is compared
   with the line of today's output that has the same key (its words that are not
   numbers, and the numbers marked ``key``); ``-`` leaves a number unchecked. A number is
   a whitespace-separated word such as ``1,465,728``, ``2.3e-10``, ``100%``, ``(256,``.

Where today's value comes from (SOURCE):
- ``/REGEX/``: group 1 of the first match in the lesson's output (stdout, then stderr, of
  its blocks in order);
- ``jsonl PATH FIELD [KEY=VALUE]``: FIELD of the last record of the JSON-lines file PATH
  (relative to the repository copy the lesson ran in) that has FIELD (and KEY = VALUE).

KINDS and their tolerance (today against the quote):
- ``exact``: today's value written at the quote's precision is the quote: identities,
  sizes, byte counts, what a fixed seed determines;
- ``loss``: within 3%: losses of seeded runs (float32 rounding, and in ASP/SSP the timing,
  move the last digits);
- ``ratio``: within 30%: shares, ratios and counts that depend on timing;
- ``time``: within a factor of 2: times and rates (the development machine's 2 cores are
  shared: times move by tens of percent from run to run);
- ``order``: within a factor of 10: rounding errors and finite-difference errors.
"""
import argparse
import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUMBER = re.compile(r"[-+]?\d(?:[\d,]*\d)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
TOKEN_EDGES = "([{:;,)]}%x"                   # stripped from a word before it is read as a number
INLINE = re.compile(r"<!--\s*figure\s+(\w+)\s+(.*?)\s*-->")
LISTING = re.compile(r"^<!--\s*figures(\s+rows:)?(.*?)-->\s*$", re.S)
FACTOR = {"time": 2.0, "order": 10.0}
RELATIVE = {"loss": 0.03, "ratio": 0.30}
KINDS = {"exact", *FACTOR, *RELATIVE}


@dataclass
class Figure:
    """One quoted number: where it is, its kind, the quoted text and today's value."""
    line: int                                  # 1-based line of the lesson
    kind: str
    what: str                                  # the source, or the row's key
    quoted: str                                # the number as the lesson writes it
    today: float | None = None
    error: str = ""                            # why today's value could not be read
    span: tuple[int, int] | None = None        # the quoted text's character span in the lesson
    aligned: bool = False                      # in an output listing: a rewrite keeps the columns


def to_float(text: str) -> float:
    return float(text.replace(",", ""))


def decimals(text: str) -> int:
    mantissa = text.lower().split("e")[0]
    return len(mantissa.split(".")[1]) if "." in mantissa else 0


def formatted(value: float, like: str) -> str:
    """``value`` written the way the quote ``like`` is: its decimals, exponent and commas."""
    if "e" in like.lower():
        out = f"{value:.{decimals(like)}e}"                 # Python writes 2.4e-07
        mantissa, exp = out.split("e")
        quoted_exp = like.lower().split("e")[1]
        sign = "-" if exp.startswith("-") else ("+" if quoted_exp.startswith("+") else "")
        digits = exp.lstrip("+-")
        if len(quoted_exp.lstrip("+-")) < len(digits):    # the quote writes 1e-5: no leading zero
            digits = digits.lstrip("0") or "0"
        return f"{mantissa}e{sign}{digits}"
    out = f"{value:,.{decimals(like)}f}" if "," in like else f"{value:.{decimals(like)}f}"
    return ("+" + out) if like.startswith("+") and value >= 0 else out


def verdict(kind: str, quoted: str, today: float) -> tuple[float, bool]:
    """(relative difference of today against the quote, within the kind's tolerance?)."""
    q = to_float(quoted)
    rel = 0.0 if today == q else (abs(today - q) / abs(q) if q else float("inf"))
    if kind == "exact":
        return rel, formatted(today, quoted).lstrip("+") == formatted(q, quoted).lstrip("+")
    if kind in FACTOR:
        if q == 0 or today == 0:
            return rel, q == today
        return rel, max(today / q, q / today) <= FACTOR[kind] and (today > 0) == (q > 0)
    return rel, rel <= RELATIVE[kind]


def check_kind(kind: str, where: str) -> str:
    if kind not in KINDS and kind not in ("key", "-"):
        raise ValueError(f"{where}: unknown kind {kind!r}; the kinds are {sorted(KINDS)}, and in rows 'key' and '-'")
    return kind


# --- reading the markers -----------------------------------------------------------------

def words(line: str) -> list[tuple[str, int, int, bool]]:
    """(text, start, end, is a number) for each word of a line; a number's span excludes its edges."""
    out = []
    for m in re.finditer(r"\S+", line):
        core = m.group().strip(TOKEN_EDGES) if not NUMBER.fullmatch(m.group()) else m.group()
        lead = m.group().find(core) if core else 0
        is_num = bool(core) and bool(NUMBER.fullmatch(core))
        out.append((core if is_num else m.group(), m.start() + lead, m.start() + lead + len(core), is_num))
    return out


def row_key(line: str, kinds: list[str]) -> tuple | None:
    """A row's key and its numbers ([(text, start, end)]), or None if it has not len(kinds) numbers."""
    ws = words(line)
    nums = [w for w in ws if w[3]]
    if len(nums) != len(kinds):
        return None
    key = [w[0] for w in ws if not w[3]] + [n[0] for n, k in zip(nums, kinds) if k == "key"]
    return tuple(key), [n[:3] for n in nums]


def listing_after(lines: list[str], i: int) -> tuple[int, int]:
    """The first and one-past-last line of the output listing that starts on line i (a bare fence)."""
    if i >= len(lines) or lines[i].strip() != "```":
        raise ValueError(f"line {i + 1}: a 'figures' marker must stand right before an output listing (```)")
    j = i + 1
    while lines[j].strip() != "```":
        j += 1
    return i + 1, j


def read_markers(text: str) -> list[dict]:
    """Every marker of a lesson, in order: dicts with ``line``, ``kind`` and either
    ``source`` + ``quoted``/``span`` (inline), ``regex`` + listing lines, or ``rows``."""
    lines, out, offsets = text.splitlines(keepends=True), [], [0]
    for ln in lines:
        offsets.append(offsets[-1] + len(ln))
    i = 0
    while i < len(lines):
        line = lines[i]
        for m in INLINE.finditer(line):
            blank = re.sub(r"<!--.*?-->", lambda c: " " * len(c.group()), line[:m.start()], flags=re.S)
            before = list(NUMBER.finditer(blank))
            if not before:
                raise ValueError(f"line {i + 1}: no number before the marker {m.group()!r}")
            q = before[-1]
            start = q.start()
            out.append({"line": i + 1, "kind": check_kind(m.group(1), f"line {i + 1}"), "source": m.group(2),
                        "quoted": q.group(), "span": (offsets[i] + start, offsets[i] + start + len(q.group()))})
        if line.lstrip().startswith("<!--") and re.match(r"<!--\s*figures\b", line.lstrip()):
            j = i
            while "-->" not in lines[j]:
                j += 1
            m = LISTING.match("".join(lines[i:j + 1]).strip())
            k = j + 1
            while k < len(lines) and lines[k].lstrip().startswith("<!--"):     # more markers for the same listing
                while "-->" not in lines[k]:
                    k += 1
                k += 1
            first, end = listing_after(lines, k)
            body = [(offsets[k], lines[k]) for k in range(first, end)]
            if m.group(1):
                kinds = [[check_kind(k, f"line {i + 1}") for k in alt.split()] for alt in m.group(2).split("|")]
                out.append({"line": i + 1, "rows": kinds, "listing": body})
            else:
                for item in filter(None, (x.strip() for x in m.group(2).splitlines())):
                    kind, _, regex = item.partition(" ")
                    out.append({"line": i + 1, "kind": check_kind(kind, f"line {i + 1}"),
                                "regex": _regex(regex.strip(), i + 1), "listing": body})
            i = j
        i += 1
    return out


def _regex(text: str, line: int) -> re.Pattern:
    if len(text) < 2 or text[0] != "/" or text[-1] != "/":
        raise ValueError(f"line {line}: expected /REGEX/ with one group, got {text!r}")
    pattern = re.compile(text[1:-1])
    if pattern.groups != 1:
        raise ValueError(f"line {line}: the regex {text} must have exactly one group (the number)")
    return pattern


# --- today's values ------------------------------------------------------------------------

def from_source(source: str, output: str, work: Path, line: int) -> float:
    """Today's value of an inline marker's SOURCE (see the module's docstring)."""
    if source.startswith("/"):
        m = _regex(source, line).search(output)
        if not m:
            raise LookupError(f"{source} is not in today's output")
        if not NUMBER.fullmatch(m.group(1)):
            raise LookupError(f"{source} found {m.group(1)!r} in today's output, not a number")
        return to_float(m.group(1))
    parts = source.split()
    if parts[0] == "jsonl" and len(parts) in (3, 4):
        path, field = work / parts[1], parts[2]
        key, _, want = (parts[3] if len(parts) == 4 else "").partition("=")
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        hits = [r for r in records if field in r and (not key or str(r.get(key)) == want)]
        if not hits:
            raise LookupError(f"{parts[1]} has no record with {field}" + (f" and {key}={want}" if key else ""))
        return float(hits[-1][field])
    raise ValueError(f"line {line}: unknown source {source!r} (expected /REGEX/ or 'jsonl PATH FIELD [KEY=VALUE]')")


def figures(text: str, output: str, work: Path) -> list[Figure]:
    """Every quoted number of a lesson with today's value (or why there is none)."""
    out = []
    for mk in read_markers(text):
        if "rows" in mk:
            out += _rows(mk, output)
            continue
        if "regex" in mk:
            listing = "".join(ln for _, ln in mk["listing"])
            q = mk["regex"].search(listing)
            if not q:
                raise ValueError(f"line {mk['line']}: /{mk['regex'].pattern}/ is not in the listing below it")
            at = _listing_offset(mk["listing"], q.start(1))
            fig = Figure(mk["line"], mk["kind"], f"/{mk['regex'].pattern}/", q.group(1),
                         span=(at, at + len(q.group(1))), aligned=True)
            source = f"/{mk['regex'].pattern}/"
        else:
            fig = Figure(mk["line"], mk["kind"], mk["source"], mk["quoted"], span=mk["span"])
            source = mk["source"]
        try:
            fig.today = from_source(source, output, work, mk["line"])
        except (LookupError, OSError, json.JSONDecodeError) as e:
            fig.error = str(e)
        out.append(fig)
    return out


def _listing_offset(listing: list[tuple[int, str]], char: int) -> int:
    for start, ln in listing:
        if char < len(ln):
            return start + char
        char -= len(ln)
    raise ValueError("offset past the listing")


def _rows(mk: dict, output: str) -> list[Figure]:
    """The figures of a ``rows`` marker: each row of the listing against today's row of the same key."""
    def parse(line):                            # (key, numbers, kinds) by the first kinds list that fits
        for kinds in mk["rows"]:
            got = row_key(line, kinds)
            if got:
                return got[0], got[1], kinds
        return None
    today = {}
    for ln in output.splitlines():
        got = parse(ln)
        if got and got[0] not in today:
            today[got[0]] = got[1]
    out = []
    for start, ln in mk["listing"]:
        got = parse(ln)
        if not got:
            continue
        key, nums, kinds = got
        for kind, (text, b, e), now in zip(kinds, nums, today.get(key) or [None] * len(kinds)):
            if kind in ("key", "-"):
                continue
            fig = Figure(mk["line"], kind, " ".join(key), text, span=(start + b, start + e), aligned=True)
            if now is None:
                fig.error = "no line of today's output has this row's key"
            else:
                fig.today = to_float(now[0])
            out.append(fig)
    return out


# --- running a lesson ----------------------------------------------------------------------

def at_stated_sizes(text: str) -> str:
    """The lesson with the docs test's ``OLD => NEW`` substitutions dropped, except those that
    only put a free port in ({port}): the commands run as the lesson writes them."""
    from tests.test_docs import MARKER

    def keep(m):
        items, _, reason = m.group(1).partition("skip:")
        kept = [x for x in items.split(";") if "=>" not in x or "{port}" in x.partition("=>")[2]]
        return "<!-- test:" + ";".join(kept) + (f"skip:{reason}" if _ else "") + "-->"
    return MARKER.sub(keep, text)


def run_lesson(doc: Path, work: Path) -> str:
    """Runs the lesson's blocks in a fresh copy ``work`` of the repository; returns and saves
    (``work/.output.txt``) their output: every block's stdout in order, then every stderr.
    A block that fails is reported and ends the run: the numbers of the blocks that ran are
    still checked, the others' are MISSING."""
    import os
    from tests import test_docs as dt
    from tests.clusterenv import cluster_lock
    todo = dt.blocks(at_stated_sizes(doc.read_text()))
    dt.repo_copy(work)
    env = dict(os.environ, PATH=f"{work / '.bin'}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(work),
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    lock = cluster_lock() if any("root" in b["needs"] for b in todo) else contextlib.nullcontext()
    if any("root" in b["needs"] for b in todo):
        env["PS_CLUSTER_LOCK_HELD"] = "1"          # as in the docs test: a script that locks must not wait for us
    teardown, ran = [], []
    with lock:
        try:
            for block in todo:
                lacking = dt.missing(block["needs"])
                if block["skip"] or lacking:
                    print(f"  line {block['line']}: not run ({block['skip'] or 'needs ' + ' '.join(lacking)})")
                    continue
                teardown += block["finally"]
                ran.append(block["line"])
                try:
                    dt.run_block(block, work, env)
                except AssertionError as failed:        # the rest may need what it did not make
                    print(f"  {doc.name}: {str(failed)[:3000]}\n  {doc.name}: its later blocks are not run")
                    break
        finally:
            for cmd in teardown:
                import subprocess
                subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, timeout=300)
    streams = [sorted(work.glob(f".block-{line}-*.{kind}")) for kind in ("out", "err") for line in ran]
    output = "".join(p.read_text() for group in streams for p in group)
    (work / ".output.txt").write_text(output)
    return output


def report(doc: Path, figs: list[Figure]) -> int:
    """Prints one line per quoted number; returns how many are stale or unread."""
    print(f"{doc.name}: {len(figs)} quoted numbers")
    print(f"  {'line':>4}  {'kind':<6} {'quoted':>12} {'today':>12} {'diff':>8}  verdict  what")
    bad = 0
    for f in figs:
        if f.today is None:
            bad += 1
            print(f"  {f.line:>4}  {f.kind:<6} {f.quoted:>12} {'-':>12} {'-':>8}  MISSING  {f.what[:50]}: {f.error}")
            continue
        rel, ok = verdict(f.kind, f.quoted, f.today)
        bad += not ok
        print(f"  {f.line:>4}  {f.kind:<6} {f.quoted:>12} {formatted(f.today, f.quoted):>12} {rel:>8.1%}  "
              f"{'ok' if ok else 'STALE':<7}  {f.what[:60]}")
    return bad


def update(doc: Path, figs: list[Figure], work: Path) -> int:
    """Writes today's value into every stale quote (and into every quote of an output listing
    that holds a stale one, so that a listing shows one run), and the lesson's figures drawn
    by the same run into docs/img; returns how many quotes changed."""
    from tests.test_docs import figures as shown
    text = doc.read_text()
    stale = [f for f in figs if f.today is not None and not verdict(f.kind, f.quoted, f.today)[1]]
    listings = {f.line for f in stale if f.aligned}            # a listing is rewritten whole: one run's numbers
    stale += [f for f in figs if f.aligned and f.line in listings and f not in stale and f.today is not None]
    for f in sorted(stale, key=lambda f: f.span[0], reverse=True):
        assert text[f.span[0]:f.span[1]] == f.quoted, (f.line, f.quoted)
        begin, new = f.span[0], formatted(f.today, f.quoted)
        if f.aligned:                          # a right-aligned column: the spaces before it give way
            pad = len(f.quoted) - len(new)
            while pad < 0 and text[begin - 2:begin] == "  ":
                begin, pad = begin - 1, pad + 1
            new = " " * max(pad, 0) + new
        text = text[:begin] + new + text[f.span[1]:]
    if stale:
        doc.write_text(text)
        for fig in shown(text):
            if (work / "docs" / fig).exists():
                shutil.copy(work / "docs" / fig, doc.parent / fig)
    return len(stale)


def lesson_files(numbers: list[int] | None) -> list[Path]:
    docs = sorted((ROOT / "docs").glob("lesson*_*.md"), key=lambda p: int(re.match(r"lesson(\d+)", p.name).group(1)))
    if not numbers:
        return docs
    chosen = [d for d in docs if int(re.match(r"lesson(\d+)", d.name).group(1)) in numbers]
    if len(chosen) != len(set(numbers)):
        raise SystemExit(f"no such lesson among {[d.name for d in docs]}")
    return chosen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The marker format and the tolerances: see the top of this file.")
    ap.add_argument("--lesson", type=int, action="append", help="only this lesson (repeatable; default: all)")
    ap.add_argument("--keep", type=Path, help="run in DIR/lessonN and keep it (outputs, runs/, figures)")
    ap.add_argument("--from", dest="source", type=Path, help="check against DIR/lessonN of an earlier --keep run")
    ap.add_argument("--update", action="store_true", help="rewrite stale quotes and copy the lesson's figures")
    args = ap.parse_args(argv)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for doc in lesson_files(args.lesson):
            work = (args.source or args.keep or Path(tmp)) / doc.stem
            if args.source:
                output = (work / ".output.txt").read_text()
            else:
                if work.exists():
                    shutil.rmtree(work)
                print(f"{doc.name}: running its commands at the sizes it states ...", flush=True)
                t0 = time.monotonic()
                output = run_lesson(doc, work)
                print(f"{doc.name}: its commands took {time.monotonic() - t0:.0f} s")
            figs = figures(doc.read_text(), output, work)
            bad += report(doc, figs)
            if args.update:
                print(f"  updated {update(doc, figs, work)} quote(s) in {doc.name}")
    print(f"{'all quoted numbers within their tolerance' if not bad else f'{bad} stale or missing'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
