"""scripts/docs_figures.py reads the quoted numbers the lessons mark, and catches a stale one.

The script itself reruns the lessons (minutes each) and is not run here; these tests give
its reader and its verdicts a made-up lesson and made-up output.
"""
import json

import pytest

from scripts.docs_figures import (at_stated_sizes, figures, formatted, read_markers, report, update, verdict,
                                  lesson_files, ROOT)

LESSON = """# Lesson 0
On free links a step takes 12.3 ms<!-- figure time /(\\S+) ms a step on free links/ -->, and
the loss ends at 2.484<!-- figure loss jsonl runs/x/metrics.jsonl val_loss step=300 -->.

<!-- test: --steps 300 => --steps 20; :5700 => :{port} -->
```bash
ps-train --steps 300 --port :5700
```

<!-- figures
exact /P = ([\\d,]+) float32/
order /max difference (\\S+)/
-->
```
P = 366,432 float32; max difference 8.3e-12
```

<!-- figures rows: time loss exact ratio -->
```
run         mode      wall s  val loss  updates  stale 0
fixed-bsp   bsp         13.2     2.307      200     100%
fixed-asp   asp          6.8     2.399      600      11%
```
"""

TODAY = """a worker pushes 87,936 bytes; 18.1 ms a step on free links
P = 366,432 float32; max difference 2.1e-11
run         mode      wall s  val loss  updates  stale 0
fixed-asp   asp          9.0     2.401      600      13%
fixed-bsp   bsp         25.0     2.307      201     100%
"""


def made_up_run(tmp_path, last_loss=2.49):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    records = [{"step": 0, "val_loss": 5.28}, {"step": 300, "val_loss": last_loss}, {"step": 300, "loss": 9.0}]
    (tmp_path / "runs" / "x" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_every_marker_kind_is_read_with_the_quoted_text_and_todays_value(tmp_path):
    figs = figures(LESSON, TODAY, made_up_run(tmp_path))
    got = [(f.kind, f.quoted, f.today) for f in figs]
    assert got == [("time", "12.3", 18.1), ("loss", "2.484", 2.49), ("exact", "366,432", 366432.0),
                   ("order", "8.3e-12", 2.1e-11),
                   ("time", "13.2", 25.0), ("loss", "2.307", 2.307), ("exact", "200", 201.0), ("ratio", "100", 100.0),
                   ("time", "6.8", 9.0), ("loss", "2.399", 2.401), ("exact", "600", 600.0), ("ratio", "11", 13.0)]
    for f in figs:                                     # each span is the quoted text itself, in the lesson
        assert LESSON[f.span[0]:f.span[1]] == f.quoted


def test_a_stale_number_is_caught_and_rewritten_with_the_rest_of_its_listing(tmp_path, capsys):
    work = made_up_run(tmp_path / "run", last_loss=2.9)               # the loss moved by 17%: stale
    figs = figures(LESSON, TODAY, work)
    verdicts = {(f.line, f.quoted): verdict(f.kind, f.quoted, f.today)[1] for f in figs}
    assert [q for (_, q), ok in verdicts.items() if not ok] == ["2.484", "200"]  # 25.0 against 13.2 is within 2x
    doc = tmp_path / "lesson0_x.md"
    doc.write_text(LESSON)
    assert report(doc, figs) == 2 and "STALE" in capsys.readouterr().out
    assert update(doc, figs, work) == 1 + 8        # the stale prose number; its listing's 8 numbers (one run)
    new = doc.read_text()
    assert "the loss ends at 2.900<!--" in new and "a step takes 12.3 ms<!--" in new     # 12.3 was within 2x
    assert "fixed-bsp   bsp         25.0     2.307      201     100%" in new
    assert "fixed-asp   asp          9.0     2.401      600      13%" in new
    assert "P = 366,432 float32; max difference 8.3e-12" in new                 # its listing had none stale
    assert report(doc, figures(new, TODAY, work)) == 0
    figs = figures(new, TODAY, work)
    figs[4].today = 1013.2                         # a wider number in a listing keeps the columns
    assert update(doc, figs[4:5], work) == 1
    assert "fixed-bsp   bsp       1013.2     2.307      201" in doc.read_text()


def test_the_tolerances_per_kind():
    assert verdict("exact", "1,465,728", 1465728.0) == (0.0, True)
    assert not verdict("exact", "1,465,728", 1465729.0)[1]
    assert verdict("exact", "7.8e-16", 7.83e-16)[1] and not verdict("exact", "7.8e-16", 7.9e-16)[1]
    assert verdict("exact", "2.307", 2.30749)[1] and not verdict("exact", "2.307", 2.3076)[1]
    assert verdict("loss", "2.307", 2.37)[1] and not verdict("loss", "2.307", 2.40)[1]
    assert verdict("time", "12.3", 24.0)[1] and verdict("time", "12.3", 6.2)[1]
    assert not verdict("time", "12.3", 25.0)[1] and not verdict("time", "12.3", 6.0)[1]
    assert verdict("ratio", "100", 75.0)[1] and not verdict("ratio", "100", 65.0)[1]
    assert verdict("order", "8.3e-12", 5e-11)[1] and not verdict("order", "8.3e-12", 1e-10)[1]
    assert verdict("exact", "0", 0.0)[1] and not verdict("loss", "0", 0.1)[1]
    assert formatted(2.9, "2.484") == "2.900" and formatted(1465729, "1,465,728") == "1,465,729"
    assert formatted(2.1e-11, "8.3e-12") == "2.1e-11" and formatted(2.0, "+1.5") == "+2.0"
    assert formatted(2.4e-7, "1.2e-07") == "2.4e-07" and formatted(2e-5, "1e-6") == "2e-5"


def test_a_bad_marker_is_an_error_that_says_where():
    with pytest.raises(ValueError, match="line 1: unknown kind 'fast'"):
        read_markers("takes 3 s<!-- figure fast /(\\S+) s/ -->\n")
    with pytest.raises(ValueError, match="line 1: no number before"):
        read_markers("takes<!-- figure time /(\\S+) s/ -->\n")
    with pytest.raises(ValueError, match="must stand right before an output listing"):
        read_markers("<!-- figures\ntime /(\\S+) s/\n-->\ntext\n")
    with pytest.raises(ValueError, match="exactly one group"):
        read_markers("<!-- figures\ntime /\\S+ s/\n-->\n```\n3 s\n```\n")
    with pytest.raises(ValueError, match="is not in the listing"):
        figures("<!-- figures\ntime /(\\S+) ms/\n-->\n```\n3 s\n```\n", "3 ms", ROOT)


def test_the_commands_run_at_the_stated_sizes_with_only_the_port_substituted():
    from tests.test_docs import blocks
    block = blocks(at_stated_sizes(LESSON))[0]
    assert block["code"].startswith("ps-train --steps 300 --port :{port}")


def test_every_lesson_is_found_and_its_markers_read():
    docs = lesson_files(None)
    assert [d.name for d in lesson_files([2])] == ["lesson2_data_parallel.md"]
    for doc in docs:
        assert read_markers(doc.read_text()), f"{doc.name} marks none of the numbers it quotes"
    with pytest.raises(SystemExit, match="no such lesson"):
        lesson_files([99])


def test_rows_are_told_apart_by_their_key_numbers_and_a_dash_is_not_checked():
    lesson = ("<!-- figures rows: key time - | key time -->\n```\n  server 0   reply   4.2  x 7\n"
              "  server 1   reply   9.0  x 7\n  server 2   reply   5.0  x -\n```\n")
    today = "  server 1   reply   8.0  x 1\n  server 2   reply   6.0  x -\n  server 0   reply   4.0  x 2\n"
    assert [(f.what, f.quoted, f.today) for f in figures(lesson, today, ROOT)] == [
        ("server reply x 0", "4.2", 4.0), ("server reply x 1", "9.0", 8.0), ("server reply x - 2", "5.0", 6.0)]


def test_a_regex_that_finds_a_word_instead_of_a_number_says_so(tmp_path):
    lesson = "a step takes 12.3 ms<!-- figure time /takes (\\S+) ms/ -->\n"
    [fig] = figures(lesson, "it takes ~13 ms\n", tmp_path)
    assert fig.today is None and "'~13'" in fig.error and "not a number" in fig.error
